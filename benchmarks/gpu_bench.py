"""GPU benchmark of the engine (issue 20, item 4): a random-weight model of the Qwen3.5-35B-A3B geometry built in
bf16 directly on the device (no checkpoint: 70 GB would not fit a lent machine's disk), run by an `LLMEngine` with
the GPU backend (no tokenizer: prompt token ids, greedy, ignore-eos).

    python benchmarks/gpu_bench.py [--geometry 35b-a3b|tiny] [--device cuda|cpu] [--quick] [--out PATH]

Measured, each after a warm-up of the same shape (so graph captures and Triton/fla compiles fall outside):
  - batch 1: decode tokens/s at ~1k context with CUDA graphs, and with enforce_eager=True; the ratio of each to the
    HBM bound (decode_bytes: the bytes one token's step must read, at HBM_BYTES_PER_S);
  - prefill tokens/s of one 8k-token prompt (one forward: max_num_batched_tokens = the prompt), and its MFU
    (prefill_flops / time / PEAK_BF16_FLOPS);
  - 64 concurrent requests of 512 prompt tokens, 128 new tokens each: aggregate output tokens/s end to end (wall
    time from the first step to the last, prefill included), over the decode phase (the steps after the last prompt
    got its first token) and over the full-batch decode steps (all 64 requests in the step);
  - the kernels the backend chose, the GPU, torch / triton / fla-core versions.
Every engine step is timed with the device synchronised on both sides (`sync`). The JSON (--out) is rewritten after
each measurement, so a run stopped by a timeout keeps what it finished ("complete": false).

The peaks are the H200's nominal figures whatever the device (on a CPU the ratios mean nothing: `--geometry tiny
--device cpu` is the dry run that keeps this script working, not a measurement).
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib.metadata
import json
import math
import platform
import time
from pathlib import Path

import torch
from torch import nn

from qwen35.config import EngineConfig, ModelConfig, TextConfig
from qwen35.engine.llm_engine import LLMEngine
from qwen35.cache.hybrid import HybridCache
from qwen35.info import count_parameters
from qwen35.layers.norm import GatedRMSNorm, RMSNorm
from qwen35.models.qwen3_5 import GatedDeltaNet, Qwen3_5ForCausalLM, rope_frequencies
from qwen35.presets import preset
from qwen35.sampling_params import SamplingParams

HBM_BYTES_PER_S = 4.8e12  # H200 HBM3e, nominal
PEAK_BF16_FLOPS = 989e12  # H200 dense bf16 tensor cores, nominal (no sparsity)
GDN_CHUNK = 64  # the chunk length of fla's chunked gated delta rule
BLOCK_SIZE = 16

# The workload on a GPU; on a CPU ("cpu", the dry run) and with --quick every count is cut (a check of the
# script, not a measurement).
COUNTS = {
    "full": dict(decode_context=1024, decode_warmup=8, decode_tokens=64, prefill_tokens=8192, prefill_repeats=3,
                 concurrent=64, concurrent_prompt=512, concurrent_new=128, max_num_batched_tokens=8192),
    "cpu": dict(decode_context=512, decode_warmup=4, decode_tokens=16, prefill_tokens=2048, prefill_repeats=1,
                concurrent=16, concurrent_prompt=64, concurrent_new=16, max_num_batched_tokens=512),
    "quick": dict(decode_context=64, decode_warmup=2, decode_tokens=4, prefill_tokens=256, prefill_repeats=1,
                  concurrent=8, concurrent_prompt=32, concurrent_new=6, max_num_batched_tokens=128),
}

DEFINITIONS = {  # written into the JSON beside the figures
    "decode_batch1": "one request; tokens_per_s over decode_tokens steps after the prefill and decode_warmup - 1 "
                     "steps; hbm_bound_ratio = tokens_per_s x bytes_per_token.total / peaks.hbm_bytes_per_s "
                     "(decode_bytes)",
    "prefill": "one prompt in one engine step (its forward, the last row's logits, one sampled token); the median of "
               "prefill_repeats after a warm-up; mfu = flops.total / seconds / peaks.bf16_flops_per_s (prefill_flops)",
    "concurrent": "all requests queued at once, max_num_batched_tokens per step; end_to_end: output tokens / the "
                  "wall time of every step (prefill included); decode_phase: tokens / time of the steps after the "
                  "last prompt got its first token; full_batch: the decode steps that decoded every request",
}

# A toy of the same structure (3 Gated DeltaNet : 1 attention, routed + shared experts) for the CPU dry run.
TINY = dict(vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
            linear_value_head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
            shared_expert_intermediate_size=32)


def text_config(geometry: str) -> TextConfig:
    d = dict(preset("qwen3.5-35b-a3b")["text_config"])
    if geometry == "tiny":
        rope = {**d["rope_parameters"], "mrope_section": [2, 1, 1]}  # sums to half the rotary dim (32 * 0.25 / 2)
        d.update(TINY, rope_parameters=rope)
    elif geometry != "35b-a3b":
        raise ValueError(f"unknown geometry {geometry!r} (35b-a3b | tiny)")
    return TextConfig.from_hf(d, "qwen3_5_moe_text")


# ---- the arithmetic: what one token reads, what a prompt computes ----

@functools.lru_cache(maxsize=4)
def param_groups(cfg: TextConfig) -> dict[str, int]:
    """Parameter counts by what a token does with them, from the real module tree on the meta device."""
    with torch.device("meta"):
        model = Qwen3_5ForCausalLM(cfg)
    c = count_parameters([(n, tuple(p.shape)) for n, p in model.named_parameters()])
    E, k = cfg.num_experts, cfg.num_experts_per_tok
    return {
        "attention": c["attention"],  # q (with its gate) / k / v / o projections, q/k norms
        "linear_attention": c["linear_attention"],  # GDN projections, conv1d, A_log, dt_bias, gated norm
        "shared_expert": c["shared_ffn"],  # the shared expert and its sigmoid gate
        "dense_ffn": c["dense_ffn"],
        "router": c["router"],
        "norms": c["norms"],  # the layers' two RMSNorms and the final one
        "routed_experts_total": c["routed_experts"],
        "routed_experts_active": c["routed_experts"] * k // E if E else 0,  # top-k of the E experts
        "embedding": cfg.vocab_size * cfg.hidden_size,
        "lm_head": cfg.vocab_size * cfg.hidden_size,  # read whole for every token's logits (tied or not)
    }


def decode_bytes(cfg: TextConfig, context: int, weight_bytes: int = 2) -> dict[str, int]:
    """HBM bytes one batch-1 decode step must move, the floor under its time (weight_bytes: 2 for bf16):
        weights = weight_bytes x (every decoder parameter but the routed experts (attention, GDN, shared expert,
                  router, norms) + top-k routed experts + one embedding row + the whole LM head)
        kv      = context x full-attention layers x 2 (K, V) x KV heads x head_dim x weight_bytes
        state   = 2 (read, written back) x GDN layers x (conv_dim x (kernel - 1) x weight_bytes (conv history)
                  + Hv x dk x dv x 4 (the fp32 recurrent state))
    (A_log and dt_bias are fp32, counted here at weight_bytes: 2 bytes short per value, 3.8 KB on 35B-A3B.)"""
    g = param_groups(cfg)
    dense = g["attention"] + g["linear_attention"] + g["shared_expert"] + g["dense_ffn"] + g["router"] + g["norms"]
    weights = weight_bytes * (dense + g["routed_experts_active"] + cfg.hidden_size + g["lm_head"])
    kv = context * cfg.num_full_attention_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * weight_bytes
    state = 2 * cfg.num_linear_attention_layers * (
        cfg.conv_dim * (cfg.linear_conv_kernel_dim - 1) * weight_bytes
        + cfg.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim * 4)
    return {"weights": weights, "kv": kv, "state": state, "total": weights + kv + state}


def gdn_chunk_flops(cfg: TextConfig, chunk: int = GDN_CHUNK) -> int:
    """FLOPs of one chunk of C tokens of one value head in the chunked gated delta rule (fla's form; dk, dv the head
    dims, S the [dk, dv] state):
        2C^2 dk (K K^T) + floor(C^3 / 3) (the triangular solve) + 2C^2 dk (W = T K) + 2C^2 dv (U = T V)
        + 2C dk dv (W S) + 2C^2 dk (Q K^T) + 2C^2 dv (P U') + 2C dk dv (Q S) + 2C dk dv (S += K^T U')."""
    C, dk, dv = chunk, cfg.linear_key_head_dim, cfg.linear_value_head_dim
    return 3 * 2 * C * C * dk + C**3 // 3 + 2 * 2 * C * C * dv + 3 * 2 * C * dk * dv


def prefill_flops(cfg: TextConfig, tokens: int, logits_rows: int = 1) -> dict[str, int]:
    """FLOPs of one prompt of T tokens in one forward:
        linear    = 2 x T x (every matmul weight a token meets: attention, GDN (the conv1d's weights counted as a
                    matmul's), shared expert, router, top-k routed experts; not the norms, not the embedding lookup)
        lm_head   = 2 x logits_rows x V x H (the engine computes logits for the prompt's last row only)
        attention = full-attention layers x 4 x Hq x D x T(T+1)/2 (QK^T and PV over the causal pairs)
        gdn       = GDN layers x Hv x ceil(T / C) x gdn_chunk_flops"""
    g = param_groups(cfg)
    matmul = g["attention"] + g["linear_attention"] + g["shared_expert"] + g["dense_ffn"] + g["router"] + \
        g["routed_experts_active"]
    T = tokens
    out = {
        "linear": 2 * T * matmul,
        "lm_head": 2 * logits_rows * g["lm_head"],
        "attention": cfg.num_full_attention_layers * 4 * cfg.num_attention_heads * cfg.head_dim * T * (T + 1) // 2,
        "gdn": cfg.num_linear_attention_layers * cfg.linear_num_value_heads * math.ceil(T / GDN_CHUNK)
        * gdn_chunk_flops(cfg),
    }
    out["total"] = sum(out.values())
    return out


# ---- the model and engines ----

def build_model(cfg: TextConfig, device: torch.device, dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """The model on the meta device, then materialised on `device` with a cheap random init: matrices N(0, 0.02),
    norms at their usual values (zero-centred RMSNorm 0, the gated norm 1), dt_bias 1, A = exp(A_log) in [1, 16]
    (HF's init); A_log and dt_bias in fp32, as the loader keeps them."""
    with torch.device("meta"):
        model = Qwen3_5ForCausalLM(cfg).to(dtype)
        for m in model.modules():
            if isinstance(m, GatedDeltaNet):
                m.A_log = nn.Parameter(m.A_log.float())
                m.dt_bias = nn.Parameter(m.dt_bias.float())
    model.to_empty(device=device)
    gen = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        norms = {}
        for m in model.modules():
            if isinstance(m, RMSNorm):
                norms[id(m.weight)] = 0.0
            elif isinstance(m, GatedRMSNorm):
                norms[id(m.weight)] = 1.0
        for name, p in model.named_parameters():
            if id(p) in norms:
                p.fill_(norms[id(p)])
            elif name.endswith("A_log"):
                p.uniform_(1, 16, generator=gen).log_()
            elif name.endswith("dt_bias"):
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02, generator=gen)
    buffers = [n for n, _ in model.named_buffers()]
    if buffers != ["model.inv_freq"]:  # to_empty left them uninitialised: each must be rebuilt here
        raise RuntimeError(f"build_model: unexpected buffers {buffers}; rebuild them after to_empty")
    model.model.inv_freq = rope_frequencies(cfg)[0].to(device)
    return model.eval().requires_grad_(False)


def make_engine(model, cfg: TextConfig, device, *, max_num_seqs: int, max_model_len: int,
                max_num_batched_tokens: int, eager: bool = False) -> LLMEngine:
    """An engine with the GPU backend forced (on CPU: its torch fallbacks), no prefix caching (every prompt is
    computed), and a KV cache sized to the workload."""
    blocks = max_num_seqs * -(-max_model_len // BLOCK_SIZE) + 2
    per_token = HybridCache.bytes_per_token(model.cache_spec(), model.dtype)
    config = EngineConfig(max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                          max_num_batched_tokens=max_num_batched_tokens, block_size=BLOCK_SIZE,
                          kv_cache_bytes=blocks * BLOCK_SIZE * per_token,
                          gpu_backend=True, enforce_eager=eager, enable_prefix_caching=False)
    return LLMEngine(model, ModelConfig("qwen3_5_moe_text", cfg), None, config, device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=g).tolist() for _ in range(n)]


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def graph_state(engine: LLMEngine) -> dict:
    """Whether decode steps really replayed CUDA graphs (a failed capture falls back to eager with a warning)."""
    graphs = getattr(engine.runner.decoder, "graphs", None)
    if graphs is None:
        return {"mode": "eager"}
    if not graphs.capture:  # off CUDA the padded step runs eagerly; on CUDA a capture failed
        return {"mode": "padded, eager", "capture_failed": engine.device.type == "cuda"}
    return {"mode": "cuda graphs", "captured_sizes": sorted(graphs.graphs)}


# ---- the measurements ----

def bench_decode(model, cfg, device, n: dict, eager: bool) -> dict:
    """Batch 1: a decode_context-token prompt (one prefill step), decode_warmup steps, then decode_tokens timed."""
    ctx, warm, timed = n["decode_context"], n["decode_warmup"], n["decode_tokens"]
    engine = make_engine(model, cfg, device, max_num_seqs=1, max_model_len=ctx + warm + timed + 8,
                         max_num_batched_tokens=max(ctx, 256), eager=eager)
    engine.add_request("decode", prompts(1, ctx, cfg.vocab_size, seed=1)[0], greedy(warm + timed))
    for _ in range(warm):  # the prefill samples the first token; warm - 1 decode steps (graph capture among them)
        engine.step()
    sync(device)
    t = time.perf_counter()
    for _ in range(timed):
        outs = engine.step()
    sync(device)
    dt = time.perf_counter() - t
    tokens = outs[0].outputs[0].token_ids
    if not outs[0].finished or len(tokens) != warm + timed:
        raise RuntimeError(f"decode: expected {warm + timed} tokens and a finished request, got {len(tokens)}")
    hbm = decode_bytes(cfg, ctx + warm + timed // 2, model.dtype.itemsize)  # the context at mid-measurement
    tok_s = timed / dt
    out = {"tokens_per_s": tok_s, "ms_per_token": 1e3 * dt / timed, "context": ctx, "timed_tokens": timed,
           "bytes_per_token": hbm, "hbm_bound_tokens_per_s": HBM_BYTES_PER_S / hbm["total"],
           "hbm_bound_ratio": tok_s * hbm["total"] / HBM_BYTES_PER_S, "graphs": graph_state(engine),
           "kernels": engine.runner.decoder.kernels.describe()}
    del engine
    free(device)
    return out


def bench_prefill(model, cfg, device, n: dict) -> dict:
    """One prompt of prefill_tokens in one forward (max_tokens=1: the step is the prefill and one sampled token);
    one warm-up prompt, then prefill_repeats timed; the median is reported."""
    T = n["prefill_tokens"]
    engine = make_engine(model, cfg, device, max_num_seqs=1, max_model_len=T + 8, max_num_batched_tokens=T)
    times = []
    for i, ids in enumerate(prompts(1 + n["prefill_repeats"], T, cfg.vocab_size, seed=2)):
        engine.add_request(f"prefill{i}", ids, greedy(1))
        sync(device)
        t = time.perf_counter()
        outs = engine.step()
        sync(device)
        if not (outs and outs[0].finished) or engine.has_unfinished_requests():
            raise RuntimeError("prefill: the prompt did not finish in one step")
        if i:
            times.append(time.perf_counter() - t)
    dt = sorted(times)[len(times) // 2]
    flops = prefill_flops(cfg, T)
    out = {"tokens_per_s": T / dt, "seconds": dt, "tokens": T, "all_seconds": times, "flops": flops,
           "tflops_per_s": flops["total"] / dt / 1e12, "mfu": flops["total"] / dt / PEAK_BF16_FLOPS}
    del engine
    free(device)
    return out


def run_concurrent(engine: LLMEngine, device, ids: list[list[int]], new: int) -> dict:
    """All requests queued at once; every step timed, with the tokens it produced."""
    for i, p in enumerate(ids):
        engine.add_request(f"c{i}", p, greedy(new))
    counts = dict.fromkeys(range(len(ids)), 0)
    steps = []  # (seconds, new tokens, all requests have their first token after this step)
    while engine.has_unfinished_requests():
        sync(device)
        t = time.perf_counter()
        outs = engine.step()
        sync(device)
        dt = time.perf_counter() - t
        made = 0
        for o in outs:
            i = int(o.request_id[1:])
            made += len(o.outputs[0].token_ids) - counts[i]
            counts[i] = len(o.outputs[0].token_ids)
        steps.append((dt, made, all(counts.values())))
    if any(c != new for c in counts.values()):
        raise RuntimeError(f"concurrent: every request should make {new} tokens, got {sorted(set(counts.values()))}")
    return {"steps": steps}


def bench_concurrent(model, cfg, device, n: dict) -> dict:
    """concurrent requests of concurrent_prompt tokens, concurrent_new new tokens each; the same workload runs
    once untimed first (it captures the same graph sizes and compiles the same kernels)."""
    S, P, new = n["concurrent"], n["concurrent_prompt"], n["concurrent_new"]
    engine = make_engine(model, cfg, device, max_num_seqs=S, max_model_len=P + new + 8,
                         max_num_batched_tokens=n["max_num_batched_tokens"])
    run_concurrent(engine, device, prompts(S, P, cfg.vocab_size, seed=3), new)
    steps = run_concurrent(engine, device, prompts(S, P, cfg.vocab_size, seed=4), new)["steps"]
    first_all = next(i for i, s in enumerate(steps) if s[2])  # the step the last prompt got its first token
    decode = steps[first_all + 1:]
    full = [s for s in decode if s[1] == S]
    total_s, total_tokens = sum(s[0] for s in steps), sum(s[1] for s in steps)
    rate = lambda ss: sum(s[1] for s in ss) / sum(s[0] for s in ss) if ss else None  # noqa: E731
    out = {"requests": S, "prompt_tokens": P, "new_tokens": new, "output_tokens": total_tokens,
           "end_to_end_tokens_per_s": total_tokens / total_s, "end_to_end_seconds": total_s,
           "prefill_phase_seconds": sum(s[0] for s in steps[:first_all + 1]),
           "decode_phase_tokens_per_s": rate(decode), "decode_phase_steps": len(decode),
           "full_batch_tokens_per_s": rate(full), "full_batch_steps": len(full),
           "full_batch_ms_per_step": 1e3 * sum(s[0] for s in full) / len(full) if full else None,
           "graphs": graph_state(engine)}
    del engine
    free(device)
    return out


def versions(device: torch.device) -> dict:
    def version(pkg):
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    # fla-core is looked up, never imported: the backend imports it itself when it runs
    out = {"torch": torch.__version__, "triton": version("triton"), "fla_core": version("fla-core"),
           "python": platform.python_version(), "cuda": torch.version.cuda}
    out["device_name"] = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return out


def table(r: dict) -> str:
    rows = []
    d = r.get("decode_batch1", {})
    for mode in ("graphs", "eager"):
        if mode in d:
            x = d[mode]
            rows.append((f"decode b=1 @{x['context']} ({x['graphs']['mode']})", f"{x['tokens_per_s']:.1f} tok/s",
                         f"{100 * x['hbm_bound_ratio']:.1f}% of HBM bound ({x['hbm_bound_tokens_per_s']:.0f})"))
    if "prefill" in r:
        x = r["prefill"]
        rows.append((f"prefill {x['tokens']} tokens", f"{x['tokens_per_s']:.0f} tok/s",
                     f"MFU {100 * x['mfu']:.1f}% ({x['tflops_per_s']:.1f} TFLOP/s)"))
    if "concurrent" in r:
        x = r["concurrent"]
        fb = x["full_batch_tokens_per_s"]
        rows.append((f"{x['requests']} concurrent, {x['prompt_tokens']}+{x['new_tokens']}",
                     f"{x['end_to_end_tokens_per_s']:.0f} tok/s end to end",
                     f"decode phase {x['decode_phase_tokens_per_s'] or 0:.0f} tok/s, full batch "
                     f"{fb or 0:.0f} tok/s ({x['full_batch_steps']} steps)"))
    w = max(len(a) for a, _, _ in rows) if rows else 0
    lines = [f"{r['geometry']} on {r['versions']['device_name']} ({r.get('kernels', '?')})"]
    lines += [f"  {a:<{w}}  {b:>24}  {c}" for a, b, c in rows]
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--geometry", choices=("35b-a3b", "tiny"), default="35b-a3b")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--quick", action="store_true", help="smaller counts: a check of the script, not a measurement")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"),
                    help="default: bfloat16 on CUDA; float32 on a CPU, where bf16 scatters and small matmuls crawl")
    ap.add_argument("--out", type=Path, help="the JSON results (rewritten after each measurement)")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here (the dry run is --geometry tiny --device cpu)")
    n = COUNTS["quick" if a.quick else "full" if device.type == "cuda" else "cpu"]
    if device.type == "cpu":  # the toy's ops are tiny: OpenMP threads spinning on a shared CPU cost more than they give
        torch.set_num_threads(1)
    cfg = text_config(a.geometry)
    groups = param_groups(cfg)
    r = {"geometry": a.geometry, "device": a.device, "dtype": str(dtype).removeprefix("torch."), "quick": a.quick,
         "counts": n,
         "versions": versions(device), "params": groups,
         "peaks": {"hbm_bytes_per_s": HBM_BYTES_PER_S, "bf16_flops_per_s": PEAK_BF16_FLOPS, "of": "H200, nominal"},
         "definitions": DEFINITIONS,
         "complete": False}

    def save(stage: str):
        print(f"[gpu_bench] {stage} done", flush=True)
        if a.out:
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps(r, indent=1) + "\n")

    t = time.perf_counter()
    model = build_model(cfg, device, dtype)
    sync(device)
    r["build_seconds"] = time.perf_counter() - t
    if device.type == "cuda":
        r["weights_gib"] = torch.cuda.memory_allocated(device) / 2**30
    save(f"build ({r['build_seconds']:.1f} s)")
    r["decode_batch1"] = {"graphs": bench_decode(model, cfg, device, n, eager=False)}
    r["kernels"] = r["decode_batch1"]["graphs"]["kernels"]
    save("decode (graphs)")
    r["decode_batch1"]["eager"] = bench_decode(model, cfg, device, n, eager=True)
    save("decode (eager)")
    r["prefill"] = bench_prefill(model, cfg, device, n)
    save("prefill")
    r["concurrent"] = bench_concurrent(model, cfg, device, n)
    if device.type == "cuda":
        r["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    r["complete"] = True
    save("concurrent")
    print(table(r), flush=True)
    return r


if __name__ == "__main__":
    main()
