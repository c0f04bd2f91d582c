"""OpenAI response pieces built from engine outputs: chat choices (reasoning and tool calls split off), their
streamed deltas, and the chat and legacy-completion logprob formats."""

from __future__ import annotations

from collections.abc import Callable

from qwen35.chat import assistant_message
from qwen35.serve.protocol import ChatCompletionChoice, ChatMessage, CompletionLogprobs
from qwen35.chat.reasoning import ReasoningStreamParser
from qwen35.chat.tool_calls import ToolCallStreamParser


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


def completion_logprobs(token_ids, entries, k: int, offset: int, decode: Callable[[int], str]) -> CompletionLogprobs:
    """Legacy-completion logprobs of these tokens, whose text starts at `offset` in the choice's text (echoed prompt
    included). A position without an entry (the first prompt token) keeps its text, with logprob None. As in
    vLLM and OpenAI, each offset is the previous one plus the length of the previous token's text."""
    lp = CompletionLogprobs()
    for tok, entry in zip(token_ids, entries):
        if entry is None:
            lp.tokens.append(decode(tok))
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
                      tools: list[dict] | None, logprobs: dict | None = None, echo: str = "",
                      single_call: bool = False) -> ChatCompletionChoice:
    """One non-streamed chat choice from the raw completion text (reasoning and tool calls split off). echo: text
    the content starts with (vLLM's chat `echo`); single_call: report only the first tool call
    (`parallel_tool_calls=false`)."""
    msg = assistant_message(text, thinking, tools)
    calls = (msg.get("tool_calls") or [])[:1 if single_call else None]
    if echo:
        msg["content"] = echo + (msg["content"] or "")
    if calls and finish_reason == "stop":
        finish_reason = "tool_calls"
    return ChatCompletionChoice(index=index, message=ChatMessage(content=msg["content"],
                                                                 reasoning_content=msg["reasoning_content"],
                                                                 tool_calls=calls),
                                logprobs=logprobs, finish_reason=finish_reason, stop_reason=stop_reason)


class ChatStreamState:
    """Turns one choice's text deltas into OpenAI delta dicts (reasoning, content, tool calls)."""

    def __init__(self, thinking: bool, tools: list[dict] | None, single_call: bool = False):
        self.reasoning = ReasoningStreamParser(thinking)
        self.tools = ToolCallStreamParser(tools) if tools else None
        self.single_call = single_call
        self.num_chars = self.num_tokens = 0
        self.done = False

    def _content(self, text: str, final: bool) -> list[dict]:
        if self.tools is None:
            return [{"content": text}] if text else []
        out = (self.tools.feed(text) if text else []) + (self.tools.finish() if final else [])
        if self.single_call:  # parallel_tool_calls=false: the first call only
            out = [d for d in out if "tool_calls" not in d or d["tool_calls"][0].get("index", 0) == 0]
        return out

    def feed(self, text: str, final: bool) -> list[dict]:
        r = self.reasoning.feed(text)
        reasoning, content = r.reasoning, r.content
        if final:
            tail = self.reasoning.finish()
            reasoning, content = reasoning + tail.reasoning, content + tail.content
        out = [{"reasoning_content": reasoning}] if reasoning else []
        return out + self._content(content, final)


def sse(model) -> str:
    return f"data: {model.model_dump_json(exclude_none=True)}\n\n"

