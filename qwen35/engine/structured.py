"""Structured output: grammars compiled by llguidance, one matcher per request, token masks applied to the logits.

`StructuredOutputs` owns the llguidance tokenizer (built from the checkpoint's tokenizer.json on first use, or in
the background by `warm_up`: ~6 s for the 248k vocabulary; shared by engines of one process) and an LRU cache of
compiled grammars keyed by the constraint's canonical spelling; each request gets a copy of its grammar's pristine
matcher.

Each step, `fill_masks` writes one bit per token id for the constrained rows and `apply_masks` sets the logits of
disallowed ids to -inf, vectorised over the batch. The matcher advances on every sampled token. A row whose mask
allows nothing, or a matcher that lands in an error state, fails that request alone with a message saying so.

With reasoning (the prompt ends inside an open `<think>` block), the constraint starts after the model writes
`</think>`: the thinking itself is free text, as in vLLM's reasoning-parser gating."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict

import numpy as np
import torch

from qwen35.sampling_params import SamplingParamsError, StructuredOutputsParams

MAX_CACHED_GRAMMARS = 256
# A constraint whose first token mask takes longer is refused: real schemas take milliseconds, a hostile regex like
# `(a{1000}){1000}` seconds, and each request's copy of the matcher pays part of that again inside engine steps.
MAX_FIRST_MASK_SECONDS = 1.0


class StructuredOutputError(SamplingParamsError):
    """A constraint that does not compile (bad schema, regex or grammar); the message says why."""


def _llguidance():
    try:
        import llguidance
    except ImportError:  # a dependency, so only a broken install gets here
        raise StructuredOutputError("structured output needs the llguidance package (pip install llguidance)") \
            from None
    return llguidance


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMAS = ("items", "additionalProperties", "unevaluatedProperties", "additionalItems", "contains", "not", "if",
            "then", "else", "propertyNames")


def close_objects(schema, every_object: bool = False):
    """The schema with `additionalProperties: false` wherever an object lists its properties and says nothing
    about others (every object with `every_object`), as vLLM's default backend (xgrammar, strict mode) reads
    schemas: otherwise a model may add keys forever. A copy; the caller's schema is untouched."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(schema.get(key), dict):
            out[key] = {name: close_objects(s, every_object) for name, s in schema[key].items()}
    for key in _SCHEMA_LISTS:
        if isinstance(schema.get(key), list):
            out[key] = [close_objects(s, every_object) for s in schema[key]]
    for key in _SCHEMAS:
        if key in schema:
            out[key] = close_objects(schema[key], every_object)
    is_object = "properties" in schema or (every_object and schema.get("type") == "object")
    if is_object and "additionalProperties" not in schema and "unevaluatedProperties" not in schema:
        out["additionalProperties"] = False
    return out


def grammar_text(c: StructuredOutputsParams) -> str:
    """The llguidance grammar (its JSON form) for a constraint."""
    llg = _llguidance()
    if c.json is not None or c.json_object:
        schema = {"type": "object"} if c.json_object else c.json
        if isinstance(schema, str):
            schema = json.loads(schema)
        options = {"whitespace_flexible": False}
        if c.whitespace_pattern:
            options["whitespace_pattern"] = c.whitespace_pattern
        if not c.json_object:
            schema = close_objects(schema, every_object=c.disable_additional_properties)
        try:
            return llg.LLMatcher.grammar_from_json_schema(schema, overrides=options)
        except ValueError as e:
            raise StructuredOutputError(f"invalid JSON schema: {e}") from None
    if c.regex is not None:
        return llg.LLMatcher.grammar_from_regex(c.regex)
    if c.choice is not None:
        return llg.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(s) for s in c.choice))
    grammar = c.grammar
    if "::=" in grammar:  # GBNF / EBNF (llama.cpp's and xgrammar's spelling)
        from llguidance.gbnf_to_lark import gbnf_to_lark
        try:
            grammar = gbnf_to_lark(grammar)
        except Exception as e:  # the converter raises plain exceptions on syntax it cannot read
            raise StructuredOutputError(f"invalid GBNF grammar: {e}") from None
    return llg.LLMatcher.grammar_from_lark(grammar)


_LLTOKENIZERS: OrderedDict[bytes, object] = OrderedDict()  # engines in one process share their grammar tokenizer
_LLTOKENIZERS_LOCK = threading.Lock()


def _shared_lltokenizer(tokenizer_json: str, vocab_size: int, eos_ids: tuple[int, ...]):
    key = hashlib.blake2b(f"{vocab_size} {eos_ids}\n{tokenizer_json}".encode(), digest_size=16).digest()
    with _LLTOKENIZERS_LOCK:
        if key not in _LLTOKENIZERS:
            try:
                _LLTOKENIZERS[key] = _llguidance().LLTokenizer(tokenizer_json, n_vocab=vocab_size,
                                                               eos_token=list(eos_ids))
            except Exception as e:  # llguidance reads byte-level BPE tokenizer.json files (every Qwen3.5's)
                raise StructuredOutputError(f"structured output cannot use this tokenizer: {e}") from None
            while len(_LLTOKENIZERS) > 2:
                _LLTOKENIZERS.popitem(last=False)
        _LLTOKENIZERS.move_to_end(key)
        return _LLTOKENIZERS[key]


