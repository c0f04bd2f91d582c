"""OpenAI's Responses API (`POST /v1/responses`) as a translation layer over the chat route: a `ResponsesRequest`
(input items, instructions, flat function tools, text.format, reasoning.effort, max_output_tokens) becomes a
`ChatCompletionRequest` run by the chat pipeline, and its answer (or chunk stream) becomes a `response` object with
reasoning, message and function_call output items (or the Responses API's typed stream events).

Nothing is stored: `store` is accepted and ignored, `previous_response_id` is refused. Errors the chat pipeline
raises name the Responses field (`input`, `text.format`, `max_output_tokens`) rather than the chat one."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.json_schema import models_json_schema

from qwen35.serve.middleware import ERROR_RESPONSES, APIError, error_response
from qwen35.serve.protocol import MAX_LOGPROBS, ChatCompletionRequest, ChatCompletionResponse

logger = logging.getLogger(__name__)

Effort = Literal["none", "minimal", "low", "medium", "high", "xhigh"]
# Chat-request fields named differently here: a 400 from the chat pipeline names the Responses field.
_PARAMS = {"messages": "input", "response_format": "text.format", "max_completion_tokens": "max_output_tokens",
           "max_tokens": "max_output_tokens", "reasoning_effort": "reasoning.effort"}
# vLLM sampling extras passed to the chat request as they are
_EXTRAS = ("top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "seed", "stop",
           "ignore_eos", "min_tokens", "stop_token_ids", "logit_bias", "skip_special_tokens",
           "include_stop_str_in_output", "chat_template_kwargs")


class ReasoningConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")
    effort: Effort | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None  # accepted; no summaries are written


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")
    format: dict[str, Any] | None = None  # {"type": "text" | "json_object" | "json_schema", "name", "schema", ...}
    verbosity: Literal["low", "medium", "high"] | None = None


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["auto", "none", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    reasoning: ReasoningConfig | None = None
    text: TextConfig | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    # accepted and echoed or ignored: nothing is stored, no tier or truncation choice applies
    store: bool | None = None
    previous_response_id: str | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    truncation: Literal["auto", "disabled"] | None = None
    service_tier: str | None = None
    include: list[str] | None = None
    background: bool | None = None
    # vLLM extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None
    logit_bias: dict[str, float] | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None


def _text_of(parts, where: str) -> str:
    """A function_call_output's output: a string or a list of text parts."""
    if isinstance(parts, str):
        return parts
    if isinstance(parts, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in parts):
        return "".join(p["text"] for p in parts)
    raise APIError(400, f"{where} must be a string or a list of input_text parts", "input")


