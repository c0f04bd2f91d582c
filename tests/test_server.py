"""The OpenAI-compatible server, run as a real process on a loopback port and driven by the official `openai` client
and raw `httpx` (32 concurrent streaming clients among them): outputs equal `LLM.generate`, streaming, reasoning,
tools, errors, concurrency, abort on disconnect, and the waiting-queue limit."""

import json
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from qwen35 import LLM, SamplingParams
from qwen35.chat import render
from qwen35.serve.responses import ChatStreamState, build_chat_choice
from qwen35.chat.reasoning import split_reasoning
from tests.tiny_models import build
from tests.tokenizer_fixtures import add_qwen35_tokenizer

GENERATION_CONFIG = {"bos_token_id": 248044, "pad_token_id": 248044, "eos_token_id": [248046, 248044],
                     "do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20}
API_KEY = "sk-test-key"
MODEL = "tiny"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string"}, "days": {"type": "integer"}},
                                               "required": ["city"]}}}]

SERVER = r"""
import json, socket, sys
import uvicorn
from qwen35.llm import LLM
from qwen35.serve.app import build_app
cfg = json.loads(sys.argv[1])
llm = LLM(cfg["model"], dtype="float32", max_model_len=512, max_num_seqs=cfg["max_num_seqs"], **cfg.get("llm", {}))
app = build_app(llm, "tiny", api_key=cfg["api_key"], max_waiting=cfg["max_waiting"],
                max_body_bytes=cfg.get("max_body_bytes", 64 * 1024))
sock = socket.socket()
sock.bind(("127.0.0.1", 0))
print(sock.getsockname()[1], flush=True)
uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
"""


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve-ckpt")
    build("dense", path, seed=31, vocab_size=248320)
    return add_qwen35_tokenizer(path, generation_config=GENERATION_CONFIG)


class Server:
    def __init__(self, ckpt, log_path, script=SERVER, **cfg):
        cfg = {"model": str(ckpt), "api_key": None, "max_num_seqs": 32, "max_waiting": 256, **cfg}
        self.headers = {"Authorization": f"Bearer {cfg['api_key']}".encode()} if cfg["api_key"] else {}
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-c", script, json.dumps(cfg)], stdout=subprocess.PIPE,
                                     stderr=self.log, text=True)
        self.url = None

    def wait_ready(self, timeout=120):
        line = self.proc.stdout.readline()
        assert line.strip().isdigit(), f"server did not start; see {self.log.name}"
        self.url = f"http://127.0.0.1:{int(line)}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise TimeoutError("server /health did not answer")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        self.log.close()

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", headers=self.headers, timeout=10).text
        return {name: float(value) for name, value in re.findall(r"^([^#\s]+) (\S+)$", text, re.M)}


@pytest.fixture(scope="module")
def servers(ckpt, tmp_path_factory):
    logs = tmp_path_factory.mktemp("server-logs")
    # main: API key, room for 32 sequences; small: one sequence, one waiting request (disconnect and 503 tests)
    main = Server(ckpt, logs / "main.log", api_key=API_KEY)
    small = Server(ckpt, logs / "small.log", max_num_seqs=1, max_waiting=1)
    try:
        yield main.wait_ready(), small.wait_ready()
    finally:
        main.stop()
        small.stop()


@pytest.fixture(scope="module")
def server(servers):
    return servers[0]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def llm(ckpt):
    return LLM(ckpt, dtype="float32", max_model_len=512)


def auth():
    return {"Authorization": f"Bearer {API_KEY}"}


def reference(llm, messages, max_tokens, **template_kwargs):
    prompt = render(llm, messages, chat_template_kwargs=template_kwargs)
    out = llm.generate({"prompt": prompt, "prompt_token_ids": llm.tokenizer.encode(prompt)},
                       SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))[0]
    return prompt, out.outputs[0]


