"""What every route of the server shares: the request-level helpers (parsing a body off the event loop, aborting on
disconnect, SSE error events) and `ServerContext`, the served model's state (LLM, engine thread, metrics, prompt
renderer, media-job semaphore) with the steps of a request common to the chat and completion routes: checking the
model name and queue room, building SamplingParams, compiling an output constraint, queueing into the engine, and
reading its outputs back (with metrics)."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from qwen35.engine.llm_engine import EngineError, RequestFailed
from qwen35.engine.structured import StructuredOutputError
from qwen35.multimodal.inputs import fetch_remote_media, prepare_prompt
from qwen35.outputs import RequestOutput
from qwen35.sampling_params import SamplingParams, SamplingParamsError
from qwen35.serve.async_engine import AsyncEngine
from qwen35.serve.constraints import request_constraint
from qwen35.serve.metrics import Metrics
from qwen35.serve.middleware import APIError
from qwen35.serve.prompts import Prompts
from qwen35.serve.protocol import PromptTokensDetails, Usage

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


class ServerContext:
    """The served model and the request steps the routes share (`request.app.state.ctx`)."""

    def __init__(self, llm, engine: AsyncEngine, model_name: str, prompts: Prompts, metrics: Metrics,
                 max_waiting: int, max_media_jobs: int):
        self.llm, self.engine, self.model_name, self.prompts, self.metrics = llm, engine, model_name, prompts, metrics
        self.tokenizer, self.max_model_len, self.structured = llm.tokenizer, engine.max_model_len, engine.structured
        self.max_waiting = max_waiting
        self.media_jobs = asyncio.Semaphore(max_media_jobs)

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}", "model")

    def check_capacity(self, n: int) -> None:
        if n > self.max_waiting:
            raise APIError(400, f"n={n} sequences is more than this server queues ({self.max_waiting})", "n")
        if self.engine.num_waiting + n > self.max_waiting:
            raise APIError(503, f"the server is busy ({self.engine.num_waiting} requests waiting); retry later")

    def make_params(self, req, max_tokens: int | None, **extra) -> SamplingParams:
        """The request's SamplingParams over the generation config's defaults; max_tokens None leaves the length to
        the engine (the room left in the context)."""
        try:
            params = SamplingParams.from_optional(
                keep_none=("max_tokens",), max_tokens=max_tokens, logit_bias=req.logit_bias,
                allowed_token_ids=req.allowed_token_ids,
                truncate_prompt_tokens=req.truncate_prompt_tokens,
                n=req.n, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
                repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty, seed=req.seed, stop=req.stop,
                stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos, min_tokens=req.min_tokens,
                skip_special_tokens=req.skip_special_tokens,
                include_stop_str_in_output=req.include_stop_str_in_output, **extra)
            return params.with_defaults(self.llm.generation_defaults())
        except SamplingParamsError as e:
            raise _bad_request(e) from None

    async def constraint_of(self, req, tools=None):
        """The request's output constraint, compiled (and cached) here, off the engine's thread, so that a bad
        schema is a 400 naming its field before anything is queued."""
        constraint, field = request_constraint(req, tools, self.tokenizer.added_tokens)
        if constraint is not None:
            try:
                await asyncio.to_thread(self.structured.compile, constraint)
            except StructuredOutputError as e:
                raise APIError(400, f"{field}: {e}", field) from None
        return constraint

    async def start(self, request_id: str, prompt_ids: list[int], params: SamplingParams, prompt: str | None, mm=None):
        self.check_capacity(params.n)
        try:
            stream = await self.engine.add_request(request_id, prompt_ids, params, prompt, mm)
        except (EngineError, SamplingParamsError, ValueError) as e:
            raise _bad_request(e) from None
        self.metrics.prompt_tokens += len(prompt_ids)
        return stream

    async def tracked(self, stream) -> AsyncIterator[RequestOutput]:
        """The stream's outputs, recording token counts, TTFT and inter-token latency; aborts on exit."""
        t0 = last = time.perf_counter()
        num_tokens, status, out = 0, "abort", None
        try:
            async for out in stream:
                now, total = time.perf_counter(), sum(len(c.token_ids) for c in out.outputs)
                if total > num_tokens:
                    (self.metrics.ttft.observe(now - t0) if num_tokens == 0 else self.metrics.itl.observe(now - last))
                    self.metrics.generation_tokens += total - num_tokens
                    num_tokens, last = total, now
                if out.finished:
                    status = "success"
                yield out
        except Exception:
            status = "error"
            raise
        finally:
            stream.abort()
            self.metrics.requests[status] += 1
            if out is not None:
                reasons = [c.finish_reason if status == "success" else status for c in out.outputs]
                self.metrics.finish(time.perf_counter() - t0, len(out.prompt_token_ids), num_tokens, reasons)

    async def final_output(self, stream) -> RequestOutput:
        final = None
        try:
            async for out in stream:
                final = out
        except RequestFailed as e:  # the engine failed it alone (and logged why): the client gets the reason
            raise APIError(500, str(e)) from None
        finally:
            await stream.aclose()
        return final

    def usage(self, out: RequestOutput) -> Usage:
        n_prompt, n_out = len(out.prompt_token_ids), sum(len(c.token_ids) for c in out.outputs)
        return Usage(prompt_tokens=n_prompt, completion_tokens=n_out, total_tokens=n_prompt + n_out,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=out.num_cached_tokens))

    async def with_media(self, prompt_ids: list[int], images: list, videos: list):
        """Fetch, decode and process the media (off the event loop) and expand the prompt's placeholders."""
        if not images and not videos:
            return prompt_ids, None
        try:
            images, videos = await fetch_remote_media(images, videos, self.llm.media_policy, self.llm.media_limits)
            async with self.media_jobs:
                return await asyncio.to_thread(prepare_prompt, prompt_ids, images, videos, self.llm.model_config,
                                               self.llm.processor_config, self.tokenizer.encode, self.llm.media_limits,
                                               self.llm.media_policy)
        except ValueError as e:  # MediaError and placeholder mismatches: the client's input
            raise APIError(400, str(e), "messages") from None

    def decode_one(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])