def _content(content, where: str):
    """Responses content parts -> chat content parts (text and image_url)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{where}.content must be a string or a list of content parts", "input")
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            parts.append({"type": "text", "text": part["refusal"]})
        elif kind == "input_image" and isinstance(part.get("image_url"), str):
            parts.append({"type": "image_url", "image_url": {"url": part["image_url"]}})
        elif kind == "input_image" and part.get("file_id") is not None:
            raise APIError(400, f"{where}.content[{j}]: images by file_id are not supported (this server stores no "
                                "files); send the image as image_url (a URL or a data: URL)", "input")
        else:
            raise APIError(400, f"{where}.content[{j}]: a content part of type {kind!r} is not supported (use "
                                "input_text, output_text or input_image with image_url)", "input")
    return parts


def _assistant(messages: list[dict], fresh: Callable[[dict], bool]) -> dict:
    """The assistant message the next output item of a previous turn belongs to: the last message when it is the
    assistant's and `fresh(it)` says it can take the item, else a new one. A turn's reasoning, message and
    function_call items become one chat message, as the chat template expects."""
    last = messages[-1] if messages else None
    if last is None or last["role"] != "assistant" or not fresh(last):
        last = {"role": "assistant", "content": ""}
        messages.append(last)
    return last


def input_messages(req: ResponsesRequest) -> list[dict]:
    """The chat messages of the request's instructions and input; a malformed item is a 400 naming it."""
    messages = [{"role": "system", "content": req.instructions}] if req.instructions is not None else []
    if isinstance(req.input, str):
        return messages + [{"role": "user", "content": req.input}]
    for i, item in enumerate(req.input):
        where = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise APIError(400, f"{where}.role must be one of user, system, developer, assistant; got {role!r}",
                               "input")
            content = _content(item.get("content"), where)
            if role == "assistant":
                msg = _assistant(messages, lambda m: not m["content"] and not m.get("tool_calls"))
                msg["content"] = content if isinstance(content, str) else "".join(p["text"] for p in content)
            else:
                messages.append({"role": "system" if role == "developer" else role, "content": content})
        elif kind == "reasoning":
            parts = item.get("content") or item.get("summary") or []
            text = "".join(p.get("text", "") for p in parts if isinstance(p, dict))
            if text:
                msg = _assistant(messages, lambda m: False)
                msg["reasoning_content"] = text
        elif kind == "function_call":
            if not all(isinstance(item.get(k), str) for k in ("call_id", "name", "arguments")):
                raise APIError(400, f"{where}: a function_call item needs string call_id, name and arguments",
                               "input")
            msg = _assistant(messages, lambda m: True)
            msg.setdefault("tool_calls", []).append({"id": item["call_id"], "type": "function", "function": {
                "name": item["name"], "arguments": item["arguments"]}})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise APIError(400, f"{where}: a function_call_output item needs a string call_id", "input")
            messages.append({"role": "tool", "tool_call_id": item["call_id"],
                             "content": _text_of(item.get("output"), f"{where}.output")})
        else:
            raise APIError(400, f"{where}: input items of type {kind!r} are not supported (use message, "
                                "function_call, function_call_output or reasoning)", "input")
    return messages


def _chat_tools(tools: list[dict] | None) -> list[dict] | None:
    if tools is None:
        return None
    out = []
    for i, tool in enumerate(tools):
        kind = tool.get("type")
        if kind != "function":
            raise APIError(400, f"tools[{i}]: tools of type {kind!r} are not supported (only function tools)",
                           "tools")
        if isinstance(tool.get("function"), dict):  # the chat API's nested shape, accepted too
            out.append(tool)
            continue
        if not isinstance(tool.get("name"), str):
            raise APIError(400, f'tools[{i}] must be {{"type": "function", "name": ..., "parameters": {{...}}}}',
                           "tools")
        fn = {k: tool[k] for k in ("name", "description", "parameters") if tool.get(k) is not None}
        out.append({"type": "function", "function": fn})
    return out


def _chat_tool_choice(choice):
    if choice is None or isinstance(choice, str):
        return choice
    if choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise APIError(400, 'tool_choice must be "auto", "none", "required" or {"type": "function", "name": ...}; '
                        f"got {json.dumps(choice)}", "tool_choice")


def _response_format(text: TextConfig | None) -> dict | None:
    fmt = text.format if text is not None else None
    if fmt is None or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if fmt.get("type") == "json_schema":
        schema = fmt.get("schema")
        if not isinstance(schema, (dict, bool)):
            raise APIError(400, 'text.format of type json_schema needs a "schema" (a JSON Schema object)',
                           "text.format.schema")
        return {"type": "json_schema", "json_schema": {"name": fmt.get("name", "response"), "schema": schema,
                                                       "strict": fmt.get("strict")}}
    raise APIError(400, f"text.format type {fmt.get('type')!r} is not one of 'text', 'json_object', 'json_schema'",
                   "text.format")