def sse_events(response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            events.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
    return events


def test_models_health_metrics(server):
    models = httpx.get(server.url + "/v1/models", headers=auth()).json()
    assert [m["id"] for m in models["data"]] == [MODEL]
    m = server.metrics()
    assert m["qwen35_kv_blocks_total"] > 0 and m["qwen35_state_slots_total"] == 32
    assert "qwen35_time_to_first_token_seconds_count" in m


@pytest.mark.parametrize("thinking", [True, False], ids=["thinking", "no-thinking"])
def test_chat_greedy_equals_llm(client, llm, thinking):
    messages = [{"role": "user", "content": "Tell me about foxes."}]
    prompt, ref = reference(llm, messages, 8, enable_thinking=thinking)
    r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=8,
                                       extra_body={"ignore_eos": True,
                                                   "chat_template_kwargs": {"enable_thinking": thinking}})
    reasoning, content = split_reasoning(ref.text, thinking)
    msg = r.choices[0].message
    assert (getattr(msg, "reasoning_content", None), msg.content) == (reasoning, content)
    assert (reasoning is not None) == thinking
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(llm.tokenizer.encode(prompt)) and r.usage.completion_tokens == 8

    stream = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=8, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True,
                                                        "chat_template_kwargs": {"enable_thinking": thinking}})
    chunks = list(stream)
    text = {"reasoning_content": "", "content": ""}
    for ch in chunks[:-1]:
        for key in text:
            text[key] += getattr(ch.choices[0].delta, key, None) or ""
    assert (text["reasoning_content"] or None, text["content"] or None) == (reasoning, content)
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8


