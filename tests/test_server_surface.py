"""The rest of the request surface a vLLM client sends, driven by the official `openai` client against a real server
(vLLM-only fields through `extra_body`): logit_bias, max_completion_tokens, stop strings and ids, continuous usage
stats, reasoning_effort, OpenAI parameters accepted and ignored, chat echo / add_generation_prompt /
continue_final_message, skip_special_tokens, truncate_prompt_tokens and allowed_token_ids. Each is checked against
`LLM.generate` / `LLM.chat` greedy references or against the same request without the parameter.

The server runs the embedded demo model (small vocabulary: it starts in seconds) from a copy whose chat template
thinks by default, as the released Qwen3.5 template does, so that reasoning_effort has something to turn off."""

import json
import shutil

import openai
import pytest
import torch

from qwen35 import LLM, SamplingParams
from qwen35.chat import render
from qwen35.demo import demo_checkpoint
from tests.test_server import SERVER, Server

MODEL = "tiny"
USER = [{"role": "user", "content": "How do I open a file?"}]
PROMPT = "def add(a, b):"
ONE_THREAD = "import torch; torch.set_num_threads(1)\n"
DEFAULT_OFF = "{%- if enable_thinking is not defined %}{%- set enable_thinking = false %}{%- endif %}"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("surface-ckpt") / "demo"
    shutil.copytree(demo_checkpoint(), path)
    template = json.loads((path / "tokenizer_config.json").read_text())["chat_template"]
    assert template.startswith(DEFAULT_OFF)
    (path / "chat_template.jinja").write_text(template.replace(DEFAULT_OFF, DEFAULT_OFF.replace("false", "true"), 1))
    return path


