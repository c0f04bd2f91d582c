"""A reduced Qwen3.5 vocabulary for a small model: the tokens some texts use, renumbered densely, and a tokenizer
that still encodes any text.

Kept: the 256 single-byte tokens (so any text encodes), every token Qwen3.5's BPE produces on the given texts, every
intermediate piece BPE forms on the way to those tokens (so the restricted merge list takes the same steps and the
subset tokenizer encodes those texts exactly as the full one, id for id through the map), optionally the `extra_tokens`
lowest-rank tokens (Qwen's most common merges), and all added tokens (`<|im_start|>`, `<think>`, vision tokens, ...).
Kept BPE tokens keep their relative order; added tokens follow them in Qwen3.5's order. Other text still encodes,
into more, shorter tokens than Qwen3.5 would use. `vocab_map.json` records new id -> Qwen3.5 id.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import tokenizers

from qwen35.tokenizer_build import (
    ADDED_TOKENS,
    NUM_BPE_TOKENS,
    PRETOKENIZE_REGEX,
    bytes_to_unicode,
    default_tiktoken_file,
    load_tiktoken_ranks,
    tokenizer_config_json,
    tokenizer_json,
)

VOCAB_MAP_FILE = "vocab_map.json"
PAD_MULTIPLE = 64  # the embedding gets a row count the matmul kernels like; the extra ids are never produced


@dataclass(frozen=True)
class SubsetVocab:
    """A built subset. `original_ids[new_id]` is the Qwen3.5 id; `vocab_size` is padded to a multiple of 64 (use it
    for the embedding); `special_ids` maps each added token's text to its new id."""

    path: Path
    original_ids: tuple[int, ...]
    vocab_size: int
    special_ids: dict[str, int]
    meta: dict = field(default_factory=dict)
    _inverse: dict[int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "_inverse", {o: n for n, o in enumerate(self.original_ids)})

    @property
    def num_tokens(self) -> int:
        """Ids the tokenizer can produce (BPE + added); ids from here to vocab_size are padding."""
        return len(self.original_ids)

    def new_id(self, original_id: int) -> int:
        """The subset id of a Qwen3.5 id (KeyError if the subset lacks it)."""
        return self._inverse[original_id]


def _pre_tokenizer() -> tokenizers.pre_tokenizers.PreTokenizer:
    """Qwen3.5's pre-tokenizer (the same two steps tokenizer_json writes): regex split, then byte-level spelling."""
    split = tokenizers.pre_tokenizers.Split(tokenizers.Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False)
    byte_level = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    return tokenizers.pre_tokenizers.Sequence([split, byte_level])


def bpe_pieces(word: str, rank: dict[str, int]) -> list[str]:
    """Every token BPE forms while encoding `word` (byte-level spelling, merges only), in order, the final ones last.

    Pairs compete as in the merge list tokenizer_build writes: by the merged token's rank, then the ranks of the
    two halves, then leftmost first (tokenizers' merge heap)."""
    parts = list(word)
    formed: list[str] = []
    while len(parts) > 1:
        best = None
        for i in range(len(parts) - 1):
            r = rank.get(parts[i] + parts[i + 1])
            if r is not None:
                key = (r, rank[parts[i]], rank[parts[i + 1]], i)
                if best is None or key < best:
                    best = key
        if best is None:
            break
        i = best[3]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
        formed.append(parts[i])
    return formed


def used_tokens(texts: Iterable[str], rank: dict[str, int]) -> set[str]:
    """The BPE tokens (byte-level spelling) Qwen3.5 produces on `texts`, plus the pieces formed on the way.

    Added tokens are split off first, as the tokenizer does; a pre-token that is itself a token is one token
    (tokenizer.json sets ignore_merges), any other goes through the merges."""
    added = re.compile("|".join(re.escape(c) for c, _ in sorted(ADDED_TOKENS, key=lambda t: -len(t[0]))))
    pre_tokenizer = _pre_tokenizer()
    words: set[str] = set()
    for text in texts:
        for segment in added.split(text):
            if segment:
                segment = unicodedata.normalize("NFC", segment)
                words.update(w for w, _ in pre_tokenizer.pre_tokenize_str(segment))
    kept: set[str] = set()
    for word in words:
        if word in rank:
            kept.add(word)
        else:
            kept.update(bpe_pieces(word, rank))
    return kept


