"""A request as the engine tracks it: its tokens, how many of them the cache already holds, the blocks and state
slot it owns, and its incremental output (text, logprobs, stop state)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from qwen35.outputs import PositionLogprobs
from qwen35.sampling_params import SamplingParams

if TYPE_CHECKING:  # for the annotations only
    from qwen35.engine.structured import GrammarMatcher
    from qwen35.multimodal.prompt import MultimodalPrompt
    from qwen35.tokenizer import IncrementalDetokenizer


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None = None
    index: int = 0  # which of the parent's n completions this is
    parent_id: str = ""  # the id the caller gave; n > 1 completions share it
    arrival: int = 0
    status: Status = Status.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V and state are in the cache
    block_ids: list[int] = field(default_factory=list)
    state_slot: int | None = None
    generator: torch.Generator | None = None
    num_preemptions: int = 0
    # output state
    text: str = ""
    logprobs: list[PositionLogprobs] | None = None
    cumulative_logprob: float = 0.0
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None
    error: str | None = None  # why the engine failed this request (finish_reason "error")
    detokenizer: IncrementalDetokenizer | None = None
    max_total_tokens: int = 0  # prompt + output cap from max_tokens and max_model_len
    bad_words_ids: list[list[int]] = field(default_factory=list)  # token sequences of SamplingParams.bad_words
    grammar: GrammarMatcher | None = None  # of a request with structured output
    mm: MultimodalPrompt | None = None  # 3D positions and visual embeddings (shared by n > 1 siblings)
    # prefix cache
    num_cached_tokens: int | None = None  # tokens the cache held at the first admission
    block_hashes: list[bytes] = field(default_factory=list)  # of the full blocks of all_token_ids, as far as known
    num_registered_blocks: int = 0  # leading blocks already findable in the cache
    pending_snapshots: list = field(default_factory=list)  # snapshots this step writes (cache.prefix.Snapshot)
    extra_snapshots: set[int] = field(default_factory=set)  # branch points to snapshot at, besides the usual ones
    fork_of: Request | None = None  # set on n > 1 siblings: wait for this first sibling's prefill, then fork from it
    # speculative decoding
    spec_token_ids: list[int] = field(default_factory=list)  # drafts the next step verifies after the last token
    ring_slots: list[int] = field(default_factory=list)  # state slots holding the states after each verified draft

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED
