"""The user-facing API and CLI on a tiny checkpoint that carries the real Qwen3.5 tokenizer and chat template."""

import json
import os
import subprocess
import sys

import pytest
import torch

from qwen35 import LLM, SamplingParams
from tests.tiny_models import build
from tests.tokenizer_fixtures import add_qwen35_tokenizer

GENERATION_CONFIG = {"bos_token_id": 248044, "pad_token_id": 248044, "eos_token_id": [248046, 248044],
                     "do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok-ckpt")
    hf = build("dense", path, seed=31, vocab_size=248320)
    return add_qwen35_tokenizer(path, generation_config=GENERATION_CONFIG), hf


@pytest.fixture(scope="module")
def llm(ckpt):
    return LLM(ckpt[0], dtype="float32", max_model_len=512)


def test_text_prompt_greedy_matches_transformers(llm, ckpt):
    _, hf = ckpt
    prompts = ["Der schnelle braune Fuchs", "東京の天気は", "def fib(n):"]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    for p, o in zip(prompts, outs):
        ids = llm.tokenizer.encode(p)
        assert o.prompt == p and o.prompt_token_ids == ids
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, min_new_tokens=16)[0, len(ids):]
        c = o.outputs[0]
        assert c.token_ids == ref.tolist()
        assert c.text == llm.tokenizer.decode(c.token_ids, skip_special_tokens=True)
        assert max(c.token_ids) < llm.tokenizer.vocab_size


def test_eos_ids_and_generation_defaults(llm):
    assert llm.engine.eos_ids == {248046, 248044}
    assert llm.engine.vocab_limit == llm.tokenizer.vocab_size == 248077
    d = llm.get_default_sampling_params()
    assert (d.temperature, d.top_p, d.top_k) == (0.6, 0.95, 20)
    mine = SamplingParams.from_optional(temperature=0.0, max_tokens=3).with_defaults(llm.generation_defaults())
    assert (mine.temperature, mine.top_k, mine.max_tokens) == (0.0, 20, 3)


def test_stop_strings_match_across_token_boundaries(llm):
    base = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
    c = base.outputs[0]
    # a stop string made of the end of one token and the start of the next
    pieces = [llm.tokenizer.decode([t], skip_special_tokens=True) for t in c.token_ids]
    k = next(i for i in range(3, len(pieces) - 1) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2)
    stop = pieces[k][-2:] + pieces[k + 1][:2]
    cut = c.text.find(stop)
    assert cut >= 0
    out = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                          stop=["@@never@@", stop]))[0].outputs[0]
    assert out.text == c.text[:cut] and out.finish_reason == "stop" and out.stop_reason == stop
    inc = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=stop,
                                                          include_stop_str_in_output=True))[0].outputs[0]
    assert inc.text == c.text[:cut + len(stop)]
    # streaming never shows text that the stop string later removes
    for partial in llm.stream("Once upon a time", SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                                 stop=stop)):
        assert c.text[:cut].startswith(partial.outputs[0].text)


def test_chat_renders_the_template_and_parses_the_answer(llm):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=8))[0]
    from qwen35.chat import render

    prompt = render(llm, messages)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n")
    assert out.prompt_token_ids == llm.tokenizer.encode(prompt)
    msg = out.messages[0]
    # thinking on and no </think> within 8 tokens: all reasoning
    assert msg["role"] == "assistant" and msg["content"] is None
    assert msg["reasoning_content"] == out.outputs[0].text.strip("\n") or out.outputs[0].text.strip() == ""
    off = llm.chat(messages, SamplingParams(temperature=0, max_tokens=8),
                   chat_template_kwargs={"enable_thinking": False})[0]
    assert off.messages[0]["reasoning_content"] is None
    assert render(llm, messages, chat_template_kwargs={"enable_thinking": False}).endswith("<think>\n\n</think>\n\n")


def test_chat_template_error_is_clear(llm):
    from qwen35.chat.template import ChatTemplateError

    with pytest.raises(ChatTemplateError, match="System message must be at the beginning"):
        llm.chat([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}])
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("bad", [123, None, 1.5, [1.5], [[1, "a"]], {"text": "hi"}, {"prompt": 5},
                                 {"prompt_token_ids": "abc"}, [{"prompt": None}]])
def test_bad_prompt_forms_name_the_accepted_ones(llm, bad):
    with pytest.raises(TypeError, match=r"a prompt is a string, a list of token ids, or a dict with 'prompt' \(a "
                                        r"string\) or 'prompt_token_ids' \(a list of ints\).*; got "):
        llm.generate(bad)
    with pytest.raises(TypeError, match="sampling_params must be a SamplingParams or a list of them"):
        llm.generate("Hi", {"temperature": 0})
    assert not llm.engine.has_unfinished_requests()


