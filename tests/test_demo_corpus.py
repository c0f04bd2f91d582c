"""The demo model's corpus: deterministic, split by document, rendered in the format the model is prompted with."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qwen35.chat.template import ChatTemplate
from qwen35.train.corpus import (CHAT_TEMPLATE_PATH, HELD_OUT_PERCENT, MAX_ANSWER_CHARS, build_corpus, clean_text,
                                 is_heldout)

REPO = Path(__file__).resolve().parent.parent


@functools.lru_cache(maxsize=1)
def demo_corpus():
    """The seed-0 corpus, built once per test process (test_tokenizer_subset uses it too)."""
    return build_corpus()


@pytest.fixture(scope="module")
def corpus():
    return demo_corpus()


def test_split_is_by_document_and_about_five_percent(corpus):
    train = {t for s in corpus.train for t in s.titles}
    heldout = {t for s in corpus.heldout for t in s.titles}
    assert not train & heldout
    assert all(not is_heldout(t) for t in train) and all(is_heldout(t) for t in heldout)
    share = 100 * len(heldout) / (len(train) + len(heldout))
    assert HELD_OUT_PERCENT / 2 < share < HELD_OUT_PERCENT * 2
    assert len(train) + len(heldout) > 1000 and corpus.num_chars("train") > 300_000


def test_seed_changes_wording_not_split(corpus):
    other = build_corpus(seed=1)
    assert other.sha256 != corpus.sha256
    assert {t for s in other.heldout for t in s.titles} == {t for s in corpus.heldout for t in s.titles}


def test_same_corpus_in_another_process(corpus):
    # Python salts str hashes per process: the corpus must not depend on them.
    code = "from qwen35.train.corpus import build_corpus; print(build_corpus().sha256)"
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == corpus.sha256


def test_describe_records_the_python_version(corpus):
    info = corpus.describe()
    assert info["python_version"] == "%d.%d.%d" % sys.version_info[:3]
    assert info["train_samples"] == len(corpus.train) and info["sha256"] == corpus.sha256
    with pytest.raises(ValueError, match="unknown corpus split 'test'"):
        corpus.texts("test")


def test_samples_are_rendered_as_the_model_is_prompted(corpus):
    template = ChatTemplate(CHAT_TEMPLATE_PATH.read_text())
    for sample in corpus.train[:200] + corpus.heldout:
        messages = list(sample.messages)
        assert sample.text == template.render(messages)
        # A non-thinking generation prompt for the last question, then the answer and <|im_end|>.
        prompt = template.render(messages[:-1], add_generation_prompt=True, enable_thinking=False)
        start, end = sample.assistant_spans[-1]
        assert sample.text[:end] == prompt[: -len("<think>\n\n</think>\n\n")] + sample.text[start:end]
        assert sample.text[start:end] == "<think>\n\n</think>\n\n" + messages[-1]["content"] + "<|im_end|>"
        assert len(sample.assistant_spans) == sum(m["role"] == "assistant" for m in messages)
        for a, b in sample.assistant_spans:
            assert sample.text[a - len("<|im_start|>assistant\n") : a] == "<|im_start|>assistant\n"
            assert sample.text[b - len("<|im_end|>") : b] == "<|im_end|>"


def test_user_asks_and_assistant_answers(corpus):
    answers = {t: m["content"] for s in corpus.train + corpus.heldout
               for t, m in zip(s.titles, [m for m in s.messages if m["role"] == "assistant"])}
    questions = [m["content"] for s in corpus.train + corpus.heldout for m in s.messages if m["role"] == "user"]
    assert any("`json`" in q for q in questions) and any("statement" in q for q in questions)
    assert answers["str.split"].startswith("`str.split(sep=None, maxsplit=-1)`\n\nReturn a list of the substrings")
    assert answers["str.count"].startswith("`S.count(sub[, start[, end]]) -> int`\n\nReturn the number")


def test_clean_text_removes_markup_and_keeps_code():
    doc = (
        "Serialize ``obj`` with :func:`json.dumps` and :class:`~json.JSONEncoder` [1].\nSecond line of the\n"
        "same paragraph.\n\n.. versionadded:: 3.2\n\nChanged in version 3.6: something.\n\n"
        "   stmt ::= \"x\" expression\n\nExample::\n\n    >>> f(1)\n    2\n\n      indented\n\n[1] A footnote.\n"
    )
    assert clean_text(doc) == (
        "Serialize `obj` with `json.dumps` and `json.JSONEncoder`. Second line of the same paragraph.\n\n"
        "Example:\n\n```\n>>> f(1)\n2\n\n  indented\n```"
    )
    assert clean_text('The "with" statement wraps a block.', quoted_code=True) == "The `with` statement wraps a block."
    long = " ".join(["A sentence of ordinary words."] * 300)
    assert len(clean_text(long)) <= MAX_ANSWER_CHARS and clean_text(long).endswith(".")
    assert clean_text("Typical usage:\n\n" + "    x = 1\n" * 1000) == "Typical usage:"
    assert clean_text("Intro.\n\nTypical usage:\n\n" + "    x = 1\n" * 1000) == "Intro."


def test_what_other_libraries_add_to_standard_modules_is_left_out(monkeypatch):
    """transformers adds `warning_once` to logging.Logger when imported: the corpus must not change with it."""
    import logging

    from qwen35.train.corpus import documents

    def warning_once(self, msg):
        """Log a warning only the first time this exact message is seen by the process."""

    warning_once.__module__ = "somelib.utils.logging"
    monkeypatch.setattr(logging.Logger, "warning_once", warning_once, raising=False)
    assert "logging.Logger.warning_once" not in {d.title for d in documents()}