class StructuredOutputs:
    """The engine's grammar compiler and mask applier. tokenizer: qwen35.tokenizer.Tokenizer; vocab_size: the
    logits' width (the embedding's padding rows past the tokenizer are never allowed)."""

    def __init__(self, tokenizer, vocab_size: int, think_ids: tuple[int | None, int | None] = (None, None)):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.think_start, self.think_end = think_ids
        self.num_words = (vocab_size + 31) // 32
        self._lltok = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, object] = OrderedDict()  # key -> pristine LLMatcher

    def warm_up(self) -> None:
        """Build the llguidance tokenizer in a background thread, so the first constrained request need not wait."""
        threading.Thread(target=self.lltokenizer, daemon=True, name="qwen35-llguidance").start()

    def lltokenizer(self):
        with self._lock:
            if self._lltok is None:
                self._lltok = _shared_lltokenizer(self.tokenizer.backend.to_str(), self.vocab_size,
                                                  tuple(self.tokenizer.eos_token_ids))
            return self._lltok

    def matcher(self, c: StructuredOutputsParams, prompt_token_ids: list[int]) -> "GrammarMatcher":
        """A fresh matcher for one request; raises StructuredOutputError when the constraint does not compile."""
        pristine = self.compile(c)
        with self._lock:  # the server compiles in worker threads while the engine thread copies
            matcher = pristine.deep_copy()
        return GrammarMatcher(matcher, waits_for=self._open_think(prompt_token_ids),
                              think_end=self.think_end)

    def compile(self, c: StructuredOutputsParams):
        """The constraint's pristine matcher, compiled once and cached; raises StructuredOutputError naming what
        does not compile."""
        key = c.key()
        with self._lock:
            pristine = self._cache.get(key)
            if pristine is not None:
                self._cache.move_to_end(key)
        if pristine is None:
            llg = _llguidance()
            grammar = grammar_text(c)
            tok = self.lltokenizer()
            is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, tok)
            if is_error:
                raise StructuredOutputError(f"invalid {c.kind} constraint: {messages[0].strip()}")
            pristine = llg.LLMatcher(tok, grammar, log_level=0)
            # The first mask builds most of the lexer: here, in the caller's thread (a server worker), not in an
            # engine step that every running request waits for.
            t0 = time.perf_counter()
            self.fill_masks([GrammarMatcher(pristine)])
            seconds = time.perf_counter() - t0
            if pristine.is_error():
                raise StructuredOutputError(f"invalid {c.kind} constraint: {pristine.get_error()}")
            if seconds > MAX_FIRST_MASK_SECONDS:
                raise StructuredOutputError(f"the {c.kind} constraint is too complex: its first token mask took "
                                            f"{seconds:.1f} s (the limit is {MAX_FIRST_MASK_SECONDS:.0f} s)")
            with self._lock:
                self._cache[key] = pristine
                while len(self._cache) > MAX_CACHED_GRAMMARS:
                    self._cache.popitem(last=False)
        return pristine

    def _open_think(self, ids: list[int]) -> bool:
        """The prompt ends inside a `<think>` block the model must close before the constraint starts."""
        if self.think_start is None or self.think_end is None:
            return False
        for t in reversed(ids):
            if t == self.think_end:
                return False
            if t == self.think_start:
                return True
        return False

    def fill_masks(self, matchers: list["GrammarMatcher"]) -> torch.Tensor:
        """int32 [len(matchers), ceil(V/32)]: bit j of word i allows token 32·i + j. (Straight into the buffer:
        llguidance's torch helpers would import torch.compile's machinery, seconds on first use.)"""
        masks = np.empty((len(matchers), self.num_words), dtype=np.int32)
        row_bytes = self.num_words * 4
        for i, m in enumerate(matchers):
            m.matcher.unsafe_compute_mask_ptr(masks.ctypes.data + i * row_bytes, row_bytes)
        return torch.from_numpy(masks)

    def apply_masks(self, logits: torch.Tensor, masks, rows: list[int] | None = None) -> torch.Tensor:
        """logits [N, V'] (V' <= vocab_size) in place: disallowed ids to -inf, mask j on row rows[j] (default: row
        j of B = N rows), so the constrained rows of a batch need not be copied out and back. Returns which masks
        allow nothing (bool [B])."""
        # little-endian words: byte k of the row holds ids 8k..8k+7, lowest bit first. Unpacking the inverted
        # bytes gives the disallowed ids as 0/1 bytes, read as bools without another pass over [B, V'].
        width = logits.shape[-1]
        packed = (masks.numpy() if isinstance(masks, torch.Tensor) else masks).view(np.uint8)
        disallowed = torch.from_numpy(np.unpackbits(~packed, axis=-1, count=width, bitorder="little"))
        disallowed = disallowed.view(torch.bool).to(logits.device)
        if rows is None or list(rows) == list(range(logits.shape[0])):
            logits.masked_fill_(disallowed, float("-inf"))
        else:
            for j, i in enumerate(rows):  # each row of a 2-D tensor is a contiguous view
                logits[i].masked_fill_(disallowed[j], float("-inf"))
        whole, rest = divmod(width, 8)  # the empty rows, from the packed bytes of ids < V'
        empty = ~packed[:, :whole].any(-1)
        if rest:
            empty &= (packed[:, whole] & ((1 << rest) - 1)) == 0
        return torch.from_numpy(empty)


class GrammarMatcher:
    """One request's position in its grammar. `active` is False while the model is still thinking."""

    def __init__(self, matcher, waits_for: bool = False, think_end: int | None = None):
        self.matcher, self.think_end = matcher, think_end
        self.active = not waits_for

    def accept(self, token_id: int, is_eos: bool) -> None:
        """Advance on a sampled token; raises ValueError if the grammar rejects it."""
        if not self.active:
            self.active = token_id == self.think_end
            return
        if is_eos and self.matcher.is_accepting():
            return
        if not self.matcher.consume_token(token_id):
            raise ValueError(f"structured output: the grammar rejected token {token_id}: {self.matcher.get_error()}")

    def error(self) -> str:
        return self.matcher.get_error() or "the output cannot continue"
