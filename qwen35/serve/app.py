"""The OpenAI-compatible HTTP app: chat and text completions (streamed as SSE or not), models, health, Prometheus
metrics, tokenize/detokenize. A thin layer over `AsyncEngine`; errors are OpenAI error bodies with HTTP statuses."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import re
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from qwen35.chat import assistant_message, render
from qwen35.chat_template import ChatTemplateError
from qwen35.engine.llm_engine import EngineError
from qwen35.multimodal.inputs import fetch_remote_media, prepare_prompt, split_chat_media
from qwen35.multimodal.items import MediaError
from qwen35.outputs import RequestOutput
from qwen35.sampling_params import SamplingParams, SamplingParamsError
from qwen35.serve.async_engine import AsyncEngine
from qwen35.serve.protocol import (ChatCompletionChoice, ChatCompletionChunk, ChatCompletionRequest,
                                   ChatCompletionResponse, ChatCompletionStreamChoice, ChatMessage, CompletionChoice,
                                   CompletionLogprobs, CompletionRequest, CompletionResponse, DeltaMessage,
                                   DetokenizeRequest, ErrorInfo, ErrorResponse, TokenizeRequest, Usage, random_id)
from qwen35.serve.reasoning import ReasoningStreamParser, is_thinking_prompt
from qwen35.serve.tool_calls import ToolCallStreamParser

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                413: "invalid_request_error", 503: "service_unavailable_error"}
_PROTECTED = ("/v1/", "/tokenize", "/detokenize")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorInfo(message=message, type=_ERROR_TYPES.get(status, "internal_error"),
                                         param=param, code=status))
    return JSONResponse(body.model_dump(), status_code=status)


def _bad_request(e: Exception) -> APIError:
    """A 400 for a client error raised below the HTTP layer; names the field when the message does."""
    m = re.match(r"SamplingParams\.(\w+)", str(e))
    return APIError(400, str(e), m.group(1) if m else None)


class _Guard:
    """ASGI middleware: API-key check (401) and request-body size limit (413) before any route runs."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.api_key and scope["path"].startswith(_PROTECTED):
            auth = headers.get(b"authorization", b"").decode("latin-1")
            token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                return await error_response(401, "missing or invalid API key")(scope, receive, send)
        if scope["method"] != "POST":
            return await self.app(scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return await self._too_large(scope, receive, send)
        body, more = b"", True  # read the body here so a chunked upload is bounded too
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:
                return await self._too_large(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send):
        response = error_response(413, f"request body exceeds {self.max_body_bytes} bytes")
        return await response(scope, receive, send)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        i = bisect_left(self.buckets, value)
        if i < len(self.counts):
            self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, acc = [f"# TYPE {name} histogram"], 0
        for le, n in zip(self.buckets, self.counts):
            acc += n
            out.append(f'{name}_bucket{{le="{le}"}} {acc}')
        out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum}", f"{name}_count {self.count}"]
        return out