def test_chat_logprobs_and_n(client):
    messages = [{"role": "user", "content": "Hi"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=4, logprobs=True,
                                       top_logprobs=3, n=2, extra_body={"ignore_eos": True})
    assert len(r.choices) == 2 and r.choices[0].message == r.choices[1].message
    lp = r.choices[0].logprobs.content
    assert len(lp) == 4 and all(len(t.top_logprobs) == 3 for t in lp)
    assert all(t.logprob == t.top_logprobs[0].logprob for t in lp)  # greedy picks the top token


def test_completions_text_ids_echo(server, client, llm):
    ref = llm.generate("The capital of France", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    ids = ref.prompt_token_ids
    r = client.completions.create(model=MODEL, prompt="The capital of France", temperature=0, max_tokens=6,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == ref.outputs[0].text and r.usage.completion_tokens == 6
    r = client.completions.create(model=MODEL, prompt=ids, temperature=0, max_tokens=6, echo=True, logprobs=2,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == llm.tokenizer.decode(ids) + ref.outputs[0].text
    assert len(r.choices[0].logprobs.tokens) == len(ids) + 6 and r.choices[0].logprobs.token_logprobs[0] is None
    with httpx.stream("POST", server.url + "/v1/completions", headers=auth(), timeout=60,
                      json={"model": MODEL, "prompt": "The capital of France", "temperature": 0, "max_tokens": 6,
                            "ignore_eos": True, "stream": True}) as resp:
        events = sse_events(resp)
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == ref.outputs[0].text


def test_tool_call_response_formatting():
    text = ("I should check.\n</think>\n\nLet me look.\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\n"
            "Paris\n</parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>")
    choice = build_chat_choice(0, text, "stop", None, thinking=True, tools=TOOLS)
    assert choice.finish_reason == "tool_calls"
    assert choice.message.reasoning_content == "I should check." and choice.message.content == "Let me look."
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris", "days": 3}
    # streamed token by token, the deltas add up to the same message
    st = ChatStreamState(thinking=True, tools=TOOLS)
    deltas = [d for i in range(len(text)) for d in st.feed(text[i], final=False)] + st.feed("", final=True)
    joined = {"reasoning_content": "", "content": "", "name": "", "arguments": ""}
    for d in deltas:
        for key in ("reasoning_content", "content"):
            joined[key] += d.get(key) or ""
        for tc in d.get("tool_calls", []):
            joined["name"] += tc.get("function", {}).get("name") or ""
            joined["arguments"] += tc.get("function", {}).get("arguments") or ""
    assert joined["reasoning_content"] == "I should check." and joined["content"].strip() == "Let me look."
    assert joined["name"] == "get_weather" and json.loads(joined["arguments"]) == {"city": "Paris", "days": 3}
    # tool_choice "none" (tools=None): the call stays text
    assert build_chat_choice(0, text, "stop", None, True, None).message.content.startswith("Let me look.")


def test_tool_round_trip_through_template(server, client):
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "reasoning_content": "Need the tool.",
                 "tool_calls": [{"id": "call_1", "type": "function",
                                 "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 3}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, temperature=0, max_tokens=4)
    assert r.choices[0].finish_reason in ("length", "stop", "tool_calls")
    tok = httpx.post(server.url + "/tokenize", headers=auth(), json={"messages": messages}).json()
    text = httpx.post(server.url + "/detokenize", headers=auth(), json={"tokens": tok["tokens"]}).json()["prompt"]
    assert "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n" in text
    assert "<tool_response>\nsunny\n</tool_response>" in text and "Need the tool." in text


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_forced_tool_choice_makes_a_call(client, stream):
    """tool_choice naming a function (or "required") constrains the output to a call (of that function), so even
    this random model answers with one."""
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS,
              tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=40, temperature=0)
    if not stream:
        r = client.chat.completions.create(**kw)
        calls = r.choices[0].message.tool_calls
        assert r.choices[0].message.reasoning_content is None
    else:
        calls = [tc for ch in client.chat.completions.create(**kw, stream=True) if ch.choices
                 for tc in (ch.choices[0].delta.tool_calls or [])]
    assert calls and calls[0].function.name == "get_weather" and calls[0].id.startswith("call_")
    r = client.chat.completions.create(**{**kw, "tool_choice": "required"})
    assert r.choices[0].message.reasoning_content is None


def test_errors_keep_server_healthy(server):
    url, h = server.url, auth()
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}

    def check(resp, status, param=None):
        assert resp.status_code == status, resp.text
        err = resp.json()["error"]
        assert err["message"] and err["code"] == status
        if param:
            assert err["param"] == param, err

    check(httpx.post(url + "/v1/chat/completions", headers={**h, "Content-Type": "application/json"},
                     content=b"{not json"), 400)
    check(httpx.post(url + "/v1/chat/completions", headers=h, json={"model": MODEL}), 400, "messages")
    check(httpx.post(url + "/v1/chat/completions", headers=h, json={**chat, "model": "nope"}), 404, "model")
    check(httpx.post(url + "/v1/chat/completions", headers=h, json={**chat, "temperature": -1}), 400, "temperature")
    check(httpx.post(url + "/v1/chat/completions", headers=h, json={**chat, "top_p": 5}), 400, "top_p")
    check(httpx.post(url + "/v1/chat/completions", headers=h,
                     json={**chat, "response_format": {"type": "xml"}}), 400, "response_format")
    # the first constraint builds the grammar tokenizer of the 248k vocabulary: seconds on a loaded machine
    check(httpx.post(url + "/v1/chat/completions", headers=h, json={**chat, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}}, timeout=120), 400,
          "response_format")
    check(httpx.post(url + "/v1/chat/completions", headers=h, json={**chat, "tools": TOOLS, "tool_choice": {
        "type": "function", "function": {"name": "no_such_tool"}}}), 400, "tool_choice")
    check(httpx.post(url + "/v1/chat/completions", headers=h, json={**chat, "tool_choice": "required"}), 400,
          "tool_choice")
    check(httpx.post(url + "/v1/completions", headers=h,
                     json={"model": MODEL, "prompt": "word " * 600, "max_tokens": 2}), 400)
    check(httpx.post(url + "/v1/completions", headers=h,
                     json={"model": MODEL, "prompt": "Hi", "max_tokens": 600}), 400)
    check(httpx.post(url + "/v1/completions", headers=h, json={"model": MODEL, "prompt": [10**9]}), 400)
    check(httpx.post(url + "/v1/completions", headers=h, json={"model": MODEL, "prompt": "x" * 100_000}), 413)
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    check(httpx.post(url + "/v1/chat/completions", headers=h, json={**chat, "messages": [
        {"role": "user", "content": [image]}]}), 400, "messages")  # a text-only model
    check(httpx.post(url + "/v1/chat/completions", json=chat), 401)
    check(httpx.post(url + "/v1/chat/completions", headers={"Authorization": "Bearer wrong"}, json=chat), 401)
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0).chat.completions.create(
            model="nope", messages=chat["messages"])
    assert httpx.get(url + "/health").status_code == 200
    ok = httpx.post(url + "/v1/chat/completions", headers=h, json=chat, timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 2
    assert server.metrics()['qwen35_requests_total{status="error"}'] >= 10


def test_concurrent_streams_equal_sequential(client):
    prompts = [f"Story number {i}: once upon a time" for i in range(32)]

    def ask(p, stream):
        kw = dict(model=MODEL, messages=[{"role": "user", "content": p}], temperature=0, max_tokens=6,
                  extra_body={"ignore_eos": True, "chat_template_kwargs": {"enable_thinking": False}})
        if not stream:
            return client.chat.completions.create(**kw).choices[0].message.content
        return "".join(ch.choices[0].delta.content or "" for ch in client.chat.completions.create(**kw, stream=True)
                       if ch.choices)

    sequential = [ask(p, False) for p in prompts]
    with ThreadPoolExecutor(32) as pool:
        concurrent = list(pool.map(lambda p: ask(p, True), prompts))
    assert concurrent == sequential and all(concurrent)


def wait_for(predicate, timeout=20):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def idle(m):
    return (m["qwen35_kv_blocks_used"], m["qwen35_state_slots_used"], m["qwen35_num_requests_running"],
            m["qwen35_num_requests_waiting"]) == (0, 0, 0, 0)


def long_stream(url):
    return httpx.stream("POST", url + "/v1/completions", timeout=60,
                        json={"model": MODEL, "prompt": "Count forever:", "max_tokens": 480, "ignore_eos": True,
                              "temperature": 0, "stream": True})


def first_event(lines):
    # Keep `lines` referenced by the caller: a collected iterator makes httpcore close the connection.
    for line in lines:
        if line.startswith("data: "):
            return line
    raise AssertionError("stream ended without events")


def test_disconnect_frees_blocks_and_slot(servers):
    small = servers[1]
    with long_stream(small.url) as resp:
        lines = resp.iter_lines()
        first_event(lines)
        m = small.metrics()
        assert m["qwen35_kv_blocks_used"] > 0 and m["qwen35_state_slots_used"] == 1
    wait_for(lambda: idle(small.metrics()))
    assert small.metrics()['qwen35_requests_total{status="abort"}'] >= 1


def test_waiting_limit_503(servers):
    small = servers[1]
    with long_stream(small.url) as first:
        lines = first.iter_lines()
        first_event(lines)  # running: holds the only slot
        with long_stream(small.url) as second:  # headers mean it was queued
            assert second.status_code == 200
            wait_for(lambda: small.metrics()["qwen35_num_requests_waiting"] == 1)
            third = httpx.post(small.url + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
            assert third.status_code == 503 and third.json()["error"]["code"] == 503
    wait_for(lambda: idle(small.metrics()))
    ok = httpx.post(small.url + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200


def test_prefix_cache_hits_show_in_usage_and_metrics(server, client):
    """The same conversation asked again resumes from the cache: usage.prompt_tokens_details.cached_tokens says how
    many prompt tokens, and /metrics counts them (tokens and requests) beside the snapshot pool's gauges."""
    before = server.metrics()
    messages = [{"role": "system", "content": "You are a careful assistant who answers in one short sentence."},
                {"role": "user", "content": "Name a river in Europe and the sea it flows into, please."}]
    first = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, temperature=0)
    again = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, temperature=0)
    n = first.usage.prompt_tokens
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens == (n - 1) // 16 * 16 > 0
    after = server.metrics()
    grew = {k: after[k] - before.get(k, 0) for k in ("qwen35_prefix_cache_queries_total",
                                                     "qwen35_prefix_cache_hits_total",
                                                     "qwen35_prefix_cache_requests_total",
                                                     "qwen35_prefix_cache_request_hits_total")}
    assert grew == {"qwen35_prefix_cache_queries_total": 2 * n, "qwen35_prefix_cache_hits_total": (n - 1) // 16 * 16,
                    "qwen35_prefix_cache_requests_total": 2, "qwen35_prefix_cache_request_hits_total": 1}
    assert after["qwen35_state_snapshots_used"] >= 1 and after["qwen35_state_snapshots_total"] > 0
    assert after["qwen35_kv_blocks_cached"] >= 1
