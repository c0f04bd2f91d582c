"""`POST /v1/completions`: text or token-id prompts (several per request), `echo` with prompt logprobs in the legacy
format, an optional output constraint, whole or streamed as SSE."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from qwen35.outputs import RequestOutput
from qwen35.serve.context import ServerContext, parse_body, sse_error, unless_disconnected
from qwen35.serve.middleware import ERROR_RESPONSES, APIError, error_response
from qwen35.serve.protocol import (CompletionChoice, CompletionRequest, CompletionResponse, PromptTokensDetails,
                                   Usage, random_id)
from qwen35.serve.responses import completion_logprobs, sse

logger = logging.getLogger(__name__)
router = APIRouter()


def completion_inputs(ctx: ServerContext, prompts_in, echo: bool) -> list[tuple[str | None, list[int], str | None]]:
    """(prompt text or None, prompt ids, text to echo or None) per prompt; runs in a worker thread."""
    items = []
    for p in prompts_in:
        if isinstance(p, str):
            items.append((p, ctx.prompts.encode(p, "prompt"), p if echo else None))
        else:
            items.append((None, list(p), ctx.tokenizer.decode(p) if echo else None))
    return items


@router.post("/v1/completions", responses=ERROR_RESPONSES)
async def completions(request: Request):
    ctx: ServerContext = request.app.state.ctx
    req = await parse_body(request, CompletionRequest)
    ctx.check_model(req.model)
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
    items = await asyncio.to_thread(completion_inputs, ctx, prompts_in, req.echo)
    k = req.logprobs
    results = []
    request_id = random_id("cmpl")
    constraint = await ctx.constraint_of(req)
    for i, (text, ids, _) in enumerate(items):
        params = ctx.make_params(req, max_tokens=req.max_tokens if req.max_tokens is not None else 16,
                             structured_outputs=constraint,
                             logprobs=k, prompt_logprobs=k if (req.echo and k is not None) else None)
        rid = request_id if len(items) == 1 else f"{request_id}-{i}"
        try:
            results.append(ctx.tracked(await ctx.start(rid, ids, params, text)))
        except BaseException:
            for s in results:
                await s.aclose()
            raise
    echoes = [echo for _, _, echo in items]
    if req.stream:
        so = req.stream_options
        return StreamingResponse(completion_stream(ctx, request_id, results[0], echoes[0], k,
                                                   bool(so and so.include_usage),
                                                   bool(so and so.continuous_usage_stats)),
                                 media_type="text/event-stream")

    async def finals():
        return [await ctx.final_output(s) for s in results]

    outs = await unless_disconnected(request, finals())
    if outs is None:
        return error_response(499, "the client closed the connection")
    choices, total = [], Usage()
    for i, (out, echo) in enumerate(zip(outs, echoes)):
        u = ctx.usage(out)
        cached = (total.prompt_tokens_details.cached_tokens if total.prompt_tokens_details else 0) + \
            u.prompt_tokens_details.cached_tokens
        total = Usage(prompt_tokens=total.prompt_tokens + u.prompt_tokens,
                      completion_tokens=total.completion_tokens + u.completion_tokens,
                      total_tokens=total.total_tokens + u.total_tokens,
                      prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))
        for c in out.outputs:
            ids, entries = completion_tokens(out, c, 0, echo)
            logprobs = completion_logprobs(ids, entries, k, 0, ctx.decode_one) if k is not None else None
            choices.append(CompletionChoice(index=i * len(out.outputs) + c.index, text=(echo or "") + c.text,
                                            logprobs=logprobs, finish_reason=c.finish_reason,
                                            stop_reason=c.stop_reason))
    return CompletionResponse(id=request_id, model=ctx.model_name, choices=choices, usage=total)

def completion_tokens(out: RequestOutput, c, start: int, echo: str | None) -> tuple[list, list]:
    """The choice's token ids and logprob entries from its `start`-th output token on, behind the prompt's
    when `echo` is given."""
    ids, entries = list(c.token_ids[start:]), list((c.logprobs or [])[start:])
    if echo is not None:
        ids, entries = list(out.prompt_token_ids) + ids, list(out.prompt_logprobs or []) + entries
    return ids, entries

async def completion_stream(ctx: ServerContext, request_id, stream, echo, k, include_usage, continuous_usage=False):
    # per choice: (characters of its text sent, tokens sent, text offset of the next token); None once done
    sent: dict[int, tuple[int, int, int] | None] = {}
    last = None

    def chunk(index, text, logprobs=None, finish_reason=None, stop_reason=None):
        return sse(CompletionResponse(id=request_id, model=ctx.model_name, choices=[CompletionChoice(
            index=index, text=text, logprobs=logprobs, finish_reason=finish_reason, stop_reason=stop_reason)],
            usage=ctx.usage(last) if continuous_usage else None))

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
                    logprobs = completion_logprobs(ids, entries, k, offset, ctx.decode_one)
                    if logprobs.tokens:
                        offset = logprobs.text_offset[-1] + len(logprobs.tokens[-1])
                if text or c.finish_reason or (logprobs and logprobs.tokens):
                    yield chunk(c.index, text, logprobs, c.finish_reason, c.stop_reason)
                sent[c.index] = None if c.finish_reason else (len(c.text), len(c.token_ids), offset)
        if include_usage and last is not None:
            yield sse(CompletionResponse(id=request_id, model=ctx.model_name, choices=[], usage=ctx.usage(last)))
    except Exception as e:  # the headers are sent: the error becomes the stream's last event
        logger.warning("stream %s failed: %r", request_id, e)
        yield sse_error(e)
    finally:
        await stream.aclose()
    yield "data: [DONE]\n\n"

