"""The OpenAI-compatible HTTP app: chat and text completions (streamed as SSE or not), models, health (/health,
/ping), version, Prometheus metrics, tokenize/detokenize. A thin layer over `AsyncEngine`;
errors are OpenAI error bodies with HTTP statuses.

The routes parse and validate their own JSON bodies, and render and tokenize prompts, in worker threads, so one
large request cannot stall the event loop (the health check, other streams). A client that disconnects has its
requests aborted, streamed or not."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema

import qwen35
from qwen35.chat import final_message_text
from qwen35.engine.llm_engine import EngineError, RequestFailed
from qwen35.engine.structured import StructuredOutputError
from qwen35.multimodal.inputs import fetch_remote_media, prepare_prompt
from qwen35.outputs import RequestOutput
from qwen35.sampling_params import SamplingParams, SamplingParamsError
from qwen35.serve.async_engine import AsyncEngine
from qwen35.serve.metrics import Metrics
from qwen35.serve.middleware import (ERROR_RESPONSES, APIError, Guard, InFlight, check_api_key, error_response,
                                     install_error_handlers)
from qwen35.serve.constraints import request_constraint
from qwen35.serve.prompts import Prompts, default_max_body_bytes
from qwen35.serve.protocol import (ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse,
                                   ChatCompletionStreamChoice, CompletionChoice, CompletionRequest,
                                   CompletionResponse, DeltaMessage, DetokenizeRequest, PromptTokensDetails,
                                   TokenizeRequest, Usage, random_id)
from qwen35.serve.reasoning import is_thinking_prompt
from qwen35.serve.responses import ChatStreamState, build_chat_choice, chat_logprobs, completion_logprobs, sse
from qwen35.serve.responses_api import install_responses_api

logger = logging.getLogger(__name__)

_SMALL_BODY = 1 << 16  # bodies below this are parsed on the event loop (a thread hop costs more)


def _bad_request(e: Exception) -> APIError:
    """A 400 for a client error raised below the HTTP layer; names the field when the message does."""
    m = re.match(r"SamplingParams\.(\w+)", str(e))
    return APIError(400, str(e), m.group(1) if m else None)


async def parse_body(request: Request, model: type[BaseModel]):
    body = await request.body()
    try:
        if len(body) < _SMALL_BODY:
            return model.model_validate_json(body)
        return await asyncio.to_thread(model.model_validate_json, body)
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False, include_input=False)) from None


async def _until_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work):
    """Await the coroutine `work`, cancelling it (which aborts its engine requests) if the client disconnects first;
    returns None then."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_until_disconnect(request.receive))
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait((task,))  # let its cleanup (the aborts) run
    return None if task.cancelled() else task.result()


def sse_error(e: Exception) -> str:
    """The last event of a stream that failed after its headers were sent, as vLLM sends it."""
    status, message = (e.status, e.message) if isinstance(e, APIError) else (500, f"{type(e).__name__}: {e}")
    return f"data: {json.dumps({'error': {'message': message, 'type': 'internal_error', 'code': status}})}\n\n"


