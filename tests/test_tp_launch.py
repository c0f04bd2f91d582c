"""Launching a tensor-parallel model as users do. `qwen35 serve -tp 2`: a real server process over two gloo ranks
answers the official openai client with the single-process model's greedy tokens, and a killed worker ends the
server with an error naming it (no hang). `torchrun --nproc-per-node 2 -m qwen35 generate -tp 2`: the same
command on every rank, rank 1 a worker inside LLM(), the output that of one process."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from qwen35 import LLM, SamplingParams
from tests.tiny_models import build
from tests.tokenizer_fixtures import add_qwen35_tokenizer

GENERATION_CONFIG = {"bos_token_id": 248044, "pad_token_id": 248044, "eos_token_id": [248046, 248044]}


PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tp-serve-ckpt")
    build("dense", path, seed=41, vocab_size=248320, num_attention_heads=6, num_key_value_heads=3)  # 3 KV: uneven
    return add_qwen35_tokenizer(path, generation_config=GENERATION_CONFIG)


@pytest.fixture(scope="module")
def reference(ckpt):
    """The single-process greedy completion of PROMPT (8 tokens)."""
    llm = LLM(ckpt, dtype="float32", max_model_len=256)
    return llm.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0].outputs[0]


def _env():
    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def _start(ckpt, log_path):
    env = _env()
    log = open(log_path, "w+")
    proc = subprocess.Popen([sys.executable, "-m", "qwen35", "serve", str(ckpt), "-tp", "2", "--port", "0",
                             "--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "4"],
                            stdout=log, stderr=log, env=env)
    deadline, url = time.monotonic() + 120, None
    while url is None and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
        m = re.search(r"Uvicorn running on (http://\S+)", log_path.read_text())
        url = m and m[1]
    assert url, f"server did not start: {log_path.read_text()[-3000:]}"
    while True:  # uvicorn logs the address just before it listens
        try:
            httpx.get(url + "/health", timeout=10)
            break
        except httpx.ConnectError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    return proc, log, url


def test_tp2_server_answers_then_a_killed_worker_stops_it(ckpt, reference, tmp_path):
    want, prompt = reference, PROMPT
    log_path = tmp_path / "serve.log"
    proc, log, url = _start(ckpt, log_path)
    try:
        text = log_path.read_text()
        pid = int(re.search(r"tensor parallel: 2 ranks \(worker pids (\d+)\)", text)[1])
        client = openai.OpenAI(base_url=url + "/v1", api_key="none")
        got = client.completions.create(model=ckpt.name, prompt=prompt, max_tokens=8, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert got.choices[0].text == want.text and got.usage.completion_tokens == 8
        chat = client.chat.completions.create(model=ckpt.name, messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=4, temperature=0)
        assert chat.usage.completion_tokens >= 1

        os.kill(pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == 1, "the server kept running after its worker died"
        text = log_path.read_text()
        assert f"tensor parallelism stopped: worker 1 (pid {pid}) exited with code -9" in text, text[-3000:]
        assert "qwen35 serve: stopped: tensor parallelism failed" in text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        log.close()


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    """torchrun on 2 local ranks; on a timeout the whole process group goes (no orphaned rank)."""
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "qwen35", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(), start_new_session=True)
    try:
        out, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_torchrun_launches_the_same_command_on_every_rank(ckpt, reference):
    out = _torchrun("generate", "--model", str(ckpt), "-tp", "2", "--dtype", "float32", "--temperature", "0",
                    "--max-tokens", "8", "--ignore-eos", PROMPT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == reference.text.strip()  # printed once: by rank 0


def test_torchrun_world_size_must_match(monkeypatch):
    """Checked before joining any group (this process never becomes a rank)."""
    from qwen35.engine.executor import start_group

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.raises(ValueError, match=r"tensor_parallel_size is 4 but torchrun started 2 processes \(WORLD_SIZE\)"):
        start_group(4, torch.device("cpu"))
