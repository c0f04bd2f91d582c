"""Result objects of `LLM.generate` / `LLM.chat`, with vLLM's field names and meanings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None  # 1-based rank of the token in the model's distribution
    decoded_token: str | None = None


# Per position: token id -> Logprob, holding the top-k and the chosen (or actual prompt) token.
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[PositionLogprobs] | None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" | None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it (not eos)

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[PositionLogprobs | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    error: str | None = None  # set when the engine failed this request (its completions end with "error"/"abort")
    num_cached_tokens: int = 0  # prompt tokens taken from the prefix cache instead of computed
    # Filled by LLM.chat: the parsed assistant message of outputs[i] ({"reasoning_content", "content", "tool_calls"}).
    messages: list[dict[str, Any]] = field(default_factory=list)
