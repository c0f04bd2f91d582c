"""`POST /v1/chat/completions`: messages rendered with the chat template, an optional output constraint, the answer
split into reasoning, content and tool calls, whole or streamed as SSE chunks. `run_chat` is also what the
Responses API runs."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from qwen35.chat import final_message_text
from qwen35.chat.reasoning import is_thinking_prompt
from qwen35.serve.context import ServerContext, parse_body, sse_error, unless_disconnected
from qwen35.serve.middleware import ERROR_RESPONSES, APIError, error_response
from qwen35.serve.protocol import (ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse,
                                   ChatCompletionStreamChoice, DeltaMessage, random_id)
from qwen35.serve.responses import ChatStreamState, build_chat_choice, chat_logprobs, sse

logger = logging.getLogger(__name__)
router = APIRouter()


@router.post("/v1/chat/completions", responses=ERROR_RESPONSES)
async def chat_completions(request: Request):
    req = await parse_body(request, ChatCompletionRequest)
    result = await run_chat(request.app.state.ctx, req, request)
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

async def run_chat(ctx: ServerContext, req: ChatCompletionRequest, request: Request):
    """A validated chat request, run: the ChatCompletionResponse (None if the client disconnected first), or
    with req.stream an async iterator of ChatCompletionChunk (close it when not read to the end). The
    Responses API runs on this too."""
    ctx.check_model(req.model)
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", "top_logprobs")
    if req.continue_final_message and req.add_generation_prompt:
        raise APIError(400, "continue_final_message needs add_generation_prompt=false", "continue_final_message")
    constraint = await ctx.constraint_of(req, req.tools)
    forced_call = req.tool_choice not in (None, "auto", "none")
    parse_tools = req.tools if req.tools and req.tool_choice != "none" else None
    kwargs = dict(req.chat_template_kwargs or {})
    if req.reasoning_effort is not None and "enable_thinking" not in kwargs:
        kwargs["enable_thinking"] = req.reasoning_effort not in ("none", "minimal")
    prompt, images, videos = await asyncio.to_thread(ctx.prompts.render_chat, req.messages, req.tools, kwargs,
                                                     req.add_generation_prompt, req.continue_final_message)
    thinking = is_thinking_prompt(prompt)
    # A forced call starts right away: an open think block is closed in the prompt, so the grammar (which only
    # applies after the thinking) constrains the first token on.
    prefix = "\n</think>\n\n" if thinking and forced_call else ""
    prompt += prefix
    prompt_ids = await asyncio.to_thread(ctx.prompts.encode, prompt, "messages")
    prompt_ids, mm = await ctx.with_media(prompt_ids, images, videos)
    echo = ""
    if req.echo and req.messages and (not req.add_generation_prompt or req.messages[-1].get("role") == "assistant"):
        echo = final_message_text(req.messages)
    k = req.top_logprobs or 0
    params = ctx.make_params(req, max_tokens=req.max_completion_tokens or req.max_tokens,
                         logprobs=k if req.logprobs else None, structured_outputs=constraint)
    request_id = random_id("chatcmpl")
    stream = ctx.tracked(await ctx.start(request_id, prompt_ids, params, prompt, mm))
    single_call = req.parallel_tool_calls is False
    if req.stream:
        so = req.stream_options
        return chat_chunks(ctx, request_id, stream, params.n, thinking, parse_tools, k,
                           bool(so and so.include_usage), bool(so and so.continuous_usage_stats), prefix, echo,
                           single_call)
    final = await unless_disconnected(request, ctx.final_output(stream))
    if final is None:
        return None
    choices = [build_chat_choice(c.index, prefix + c.text, c.finish_reason, c.stop_reason, thinking, parse_tools,
                                 chat_logprobs(c, 0, k), echo, single_call) for c in final.outputs]
    return ChatCompletionResponse(id=request_id, model=ctx.model_name, choices=choices, usage=ctx.usage(final))


async def chat_chunks(ctx: ServerContext, request_id, stream, n, thinking, tools, k, include_usage,
                      continuous_usage, prefix="", echo="", single_call=False) -> AsyncIterator[ChatCompletionChunk]:
    states = [ChatStreamState(thinking, tools, single_call) for _ in range(n)]
    now = {"usage": None}

    def chunk(index, delta, logprobs=None, finish_reason=None, stop_reason=None):
        return ChatCompletionChunk(id=request_id, model=ctx.model_name, usage=now["usage"], choices=[
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
                    now["usage"] = ctx.usage(out).model_copy(update={"completion_tokens": 0,
                                                                 "total_tokens": len(out.prompt_token_ids)})
                    for ch in opening():
                        yield ch
                now["usage"] = ctx.usage(out)
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
            yield ChatCompletionChunk(id=request_id, model=ctx.model_name, choices=[], usage=ctx.usage(last))
    finally:
        await stream.aclose()