def _document_bodies(app: FastAPI, bodies: dict[str, type[BaseModel]]) -> None:
    """The routes parse their own bodies, so FastAPI does not see the request models: put them in the OpenAPI
    document by hand."""
    generate = app.openapi

    def openapi():
        if app.openapi_schema is None:
            schema = generate()
            _, defs = models_json_schema([(m, "validation") for m in bodies.values()],
                                         ref_template="#/components/schemas/{model}")
            schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
            for path, model in bodies.items():
                schema["paths"][path]["post"]["requestBody"] = {"required": True, "content": {"application/json": {
                    "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
        return app.openapi_schema

    app.openapi = openapi


def build_app(llm, served_model_name: str | None = None, api_key: str | None = None,
              default_chat_template_kwargs: dict | None = None, max_waiting: int = 256,
              max_body_bytes: int | None = None, engine: AsyncEngine | None = None, public_metrics: bool = False,
              body_timeout: float = 60.0, escape_special_tokens: bool = False, max_media_jobs: int = 2,
              warm_up_grammars: bool = False) -> FastAPI:
    """max_body_bytes: None derives it from the context length (see prompts.default_max_body_bytes).
    api_key: required on every route but /health, /ping and /version (and /metrics when public_metrics);
    compared as UTF-8 bytes.
    body_timeout: seconds a client has to send its whole request body (408 after).
    max_media_jobs: requests whose media are decoded and preprocessed at once (each at most one source image or
    video frame at full size at a time); the others wait their turn, so media memory in flight stays bounded.
    warm_up_grammars: build the structured-output tokenizer in the background now (seconds for a full vocabulary)
    rather than on the first constrained request."""
    check_api_key(api_key)
    if max_media_jobs < 1:
        raise ValueError(f"max_media_jobs must be at least 1, got {max_media_jobs}")
    media_jobs = asyncio.Semaphore(max_media_jobs)
    engine = engine or AsyncEngine(llm)
    model_name = served_model_name or llm.model_path.name
    tokenizer = llm.tokenizer
    max_model_len = engine.engine.max_model_len
    metrics = Metrics(model_name, max_model_len)
    structured = engine.engine.structured
    if warm_up_grammars:
        structured.warm_up()
    prompts = Prompts(llm, max_model_len, default_chat_template_kwargs, escape_special_tokens)
    if max_body_bytes is None:
        max_body_bytes = default_max_body_bytes(max_model_len, prompts.max_token_bytes,
                                                llm.media_limits.max_image_bytes if llm.processor_config else None)

    in_flight = InFlight()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        # uvicorn cancels what still runs when its graceful-shutdown time is up: let those requests send their 503
        await in_flight.wait_idle(timeout=2.0)
        await asyncio.to_thread(engine.shutdown)

    app = FastAPI(title="qwen35", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.engine, app.state.metrics, app.state.max_body_bytes = engine, metrics, max_body_bytes
    open_paths = ("/health", "/ping", "/version") + (("/metrics",) if public_metrics else ())
    app.add_middleware(Guard, api_key=api_key, open_paths=open_paths,
                       max_body_bytes=max_body_bytes, body_timeout=body_timeout, in_flight=in_flight)
    install_error_handlers(app, lambda: metrics.requests.update(["error"]))
    _document_bodies(app, {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest,
                           "/tokenize": TokenizeRequest, "/detokenize": DetokenizeRequest})

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {model_name!r}", "model")

    def check_capacity(n: int) -> None:
        if n > max_waiting:
            raise APIError(400, f"n={n} sequences is more than this server queues ({max_waiting})", "n")
        if engine.num_waiting + n > max_waiting:
            raise APIError(503, f"the server is busy ({engine.num_waiting} requests waiting); retry later")

    def make_params(req, **extra) -> SamplingParams:
        try:
            params = SamplingParams.from_optional(
                logit_bias=req.logit_bias, allowed_token_ids=req.allowed_token_ids,
                truncate_prompt_tokens=req.truncate_prompt_tokens,
                n=req.n, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
                repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty, seed=req.seed, stop=req.stop,
                stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos, min_tokens=req.min_tokens,
                skip_special_tokens=req.skip_special_tokens,
                include_stop_str_in_output=req.include_stop_str_in_output, **extra)
            return params.with_defaults(llm._generation_defaults())
        except SamplingParamsError as e:
            raise _bad_request(e) from None

    async def constraint_of(req, tools=None):
        """The request's output constraint, compiled (and cached) here, off the engine's thread, so that a bad
        schema is a 400 naming its field before anything is queued."""
        constraint, field = request_constraint(req, tools, tokenizer.added_tokens)
        if constraint is not None:
            try:
                await asyncio.to_thread(structured.compile, constraint)
            except StructuredOutputError as e:
                raise APIError(400, f"{field}: {e}", field) from None
        return constraint

    async def start(request_id: str, prompt_ids: list[int], params: SamplingParams, prompt: str | None, mm=None):
        check_capacity(params.n)
        try:
            stream = await engine.add_request(request_id, prompt_ids, params, prompt, mm)
        except (EngineError, SamplingParamsError, ValueError) as e:
            raise _bad_request(e) from None
        metrics.prompt_tokens += len(prompt_ids)
        return stream

    async def tracked(stream) -> AsyncIterator[RequestOutput]:
        """The stream's outputs, recording token counts, TTFT and inter-token latency; aborts on exit."""
        t0 = last = time.perf_counter()
        num_tokens, status, out = 0, "abort", None
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
            if out is not None:
                reasons = [c.finish_reason if status == "success" else status for c in out.outputs]
                metrics.finish(time.perf_counter() - t0, len(out.prompt_token_ids), num_tokens, reasons)

    async def final_output(stream) -> RequestOutput:
        final = None
        try:
            async for out in stream:
                final = out
        except RequestFailed as e:  # the engine failed it alone (and logged why): the client gets the reason
            raise APIError(500, str(e)) from None
        finally:
            await stream.aclose()
        return final

    def usage(out: RequestOutput) -> Usage:
        n_prompt, n_out = len(out.prompt_token_ids), sum(len(c.token_ids) for c in out.outputs)
        return Usage(prompt_tokens=n_prompt, completion_tokens=n_out, total_tokens=n_prompt + n_out,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=out.num_cached_tokens))

    def max_tokens_for(requested: int | None, num_prompt: int) -> int:
        if requested is not None:
            return requested
        room = max(1, max_model_len - num_prompt)
        return min(room, llm._generation_defaults().get("max_tokens", room))

    async def with_media(prompt_ids: list[int], images: list, videos: list):
        """Fetch, decode and process the media (off the event loop) and expand the prompt's placeholders."""
        if not images and not videos:
            return prompt_ids, None
        try:
            images, videos = await fetch_remote_media(images, videos, llm.media_policy, llm.media_limits)
            async with media_jobs:
                return await asyncio.to_thread(prepare_prompt, prompt_ids, images, videos, llm.model_config,
                                               llm.processor_config, tokenizer.encode, llm.media_limits,
                                               llm.media_policy)
        except ValueError as e:  # MediaError and placeholder mismatches: the client's input
            raise APIError(400, str(e), "messages") from None

    @app.get("/health")
    async def health():
        return PlainTextResponse("")

    @app.api_route("/ping", methods=["GET", "POST"])
    async def ping():  # as vLLM (SageMaker's health check): /health under another name
        return PlainTextResponse("")

    @app.get("/version")
    async def version():
        return {"version": qwen35.__version__}

    @app.get("/metrics")
    async def get_metrics():
        return PlainTextResponse(metrics.render(engine), media_type="text/plain; version=0.0.4")

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": int(time.time()), "owned_by": "qwen35",
                "root": str(llm.model_path), "max_model_len": max_model_len}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", responses=ERROR_RESPONSES)
    async def get_model(model_id: str):  # ids may hold slashes (hub ids)
        check_model(model_id)
        return model_card()

    @app.post("/tokenize", responses=ERROR_RESPONSES)
    async def tokenize(request: Request):
        req = await parse_body(request, TokenizeRequest)
        check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of 'prompt' and 'messages'", "prompt")
        if req.prompt is not None:
            ids = await asyncio.to_thread(prompts.encode, req.prompt, None)
        else:
            text, images, videos = await asyncio.to_thread(prompts.render_chat, req.messages, None,
                                                           req.chat_template_kwargs, req.add_generation_prompt)
            ids, _ = await with_media(await asyncio.to_thread(prompts.encode, text, None), images, videos)
        return {"tokens": ids, "count": len(ids), "max_model_len": max_model_len}

    @app.post("/detokenize", responses=ERROR_RESPONSES)
    async def detokenize(request: Request):
        req = await parse_body(request, DetokenizeRequest)
        check_model(req.model)
        bad = [t for t in req.tokens if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary", "tokens")
        return {"prompt": await asyncio.to_thread(tokenizer.decode, req.tokens)}

    @app.post("/v1/chat/completions", responses=ERROR_RESPONSES)
    async def chat_completions(request: Request):
        req = await parse_body(request, ChatCompletionRequest)
        result = await run_chat(req, request)
        if req.stream:
            return StreamingResponse(sse_stream(result), media_type="text/event-stream")
        return result if result is not None else error_response(499, "the client closed the connection")

    async def sse_stream(chunks) -> AsyncIterator[str]:
        """Server-sent events of a chat stream; an error after the headers went out becomes its last event."""
        try:
            async for ch in chunks:
                yield sse(ch)
        except Exception as e:
            logger.warning("stream failed: %r", e)
            yield sse_error(e)
        finally:
            await chunks.aclose()
        yield "data: [DONE]\n\n"

    async def run_chat(req: ChatCompletionRequest, request: Request):
        """A validated chat request, run: the ChatCompletionResponse (None if the client disconnected first), or
        with req.stream an async iterator of ChatCompletionChunk (close it when not read to the end). The
        Responses API runs on this too."""
        check_model(req.model)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", "top_logprobs")
        if req.continue_final_message and req.add_generation_prompt:
            raise APIError(400, "continue_final_message needs add_generation_prompt=false", "continue_final_message")
        constraint = await constraint_of(req, req.tools)
        forced_call = req.tool_choice not in (None, "auto", "none")
        parse_tools = req.tools if req.tools and req.tool_choice != "none" else None
        kwargs = dict(req.chat_template_kwargs or {})
        if req.reasoning_effort is not None and "enable_thinking" not in kwargs:
            kwargs["enable_thinking"] = req.reasoning_effort not in ("none", "minimal")
        prompt, images, videos = await asyncio.to_thread(prompts.render_chat, req.messages, req.tools, kwargs,
                                                         req.add_generation_prompt, req.continue_final_message)
        thinking = is_thinking_prompt(prompt)
        # A forced call starts right away: an open think block is closed in the prompt, so the grammar (which only
        # applies after the thinking) constrains the first token on.
        prefix = "\n</think>\n\n" if thinking and forced_call else ""
        prompt += prefix
        prompt_ids = await asyncio.to_thread(prompts.encode, prompt, "messages")
        prompt_ids, mm = await with_media(prompt_ids, images, videos)
        echo = ""
        if req.echo and req.messages and (not req.add_generation_prompt or req.messages[-1].get("role") == "assistant"):
            echo = final_message_text(req.messages)
        k = req.top_logprobs or 0
        params = make_params(req, max_tokens=max_tokens_for(req.max_completion_tokens or req.max_tokens,
                                                            len(prompt_ids)),
                             logprobs=k if req.logprobs else None, structured_outputs=constraint)
        request_id = random_id("chatcmpl")
        stream = tracked(await start(request_id, prompt_ids, params, prompt, mm))
        single_call = req.parallel_tool_calls is False
        if req.stream:
            so = req.stream_options
            return chat_chunks(request_id, stream, params.n, thinking, parse_tools, k,
                               bool(so and so.include_usage), bool(so and so.continuous_usage_stats), prefix, echo,
                               single_call)
        final = await unless_disconnected(request, final_output(stream))
        if final is None:
            return None
        choices = [build_chat_choice(c.index, prefix + c.text, c.finish_reason, c.stop_reason, thinking, parse_tools,
                                     chat_logprobs(c, 0, k), echo, single_call) for c in final.outputs]
        return ChatCompletionResponse(id=request_id, model=model_name, choices=choices, usage=usage(final))

    async def chat_chunks(request_id, stream, n, thinking, tools, k, include_usage, continuous_usage, prefix="",
                          echo="", single_call=False) -> AsyncIterator[ChatCompletionChunk]:
        states = [ChatStreamState(thinking, tools, single_call) for _ in range(n)]
        now = {"usage": None}

        def chunk(index, delta, logprobs=None, finish_reason=None, stop_reason=None):
            return ChatCompletionChunk(id=request_id, model=model_name, usage=now["usage"], choices=[
                ChatCompletionStreamChoice(index=index, delta=DeltaMessage(**delta), logprobs=logprobs,
                                           finish_reason=finish_reason, stop_reason=stop_reason)])

        def opening():  # each choice's role chunk, and the deltas of the prompt's forced prefix
            for i in range(n):
                yield chunk(i, {"role": "assistant", "content": echo})
                yield from (chunk(i, d) for d in (states[i].feed(prefix, False) if prefix else []))

        try:
            # With usage on every chunk, the opening waits for the (truncated) prompt's length, as in vLLM.
            for ch in () if continuous_usage else opening():
                yield ch
            last = None
            async for out in stream:
                if continuous_usage:
                    if last is None:
                        now["usage"] = usage(out).model_copy(update={"completion_tokens": 0,
                                                                     "total_tokens": len(out.prompt_token_ids)})
                        for ch in opening():
                            yield ch
                    now["usage"] = usage(out)
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
                        yield chunk(c.index, {}, finish_reason=reason, stop_reason=c.stop_reason)
            if include_usage and last is not None:
                yield ChatCompletionChunk(id=request_id, model=model_name, choices=[], usage=usage(last))
        finally:
            await stream.aclose()

    def completion_inputs(prompts_in, echo: bool) -> list[tuple[str | None, list[int], str | None]]:
        """(prompt text or None, prompt ids, text to echo or None) per prompt; runs in a worker thread."""
        items = []
        for p in prompts_in:
            if isinstance(p, str):
                items.append((p, prompts.encode(p, "prompt"), p if echo else None))
            else:
                items.append((None, list(p), tokenizer.decode(p) if echo else None))
        return items

    @app.post("/v1/completions", responses=ERROR_RESPONSES)
    async def completions(request: Request):
        req = await parse_body(request, CompletionRequest)
        check_model(req.model)
        if req.suffix:
            raise APIError(400, "suffix is not supported", "suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise APIError(400, "best_of other than n is not supported", "best_of")
        p = req.prompt
        prompts_in = [p] if isinstance(p, str) or (p and all(isinstance(t, int) for t in p)) else list(p)
        if not prompts_in:
            raise APIError(400, "the prompt is empty", "prompt")
        if req.stream and len(prompts_in) > 1:
            raise APIError(400, "streaming takes one prompt per request", "prompt")
        items = await asyncio.to_thread(completion_inputs, prompts_in, req.echo)
        k = req.logprobs
        results = []
        request_id = random_id("cmpl")
        constraint = await constraint_of(req)
        for i, (text, ids, _) in enumerate(items):
            params = make_params(req, max_tokens=req.max_tokens if req.max_tokens is not None else 16,
                                 structured_outputs=constraint,
                                 logprobs=k, prompt_logprobs=k if (req.echo and k is not None) else None)
            rid = request_id if len(items) == 1 else f"{request_id}-{i}"
            try:
                results.append(tracked(await start(rid, ids, params, text)))
            except BaseException:
                for s in results:
                    await s.aclose()
                raise
        echoes = [echo for _, _, echo in items]
        if req.stream:
            so = req.stream_options
            return StreamingResponse(completion_stream(request_id, results[0], echoes[0], k,
                                                       bool(so and so.include_usage),
                                                       bool(so and so.continuous_usage_stats)),
                                     media_type="text/event-stream")

        async def finals():
            return [await final_output(s) for s in results]

        outs = await unless_disconnected(request, finals())
        if outs is None:
            return error_response(499, "the client closed the connection")
        choices, total = [], Usage()
        for i, (out, echo) in enumerate(zip(outs, echoes)):
            u = usage(out)
            cached = (total.prompt_tokens_details.cached_tokens if total.prompt_tokens_details else 0) + \
                u.prompt_tokens_details.cached_tokens
            total = Usage(prompt_tokens=total.prompt_tokens + u.prompt_tokens,
                          completion_tokens=total.completion_tokens + u.completion_tokens,
                          total_tokens=total.total_tokens + u.total_tokens,
                          prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))
            for c in out.outputs:
                ids, entries = completion_tokens(out, c, 0, echo)
                logprobs = completion_logprobs(ids, entries, k, 0, decode_one) if k is not None else None
                choices.append(CompletionChoice(index=i * len(out.outputs) + c.index, text=(echo or "") + c.text,
                                                logprobs=logprobs, finish_reason=c.finish_reason,
                                                stop_reason=c.stop_reason))
        return CompletionResponse(id=request_id, model=model_name, choices=choices, usage=total)

    def decode_one(token_id: int) -> str:
        return tokenizer.decode([token_id])

    def completion_tokens(out: RequestOutput, c, start: int, echo: str | None) -> tuple[list, list]:
        """The choice's token ids and logprob entries from its `start`-th output token on, behind the prompt's
        when `echo` is given."""
        ids, entries = list(c.token_ids[start:]), list((c.logprobs or [])[start:])
        if echo is not None:
            ids, entries = list(out.prompt_token_ids) + ids, list(out.prompt_logprobs or []) + entries
        return ids, entries

    async def completion_stream(request_id, stream, echo, k, include_usage, continuous_usage=False):
        # per choice: (characters of its text sent, tokens sent, text offset of the next token); None once done
        sent: dict[int, tuple[int, int, int] | None] = {}
        last = None

        def chunk(index, text, logprobs=None, finish_reason=None, stop_reason=None):
            return sse(CompletionResponse(id=request_id, model=model_name, choices=[CompletionChoice(
                index=index, text=text, logprobs=logprobs, finish_reason=finish_reason, stop_reason=stop_reason)],
                usage=usage(last) if continuous_usage else None))

        try:
            async for out in stream:
                last = out
                if echo is not None and k is not None and len(out.prompt_logprobs or []) < len(out.prompt_token_ids):
                    continue  # the prompt's logprobs are not all in yet; outputs are cumulative, nothing is lost
                for c in out.outputs:
                    first = c.index not in sent
                    if not first and sent[c.index] is None:
                        continue
                    chars, toks, offset = sent.get(c.index) or (0, 0, 0)
                    text = (echo if first and echo is not None else "") + c.text[chars:]
                    logprobs = None
                    if k is not None:
                        ids, entries = completion_tokens(out, c, toks, echo if first else None)
                        logprobs = completion_logprobs(ids, entries, k, offset, decode_one)
                        if logprobs.tokens:
                            offset = logprobs.text_offset[-1] + len(logprobs.tokens[-1])
                    if text or c.finish_reason or (logprobs and logprobs.tokens):
                        yield chunk(c.index, text, logprobs, c.finish_reason, c.stop_reason)
                    sent[c.index] = None if c.finish_reason else (len(c.text), len(c.token_ids), offset)
            if include_usage and last is not None:
                yield sse(CompletionResponse(id=request_id, model=model_name, choices=[], usage=usage(last)))
        except Exception as e:  # the headers are sent: the error becomes the stream's last event
            logger.warning("stream %s failed: %r", request_id, e)
            yield sse_error(e)
        finally:
            await stream.aclose()
        yield "data: [DONE]\n\n"

    install_responses_api(app, run_chat, model_name, lambda text: len(tokenizer.encode(text)))
    return app
