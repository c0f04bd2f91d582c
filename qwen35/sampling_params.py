"""`SamplingParams` with vLLM's semantics and validation: temperature 0 is greedy; top_k <= 0 and top_p = 1 disable
those filters; penalties follow vLLM (repetition over prompt + output, presence/frequency over the output).
Every number must be finite and in range; what needs the model (the vocabulary, max_num_seqs) the engine checks."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import ClassVar


class SamplingParamsError(ValueError):
    """An invalid sampling parameter; the message names the field."""


@dataclass
class SamplingParams:
    MAX_N: ClassVar[int] = 128  # completions per request: each is a sequence in the batch
    SEED_RANGE: ClassVar[range] = range(-2**63, 2**63)  # int64, as vLLM; seed + i (i < MAX_N) stays in torch's range

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    _user_set: frozenset = field(default=frozenset(), repr=False, compare=False)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is None or isinstance(self.stop, (list, tuple)):  # a copy: the engine keeps its own
            self.stop = list(self.stop or [])
        if self.stop_token_ids is None or isinstance(self.stop_token_ids, (list, tuple)):
            self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    @property
    def is_greedy(self) -> bool:
        return self.temperature < 1e-5

    @classmethod
    def from_optional(cls, **kwargs) -> "SamplingParams":
        """Build from keyword arguments, ignoring those that are None (the server passes what the client sent)."""
        given = {k: v for k, v in kwargs.items() if v is not None}
        return cls(**given, _user_set=frozenset(given))

    def with_defaults(self, defaults: dict) -> "SamplingParams":
        """Fill the fields the user did not set from generation_config-style defaults."""
        known = {f.name for f in fields(self)}
        updates = {k: v for k, v in defaults.items() if k in known and k not in self._user_set}
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return SamplingParams(**{**values, **updates})

    def validate(self) -> None:
        """Raise SamplingParamsError naming the first bad field (the engine calls it again: the fields are mutable)."""
        def fail(name, why):
            raise SamplingParamsError(f"SamplingParams.{name} {why}, got {getattr(self, name)!r}")

        def check_type(name, kinds):
            v = getattr(self, name)
            if isinstance(v, bool) and bool not in kinds or not isinstance(v, kinds):
                fail(name, f"must be {' or '.join(k.__name__ for k in kinds)}")

        for name in ("n", "top_k", "min_tokens"):
            check_type(name, (int,))
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            check_type(name, (bool,))
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            check_type(name, (int, float))
            if not _is_finite(getattr(self, name)):
                fail(name, "must be a finite number")
        if not 1 <= self.n <= self.MAX_N:
            fail("n", f"must be in [1, {self.MAX_N}]")
        if self.temperature < 0:
            fail("temperature", "must be non-negative")
        if not 0 < self.top_p <= 1:
            fail("top_p", "must be in (0, 1]")
        if self.top_k < -1:
            fail("top_k", "must be -1 or 0 (disabled) or positive")
        if not 0 <= self.min_p <= 1:
            fail("min_p", "must be in [0, 1]")
        if self.repetition_penalty <= 0:
            fail("repetition_penalty", "must be positive")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                fail(name, "must be in [-2, 2]")
        if self.max_tokens is not None:
            check_type("max_tokens", (int,))
            if self.max_tokens < 1:
                fail("max_tokens", "must be at least 1")
        if self.min_tokens < 0:
            fail("min_tokens", "must be non-negative")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            fail("min_tokens", f"must not exceed max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                fail(name, "must be a non-negative integer")
        if self.seed is not None:
            check_type("seed", (int,))
            if self.seed not in self.SEED_RANGE:
                fail("seed", "must be in [-2**63, 2**63 - 1]")
        if not isinstance(self.stop, list) or any(not isinstance(s, str) or not s for s in self.stop):
            fail("stop", "must be a non-empty string or a list of them")
        if not isinstance(self.stop_token_ids, list) or any(
                isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            fail("stop_token_ids", "must be a list of non-negative integers")


def _is_finite(x: int | float) -> bool:
    try:
        return math.isfinite(x)
    except OverflowError:  # an int too large for a float
        return False