class Metrics:
    def __init__(self):
        self.requests: Counter[str] = Counter()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft = Histogram((0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.itl = Histogram((0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))

    def render(self, engine: AsyncEngine) -> str:
        e = engine.engine
        lines = ["# TYPE qwen35_requests_total counter"]
        lines += [f'qwen35_requests_total{{status="{s}"}} {n}' for s, n in sorted(self.requests.items())]
        lines += ["# TYPE qwen35_prompt_tokens_total counter", f"qwen35_prompt_tokens_total {self.prompt_tokens}",
                  "# TYPE qwen35_generation_tokens_total counter",
                  f"qwen35_generation_tokens_total {self.generation_tokens}"]
        gauges = {"num_requests_running": engine.num_running, "num_requests_waiting": engine.num_waiting,
                  "kv_blocks_total": e.blocks.num_blocks, "kv_blocks_used": e.blocks.num_blocks - e.blocks.num_free,
                  "state_slots_total": e.slots.num_slots, "state_slots_used": e.slots.num_slots - e.slots.num_free}
        for name, value in gauges.items():
            lines += [f"# TYPE qwen35_{name} gauge", f"qwen35_{name} {value}"]
        lines += self.ttft.lines("qwen35_time_to_first_token_seconds")
        lines += self.itl.lines("qwen35_inter_token_latency_seconds")
        return "\n".join(lines) + "\n"


def _content(content: Any, role: str) -> Any:
    """OpenAI content parts -> one string, or a list of text and image/video placeholder parts when the message
    carries media (split_chat_media has already replaced image_url / video_url parts by placeholders)."""
    if not isinstance(content, list):
        return content
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind not in ("text", "image", "video"):
            raise APIError(400, f"{role} message content part of type {kind!r} is not supported (use text, "
                                "image_url or video_url)", "messages")
        parts.append({"type": "text", "text": part.get("text", "")} if kind == "text" else {"type": kind})
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def normalize_messages(messages: list[dict]) -> list[dict]:
    """Client messages -> what the chat template expects (string content, tool-call arguments as mappings)."""
    out = []
    for m in messages:
        m = dict(m)
        role = m.get("role")
        if role == "developer":
            m["role"] = role = "system"
        if "content" in m:
            m["content"] = _content(m["content"], role) if m["content"] is not None else ""
        if m.get("reasoning") is not None and m.get("reasoning_content") is None:
            m["reasoning_content"] = m.pop("reasoning")
        calls = []
        for call in m.get("tool_calls") or []:
            call = json.loads(json.dumps(call))
            fn = call.get("function") or {}
            if isinstance(fn.get("arguments"), str):
                try:
                    fn["arguments"] = json.loads(fn["arguments"] or "{}")
                except json.JSONDecodeError as e:
                    raise APIError(400, f"tool call arguments are not valid JSON: {e}", "messages") from None
            calls.append(call)
        if calls:
            m["tool_calls"] = calls
        out.append(m)
    return out


def chat_logprobs(c, start: int, k: int) -> dict | None:
    if c.logprobs is None:
        return None
    content = []
    for tok, entry in zip(c.token_ids[start:], c.logprobs[start:]):
        chosen = entry[tok]
        top = sorted(entry.values(), key=lambda lp: lp.rank or 0)[:k]
        content.append({"token": chosen.decoded_token or "", "logprob": chosen.logprob,
                        "bytes": list((chosen.decoded_token or "").encode()),
                        "top_logprobs": [{"token": t.decoded_token or "", "logprob": t.logprob,
                                          "bytes": list((t.decoded_token or "").encode())} for t in top]})
    return {"content": content}


def completion_logprobs(token_ids, entries, k: int, offset: int) -> CompletionLogprobs:
    lp = CompletionLogprobs()
    for tok, entry in zip(token_ids, entries):
        if entry is None:  # the first prompt token has no logprob
            lp.tokens.append("")
            lp.token_logprobs.append(None)
            lp.top_logprobs.append(None)
        else:
            chosen = entry[tok]
            lp.tokens.append(chosen.decoded_token or "")
            lp.token_logprobs.append(chosen.logprob)
            top = sorted(entry.values(), key=lambda x: x.rank or 0)[:k]
            lp.top_logprobs.append({t.decoded_token or "": t.logprob for t in top})
        lp.text_offset.append(offset)
        offset += len(lp.tokens[-1])
    return lp


def build_chat_choice(index: int, text: str, finish_reason: str | None, stop_reason, thinking: bool,
                      tools: list[dict] | None, logprobs: dict | None = None) -> ChatCompletionChoice:
    """One non-streamed chat choice from the raw completion text (reasoning and tool calls split off)."""
    msg = assistant_message(text, thinking, tools)
    calls = msg.get("tool_calls") or []
    if calls and finish_reason == "stop":
        finish_reason = "tool_calls"
    return ChatCompletionChoice(index=index, message=ChatMessage(content=msg["content"],
                                                                 reasoning_content=msg["reasoning_content"],
                                                                 tool_calls=calls),
                                logprobs=logprobs, finish_reason=finish_reason, stop_reason=stop_reason)


def forced_tool_call(tool_choice, tools) -> str:
    """The output prefix that makes the model call a tool: any tool for "required", the named one for
    {"type": "function", "function": {"name": ...}}; "" for "auto" / "none" / absent."""
    if tool_choice in (None, "auto", "none"):
        return ""
    if not tools:
        raise APIError(400, f"tool_choice {tool_choice!r} needs tools", "tool_choice")
    if tool_choice == "required":
        return "<tool_call>\n<function="
    name = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
    names = [t.get("function", {}).get("name") for t in tools]
    if name is None:
        raise APIError(400, f"tool_choice must be 'auto', 'none', 'required' or a named function, got "
                            f"{tool_choice!r}", "tool_choice")
    if name not in names:
        raise APIError(400, f"tool_choice names function {name!r}, which is not in tools", "tool_choice")
    return f"<tool_call>\n<function={name}>\n"


class ChatStreamState:
    """Turns one choice's text deltas into OpenAI delta dicts (reasoning, content, tool calls)."""

    def __init__(self, thinking: bool, tools: list[dict] | None):
        self.reasoning = ReasoningStreamParser(thinking)
        self.tools = ToolCallStreamParser(tools) if tools else None
        self.num_chars = self.num_tokens = 0
        self.done = False

    def _content(self, text: str, final: bool) -> list[dict]:
        if self.tools is None:
            return [{"content": text}] if text else []
        out = self.tools.feed(text) if text else []
        return out + (self.tools.finish() if final else [])

    def feed(self, text: str, final: bool) -> list[dict]:
        r = self.reasoning.feed(text)
        reasoning, content = r.reasoning, r.content
        if final:
            tail = self.reasoning.finish()
            reasoning, content = reasoning + tail.reasoning, content + tail.content
        out = [{"reasoning_content": reasoning}] if reasoning else []
        return out + self._content(content, final)


def _sse(model) -> str:
    return f"data: {model.model_dump_json(exclude_none=True)}\n\n"


def build_app(llm, served_model_name: str | None = None, api_key: str | None = None,
              default_chat_template_kwargs: dict | None = None, max_waiting: int = 256,
              max_body_bytes: int = 64 * 1024 * 1024, engine: AsyncEngine | None = None,
              escape_special_tokens: bool = False) -> FastAPI:
    engine = engine or AsyncEngine(llm)
    model_name = served_model_name or llm.model_path.name
    metrics = Metrics()
    tokenizer = llm.tokenizer

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        engine.shutdown()

    app = FastAPI(title="qwen35", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.engine, app.state.metrics = engine, metrics
    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=max_body_bytes)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        metrics.requests["error"] += 1
        return error_response(e.status, e.message, e.param)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):
        metrics.requests["error"] += 1
        errors = e.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return error_response(400, f"malformed JSON body: {first.get('ctx', {}).get('error', '')}".rstrip(": "))
        message = "; ".join(f"{'.'.join(str(p) for p in err.get('loc', ()) if p != 'body')}: {err.get('msg')}"
                            for err in errors)
        return error_response(400, message or "invalid request", loc[0] if loc else None)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail))

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {model_name!r}", "model")

    def check_capacity() -> None:
        if engine.num_waiting >= max_waiting:
            raise APIError(503, f"the server is busy ({engine.num_waiting} requests waiting); retry later")

    def make_params(req, **extra) -> SamplingParams:
        try:
            params = SamplingParams.from_optional(
                n=req.n, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
                repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty, seed=req.seed, stop=req.stop,
                stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos, min_tokens=req.min_tokens,
                skip_special_tokens=req.skip_special_tokens,
                include_stop_str_in_output=req.include_stop_str_in_output, **extra)
            return params.with_defaults(llm._generation_defaults())
        except SamplingParamsError as e:
            raise _bad_request(e) from None

    async def start(request_id: str, prompt_ids: list[int], params: SamplingParams, prompt: str | None, mm=None):
        check_capacity()
        try:
            stream = await engine.add_request(request_id, prompt_ids, params, prompt, mm)
        except (EngineError, SamplingParamsError, ValueError) as e:
            raise _bad_request(e) from None
        metrics.prompt_tokens += len(prompt_ids)
        return stream

    async def tracked(stream) -> AsyncIterator[RequestOutput]:
        """The stream's outputs, recording token counts, TTFT and inter-token latency; aborts on exit."""
        t0 = last = time.perf_counter()
        num_tokens, status = 0, "abort"
        try:
            async for out in stream:
                now, total = time.perf_counter(), sum(len(c.token_ids) for c in out.outputs)
                if total > num_tokens:
                    (metrics.ttft.observe(now - t0) if num_tokens == 0 else metrics.itl.observe(now - last))
                    metrics.generation_tokens += total - num_tokens
                    num_tokens, last = total, now
                if out.finished:
                    status = "success"
                yield out
        except Exception:
            status = "error"
            raise
        finally:
            stream.abort()
            metrics.requests[status] += 1

    def usage(out: RequestOutput) -> Usage:
        n_prompt, n_out = len(out.prompt_token_ids), sum(len(c.token_ids) for c in out.outputs)
        return Usage(prompt_tokens=n_prompt, completion_tokens=n_out, total_tokens=n_prompt + n_out)

    def max_tokens_for(requested: int | None, num_prompt: int) -> int:
        if requested is not None:
            return requested
        room = max(1, engine.engine.max_model_len - num_prompt)
        return min(room, llm._generation_defaults().get("max_tokens", room))

    @app.get("/health")
    async def health():
        return PlainTextResponse("")

    @app.get("/metrics")
    async def get_metrics():
        return PlainTextResponse(metrics.render(engine), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "qwen35", "root": str(llm.model_path),
                                            "max_model_len": engine.engine.max_model_len}]}

    def render_chat(messages, tools, template_kwargs, add_generation_prompt=True) -> tuple[str, list, list]:
        """(prompt, image sources, video sources): media parts become the template's placeholders."""
        kwargs = {**(default_chat_template_kwargs or {}), **(template_kwargs or {})}
        try:
            messages, images, videos = split_chat_media(messages)
        except MediaError as e:
            raise APIError(400, str(e), "messages") from None
        if (images or videos) and llm.processor_config is None:
            raise APIError(400, "this model takes text only (no vision tower); it cannot take images or videos",
                           "messages")
        try:
            return render(llm, normalize_messages(messages), tools, kwargs, add_generation_prompt,
                          escape_special_tokens), images, videos
        except (ChatTemplateError, ValueError) as e:
            raise APIError(400, f"cannot render the chat template: {e}", "messages") from None

    async def with_media(prompt_ids: list[int], images: list, videos: list):
        """Fetch, decode and process the media (off the event loop) and expand the prompt's placeholders."""
        if not images and not videos:
            return prompt_ids, None
        try:
            images, videos = await fetch_remote_media(images, videos, llm.media_policy, llm.media_limits)
            return await asyncio.to_thread(prepare_prompt, prompt_ids, images, videos, llm.model_config,
                                           llm.processor_config, tokenizer.encode, llm.media_limits,
                                           llm.media_policy)
        except ValueError as e:  # MediaError and placeholder mismatches: the client's input
            raise APIError(400, str(e), "messages") from None

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of 'prompt' and 'messages'", "prompt")
        if req.prompt is not None:
            ids = tokenizer.encode(req.prompt)
        else:
            text, images, videos = render_chat(req.messages, None, req.chat_template_kwargs, req.add_generation_prompt)
            ids, _ = await with_media(tokenizer.encode(text), images, videos)
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.engine.max_model_len}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        check_model(req.model)
        bad = [t for t in req.tokens if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary", "tokens")
        return {"prompt": tokenizer.decode(req.tokens)}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest):
        check_model(req.model)
        if req.response_format and req.response_format.get("type") not in (None, "text"):
            raise APIError(400, f"response_format {req.response_format.get('type')!r} is not supported "
                                "(no guided decoding); only 'text'", "response_format")
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", "top_logprobs")
        call_prefix = forced_tool_call(req.tool_choice, req.tools)
        parse_tools = req.tools if req.tools and req.tool_choice != "none" else None
        prompt, images, videos = render_chat(req.messages, req.tools, req.chat_template_kwargs)
        thinking = is_thinking_prompt(prompt)
        # A forced call is written into the prompt (after closing an open think block); the parsers see it as the
        # start of the output.
        forced = ("\n</think>\n\n" if thinking and call_prefix else "") + call_prefix
        prompt += forced
        prompt_ids, mm = await with_media(tokenizer.encode(prompt), images, videos)
        k = req.top_logprobs or 0
        params = make_params(req, max_tokens=max_tokens_for(req.max_completion_tokens or req.max_tokens,
                                                            len(prompt_ids)),
                             logprobs=k if req.logprobs else None)
        request_id = random_id("chatcmpl")
        stream = tracked(await start(request_id, prompt_ids, params, prompt, mm))
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(chat_stream(request_id, stream, params.n, thinking, parse_tools, k,
                                                 include_usage, forced), media_type="text/event-stream")
        final = None
        try:
            async for out in stream:
                final = out
        finally:
            await stream.aclose()
        choices = [build_chat_choice(c.index, forced + c.text, c.finish_reason, c.stop_reason, thinking, parse_tools,
                                     chat_logprobs(c, 0, k)) for c in final.outputs]
        return ChatCompletionResponse(id=request_id, model=model_name, choices=choices, usage=usage(final))

    async def chat_stream(request_id, stream, n, thinking, tools, k, include_usage, forced=""):
        states = [ChatStreamState(thinking, tools) for _ in range(n)]

        def chunk(index, delta, logprobs=None, finish_reason=None):
            return _sse(ChatCompletionChunk(id=request_id, model=model_name, choices=[ChatCompletionStreamChoice(
                index=index, delta=DeltaMessage(**delta), logprobs=logprobs, finish_reason=finish_reason)]))

        try:
            for i in range(n):
                yield chunk(i, {"role": "assistant", "content": ""})
                for d in states[i].feed(forced, False) if forced else []:
                    yield chunk(i, d)
            last = None
            async for out in stream:
                last = out
                for c in out.outputs:
                    st = states[c.index]
                    if st.done:
                        continue
                    final = c.finish_reason is not None
                    deltas = st.feed(c.text[st.num_chars:], final)
                    logprobs = chat_logprobs(c, st.num_tokens, k)
                    st.num_chars, st.num_tokens = len(c.text), len(c.token_ids)
                    for j, d in enumerate(deltas):
                        yield chunk(c.index, d, logprobs if j == 0 else None)
                    if not deltas and logprobs and logprobs["content"]:
                        yield chunk(c.index, {}, logprobs)
                    if final:
                        st.done = True
                        reason = c.finish_reason
                        if st.tools is not None and st.tools.has_tool_calls and reason == "stop":
                            reason = "tool_calls"
                        yield chunk(c.index, {}, finish_reason=reason)
            if include_usage and last is not None:
                yield _sse(ChatCompletionChunk(id=request_id, model=model_name, choices=[], usage=usage(last)))
            yield "data: [DONE]\n\n"
        finally:
            await stream.aclose()

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        check_model(req.model)
        if req.suffix:
            raise APIError(400, "suffix is not supported", "suffix")
        p = req.prompt
        if isinstance(p, str) or (p and all(isinstance(t, int) for t in p)):
            prompts = [p]
        else:
            prompts = list(p)
        if not prompts:
            raise APIError(400, "the prompt is empty", "prompt")
        if req.stream and len(prompts) > 1:
            raise APIError(400, "streaming takes one prompt per request", "prompt")
        items = []
        for prompt in prompts:
            if isinstance(prompt, str):
                items.append((prompt, tokenizer.encode(prompt)))
            else:
                items.append((None, list(prompt)))
        k = req.logprobs
        results = []
        request_id = random_id("cmpl")
        for i, (text, ids) in enumerate(items):
            params = make_params(req, max_tokens=req.max_tokens if req.max_tokens is not None else 16,
                                 logprobs=k, prompt_logprobs=k if (req.echo and k is not None) else None)
            rid = request_id if len(items) == 1 else f"{request_id}-{i}"
            try:
                results.append(tracked(await start(rid, ids, params, text)))
            except BaseException:
                for s in results:
                    await s.aclose()
                raise
        echoes = [(text if text is not None else tokenizer.decode(ids)) if req.echo else "" for text, ids in items]
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(completion_stream(request_id, results[0], echoes[0], k, include_usage),
                                     media_type="text/event-stream")
        finals = []
        for s in results:
            final = None
            try:
                async for out in s:
                    final = out
            finally:
                await s.aclose()
            finals.append(final)
        choices, total = [], Usage()
        for i, (out, echo) in enumerate(zip(finals, echoes)):
            u = usage(out)
            total = Usage(prompt_tokens=total.prompt_tokens + u.prompt_tokens,
                          completion_tokens=total.completion_tokens + u.completion_tokens,
                          total_tokens=total.total_tokens + u.total_tokens)
            for c in out.outputs:
                logprobs = None
                if k is not None:
                    ids, entries = list(c.token_ids), list(c.logprobs or [])
                    if echo:
                        ids, entries = list(out.prompt_token_ids) + ids, list(out.prompt_logprobs or []) + entries
                    logprobs = completion_logprobs(ids, entries, k, 0)
                choices.append(CompletionChoice(index=i * len(out.outputs) + c.index, text=echo + c.text,
                                                logprobs=logprobs, finish_reason=c.finish_reason,
                                                stop_reason=c.stop_reason))
        return CompletionResponse(id=request_id, model=model_name, choices=choices, usage=total)

    async def completion_stream(request_id, stream, echo, k, include_usage):
        sent: dict[int, tuple[int, int]] = {}

        def chunk(index, text, logprobs=None, finish_reason=None):
            return _sse(CompletionResponse(id=request_id, model=model_name, choices=[CompletionChoice(
                index=index, text=text, logprobs=logprobs, finish_reason=finish_reason)]))

        try:
            last = None
            async for out in stream:
                last = out
                for c in out.outputs:
                    if c.index not in sent:
                        sent[c.index] = (0, 0)
                        if echo:
                            yield chunk(c.index, echo)
                    chars, toks = sent[c.index]
                    if chars < 0:
                        continue
                    logprobs = (completion_logprobs(c.token_ids[toks:], (c.logprobs or [])[toks:], k, chars)
                                if k is not None else None)
                    if len(c.text) > chars or c.finish_reason:
                        yield chunk(c.index, c.text[chars:], logprobs, c.finish_reason)
                    sent[c.index] = (-1, 0) if c.finish_reason else (len(c.text), len(c.token_ids))
            if include_usage and last is not None:
                yield _sse(CompletionResponse(id=request_id, model=model_name, choices=[], usage=usage(last)))
            yield "data: [DONE]\n\n"
        finally:
            await stream.aclose()

    return app