@pytest.fixture(scope="module")
def served(ckpt, tmp_path_factory):
    """(server, the same checkpoint in this process): the reference loads while the server starts. One torch
    thread each: the two processes take turns on the cores, and idle OpenMP threads spinning in one slow the other
    many times over."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    s = Server(ckpt, tmp_path_factory.mktemp("surface-log") / "server.log", script=ONE_THREAD + SERVER,
               max_num_seqs=8)
    try:
        llm = LLM(ckpt, dtype="float32", max_model_len=512)
        yield s.wait_ready(), llm
    finally:
        s.stop()
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0].url + "/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def llm(served):
    return served[1]


def greedy(max_tokens, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)


def complete(client, prompt=PROMPT, max_tokens=6, **extra):
    """A greedy /v1/completions call; vLLM-only fields go in extra_body."""
    openai_keys = {"logprobs", "echo", "stop", "stream", "stream_options", "user", "seed"}
    kw = {k: extra.pop(k) for k in list(extra) if k in openai_keys}
    return client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=max_tokens,
                                     extra_body={"ignore_eos": True, **extra}, **kw)


def chat(client, messages=USER, max_tokens=6, extra_body=None, **kw):
    return client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=max_tokens,
                                          extra_body={"ignore_eos": True, **(extra_body or {})}, **kw)


def bad_request(call) -> dict:
    """The error body of a call that must fail with 400."""
    with pytest.raises(openai.BadRequestError) as e:
        call()
    return e.value.body


# logit_bias

def test_logit_bias_forces_and_bans(client, llm):
    ref = llm.generate(PROMPT, greedy(4))[0].outputs[0]
    forced = llm.tokenizer.encode(" banana")[0]
    assert forced not in ref.token_ids
    r = complete(client, max_tokens=4, logprobs=0, logit_bias={str(forced): 100})
    assert r.choices[0].logprobs.tokens == [llm.tokenizer.decode([forced])] * 4
    # -100 on the greedy first token: the answer changes, to what the engine gives with the same bias
    first = ref.token_ids[0]
    banned = llm.generate(PROMPT, greedy(4, logit_bias={first: -100}))[0].outputs[0]
    assert banned.token_ids[0] != first
    r = complete(client, max_tokens=4, logit_bias={str(first): -100})
    assert r.choices[0].text == banned.text != ref.text
    # chat takes it too (the openai client's own parameter)
    r = client.chat.completions.create(model=MODEL, messages=USER, temperature=0, max_tokens=3,
                                       logit_bias={str(forced): 100}, extra_body={"ignore_eos": True})
    assert (r.choices[0].message.reasoning_content or "") + (r.choices[0].message.content or "") == \
        llm.tokenizer.decode([forced] * 3)


@pytest.mark.parametrize("bias", [{"5": 101}, {"5": -100.5}, {"five": 1}, {"-3": 1}, {"5": "x"}, {"5": True},
                                  {"99999999": 1}], ids=["over", "under", "not-an-id", "negative", "not-a-number",
                                                         "bool", "beyond-vocab"])
def test_logit_bias_bad_values(client, bias):
    body = bad_request(lambda: complete(client, logit_bias=bias))
    assert body["param"] == "logit_bias", body
    body = bad_request(lambda: client.chat.completions.create(model=MODEL, messages=USER, logit_bias=bias))
    assert body["param"] == "logit_bias", body


# max_completion_tokens

def test_max_completion_tokens(client):
    for kw in ({"max_completion_tokens": 3}, {"max_completion_tokens": 3, "max_tokens": 7}):
        r = client.chat.completions.create(model=MODEL, messages=USER, temperature=0, extra_body={"ignore_eos": True},
                                           **kw)
        assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
    body = bad_request(lambda: client.chat.completions.create(model=MODEL, messages=USER, max_completion_tokens=0))
    assert body["param"] == "max_completion_tokens", body


# stop strings and stop_token_ids

def test_stop_strings_and_ids(client, llm):
    ref = llm.generate(PROMPT, greedy(12))[0].outputs[0]
    stop = "value"
    at = ref.text.index(stop)
    assert ref.text.index(stop) > 0
    r = complete(client, max_tokens=12, stop=[stop])
    c = r.choices[0]
    assert (c.text, c.finish_reason, c.stop_reason) == (ref.text[:at], "stop", stop)
    r = complete(client, max_tokens=12, stop=stop, include_stop_str_in_output=True)
    assert (r.choices[0].text, r.choices[0].stop_reason) == (ref.text[:at + len(stop)], stop)
    for include in (False, True):  # streamed: the text held back until it cannot start a stop string
        chunks = list(complete(client, max_tokens=12, stop=[stop], stream=True, include_stop_str_in_output=include))
        assert "".join(ch.choices[0].text for ch in chunks) == ref.text[:at + (len(stop) if include else 0)]
        assert (chunks[-1].choices[0].finish_reason, chunks[-1].choices[0].stop_reason) == ("stop", stop)
    # a stop token id: the generation ends on it, reported as stop_reason; its text only with
    # include_stop_str_in_output (as vLLM)
    stop_id = ref.token_ids[3]
    assert stop_id not in ref.token_ids[:3]
    for include in (False, True):
        r = complete(client, max_tokens=12, stop_token_ids=[stop_id], include_stop_str_in_output=include)
        c = r.choices[0]
        assert (c.text, c.finish_reason, c.stop_reason) == \
            (llm.tokenizer.decode(ref.token_ids[:4 if include else 3]), "stop", stop_id)
        assert r.usage.completion_tokens == 4
    # in chat: a stop id and a stop string cut from the greedy reply
    ref = llm.chat(USER, greedy(10), chat_template_kwargs={"enable_thinking": False})[0].outputs[0]
    off = {"chat_template_kwargs": {"enable_thinking": False}}
    r = chat(client, max_tokens=10, extra_body={**off, "stop_token_ids": [ref.token_ids[2]]})
    c = r.choices[0]
    assert (c.message.content, c.finish_reason, c.stop_reason) == \
        (llm.tokenizer.decode(ref.token_ids[:2]), "stop", ref.token_ids[2])
    word = ref.text.split()[2]
    r = chat(client, max_tokens=10, stop=word, extra_body=off)
    c = r.choices[0]
    assert (c.message.content, c.finish_reason, c.stop_reason) == (ref.text[:ref.text.index(word)], "stop", word)
    chunks = list(chat(client, max_tokens=10, stop=word, extra_body=off, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == c.message.content
    assert (chunks[-1].choices[0].finish_reason, chunks[-1].choices[0].stop_reason) == ("stop", word)


# stream_options: usage on every chunk

def test_continuous_usage_stats(client):
    opts = {"include_usage": True, "continuous_usage_stats": True}
    off = {"chat_template_kwargs": {"enable_thinking": False}}
    for create, kw in ((client.chat.completions.create, {"messages": USER, "extra_body": {"ignore_eos": True, **off}}),
                       (client.completions.create, {"prompt": PROMPT, "extra_body": {"ignore_eos": True}})):
        plain = create(model=MODEL, temperature=0, max_tokens=5, **kw)
        chunks = list(create(model=MODEL, temperature=0, max_tokens=5, stream=True, stream_options=opts, **kw))
        assert all(ch.usage is not None for ch in chunks), [ch.usage for ch in chunks]
        counts = [ch.usage.completion_tokens for ch in chunks]
        assert counts == sorted(counts) and counts[-1] == 5 and len(set(counts)) > 2, counts
        assert all(ch.usage.prompt_tokens == plain.usage.prompt_tokens for ch in chunks)
        counts = [(u.prompt_tokens, u.completion_tokens, u.total_tokens) for u in (chunks[-1].usage, plain.usage)]
        assert chunks[-1].choices == [] and counts[0] == counts[1]  # (cached_tokens may differ: the cache warmed)
        # without continuous_usage_stats only the last chunk carries usage
        chunks = list(create(model=MODEL, temperature=0, max_tokens=5, stream=True,
                             stream_options={"include_usage": True}, **kw))
        assert [ch.usage is not None for ch in chunks] == [False] * (len(chunks) - 1) + [True]
        body = bad_request(lambda: create(model=MODEL, max_tokens=5, stream_options=opts, **kw))
        assert body["param"] == "stream_options", body


# reasoning_effort

def test_reasoning_effort(client, llm):
    def reply(**kw):
        msg = chat(client, max_tokens=8, **kw).choices[0].message
        return getattr(msg, "reasoning_content", None), msg.content

    def expected(thinking):
        m = llm.chat(USER, greedy(8), chat_template_kwargs={"enable_thinking": thinking})[0].messages[0]
        return m["reasoning_content"], m["content"]

    on, off = expected(True), expected(False)
    assert on[0] is not None and off[0] is None and on != off
    assert reply() == on  # this template thinks by default
    for effort in ("none", "minimal"):
        assert reply(reasoning_effort=effort) == off
    for effort in ("low", "medium", "high"):
        assert reply(reasoning_effort=effort) == on
    # chat_template_kwargs wins over reasoning_effort
    assert reply(reasoning_effort="none", extra_body={"chat_template_kwargs": {"enable_thinking": True}}) == on
    body = bad_request(lambda: chat(client, reasoning_effort="extreme"))
    assert body["param"] == "reasoning_effort", body


# OpenAI parameters that mean nothing here: accepted and ignored

def test_ignored_openai_parameters(client):
    off = {"chat_template_kwargs": {"enable_thinking": False}}
    plain = chat(client, max_tokens=6, extra_body=off)
    r = chat(client, max_tokens=6, extra_body=off, user="u-1", parallel_tool_calls=False, seed=7, n=2,
             metadata={"k": "v"}, store=False, service_tier="auto", modalities=["text"],
             prediction={"type": "content", "content": "predicted"}, safety_identifier="sid",
             prompt_cache_key="pck", verbosity="low")
    assert [c.message.content for c in r.choices] == [plain.choices[0].message.content] * 2
    r = complete(client, user="u-1", seed=7, metadata={"k": "v"}, store=False, service_tier="auto")
    assert r.choices[0].text == complete(client).choices[0].text


# chat echo, add_generation_prompt, continue_final_message

def test_add_generation_prompt_and_echo(client, llm):
    messages = USER + [{"role": "assistant", "content": "Use the open function."}]
    prompt = render(llm, messages, add_generation_prompt=False)
    assert prompt.endswith("Use the open function.<|im_end|>\n")
    ref = llm.generate({"prompt": prompt, "prompt_token_ids": llm.tokenizer.encode(prompt)}, greedy(6))[0]
    r = chat(client, messages, extra_body={"add_generation_prompt": False})
    assert r.choices[0].message.content == ref.outputs[0].text
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
    r = chat(client, messages, extra_body={"add_generation_prompt": False, "echo": True})
    assert r.choices[0].message.content == "Use the open function." + ref.outputs[0].text
    chunks = list(chat(client, messages, stream=True, extra_body={"add_generation_prompt": False, "echo": True}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == r.choices[0].message.content
    # echo has nothing to repeat when the generation prompt follows a user message
    plain = chat(client)
    assert chat(client, extra_body={"echo": True}).choices[0].message == plain.choices[0].message


def test_continue_final_message(client, llm):
    start = "To open a file, call"
    messages = USER + [{"role": "assistant", "content": start}]
    full = render(llm, messages, add_generation_prompt=False)
    prompt = full[:full.rindex(start) + len(start)]  # the rendered conversation cut right after the message
    assert full[len(prompt):] == "<|im_end|>\n"
    ref = llm.generate({"prompt": prompt, "prompt_token_ids": llm.tokenizer.encode(prompt)}, greedy(6))[0]
    cont = {"add_generation_prompt": False, "continue_final_message": True}
    r = chat(client, messages, extra_body=cont)
    assert r.choices[0].message.content == ref.outputs[0].text
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
    r = chat(client, messages, extra_body={**cont, "echo": True})
    assert r.choices[0].message.content == start + ref.outputs[0].text
    chunks = list(chat(client, messages, stream=True, extra_body={**cont, "echo": True}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == start + ref.outputs[0].text
    body = bad_request(lambda: chat(client, messages, extra_body={"continue_final_message": True}))
    assert body["param"] == "continue_final_message", body
    # the Python API
    out = llm.chat(messages, greedy(6), continue_final_message=True, add_generation_prompt=False)[0]
    assert out.prompt_token_ids == ref.prompt_token_ids and out.outputs[0].text == ref.outputs[0].text
    assert out.messages[0]["content"] == ref.outputs[0].text
    with pytest.raises(ValueError, match="continue_final_message"):
        llm.chat(messages, greedy(6), continue_final_message=True)


# skip_special_tokens

def test_skip_special_tokens(client, llm):
    im_start = llm.tokenizer.encode("<|im_start|>")
    assert len(im_start) == 1
    force = {"logit_bias": {str(im_start[0]): 100}}
    assert complete(client, max_tokens=2, **force).choices[0].text == ""
    r = complete(client, max_tokens=2, skip_special_tokens=False, **force)
    assert r.choices[0].text == "<|im_start|><|im_start|>" and r.usage.completion_tokens == 2
    r = chat(client, max_tokens=2, extra_body={**force, "skip_special_tokens": False,
                                               "chat_template_kwargs": {"enable_thinking": False}})
    assert r.choices[0].message.content == "<|im_start|><|im_start|>"


# truncate_prompt_tokens

def test_truncate_prompt_tokens(client, llm):
    text = "Return the number of items in a container. The argument may be a sequence"
    ids = llm.tokenizer.encode(text)
    assert len(ids) > 8
    r = complete(client, prompt=text, truncate_prompt_tokens=5)
    tail = complete(client, prompt=ids[-5:])
    assert r.usage.prompt_tokens == 5 and r.choices[0].text == tail.choices[0].text
    assert r.choices[0].text != complete(client, prompt=text).choices[0].text
    assert r.choices[0].text == llm.generate({"prompt_token_ids": ids[-5:]}, greedy(6))[0].outputs[0].text
    r = complete(client, prompt=text, truncate_prompt_tokens=-1)  # as many as fit: all of them here
    assert r.usage.prompt_tokens == len(ids)
    r = chat(client, extra_body={"truncate_prompt_tokens": 4})
    assert r.usage.prompt_tokens == 4
    for k in (0, -2, True, 2.5):
        body = bad_request(lambda: complete(client, prompt=text, truncate_prompt_tokens=k))
        assert body["param"] == "truncate_prompt_tokens", body
    body = bad_request(lambda: complete(client, prompt=text, truncate_prompt_tokens=10**6))  # past max_model_len
    assert body["param"] == "truncate_prompt_tokens" and "max_model_len" in body["message"], body


# allowed_token_ids

def test_allowed_token_ids(client, llm):
    allowed = sorted(set(llm.tokenizer.encode(" open read write file close")))
    free = complete(client, max_tokens=8, logprobs=0)
    r = complete(client, max_tokens=8, logprobs=0, allowed_token_ids=allowed)
    names = {llm.tokenizer.decode([t]) for t in allowed}
    assert len(r.choices[0].logprobs.tokens) == 8 and set(r.choices[0].logprobs.tokens) <= names
    assert not set(free.choices[0].logprobs.tokens) <= names
    ref = llm.generate(PROMPT, greedy(8, allowed_token_ids=allowed))[0].outputs[0]
    assert set(ref.token_ids) <= set(allowed) and r.choices[0].text == ref.text
    for bad in ([99999999], [], [True], ["5"]):
        body = bad_request(lambda: complete(client, allowed_token_ids=bad))
        assert body["param"] == "allowed_token_ids", body


@pytest.mark.parametrize("final", ["To open a file, call", " To open", "call(\n", "one\n\ntwo  ", "x</think>y",
                                   [{"type": "text", "text": "a "}, {"type": "text", "text": " b\n"}]],
                         ids=["plain", "leading-space", "trailing-newline", "inner-blank-line", "think-tag", "parts"])
def test_continue_final_message_matches_transformers(llm, final):
    """The continued prompt is the one transformers' apply_chat_template (which vLLM uses) renders."""
    render_jinja_template = pytest.importorskip("transformers.utils.chat_template_utils").render_jinja_template
    messages = USER + [{"role": "assistant", "content": final}]
    for thinking in (True, False):
        try:
            expected = render_jinja_template([messages], chat_template=llm.tokenizer.chat_template,
                                             add_generation_prompt=False, continue_final_message=True,
                                             enable_thinking=thinking)[0][0]
        except ValueError:  # the template rewrote the message (here: split its reasoning off)
            expected = None
        try:
            prompt = render(llm, messages, chat_template_kwargs={"enable_thinking": thinking},
                            add_generation_prompt=False, continue_final_message=True)
        except ValueError as e:
            assert "continue_final_message" in str(e)
            prompt = None
        assert prompt == expected
    assert (expected is None) == (final == "x</think>y")