def chat_request(req: ResponsesRequest, model_name: str) -> ChatCompletionRequest:
    """The chat request that runs a Responses request (400s name the Responses field)."""
    if req.previous_response_id is not None:
        raise APIError(400, "previous_response_id is not supported: this server stores no responses; send the "
                            "whole conversation in input", "previous_response_id")
    if req.background:
        raise APIError(400, "background responses are not supported (nothing is stored to poll)", "background")
    body = {"model": req.model or model_name, "messages": input_messages(req), "tools": _chat_tools(req.tools),
            "tool_choice": _chat_tool_choice(req.tool_choice), "parallel_tool_calls": req.parallel_tool_calls,
            "max_completion_tokens": req.max_output_tokens, "temperature": req.temperature, "top_p": req.top_p,
            "response_format": _response_format(req.text), "user": req.user, "stream": req.stream,
            "stream_options": {"include_usage": True} if req.stream else None,
            "reasoning_effort": req.reasoning.effort if req.reasoning else None}
    body.update({k: getattr(req, k) for k in _EXTRAS if getattr(req, k) is not None})
    try:
        return ChatCompletionRequest.model_validate({k: v for k, v in body.items() if v is not None})
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        field = str(err["loc"][0]) if err["loc"] else None
        raise APIError(400, f"{field}: {err['msg']}", _PARAMS.get(field, field)) from None


def _renamed(e: APIError) -> APIError:
    """A chat pipeline's 400 with the Responses field's name."""
    param = _PARAMS.get(e.param, e.param)
    message = e.message
    if e.param in _PARAMS and message.startswith(e.param):
        message = param + message[len(e.param):]
    return APIError(e.status, message, param)


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def reasoning_item(item_id: str, text: str, status: str = "completed") -> dict:
    return {"type": "reasoning", "id": item_id, "summary": [], "content": [{"type": "reasoning_text", "text": text}],
            "status": status}


def text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def message_item(item_id: str, text: str | None, status: str = "completed") -> dict:
    return {"type": "message", "id": item_id, "role": "assistant", "status": status,
            "content": [] if text is None else [text_part(text)]}


def call_item(item_id: str, call_id: str, name: str, arguments: str, status: str = "completed") -> dict:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


class ResponseBuilder:
    """The `response` objects of one request: the request's settings echoed, plus output, status and usage."""

    def __init__(self, req: ResponsesRequest, model_name: str, count_tokens: Callable[[str], int]):
        self.id, self.created_at, self.count_tokens = _id("resp"), int(time.time()), count_tokens
        fmt = req.text.format if req.text is not None and req.text.format is not None else {"type": "text"}
        self.echo = {
            "model": req.model or model_name, "instructions": req.instructions, "metadata": req.metadata or {},
            "parallel_tool_calls": req.parallel_tool_calls is not False, "temperature": req.temperature,
            "top_p": req.top_p, "tool_choice": req.tool_choice or "auto", "tools": req.tools or [],
            "max_output_tokens": req.max_output_tokens, "text": {"format": fmt},
            "reasoning": req.reasoning.model_dump() if req.reasoning else None, "top_logprobs": req.top_logprobs,
            "truncation": req.truncation or "disabled", "service_tier": req.service_tier, "user": req.user,
            "previous_response_id": None, "background": False}

    def response(self, status: str, output: list[dict], finish_reason: str | None = None,
                 usage=None, reasoning: str = "") -> dict:
        """status "in_progress" while streaming; when done, "completed", or "incomplete" for finish_reason "length"
        ("failed" for an engine error)."""
        r = {"id": self.id, "object": "response", "created_at": self.created_at, "status": status,
             "error": None, "incomplete_details": None, "output": output, "usage": None, **self.echo}
        if status == "in_progress":
            return r
        r["completed_at"] = int(time.time())
        if finish_reason == "length":
            r["status"], r["incomplete_details"] = "incomplete", {"reason": "max_output_tokens"}
        elif finish_reason in ("error", "abort"):
            r["status"] = "failed"
            r["error"] = {"code": "server_error", "message": f"the generation ended with finish_reason "
                                                             f"{finish_reason!r}"}
        if usage is not None:
            cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
            # The engine does not tell reasoning tokens apart: counted by encoding the reasoning text again.
            r["usage"] = {"input_tokens": usage.prompt_tokens,
                          "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
                          "output_tokens": usage.completion_tokens,
                          "output_tokens_details": {"reasoning_tokens": min(
                              usage.completion_tokens, self.count_tokens(reasoning) if reasoning else 0)},
                          "total_tokens": usage.total_tokens}
        return r

    def from_chat(self, resp: ChatCompletionResponse) -> dict:
        """The finished response of a non-streamed chat answer."""
        choice = resp.choices[0]
        msg, output = choice.message, []
        status = "incomplete" if choice.finish_reason == "length" else "completed"
        if msg.reasoning_content:
            output.append(reasoning_item(_id("rs"), msg.reasoning_content))
        if msg.content:
            output.append(message_item(_id("msg"), msg.content))
        for call in msg.tool_calls:
            output.append(call_item(_id("fc"), call.id, call.function.name, call.function.arguments))
        if output:
            output[-1]["status"] = status  # the item the output was cut in
        return self.response("completed", output, choice.finish_reason, resp.usage, msg.reasoning_content or "")