def subset_merges(kept: list[str], rank: dict[str, int]) -> list[tuple[str, str]]:
    """The full merge list restricted to merges whose halves and result are all kept, in the full list's order."""
    keep = set(kept)
    merges = []
    for token in kept:
        splits = [(rank[token[:i]], rank[token[i:]]) for i in range(1, len(token))
                  if token[:i] in keep and token[i:] in keep]
        merges.extend((rank[token], a, b) for a, b in splits)
    merges.sort()
    by_rank = {r: t for t, r in rank.items() if t in keep}
    return [(by_rank[a], by_rank[b]) for _, a, b in merges]


def build_subset_tokenizer(
    texts: Iterable[str],
    out_dir: str | Path,
    chat_template: str | None = None,
    extra_tokens: int = 0,
    tiktoken_file: str | Path | None = None,
    meta: dict | None = None,
) -> SubsetVocab:
    """Write tokenizer.json, tokenizer_config.json (holding `chat_template` if given) and vocab_map.json for the
    subset of Qwen3.5's vocabulary that `texts` need, into `out_dir`. `extra_tokens` also keeps that many of the
    lowest-rank tokens. `meta` (e.g. the corpus hash) is stored in vocab_map.json. Takes a few seconds."""
    ranks = load_tiktoken_ranks(tiktoken_file if tiktoken_file is not None else default_tiktoken_file())
    if len(ranks) != NUM_BPE_TOKENS:
        raise ValueError(f"expected the Qwen3.5 vocabulary of {NUM_BPE_TOKENS} BPE tokens, got {len(ranks)}")
    table = bytes_to_unicode()
    rank = {token.decode("latin-1").translate(table): r for token, r in ranks.items()}

    kept = used_tokens(texts, rank)
    kept.update(table.values())  # all 256 bytes: any text encodes
    by_rank = sorted(rank, key=rank.__getitem__)
    for token in by_rank[:extra_tokens]:
        kept.add(token)
        kept.update(bpe_pieces(token, rank))
    vocab = sorted(kept, key=rank.__getitem__)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = tokenizer_json(vocab, subset_merges(vocab, rank))
    (out / "tokenizer.json").write_text(json.dumps(doc, ensure_ascii=False), "utf-8")
    config = tokenizer_config_json(chat_template)
    # tokenizer_config_json numbers the added tokens after Qwen3.5's 248044 BPE tokens; here they follow the subset.
    config["added_tokens_decoder"] = {
        str(len(vocab) + i): entry for i, entry in enumerate(config["added_tokens_decoder"].values())
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n", "utf-8")

    original_ids = [rank[t] for t in vocab] + [NUM_BPE_TOKENS + i for i in range(len(ADDED_TOKENS))]
    num_tokens = len(original_ids)
    vocab_size = -(-num_tokens // PAD_MULTIPLE) * PAD_MULTIPLE
    vocab_map = {
        "description": (
            "A subset of the Qwen3.5 tokenizer's vocabulary, renumbered densely: the byte-level BPE tokens the "
            "training corpus uses (with the pieces BPE forms on the way to them and all 256 single bytes), then "
            "Qwen3.5's added tokens. original_ids[new_id] is the Qwen3.5 id. Ids from num_tokens to vocab_size "
            "are padding the tokenizer never produces."
        ),
        "num_tokens": num_tokens,
        "vocab_size": vocab_size,
        "extra_tokens": extra_tokens,
        "meta": meta or {},
        "original_ids": original_ids,
    }
    (out / VOCAB_MAP_FILE).write_text(json.dumps(vocab_map, indent=1) + "\n", "utf-8")
    return load_vocab_map(out)


def load_vocab_map(path: str | Path) -> SubsetVocab:
    """Read `vocab_map.json` from a subset tokenizer directory."""
    root = Path(path)
    file = root / VOCAB_MAP_FILE
    try:
        data = json.loads(file.read_text("utf-8"))
        original_ids = tuple(int(i) for i in data["original_ids"])
        vocab_size = int(data["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{file}: not a subset vocabulary map ({type(exc).__name__}: {exc})") from None
    if vocab_size < len(original_ids):
        raise ValueError(f"{file}: vocab_size {vocab_size} is smaller than its {len(original_ids)} tokens")
    num_bpe = len(original_ids) - len(ADDED_TOKENS)
    special_ids = {content: num_bpe + i for i, (content, _) in enumerate(ADDED_TOKENS)}
    return SubsetVocab(root, original_ids, vocab_size, special_ids, data.get("meta") or {})