def run_cli(*args, stdin=None, env=None):
    env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "qwen35", *args], input=stdin, capture_output=True, text=True,
                          timeout=300, env=env)


def test_cli_generate_json_equals_api(llm, ckpt):
    r = run_cli("generate", "--model", str(ckpt[0]), "--dtype", "float32", "--max-model-len", "512",
                "--temperature", "0", "--max-tokens", "6", "--logprobs", "2", "--ignore-eos", "--json", "Hello")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    ref = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=6, logprobs=2, ignore_eos=True))[0]
    assert got["outputs"][0]["token_ids"] == ref.outputs[0].token_ids
    assert got["outputs"][0]["text"] == ref.outputs[0].text
    assert len(got["outputs"][0]["logprobs"]) == 6


def test_cli_generate_streams_from_stdin(llm, ckpt):
    r = run_cli("generate", "--model", str(ckpt[0]), "--dtype", "float32", "--max-model-len", "512",
                "--temperature", "0", "--max-tokens", "6", "--ignore-eos", "-", stdin="Hello")
    assert r.returncode == 0, r.stderr
    ref = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    assert r.stdout == ref.outputs[0].text + "\n"


def test_cli_chat_reads_turns_and_commands(ckpt):
    r = run_cli("chat", "--model", str(ckpt[0]), "--max-model-len", "512", "--temperature", "0",
                "--max-tokens", "4", stdin="Hello\n/think off\nmulti \\\nline\n/reset\n/help\n/quit\n")
    assert r.returncode == 0, r.stderr
    assert "(think off)" in r.stdout and "(conversation cleared)" in r.stdout and "/system TEXT" in r.stdout


def test_cli_errors_are_one_line_and_nonzero(ckpt):
    r = run_cli("generate", "--model", str(ckpt[0]), "--top-p", "0", "x")
    assert r.returncode == 2 and "SamplingParams.top_p must be in (0, 1]" in r.stderr
    assert "Traceback" not in r.stderr
    r = run_cli("generate", "--model", "/nonexistent", "x")
    assert r.returncode == 2 and "/nonexistent" in r.stderr and "Traceback" not in r.stderr


def test_cli_info_397b():
    r = run_cli("info", "qwen3.5-397b-a17b", "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert 390e9 < s["params"]["total"] < 400e9 and 16.5e9 < s["params"]["active"] < 18e9
    assert s["kv_cache_bytes_per_token"] == 15 * 2 * 2 * 256 * 2


def test_embedded_default_generates(tmp_path):
    """The README's first command: no --model, the demo model shipped in the package is used."""
    env = {"QWEN35_CACHE": str(tmp_path)}
    r = run_cli("generate", "--max-tokens", "5", "--temperature", "0", "Hello", env=env)
    assert r.returncode == 0, r.stderr
    assert "trained in minutes on the Python documentation" in r.stderr and r.stdout.strip()
    r = run_cli("chat", "--max-tokens", "3", stdin="Hi\n", env=env)
    assert r.returncode == 0, r.stderr
    # the demo model has a vision tower: images attach from the command line and from the chat
    from PIL import Image

    Image.new("RGB", (300, 200), (200, 30, 30)).save(tmp_path / "red.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    r = run_cli("chat", "--max-tokens", "3", "--image", str(tmp_path / "red.png"),
                stdin=f"What is this?\n/image {tmp_path / 'broken.png'}\nAnd this?\nStill here\n", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("attached to your next message") == 2
    assert "broken.png: not an image" in r.stdout or "broken.png: corrupt" in r.stdout, r.stdout


def test_stream_deltas_concatenate_to_the_final_output(llm):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1, n=2)
    final = llm.generate(["Hello", "World"], params)
    text, toks, lps, reasons = {}, {}, {}, {}
    for out in llm.stream(["Hello", "World"], params, output_kind="delta"):
        for c in out.outputs:
            key = (out.request_id, c.index)
            text[key] = text.get(key, "") + c.text
            toks[key] = toks.get(key, []) + c.token_ids
            lps[key] = lps.get(key, []) + c.logprobs
            reasons[key] = c.finish_reason
    keys = sorted(text, key=lambda k: (int(k[0]), k[1]))  # request ids are counters: "10" comes after "9"
    assert [text[k] for k in keys] == [c.text for o in final for c in o.outputs]
    assert [toks[k] for k in keys] == [c.token_ids for o in final for c in o.outputs]
    assert [len(lps[k]) for k in keys] == [12] * 4 and set(reasons.values()) == {"length"}
    assert not llm.engine.has_unfinished_requests()