class EventStream:
    """Chat chunk deltas -> the Responses API's stream events: each output item is added, filled by deltas and
    done before the next one starts; every event carries the next sequence number."""

    def __init__(self, builder: ResponseBuilder):
        self.builder, self.seq = builder, 0
        self.output: list[dict] = []  # finished items
        self.item: dict | None = None  # the item being streamed (its text in "text")
        self.reasoning = ""

    def event(self, kind: str, **fields) -> str:
        data = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"

    def _where(self) -> dict:
        return {"item_id": self.item["id"], "output_index": len(self.output)}

    def _open(self, kind: str, item: dict, part: dict | None = None) -> list[str]:
        events = self.close()
        self.item = {"kind": kind, "id": item["id"], "text": "", "call": item}
        events.append(self.event("response.output_item.added", output_index=len(self.output), item=item))
        if part is not None:
            events.append(self.event("response.content_part.added", **self._where(), content_index=0, part=part))
        return events

    def close(self, status: str = "completed") -> list[str]:
        """Finish the item being streamed (status "incomplete" when the output was cut at max_output_tokens)."""
        it, events = self.item, []
        if it is None:
            return events
        text, where = it["text"], self._where()
        if it["kind"] == "reasoning":
            item = reasoning_item(it["id"], text, status)
            events.append(self.event("response.reasoning_text.done", **where, content_index=0, text=text))
            events.append(self.event("response.content_part.done", **where, content_index=0,
                                     part={"type": "reasoning_text", "text": text}))
        elif it["kind"] == "message":
            item = message_item(it["id"], text, status)
            events.append(self.event("response.output_text.done", **where, content_index=0, text=text, logprobs=[]))
            events.append(self.event("response.content_part.done", **where, content_index=0, part=text_part(text)))
        else:
            call = it["call"]
            item = call_item(it["id"], call["call_id"], call["name"], text, status)
            events.append(self.event("response.function_call_arguments.done", **where, arguments=text))
        events.append(self.event("response.output_item.done", output_index=len(self.output), item=item))
        self.output.append(item)
        self.item = None
        return events

    def feed(self, delta) -> list[str]:
        events = []
        if delta.reasoning_content:
            if self.item is None or self.item["kind"] != "reasoning":
                events += self._open("reasoning", {"type": "reasoning", "id": _id("rs"), "summary": [], "content": [],
                                                   "status": "in_progress"},
                                     {"type": "reasoning_text", "text": ""})
            self.item["text"] += delta.reasoning_content
            self.reasoning += delta.reasoning_content
            events.append(self.event("response.reasoning_text.delta", **self._where(), content_index=0,
                                     delta=delta.reasoning_content))
        if delta.content:
            if self.item is None or self.item["kind"] != "message":
                events += self._open("message", message_item(_id("msg"), None, "in_progress"), text_part(""))
            self.item["text"] += delta.content
            events.append(self.event("response.output_text.delta", **self._where(), content_index=0,
                                     delta=delta.content, logprobs=[]))
        for tc in delta.tool_calls or []:
            fn = tc.get("function") or {}
            if tc.get("id"):  # a new call starts
                call_id = tc["id"]
                events += self._open("call", call_item("fc_" + call_id.removeprefix("call_"), call_id,
                                                       fn.get("name", ""), "", "in_progress"))
            if fn.get("arguments") and self.item is not None and self.item["kind"] == "call":
                self.item["text"] += fn["arguments"]
                events.append(self.event("response.function_call_arguments.delta", **self._where(),
                                         delta=fn["arguments"]))
        return events


