"""`SamplingParams` with vLLM's semantics and validation: temperature 0 is greedy; top_k <= 0 and top_p = 1 disable
those filters; penalties follow vLLM (repetition over prompt + output, presence/frequency over the output).
Every number must be finite and in range; what needs the model (the vocabulary, max_num_seqs) the engine checks."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from typing import ClassVar


class SamplingParamsError(ValueError):
    """An invalid sampling parameter; the message names the field."""


@dataclass
class StructuredOutputsParams:
    """What the output must match (vLLM's `StructuredOutputsParams`): exactly one of a JSON schema (a dict or its
    JSON text), any JSON object, a regular expression, a choice among strings, or a grammar (Lark, or GBNF/EBNF with
    `::=` rules). JSON is generated compact unless `whitespace_pattern` (a regex) allows more between tokens;
    `disable_any_whitespace` is accepted for vLLM compatibility (compact is already the default)."""

    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None

    KINDS: ClassVar[tuple[str, ...]] = ("json", "regex", "choice", "grammar", "json_object")

    def __post_init__(self):
        if isinstance(self.choice, tuple):
            self.choice = list(self.choice)
        self.validate()

    @property
    def kind(self) -> str:
        return next(k for k in self.KINDS if getattr(self, k) not in (None, False))

    def validate(self) -> None:
        def fail(why):
            raise SamplingParamsError(f"SamplingParams.structured_outputs {why}")

        given = [k for k in self.KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            fail(f"must set exactly one of {', '.join(self.KINDS)}; got {', '.join(given) or 'none'}")
        if self.json is not None:
            schema = self.json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except ValueError as e:
                    fail(f"json is not valid JSON: {e}")
            if not isinstance(schema, (dict, bool)):
                fail(f"json must be a JSON schema (an object), got {type(schema).__name__}")
        for name in ("regex", "grammar", "whitespace_pattern"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or (not v and name != "whitespace_pattern")):
                fail(f"{name} must be a non-empty string")
        if self.choice is not None and (not isinstance(self.choice, list) or not self.choice
                                        or any(not isinstance(c, str) for c in self.choice)):
            fail("choice must be a non-empty list of strings")

    def key(self) -> str:
        """A canonical spelling: equal constraints compile once (the grammar cache's key)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        if isinstance(d["json"], str):
            d["json"] = json.loads(d["json"])
        return json.dumps(d, sort_keys=True, separators=(",", ":"))


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
    logit_bias: dict[int, float] | None = None  # added to the logits of these token ids (OpenAI: [-100, 100])
    allowed_token_ids: list[int] | None = None  # draw only from these ids
    bad_words: list[str] | None = None  # words never generated (as vLLM: with and without a leading space)
    structured_outputs: StructuredOutputsParams | None = None
    truncate_prompt_tokens: int | None = None  # keep only the prompt's last k tokens (-1: as many as fit)
    _user_set: frozenset = field(default=frozenset(), repr=False, compare=False)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is None or isinstance(self.stop, (list, tuple)):  # a copy: the engine keeps its own
            self.stop = list(self.stop or [])
        if self.stop_token_ids is None or isinstance(self.stop_token_ids, (list, tuple)):
            self.stop_token_ids = list(self.stop_token_ids or [])
        if isinstance(self.logit_bias, dict):
            self.logit_bias = {_token_id(k): v for k, v in self.logit_bias.items()}  # JSON spells keys as strings
        if isinstance(self.bad_words, tuple):
            self.bad_words = list(self.bad_words)
        if isinstance(self.allowed_token_ids, tuple):
            self.allowed_token_ids = list(self.allowed_token_ids)
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        self.validate()

    @property
    def is_greedy(self) -> bool:
        return self.temperature < 1e-5

    @classmethod
    def from_optional(cls, keep_none: tuple[str, ...] = (), **kwargs) -> "SamplingParams":
        """Build from keyword arguments, ignoring those that are None (the server passes what the client sent)
        except the `keep_none` ones, whose None is a value (max_tokens None: the room left in the context)."""
        given = {k: v for k, v in kwargs.items() if v is not None or k in keep_none}
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
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                fail("logit_bias", "must map token ids to numbers")
            for t, b in self.logit_bias.items():
                if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                    fail("logit_bias", f"has key {t!r}, which is not a token id")
                if isinstance(b, bool) or not isinstance(b, (int, float)) or not _is_finite(b) or not -100 <= b <= 100:
                    fail("logit_bias", f"has value {b!r} for token {t}; biases must be numbers in [-100, 100]")
        if self.allowed_token_ids is not None and (
                not isinstance(self.allowed_token_ids, list) or not self.allowed_token_ids
                or any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.allowed_token_ids)):
            fail("allowed_token_ids", "must be a non-empty list of non-negative integers")
        if self.bad_words is not None and (not isinstance(self.bad_words, list) or any(
                not isinstance(w, str) or not w.strip() for w in self.bad_words)):
            fail("bad_words", "must be a list of non-blank strings")
        if self.structured_outputs is not None:
            if not isinstance(self.structured_outputs, StructuredOutputsParams):
                fail("structured_outputs", "must be a StructuredOutputsParams")
            self.structured_outputs.validate()
        if self.truncate_prompt_tokens is not None:
            check_type("truncate_prompt_tokens", (int,))
            if self.truncate_prompt_tokens < -1 or self.truncate_prompt_tokens == 0:
                fail("truncate_prompt_tokens", "must be -1 (as many as fit) or a positive number of tokens")


def _token_id(key):
    try:
        return int(key) if isinstance(key, str) else key
    except ValueError:
        return key  # validate() names it


def _is_finite(x: int | float) -> bool:
    try:
        return math.isfinite(x)
    except OverflowError:  # an int too large for a float
        return False
