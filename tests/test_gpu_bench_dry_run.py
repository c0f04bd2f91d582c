"""benchmarks/gpu_bench.py, kept from rotting without a GPU: its dry run (a tiny geometry on this CPU, the GPU backend
forced) writes every figure, and its arithmetic (the HBM bytes of a decode step, the FLOPs of a prompt) on the
Qwen3.5-35B-A3B geometry equals numbers derived here by hand from the released config."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwen35.config import ModelConfig
from qwen35.info import model_stats
from qwen35.presets import preset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "benchmarks" / "gpu_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Qwen3.5-35B-A3B by hand: hidden 2048, 40 layers (every 4th full attention: 10, and 30 Gated DeltaNet), 16 query
# heads and 2 KV heads of 256, GDN 16 key heads and 32 value heads of 128, conv kernel 4, 256 experts top-8 of
# width 512, a shared expert of 512, vocabulary 248320, untied head.
H, V = 2048, 248320
ATTENTION = 10 * (H * 2 * 16 * 256 + 2 * H * 2 * 256 + 16 * 256 * H + 2 * 256)  # q+gate, k, v, o, q/k norms
CONV_DIM = 2 * 16 * 128 + 32 * 128
GDN = 30 * (H * CONV_DIM + H * 32 * 128 + 2 * H * 32 + CONV_DIM * 4 + 2 * 32 + 128 + 32 * 128 * H)
SHARED = 40 * (3 * 512 * H + H)  # gate/up/down, and its sigmoid gate
ROUTER = 40 * 256 * H
NORMS = 40 * 2 * H + H
ROUTED_ACTIVE = 40 * 8 * 3 * 512 * H
HEAD = V * H


def test_parameter_groups_by_hand(bench):
    g = bench.param_groups(bench.text_config("35b-a3b"))
    assert (g["attention"], g["linear_attention"], g["shared_expert"], g["router"], g["norms"]) == \
        (ATTENTION, GDN, SHARED, ROUTER, NORMS) == (272_634_880, 1_011_553_920, 125_911_040, 20_971_520, 165_888)
    assert g["routed_experts_active"] == ROUTED_ACTIVE and g["routed_experts_total"] == 32 * ROUTED_ACTIVE
    assert g["dense_ffn"] == 0 and g["lm_head"] == g["embedding"] == HEAD
    # the model card's "active" (qwen35 info) counts the whole embedding; a decode step reads one row of it
    stats = model_stats(ModelConfig.from_hf(preset("qwen3.5-35b-a3b")))["params"]
    assert stats["active"] == ATTENTION + GDN + SHARED + ROUTER + NORMS + ROUTED_ACTIVE + 2 * HEAD


def test_decode_bytes_by_hand(bench):
    cfg = bench.text_config("35b-a3b")
    b = bench.decode_bytes(cfg, context=1000)
    weights = 2 * (ATTENTION + GDN + SHARED + ROUTER + NORMS + ROUTED_ACTIVE + H + HEAD)
    kv = 1000 * 10 * 2 * 2 * 256 * 2  # K and V of 2 heads x 256, bf16, 10 layers
    state = 2 * 30 * (CONV_DIM * 3 * 2 + 32 * 128 * 128 * 4)  # read + written: bf16 conv history, fp32 state
    assert b == {"weights": weights, "kv": kv, "state": state, "total": weights + kv + state}
    assert b["weights"] == 5_892_863_232
    assert 790 < bench.HBM_BYTES_PER_S / b["total"] < 800  # the batch-1 bound at ~1k context: ~794 tokens/s


def test_prefill_flops_by_hand(bench):
    cfg = bench.text_config("35b-a3b")
    T, C = 8192, 64
    f = bench.prefill_flops(cfg, T)
    chunk = 3 * 2 * C * C * 128 + C**3 // 3 + 2 * 2 * C * C * 128 + 3 * 2 * C * 128 * 128
    assert chunk == bench.gdn_chunk_flops(cfg) == 11_621_717
    assert f["linear"] == 2 * T * (ATTENTION + GDN + SHARED + ROUTER + ROUTED_ACTIVE)
    assert f["lm_head"] == 2 * HEAD
    assert f["attention"] == 10 * 4 * 16 * 256 * T * (T + 1) // 2
    assert f["gdn"] == 30 * 32 * math.ceil(T / C) * chunk
    assert f["total"] == sum(v for k, v in f.items() if k != "total")
    assert 46.8e12 < f["total"] < 46.9e12


def test_build_model_initialises_everything(bench):
    cfg = bench.text_config("tiny")
    model = bench.build_model(cfg, torch.device("cpu"))
    layer = model.model.layers[0]
    assert layer.linear_attn.A_log.dtype == torch.float32 and layer.linear_attn.dt_bias.dtype == torch.float32
    assert model.dtype == torch.bfloat16 and not any(p.requires_grad for p in model.parameters())
    a = -layer.linear_attn.A_log.exp()
    assert (a <= -1).all() and (a >= -16).all()
    assert torch.equal(model.model.norm.weight, torch.zeros_like(model.model.norm.weight))
    assert torch.equal(layer.linear_attn.norm.weight, torch.ones_like(layer.linear_attn.norm.weight))
    assert 0.015 < model.lm_head.weight.float().std() < 0.025
    from qwen35.models.qwen3_5 import rope_frequencies
    assert torch.equal(model.model.inv_freq, rope_frequencies(cfg)[0])
    assert all(torch.isfinite(p.float()).all() for p in model.parameters())


def test_dry_run_writes_every_figure(tmp_path):
    out = tmp_path / "gpu-bench.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_bench.py"), "--geometry", "tiny",
                           "--device", "cpu", "--quick", "--out", str(out)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["complete"] and r["geometry"] == "tiny" and r["versions"]["torch"] == torch.__version__
    assert r["dtype"] == "float32"  # the CPU default
    assert r["kernels"] == "conv torch, attention torch, delta rule torch, experts loop"  # CPU: the fallbacks
    figures = [r["build_seconds"], r["prefill"]["tokens_per_s"], r["prefill"]["mfu"], r["prefill"]["flops"]["total"],
               r["concurrent"]["end_to_end_tokens_per_s"], r["concurrent"]["decode_phase_tokens_per_s"],
               r["concurrent"]["full_batch_tokens_per_s"]]
    for mode in ("graphs", "eager"):
        d = r["decode_batch1"][mode]
        figures += [d["tokens_per_s"], d["ms_per_token"], d["hbm_bound_ratio"], d["hbm_bound_tokens_per_s"],
                    d["bytes_per_token"]["total"]]
    assert all(isinstance(x, (int, float)) and x > 0 for x in figures), figures
    assert r["decode_batch1"]["graphs"]["graphs"]["mode"] == "padded, eager"  # the graphs' padded step, eagerly
    assert r["decode_batch1"]["eager"]["graphs"]["mode"] == "eager"
    assert r["concurrent"]["output_tokens"] == r["counts"]["concurrent"] * r["counts"]["concurrent_new"]
    assert "prefill" in proc.stdout and "concurrent" in proc.stdout  # the table