async def response_events(chunks, builder: ResponseBuilder) -> AsyncIterator[str]:
    """The SSE events of a streamed response, from run_chat's chunk stream; an error after the headers went out
    becomes an `error` event, the stream's last."""
    st = EventStream(builder)
    try:
        yield st.event("response.created", response=builder.response("in_progress", []))
        yield st.event("response.in_progress", response=builder.response("in_progress", []))
        finish, usage = None, None
        async for ch in chunks:
            usage = ch.usage or usage
            for c in ch.choices:
                for e in st.feed(c.delta):
                    yield e
                finish = c.finish_reason or finish
        for e in st.close("incomplete" if finish == "length" else "completed"):
            yield e
        final = builder.response("completed", st.output, finish, usage, st.reasoning)
        kind = {"incomplete": "response.incomplete", "failed": "response.failed"}.get(final["status"],
                                                                                      "response.completed")
        yield st.event(kind, response=final)
    except Exception as e:
        logger.warning("response stream %s failed: %r", builder.id, e)
        status, message = (e.status, e.message) if isinstance(e, APIError) else (500, f"{type(e).__name__}: {e}")
        yield st.event("error", code="server_error" if status >= 500 else "invalid_request_error", message=message,
                       param=getattr(e, "param", None))
    finally:
        await chunks.aclose()


async def _parse(request: Request) -> ResponsesRequest:
    try:
        return ResponsesRequest.model_validate_json(await request.body())
    except ValidationError as e:  # the app's handler makes it a 400 naming the field
        raise RequestValidationError(e.errors(include_url=False, include_input=False)) from None


def install_responses_api(app: FastAPI, run_chat, model_name: str, count_tokens: Callable[[str], int]) -> None:
    """Register `POST /v1/responses` on the app. run_chat(ChatCompletionRequest, Request): the app's chat pipeline
    (a ChatCompletionResponse, None on disconnect, or a chunk stream); count_tokens(text): the number of tokens
    of a text (for usage's reasoning_tokens)."""

    @app.post("/v1/responses", responses=ERROR_RESPONSES)
    async def responses(request: Request):
        req = await _parse(request)
        builder = ResponseBuilder(req, model_name, count_tokens)
        try:
            result = await run_chat(chat_request(req, model_name), request)
        except APIError as e:
            raise _renamed(e) from None
        if req.stream:
            return StreamingResponse(response_events(result, builder), media_type="text/event-stream")
        if result is None:
            return error_response(499, "the client closed the connection")
        return builder.from_chat(result)

    generate = app.openapi

    def openapi():  # the route parses its own body: document it by hand
        first = app.openapi_schema is None
        schema = generate()
        if first:
            _, defs = models_json_schema([(ResponsesRequest, "validation")],
                                         ref_template="#/components/schemas/{model}")
            schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
            schema["paths"]["/v1/responses"]["post"]["requestBody"] = {"required": True, "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/ResponsesRequest"}}}}
        return schema

    app.openapi = openapi
