"""The server's vLLM-compatible surface on the embedded demo model: GET /v1/models/{id}, /version, /ping (GET and
POST), which routes the API key guards, the `vllm:*` Prometheus metrics (HELP/TYPE lines, values that move with a
request), and the startup summary `qwen35 serve` prints."""

import re
from types import SimpleNamespace

import httpx
import pytest

import qwen35
from qwen35 import LLM, SamplingParams
from qwen35.serve.metrics import Metrics, buckets_1_2_5
from qwen35.serve.summary import startup_summary, weights_warning
from tests.test_server import Server

KEY = "sk-endpoints"
SERVER = r"""
import json, socket, sys
import uvicorn
from qwen35.llm import LLM
from qwen35.serve.app import build_app
llm = LLM(None, dtype="float32", max_model_len=512, max_num_seqs=4)
app = build_app(llm, api_key=json.loads(sys.argv[1])["api_key"])
sock = socket.socket()
sock.bind(("127.0.0.1", 0))
print(sock.getsockname()[1], flush=True)
uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
"""
VLLM_NAMES = {  # name -> type, as vLLM exports them
    "vllm:num_requests_running": "gauge", "vllm:num_requests_waiting": "gauge",
    "vllm:gpu_cache_usage_perc": "gauge", "vllm:kv_cache_usage_perc": "gauge",
    "vllm:prompt_tokens_total": "counter", "vllm:generation_tokens_total": "counter",
    "vllm:request_success_total": "counter", "vllm:num_preemptions_total": "counter",
    "vllm:prefix_cache_queries_total": "counter", "vllm:prefix_cache_hits_total": "counter",
    "vllm:time_to_first_token_seconds": "histogram", "vllm:time_per_output_token_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram", "vllm:e2e_request_latency_seconds": "histogram",
    "vllm:request_prompt_tokens": "histogram", "vllm:request_generation_tokens": "histogram",
}


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    s = Server("demo", tmp_path_factory.mktemp("endpoints") / "server.log", script=SERVER, api_key=KEY)
    try:
        yield s.wait_ready().url
    finally:
        s.stop()


AUTH = {"Authorization": f"Bearer {KEY}"}


def test_model_by_id(url):
    listed = httpx.get(url + "/v1/models", headers=AUTH).json()["data"][0]
    r = httpx.get(url + "/v1/models/demo", headers=AUTH)
    assert r.status_code == 200
    card = r.json()
    assert card["id"] == "demo" and card["object"] == "model" and card["max_model_len"] == 512
    assert {k: v for k, v in card.items() if k != "created"} == {k: v for k, v in listed.items() if k != "created"}
    r = httpx.get(url + "/v1/models/Qwen/Qwen3.5-9B", headers=AUTH)
    assert r.status_code == 404
    err = r.json()["error"]
    assert "'Qwen/Qwen3.5-9B' does not exist" in err["message"] and err["param"] == "model"


def test_version_and_ping_are_open_like_health(url):
    assert httpx.get(url + "/version").json() == {"version": qwen35.__version__}
    assert httpx.get(url + "/ping").status_code == 200
    assert httpx.post(url + "/ping").status_code == 200
    # the API and the metrics stay guarded
    assert httpx.get(url + "/v1/models/demo").status_code == 401
    assert httpx.get(url + "/metrics").status_code == 401


def scrape(url) -> tuple[str, dict[str, float]]:
    text = httpx.get(url + "/metrics", headers=AUTH).text
    return text, {name: float(v) for name, v in re.findall(r"^([^#\s]+) (\S+)$", text, re.M)}


def test_vllm_metrics(url):
    text, before = scrape(url)
    for name, kind in VLLM_NAMES.items():
        assert f"# HELP {name} " in text and f"# TYPE {name} {kind}\n" in text, name
    lab = 'model_name="demo"'
    assert before[f"vllm:kv_cache_usage_perc{{{lab}}}"] == 0.0
    assert before[f'vllm:time_to_first_token_seconds_bucket{{{lab},le="2560.0"}}'] == \
        before[f"vllm:time_to_first_token_seconds_count{{{lab}}}"]

    body = {"model": "demo", "prompt": "def main():", "max_tokens": 200, "min_tokens": 200, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, headers=AUTH, timeout=60) as r:
        for _ in r.iter_lines():
            pass
    usage_prompt = len(httpx.post(url + "/tokenize", json={"model": "demo", "prompt": "def main():"},
                                  headers=AUTH).json()["tokens"])
    _, after = scrape(url)

    def delta(name):
        return after[name] - before.get(name, 0)

    assert after[f"vllm:num_requests_running{{{lab}}}"] == 0 and after[f"vllm:num_requests_waiting{{{lab}}}"] == 0
    assert delta(f"vllm:prompt_tokens_total{{{lab}}}") == usage_prompt
    assert delta(f"vllm:generation_tokens_total{{{lab}}}") == 200
    assert delta(f'vllm:request_success_total{{finished_reason="length",{lab}}}') == 1
    assert delta(f"vllm:time_to_first_token_seconds_count{{{lab}}}") == 1
    assert delta(f"vllm:inter_token_latency_seconds_count{{{lab}}}") == 199
    assert delta(f"vllm:e2e_request_latency_seconds_count{{{lab}}}") == 1
    assert delta(f'vllm:request_generation_tokens_bucket{{{lab},le="200.0"}}') == 1
    assert delta(f'vllm:request_generation_tokens_bucket{{{lab},le="100.0"}}') == 0
    assert delta(f"vllm:request_prompt_tokens_sum{{{lab}}}") == usage_prompt
    # the older names stay
    assert delta("qwen35_generation_tokens_total") == 200 and delta('qwen35_requests_total{status="success"}') == 1


