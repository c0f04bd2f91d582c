"""The reduced Qwen3.5 vocabulary: exact on the corpus it was built from, lossless on any other text."""

from __future__ import annotations

import json
import unicodedata

import pytest

from qwen35.chat.template import ChatTemplate
from qwen35.tokenizer import Tokenizer
from qwen35.tokenizer_build import ADDED_TOKENS, NUM_BPE_TOKENS
from qwen35.tokenizer_subset import PAD_MULTIPLE, build_subset_tokenizer, load_vocab_map
from qwen35.train.corpus import CHAT_TEMPLATE_PATH, encode_samples
from test_demo_corpus import demo_corpus
from tokenizer_fixtures import MULTILINGUAL, qwen35_tokenizer_dir

ODD_TEXTS = {
    **MULTILINGUAL,
    "control": "bell\a nul\x00 esc\x1b[31m del\x7f vt\x0b ff\x0c \x85 \u2028 \u2029 \ufeff bom \ud7ff",
    "emoji_zwj": "🧑🏽‍🚀 👩‍👩‍👧 🫠 🪿 \U0001f9d1\u200d\U0001f91d\u200d\U0001f9d1",
    "cjk_mix": "Python 的 `dict` 是哈希表；リスト内包表記；파이썬 딕셔너리 — ok?",
    "code_py": "async def f(*a, **k) -> dict[str, int]:\n\treturn {k: v ** 2 for k, v in k.items() if v}  # 🐍\n",
    "long_repeat": "=" * 300 + " " * 50 + "abc" * 40,
}


@pytest.fixture(scope="module")
def corpus():
    return demo_corpus()


@pytest.fixture(scope="module")
def subset(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("subset-tokenizer")
    texts = corpus.texts("train") + corpus.texts("heldout")
    vocab = build_subset_tokenizer(texts, out, chat_template=CHAT_TEMPLATE_PATH.read_text(),
                                   meta={"corpus_sha256": corpus.sha256})
    return vocab, Tokenizer.from_dir(out)


@pytest.fixture(scope="module")
def full():
    return Tokenizer.from_dir(qwen35_tokenizer_dir())


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_corpus_encodes_exactly_as_qwen35(corpus, subset, full, split):
    vocab, tok = subset
    texts = corpus.texts(split)
    ours = tok.backend.encode_batch(texts, add_special_tokens=False)
    theirs = full.backend.encode_batch(texts, add_special_tokens=False)
    for text, a, b in zip(texts, ours, theirs):
        assert [vocab.original_ids[i] for i in a.ids] == b.ids, text[:200]


@pytest.mark.parametrize("name", sorted(ODD_TEXTS))
def test_any_text_encodes_into_the_subset_and_decodes_back(subset, full, name):
    vocab, tok = subset
    text = ODD_TEXTS[name]
    ids = tok.encode(text)
    assert all(0 <= i < vocab.num_tokens for i in ids)
    assert tok.decode(ids) == full.decode(full.encode(text)) == unicodedata.normalize("NFC", text)


def test_added_tokens_are_single_tokens_with_remapped_ids(subset, full):
    vocab, tok = subset
    for content, _ in ADDED_TOKENS:
        new = vocab.special_ids[content]
        assert tok.encode(content) == [new], content
        assert vocab.original_ids[new] == full.token_to_id(content)
        assert vocab.new_id(full.token_to_id(content)) == new
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_ids == (vocab.special_ids["<|im_end|>"],)
    assert tok.pad_token_id == vocab.special_ids["<|endoftext|>"]


def test_chat_prompt_through_the_loaded_tokenizer(subset, full):
    _, tok = subset
    assert tok.chat_template == CHAT_TEMPLATE_PATH.read_text()
    template = ChatTemplate(tok.chat_template)
    prompt = template.render([{"role": "user", "content": "What does `str.split` do? <|im_end|>"}],
                             add_generation_prompt=True, enable_thinking=False, literal_tokens=tok.special_tokens)
    ids = tok.encode(prompt)
    im_start, im_end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    # The template's markers are single ids; the user's "<|im_end|>" is text.
    assert ids.count(im_start) == 2 and ids.count(im_end) == 1
    assert tok.decode(ids) == str(prompt) == full.decode(full.encode(prompt))


def test_vocab_map_file(subset, corpus):
    vocab, tok = subset
    data = json.loads((vocab.path / "vocab_map.json").read_text())
    assert data["original_ids"] == list(vocab.original_ids) and data["meta"]["corpus_sha256"] == corpus.sha256
    assert tok.vocab_size == vocab.num_tokens < vocab.vocab_size < vocab.num_tokens + PAD_MULTIPLE
    assert vocab.vocab_size % PAD_MULTIPLE == 0
    bpe = vocab.original_ids[: vocab.num_tokens - len(ADDED_TOKENS)]
    assert list(bpe) == sorted(set(bpe)) and bpe[-1] < NUM_BPE_TOKENS  # relative order kept, no duplicates
    assert load_vocab_map(vocab.path) == vocab


def test_extra_tokens_keep_the_lowest_ranks(tmp_path, full):
    vocab = build_subset_tokenizer(["hello world"], tmp_path, extra_tokens=2000)
    assert set(range(2000)) <= set(vocab.original_ids)
    tok = Tokenizer.from_dir(tmp_path)
    assert [vocab.original_ids[i] for i in tok.encode("hello world")] == full.encode("hello world")


def test_bad_vocab_map_names_the_file(tmp_path):
    (tmp_path / "vocab_map.json").write_text('{"original_ids": [1, 2], "vocab_size": "x"}')
    with pytest.raises(ValueError, match=r"vocab_map\.json: not a subset vocabulary map"):
        load_vocab_map(tmp_path)


def test_assistant_mask_covers_exactly_the_answers(corpus, subset):
    _, tok = subset
    samples = corpus.train[:100] + corpus.heldout
    for sample, (ids, mask) in zip(samples, encode_samples(tok, samples)):
        assert ids == tok.encode(sample.text)
        targets = [i for i, m in zip(ids, mask) if m]
        assert tok.decode(targets) == "".join(sample.text[a:b] for a, b in sample.assistant_spans)
        assert ids[mask.index(True) - 1] == tok.token_to_id("\u010a")  # right after "<|im_start|>assistant\n"
        assert mask[-2] and not mask[-1] and ids[-2] == tok.token_to_id("<|im_end|>")  # "<|im_end|>" then "\n"
