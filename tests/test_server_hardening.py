"""The server against hostile or careless clients, on one real server process (loopback): malformed but
schema-valid input is a 400 with an OpenAI error body, big bodies do not stall the event loop, prompts that cannot
fit are refused before tokenizing, the API key guards everything but /health, slow and numerous clients are cut
off, a non-streaming request is aborted when its client leaves, legacy-completion echo logprobs are complete, and
shutdown is clean. The last test stops the server."""

import json
import signal
import socket
import threading
import time
from types import SimpleNamespace

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from qwen35.serve.middleware import install_error_handlers
from qwen35.serve.prompts import Prompts
from qwen35.tokenizer import Tokenizer
from tests.test_server import GENERATION_CONFIG, Server, sse_events, wait_for
from tests.tiny_models import build
from tests.tokenizer_fixtures import add_qwen35_tokenizer, qwen35_tokenizer_dir

KEY = "sk-ключ-tést"  # non-ASCII: matched as UTF-8 bytes
TIMEOUT = 2.0  # the server's head and body deadlines
MAX_CONNECTIONS = 6
MAX_MODEL_LEN = 2048
LONGEST_TOKEN = 128  # bytes: 128 spaces, the longest token of the Qwen3.5 vocabulary
BODY_LIMIT = MAX_MODEL_LEN * LONGEST_TOKEN + 2**20  # the derived default (a text-only model)