def test_running_gauge_and_kv_usage_read_the_engine():
    """Checked in-process: over HTTP, the demo model writes a whole answer before a scrape can land mid-request."""
    llm = LLM(max_model_len=128, max_num_seqs=2)
    engine = llm.engine
    engine.add_request("r", [1, 2, 3, 4], SamplingParams(max_tokens=8, ignore_eos=True))
    engine.add_request("w", [5, 6], SamplingParams(max_tokens=8, ignore_eos=True))
    engine.step()
    view = SimpleNamespace(engine=engine, num_running=len(engine.scheduler.running),
                           num_waiting=len(engine.scheduler.waiting))
    text = Metrics("demo", 128).render(view)
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("vllm:num_requests")
                  or line.startswith("vllm:kv_cache_usage_perc"))
    assert float(values['vllm:num_requests_running{model_name="demo"}']) == 2
    assert 0 < float(values['vllm:kv_cache_usage_perc{model_name="demo"}']) <= 1


def test_token_buckets_are_vllms():
    assert buckets_1_2_5(512) == (1, 2, 5, 10, 20, 50, 100, 200, 500)
    assert buckets_1_2_5(1000) == (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


def test_startup_summary(tmp_path):
    llm = LLM(None, dtype="float32", max_model_len=512, max_num_seqs=4, kv_cache_bytes=8 << 20)
    text = startup_summary(llm, "demo", "http://127.0.0.1:8000")
    blocks, size = llm.engine.blocks.num_blocks, llm.engine.blocks.block_size
    assert text.startswith("WARNING: serving the embedded demo model")
    assert "served as 'demo'" in text and "dtype: float32; weights: float32 (checkpoint: float)" in text
    assert f"KV cache: {blocks} blocks x {size} tokens = {blocks * size} tokens" in text
    assert f"state slots: 4 sequences + {llm.engine.snapshots.num_slots} prefix snapshots" in text
    fits = blocks * size / 512
    assert f"max concurrency at max_model_len 512: {min(4, int(fits))} requests (the KV cache holds {fits:.2f}x" in text
    assert "prefix caching: on" in text and "serving on http://127.0.0.1:8000 " in text
    assert "decoder: reference model (PyTorch ops)" in text  # fp32 on a CPU
    # random weights are named; a plain checkpoint gets no warning
    (tmp_path / "config.json").write_text('{"random_weights": true}')
    assert "random weights" in weights_warning(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "qwen3_5"}')
    assert weights_warning(tmp_path) is None


def test_speculative_decoding_metrics_and_summary():
    """With speculative decoding on, /metrics carries vLLM's spec_decode counters (in-process, from the engine's
    counts) and the startup summary says so and counts sequences, not ring slots."""
    llm = LLM(max_model_len=256, max_num_seqs=2, speculative_config={"method": "mtp", "num_speculative_tokens": 2})
    engine = llm.engine
    engine.add_request("r", llm.get_tokenizer().encode("What does str.split do?"),
                       SamplingParams(max_tokens=24, ignore_eos=True, temperature=0))
    while engine.has_unfinished_requests():
        engine.step()
    view = SimpleNamespace(engine=engine, num_running=0, num_waiting=0)
    text = Metrics("demo", 256).render(view)
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("vllm:spec_decode"))
    lab = 'model_name="demo"'
    stats = engine.spec_stats
    assert stats.num_drafts > 0
    assert float(values[f"vllm:spec_decode_num_drafts_total{{{lab}}}"]) == stats.num_drafts
    assert float(values[f"vllm:spec_decode_num_draft_tokens_total{{{lab}}}"]) == stats.num_draft_tokens
    assert float(values[f"vllm:spec_decode_num_accepted_tokens_total{{{lab}}}"]) == stats.num_accepted_tokens
    for i in range(2):
        assert float(values[f'vllm:spec_decode_num_accepted_tokens_per_pos_total{{{lab},position="{i}"}}']) == \
            stats.accepted_per_pos[i]
    summary = startup_summary(llm, "demo", "http://127.0.0.1:8000")
    assert "state slots: 2 sequences x 3 (speculative rings)" in summary
    assert "speculative decoding: MTP, 2 draft tokens per step" in summary
    assert "max_num_seqs 2)" in summary
    assert "vllm:spec_decode" not in Metrics("demo", 256).render(SimpleNamespace(
        engine=LLM(max_model_len=256).engine, num_running=0, num_waiting=0))