SCRIPT = r"""
import json, socket, sys
import uvicorn
from qwen35.llm import LLM
from qwen35.serve.app import build_app
from qwen35.serve.middleware import uvicorn_config
cfg = json.loads(sys.argv[1])
llm = LLM(cfg["model"], dtype="float32", max_model_len=cfg["max_model_len"], max_num_seqs=2)
app = build_app(llm, "tiny", api_key=cfg["api_key"], body_timeout=cfg["timeout"])
assert app.state.max_body_bytes == cfg["body_limit"], app.state.max_body_bytes
sock = socket.socket()
sock.bind(("127.0.0.1", 0))
print(sock.getsockname()[1], flush=True)
config = uvicorn_config(app, head_timeout=cfg["timeout"], max_connections=cfg["max_connections"],
                        log_level="warning", timeout_graceful_shutdown=1)
uvicorn.Server(config).run(sockets=[sock])
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("hardening-ckpt")
    build("dense", path, seed=31, vocab_size=248320)
    add_qwen35_tokenizer(path, generation_config=GENERATION_CONFIG)
    s = Server(path, tmp_path_factory.mktemp("hardening-log") / "server.log", script=SCRIPT, api_key=KEY,
               timeout=TIMEOUT, max_connections=MAX_CONNECTIONS, max_model_len=MAX_MODEL_LEN, body_limit=BODY_LIMIT)
    try:
        yield s.wait_ready()
    finally:
        s.stop()


def post(server, path, body, **kw):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.url + path, content=content, timeout=60,
                      headers={**server.headers, "Content-Type": "application/json"}, **kw)


def check_error(resp, status, param=None):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["code"] == status and err["message"], err
    if param is not None:
        assert err["param"] == param, err
    return err


def test_api_key_guards_everything_but_health(server):
    for path in ("/metrics", "/openapi.json", "/v1/models"):
        check_error(httpx.get(server.url + path), 401)
        check_error(httpx.get(server.url + path, headers={"Authorization": "Bearer sk-wrong"}), 401)
        assert httpx.get(server.url + path, headers=server.headers).status_code == 200, path
    assert httpx.get(server.url + "/health").status_code == 200
    doc = httpx.get(server.url + "/openapi.json", headers=server.headers).json()
    assert "422" not in json.dumps(doc)  # validation errors are answered 400, and the document says so
    for path in ("/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"):
        op = doc["paths"][path]["post"]
        assert "400" in op["responses"] and op["requestBody"]["content"]["application/json"]["schema"]["$ref"]


def test_method_not_allowed_names_allowed_methods(server):
    resp = httpx.put(server.url + "/v1/chat/completions", headers=server.headers)
    check_error(resp, 405)
    assert resp.headers["allow"] == "POST"


TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
USER = {"role": "user", "content": "Hi"}


def chat(messages=(USER,), **kw):
    return ("/v1/chat/completions", {"model": "tiny", "messages": list(messages), "max_tokens": 2, **kw})


def raw(path, text):  # a body written by hand: json.dumps cannot write a lone surrogate escape
    return (path, text.encode())


MALFORMED = {
    "text-part-not-a-string": chat([{"role": "user", "content": [{"type": "text", "text": 5}]}]),
    "content-a-number": chat([{"role": "user", "content": 5}]),
    "message-not-an-object": chat([5]),
    "message-without-role": chat([{"content": "Hi"}]),
    "tool-call-not-an-object": chat([USER, {"role": "assistant", "content": "", "tool_calls": [5]}]),
    "tool-call-function-a-string": chat([USER, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": "f"}]}]),
    "tool-calls-not-a-list": chat([USER, {"role": "assistant", "content": "", "tool_calls": "f"}]),
    "tool-call-arguments-a-list": chat([USER, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "[1]"}}]}]),
    "tool-choice-function-a-string": chat(tools=TOOLS, tool_choice={"type": "function", "function": "f"}),
    "tool-function-a-string": chat(tools=[{"type": "function", "function": "f"}]),
    "surrogate-in-content": raw("/v1/chat/completions",
                                '{"model": "tiny", "messages": [{"role": "user", "content": "a\\ud800b"}]}'),
    "surrogate-in-prompt": raw("/v1/completions", '{"model": "tiny", "prompt": "a\\udc00"}'),
    "surrogate-in-tokenize-prompt": raw("/tokenize", '{"prompt": "\\ud800"}'),
    "surrogate-in-tokenize-messages": raw("/tokenize", '{"messages": [{"role": "user", "content": "\\ud800"}]}'),
    "surrogate-in-tool-name": raw("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", '
                                  '"content": "Hi"}], "tools": [{"type": "function", '
                                  '"function": {"name": "\\ud800"}}]}'),
    "temperature-nan": raw("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], '
                           '"temperature": NaN}'),
    "temperature-overflows-to-inf": raw("/v1/completions", '{"model": "tiny", "prompt": "Hi", "temperature": 1e999}'),
    "top-p-infinity": raw("/v1/completions", '{"model": "tiny", "prompt": "Hi", "top_p": -Infinity}'),
    "n-huge": chat(n=10**6),
    "n-int64-max": ("/v1/completions", {"model": "tiny", "prompt": "Hi", "n": 2**63 - 1}),
    "best-of-huge": ("/v1/completions", {"model": "tiny", "prompt": "Hi", "best_of": 10**6}),
    "seed-past-int64": chat(seed=2**64 - 1, n=2),
    "logprobs-huge": ("/v1/completions", {"model": "tiny", "prompt": "Hi", "logprobs": 10**6}),
    "top-logprobs-huge": chat(logprobs=True, top_logprobs=10**6),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_input_is_a_400(server, case):
    path, body = MALFORMED[case]
    check_error(post(server, path, body), 400)


def test_unexpected_error_is_a_json_500():
    app = FastAPI()
    install_error_handlers(app, lambda: None)

    @app.get("/boom")
    async def boom():
        raise KeyError("internal detail")

    resp = TestClient(app, raise_server_exceptions=False).get("/boom")
    err = check_error(resp, 500)
    assert err["type"] == "internal_error" and "internal detail" not in err["message"]


def test_health_answers_while_a_large_body_is_processed(server):
    # ~0.5 MB of small messages: parsing and rendering it takes seconds, all of it off the event loop
    body = json.dumps({"model": "tiny", "messages": [USER] * 15_000, "max_tokens": 2}).encode()
    assert len(body) < BODY_LIMIT
    result = {}
    big = threading.Thread(target=lambda: result.setdefault("resp", post(server, "/v1/chat/completions", body)))
    t0 = time.monotonic()
    big.start()
    latencies = []
    while big.is_alive():
        t = time.monotonic()
        assert httpx.get(server.url + "/health", timeout=30).status_code == 200
        latencies.append(time.monotonic() - t)
        time.sleep(0.05)
    big.join()
    elapsed = time.monotonic() - t0
    assert len(latencies) >= 3 and max(latencies) < 1.0, (elapsed, latencies)
    check_error(result["resp"], 400, "messages")  # rendered, it cannot fit 2048 tokens
    assert "max_model_len" in result["resp"].json()["error"]["message"]


def test_prompt_that_cannot_fit_is_refused_before_tokenizing(server):
    resp = post(server, "/v1/completions", {"model": "tiny", "prompt": "word " * 60_000, "max_tokens": 2})
    err = check_error(resp, 400, "prompt")
    assert "at least 2344 tokens" in err["message"] and "max_model_len is 2048" in err["message"], err


def test_length_bound_is_safe():
    tok = Tokenizer.from_dir(qwen35_tokenizer_dir())
    prompts = Prompts(SimpleNamespace(tokenizer=tok), max_model_len=64)
    assert prompts.max_token_bytes == LONGEST_TOKEN
    budget = 63 * LONGEST_TOKEN
    spaces = " " * budget  # 63 tokens of 128 spaces: it fits, and the bound must let it through
    assert len(prompts.encode(spaces)) == 63
    with pytest.raises(Exception, match="at least 64 tokens"):
        prompts.encode(spaces + " ")
    # KELVIN SIGN (3 bytes) normalizes to "K": 3x the budget in bytes may still fit, and is let through
    kelvin = "\u212a" * (budget // 3 + 1)
    prompts.check_length(kelvin, "prompt")
    with pytest.raises(Exception, match="max_model_len is 64"):
        prompts.check_length("\u212a" * (budget + 1), "prompt")


def test_default_body_limit_is_derived_from_the_context(server):
    check_error(post(server, "/v1/completions", b" " * (BODY_LIMIT + 1)), 413)


def test_slow_body_gets_408(server):
    with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1]))) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() +
                  b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        s.settimeout(TIMEOUT + 10)
        t0 = time.monotonic()
        reply = s.recv(4096)
    assert reply.startswith(b"HTTP/1.1 408") and time.monotonic() - t0 < TIMEOUT + 5, reply


def test_slow_head_is_cut_off(server):
    with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1]))) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        s.settimeout(TIMEOUT + 10)
        t0 = time.monotonic()
        assert s.recv(4096) == b""  # closed by the server
    assert time.monotonic() - t0 < TIMEOUT + 5


def test_connection_cap(server):
    port = int(server.url.rsplit(":", 1)[1])
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.2)
        check_error(httpx.get(server.url + "/health", timeout=10), 503)
    finally:
        for s in idle:
            s.close()
    wait_for(lambda: httpx.get(server.url + "/health", timeout=10).status_code == 200)


def test_disconnected_non_streaming_request_is_aborted(server):
    before = server.metrics()
    body = json.dumps({"model": "tiny", "prompt": "Count forever:", "max_tokens": 2000, "ignore_eos": True,
                       "temperature": 0}).encode()
    with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1]))) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() +
                  b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        wait_for(lambda: server.metrics()["qwen35_num_requests_running"] == 1)
    t0 = time.monotonic()
    wait_for(lambda: server.metrics()["qwen35_num_requests_running"] == 0, timeout=10)
    after = server.metrics()
    assert time.monotonic() - t0 < 5 and after["qwen35_kv_blocks_used"] == 0
    assert after['qwen35_requests_total{status="abort"}'] == before.get('qwen35_requests_total{status="abort"}', 0) + 1
    assert after["qwen35_generation_tokens_total"] - before["qwen35_generation_tokens_total"] < 2000


def test_completion_echo_logprobs(server):
    req = {"model": "tiny", "prompt": "Hello world, said the fox", "max_tokens": 5, "temperature": 0,
           "ignore_eos": True, "echo": True, "logprobs": 2}
    choice = post(server, "/v1/completions", req).json()["choices"][0]
    lp, text = choice["logprobs"], choice["text"]
    assert text.startswith(req["prompt"]) and lp["tokens"][0] == "Hello" and lp["token_logprobs"][0] is None
    assert lp["top_logprobs"][0] is None and all(x is not None for x in lp["token_logprobs"][1:])
    assert "".join(lp["tokens"]) == text  # ASCII text: the tokens spell it out, and the offsets index it
    assert all(text[o:o + len(t)] == t for o, t in zip(lp["text_offset"], lp["tokens"]))
    assert lp["text_offset"][0] == 0 and lp["text_offset"][1] == len("Hello")

    with httpx.stream("POST", server.url + "/v1/completions", headers=server.headers, timeout=60,
                      json={**req, "stream": True}) as resp:
        events = sse_events(resp)
    assert events[-1] == "[DONE]"
    chunks = [e["choices"][0] for e in events[:-1]]
    assert "".join(c["text"] for c in chunks) == text
    for key in ("tokens", "token_logprobs", "text_offset", "top_logprobs"):
        assert [x for c in chunks for x in c["logprobs"][key]] == lp[key], key


def test_shutdown_is_clean(server):
    """Last: stops the server while a non-streaming request runs; the client gets a 503, the log no traceback."""
    result = {}
    req = {"model": "tiny", "prompt": "Count forever:", "max_tokens": 2000, "ignore_eos": True}
    client = threading.Thread(target=lambda: result.setdefault("resp", post(server, "/v1/completions", req)))
    client.start()
    wait_for(lambda: server.metrics()["qwen35_num_requests_running"] == 1)
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it is done
    client.join(30)
    check_error(result["resp"], 503)
    server.log.flush()
    log = open(server.log.name).read()
    assert "Traceback" not in log and "CancelledError" not in log, log
