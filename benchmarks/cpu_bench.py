"""CPU performance of qwen35 against transformers and against the machine's limits, on random-weight checkpoints of
two geometries (`bench-moe`, a 1.46B-total / 0.5B-active Qwen3.5-MoE; `qwen3.5-0.8b`, the released 0.8B text
model), in bfloat16 and float32, and in the quantized weight formats (int8, int4: bf16 weights quantized at load).

    pip install -e '.[bench]'
    python benchmarks/cpu_bench.py [--geometry bench-moe qwen3.5-0.8b] [--dtype bfloat16 float32]
                                   [--quantization bf16 int8 int4] [--hf bench-moe:bfloat16 ... | all]
                                   [--out benchmarks/results/cpu.json] [--chart docs/cpu-benchmarks.png]
                                   [--checkpoints DIR] [--quick]

Per geometry, dtype and format (the bfloat16 rows run each `--quantization` format, by default bf16, int8 and int4
for the MoE geometries and bf16 alone for the dense one; the float32 rows run fp32 weights), each system runs in its
own process (so peak RSS is its own):
  - batch 1: a 512-token prompt, 128 new tokens (transformers: 32, its per-token rate is steady): time to first
    token (= prefill tokens/s at 512) and decode tokens/s after it;
  - prefill tokens/s at 2048 prompt tokens (time to the first token);
  - 16 concurrent requests of 128 prompt tokens, 64 new tokens each (transformers: one left-padded static batch of
    16, 16 new tokens): aggregate decode tokens/s once every request has its first token;
  - peak RSS (and, for qwen35, the bytes of weights and cache it holds).
The machine is measured in the same run: read bandwidth (a sum over 1 GiB, taken again right before and right after
every decode measurement, whose mean is that run's bandwidth, because it moves by +-30% on a shared VM; the probe's
buffer is left out of the peak RSS) and fp32/bf16 matmul peak (2048^3 products). Printed ratios:
qwen35 / transformers; each format / bf16; decode / bandwidth bound (bytes one step moves / bandwidth: every packed
weight of the CPU decoder as it holds it, int8/int4 with their scales and zero points, routed experts counted for
the distinct ones the step's requests hit under uniform routing, the small fp32 parameters, the embedding rows,
recurrent state read and written, K/V read); prefill / matmul bound (2 FLOPs per active weight per token + causal
attention, at the best matmul peak of any dtype). The issue-14 targets for int8/int4 (set on bench-moe) are checked
at the end. Greedy decoding, ignore-eos. `--quick` runs a 4-layer toy MoE (`tiny-moe`) with short prompts and no
transformers: a check of the script (a minute or two), not a measurement.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BENCH_MOE = {
    "model_type": "qwen3_5_moe_text", "architectures": ["Qwen3_5MoeForCausalLM"], "dtype": "bfloat16",
    "vocab_size": 248320, "hidden_size": 1024, "num_hidden_layers": 16, "num_attention_heads": 8,
    "num_key_value_heads": 2, "head_dim": 256, "linear_num_key_heads": 8, "linear_num_value_heads": 16,
    "linear_key_head_dim": 128, "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4,
    "full_attention_interval": 4, "num_experts": 64, "num_experts_per_tok": 8, "moe_intermediate_size": 256,
    "shared_expert_intermediate_size": 256, "tie_word_embeddings": False, "rms_norm_eps": 1e-6,
    "max_position_embeddings": 32768, "eos_token_id": 248044,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10_000_000, "partial_rotary_factor": 0.25,
                        "mrope_section": [11, 11, 10], "mrope_interleaved": True},
}

# --quick: bench-moe's layout at toy sizes
TINY_MOE = dict(BENCH_MOE, vocab_size=8192, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                head_dim=64, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=64,
                linear_value_head_dim=64, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128,
                shared_expert_intermediate_size=128,
                rope_parameters=dict(BENCH_MOE["rope_parameters"], mrope_section=[3, 3, 2]))
# Prompt lengths and new tokens of the runs (--quick: SIZES_QUICK); 16 concurrent requests either way.
SIZES = {"prompt": 512, "new": 128, "long_prompt": 2048, "prompt_16": 128, "new_16": 64, "hf_new": 32, "hf_new_16": 16}
SIZES_QUICK = {"prompt": 64, "new": 16, "long_prompt": 128, "prompt_16": 32, "new_16": 8, "hf_new": 8, "hf_new_16": 4}
CONCURRENT = 16
FLOAT_FORMATS = {"bfloat16": "bf16", "float32": "fp32"}  # the unquantized format of each dtype


def geometry(name: str) -> dict:
    if name == "bench-moe":
        return dict(BENCH_MOE)
    if name == "tiny-moe":
        return dict(TINY_MOE)
    from qwen35.presets import preset

    cfg = dict(preset(name)["text_config"])
    cfg.update(model_type="qwen3_5_text", architectures=["Qwen3_5ForCausalLM"], dtype="bfloat16",
               max_position_embeddings=32768, eos_token_id=248044)
    return cfg


# ---------------------------------------------------------------------------------------------- machine limits

def read_bandwidth(trials: int = 3) -> float:
    """GB/s of a sum over 1 GiB of fp32 (far beyond any cache), best of `trials`. On a shared VM this moves by
    +-30% from minute to minute, so every decode measurement takes one right before it and one right after.
    The probe's 1 GiB buffer is left out of the process's peak RSS (see PEAK)."""
    PEAK.bank()
    x = torch.ones(2**28)
    best = 0.0
    for _ in range(trials):
        t = time.perf_counter()
        x.sum()
        best = max(best, x.numel() * 4 / (time.perf_counter() - t))
    del x
    PEAK.reset()
    return best / 1e9


class PeakRSS:
    """Peak resident memory of this process without the bandwidth probe's buffer: the peak so far is banked before
    each probe, and after it the kernel's high-water mark is reset (writing 5 to /proc/self/clear_refs, Linux).
    Elsewhere getrusage's peak is used, which includes the probe."""

    def __init__(self):
        self.banked, self.resettable = 0.0, Path("/proc/self/clear_refs").exists()

    @staticmethod
    def _hwm_mb() -> float:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def bank(self):
        self.banked = max(self.banked, self._hwm_mb())

    def reset(self):
        if self.resettable:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                self.resettable = False

    def peak_mb(self) -> float:
        return max(self.banked, self._hwm_mb())


PEAK = PeakRSS()


def machine_limits(trials: int = 5) -> dict:
    bw = read_bandwidth(trials) * 1e9
    peaks = {}
    for dtype, n, reps in ((torch.float32, 2048, trials), (torch.bfloat16, 1024, 2)):
        # F.linear, the call models make (torch's bf16 `a @ b` takes a far slower path on AVX2: ~0.3 GFLOP/s)
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        best = 0.0
        for _ in range(reps):
            t = time.perf_counter()
            torch.nn.functional.linear(a, b)
            best = max(best, 2 * n**3 / (time.perf_counter() - t))
        peaks[str(dtype).split(".")[1]] = best / 1e9
    return {"read_bandwidth_GBps": bw / 1e9, "matmul_GFLOPs": peaks}


# ---------------------------------------------------------------------------------------------- bounds

def active_params(cfg) -> float:
    """Weights one token multiplies (routed experts: top-k of them; the LM head included)."""
    t = cfg.text
    H = t.hidden_size
    gdn = H * (t.conv_dim + t.value_dim + 2 * t.linear_num_value_heads) + t.value_dim * H
    attn = H * (2 * t.num_attention_heads * t.head_dim + 2 * t.num_key_value_heads * t.head_dim) \
        + t.num_attention_heads * t.head_dim * H
    if t.num_experts:
        E, k = t.num_experts, t.num_experts_per_tok
        ffn = 3 * H * t.moe_intermediate_size * k + 3 * H * t.shared_expert_intermediate_size + (E + 1) * H
    else:
        ffn = 3 * H * t.intermediate_size
    return (gdn * t.num_linear_attention_layers + attn * t.num_full_attention_layers
            + ffn * t.num_hidden_layers + t.vocab_size * H)


def prefill_flops(cfg, tokens: int) -> float:
    t = cfg.text
    active = active_params(cfg) - t.vocab_size * t.hidden_size  # the LM head runs for the last token only
    attention = t.num_full_attention_layers * 2 * t.num_attention_heads * t.head_dim * tokens * tokens  # causal
    return 2 * active * tokens + 2 * t.vocab_size * t.hidden_size + attention


def _is_packed(v) -> bool:
    return hasattr(type(v), "face")  # a packed weight: the kernels read it through its face


def _nbytes(v) -> int:
    """Bytes a packed weight (data, scales, zero points) or a tensor holds."""
    if _is_packed(v):
        return v.nbytes
    return 0 if v.is_meta else v.numel() * v.element_size()


def _held(obj) -> list:
    """The packed weights and tensors a part of the decoder holds (attributes, and dicts of small tensors)."""
    out = []
    for v in vars(obj).values():
        if _is_packed(v) or isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, dict):
            out += [t for t in v.values() if isinstance(t, torch.Tensor)]
    return out


def _parts(decoder) -> list:
    return [decoder] + [part for _, mixer, ffn in decoder.layers for part in (mixer, ffn)]


def _key(v) -> int:
    return (v.data if _is_packed(v) else v).data_ptr()


def decoder_weight_bytes(decoder) -> int:
    """Bytes of weights a CpuDecoder holds: its packed weights as packed (int8/int4 with scales and zero points),
    its fp32 copies of small parameters, and whatever the model still holds (embedding, norms, ...; the matrices
    the decoder packed are on the meta device)."""
    seen, total = set(), 0
    items = [v for part in _parts(decoder) for v in _held(part)]
    items += list(decoder.model.parameters()) + list(decoder.model.buffers())
    for v in items:
        if (_is_packed(v) or not v.is_meta) and _key(v) not in seen:
            seen.add(_key(v))
            total += _nbytes(v)
    return total


def step_bytes(decoder, cache, batch: int, context: int) -> dict:
    """Bytes one decode step of `batch` requests with `context` tokens each moves on the CPU decoder: every weight
    it holds as held (a stacked expert weight for the distinct experts the batch hits, expected under uniform
    routing), the embedding rows of the new tokens, recurrent state read and written, K/V read."""
    weights = 0.0
    for part in _parts(decoder):
        E = getattr(part, "E", None)
        hit = 1.0 if E is None else 1 - (1 - part.m.top_k / E) ** batch  # fraction of the experts hit
        for v in _held(part):
            weights += _nbytes(v) * (hit if _is_packed(v) and len(v.shape) == 3 else 1)
    emb = decoder.model.model.embed_tokens.weight
    row = _nbytes(decoder.head) / decoder.head.shape[0] if emb.is_meta else emb[0].numel() * emb.element_size()
    weights += batch * row
    state = 2 * batch * sum(pool[0].numel() * pool[0].element_size() for pools in (cache.conv, cache.ssm)
                            for pool in pools.values())
    kv = batch * context * sum(pool[0, 0].numel() * pool.element_size() for pools in (cache.k, cache.v)
                               for pool in pools.values())
    return {"weights": weights, "state": state, "kv": kv, "total": weights + state + kv}


# ---------------------------------------------------------------------------------------------- workers

def prompts(n: int, length: int, seed: int, vocab_size: int = 248320) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, min(200_000, vocab_size), (length,), generator=g).tolist() for _ in range(n)]


def peak_rss_mb() -> float:
    return PEAK.peak_mb()


def worker_qwen35(path: str, dtype: str, fmt: str, sizes: dict) -> dict:
    from qwen35 import LLM, SamplingParams

    t0 = time.perf_counter()
    # native_kernels=True: the fast CPU configuration for every dtype (bf16 and quantized weights get it by default;
    # fp32 by default stays on PyTorch's matmuls, the mode that matches transformers to 1e-4)
    quant = {} if fmt in FLOAT_FORMATS.values() else {"quantization": fmt}
    try:
        llm = LLM(path, dtype=dtype, max_model_len=4096, max_num_seqs=CONCURRENT, max_num_batched_tokens=2048,
                  skip_tokenizer_init=True, native_kernels=True, **quant)
    except TypeError as e:
        if quant and "quantization" in str(e):
            raise SystemExit(f"format {fmt}: this checkout's LLM() takes no quantization= ({e})") from None
        raise
    decoder, cache = llm.engine.runner.decoder, llm.engine.cache
    if not hasattr(decoder, "layers"):
        raise SystemExit("the CPU backend is not in use (native kernels unavailable here?): nothing to measure")
    vocab = llm.model_config.text.vocab_size
    out = {"load_s": time.perf_counter() - t0, "format": fmt, "load_report": str(getattr(llm.load_report,
                                                                                          "quantization", ""))}
    S = sizes
    llm.generate(prompts(1, 64, 0, vocab), SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # warm-up
    out["bw_1_before_GBps"] = read_bandwidth()
    out[f"ttft_{S['prompt']}_s"], out["decode_1_tok_s"] = _qwen35_run(llm, prompts(1, S["prompt"], 7, vocab),
                                                                      S["new"])
    out["bw_1_after_GBps"] = read_bandwidth()
    out[f"ttft_{S['long_prompt']}_s"], _ = _qwen35_run(llm, prompts(1, S["long_prompt"], 9, vocab), 1)
    out["bw_16_before_GBps"] = read_bandwidth()
    _, out["decode_16_tok_s"] = _qwen35_run(llm, prompts(CONCURRENT, S["prompt_16"], 8, vocab), S["new_16"])
    out["bw_16_after_GBps"] = read_bandwidth()
    out["peak_rss_mb"] = peak_rss_mb()
    out["weights_mb"] = decoder_weight_bytes(decoder) / 2**20
    out["cache_mb"] = _cache_bytes(cache) / 2**20
    # the mean context of each decode run's steps
    out["bytes_1"] = step_bytes(decoder, cache, 1, S["prompt"] + S["new"] // 2)
    out["bytes_16"] = step_bytes(decoder, cache, CONCURRENT, S["prompt_16"] + S["new_16"] // 2)
    return out


def _qwen35_run(llm, batch_prompts, new_tokens: int) -> tuple[float, float]:
    """(seconds to the first token of the first request; generated tokens per second once every request has its
    first token, i.e. prefill excluded)."""
    from qwen35 import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    counts, t0, t_first, t_all = {}, time.perf_counter(), None, None
    for out in llm.stream(batch_prompts, params):
        counts[out.request_id] = len(out.outputs[0].token_ids)
        t_first = t_first or time.perf_counter()
        if t_all is None and len(counts) == len(batch_prompts):
            t_all, base = time.perf_counter(), sum(counts.values())
    rate = (sum(counts.values()) - base) / (time.perf_counter() - t_all) if new_tokens > 1 else 0.0
    return t_first - t0, rate


def _cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for pool in (cache.k, cache.v, cache.conv, cache.ssm)
               for t in pool.values())


def worker_hf(path: str, dtype: str, sizes: dict) -> dict:
    """As worker_qwen35, with fewer new tokens (sizes["hf_new"], ["hf_new_16"]): transformers decodes at a steady
    rate."""
    import transformers as tf
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        """Time of every generation step (the first put is the prompt)."""

        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    t0 = time.perf_counter()
    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    out = {"load_s": time.perf_counter() - t0}

    def run(batch, new_tokens) -> tuple[float, float]:
        ids, clock = torch.tensor(batch), Clock()
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, streamer=clock)
        steps = clock.times[1:]  # one per new token
        rate = len(batch) * (len(steps) - 1) / (steps[-1] - steps[0]) if len(steps) > 1 else 0.0
        return steps[0] - t, rate

    S, vocab = sizes, model.config.vocab_size
    run(prompts(1, 64, 0, vocab), 4)  # warm-up
    out["bw_1_before_GBps"] = read_bandwidth()
    out[f"ttft_{S['prompt']}_s"], out["decode_1_tok_s"] = run(prompts(1, S["prompt"], 7, vocab), S["hf_new"])
    out["bw_1_after_GBps"] = read_bandwidth()
    out[f"ttft_{S['long_prompt']}_s"], _ = run(prompts(1, S["long_prompt"], 9, vocab), 1)
    out["bw_16_before_GBps"] = read_bandwidth()
    _, out["decode_16_tok_s"] = run(prompts(CONCURRENT, S["prompt_16"], 8, vocab), S["hf_new_16"])
    out["bw_16_after_GBps"] = read_bandwidth()
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def run_worker(system: str, path: Path, dtype: str, fmt: str, quick: bool) -> dict:
    cmd = [sys.executable, __file__, "--worker", system, "--path", str(path), "--dtype", dtype, "--format", fmt] \
        + ["--quick"] * quick
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{system} worker failed:\n{r.stderr[-3000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for key in [k for k in out if k.startswith("ttft_")]:
        L = int(key.split("_")[1])
        out[f"prefill_{L}_tok_s"] = L / out[key]
    for n in (1, 16):  # the bandwidth during a decode run: the mean of the probes right before and right after it
        out[f"bw_{n}_GBps"] = (out[f"bw_{n}_before_GBps"] + out[f"bw_{n}_after_GBps"]) / 2
    return out


def summarize(name: str, cfg, dtype: str, fmt: str, limits: dict, sizes: dict, q: dict, hf: dict | None) -> dict:
    """Rates against their bounds. Decode bounds divide the bandwidth each system measured around its decode run
    (the mean of the probes right before and after it) by the bytes qwen35's decoder moves per step in this format
    (transformers in the same dtype holds the same weights); prefill bounds use the best matmul peak of any dtype
    (bf16 and quantized weights are multiplied in fp32 here)."""
    peak = max(limits["matmul_GFLOPs"].values()) * 1e9
    b1, b16 = q["bytes_1"], q["bytes_16"]

    def bound(key, run):
        if key == "decode_1_tok_s":
            return run["bw_1_GBps"] * 1e9 / b1["total"]
        if key == "decode_16_tok_s":
            return CONCURRENT * run["bw_16_GBps"] * 1e9 / b16["total"]
        L = int(key.split("_")[1])
        return L * peak / prefill_flops(cfg, L)

    rows = {}
    keys = [f"prefill_{sizes['prompt']}_tok_s", f"prefill_{sizes['long_prompt']}_tok_s", "decode_1_tok_s",
            "decode_16_tok_s"]
    for key in keys:
        rows[key] = {"qwen35": q[key], "bound": bound(key, q), "of_bound": q[key] / bound(key, q)}
        if hf:
            rows[key].update(transformers=hf[key], speedup=q[key] / hf[key], hf_of_bound=hf[key] / bound(key, hf))
    # compute roofline of the 16-request step: 2 FLOPs per active weight per token at the best matmul peak
    rows["decode_16_tok_s"]["compute_bound"] = peak / (2 * active_params(cfg))
    rss_budget = q["weights_mb"] + q["cache_mb"]
    return {"geometry": name, "dtype": dtype, "format": fmt, "rows": rows, "qwen35": q, "transformers": hf,
            "bytes_per_token_batch1": b1, "bytes_per_step_batch16": b16,
            "rss_over_weights_plus_cache": q["peak_rss_mb"] / rss_budget,
            "decode16_over_decode1": q["decode_16_tok_s"] / q["decode_1_tok_s"]}


def compare_formats(results: list[dict]) -> None:
    """Each quantized row's rates over its geometry's bf16 row (`vs_bf16` in its rows)."""
    base = {r["geometry"]: r for r in results if r["format"] == "bf16"}
    for r in results:
        b = base.get(r["geometry"])
        if r["format"] in ("int8", "int4") and b:
            for key, row in r["rows"].items():
                row["vs_bf16"] = row["qwen35"] / b["rows"][key]["qwen35"]


# issue 14's targets for the quantized formats (set on bench-moe): batch-1 decode at this share of its bandwidth
# bound and this many times bf16's rate
DECODE_TARGETS = {"int8": (0.80, 1.8), "int4": (0.70, 3.0)}


def check_targets(results: list[dict]) -> list[dict]:
    """Each int8/int4 row against issue 14's targets: [{geometry, format, target, value, met}]."""
    out = []
    for r in results:
        if r["format"] not in DECODE_TARGETS or "vs_bf16" not in r["rows"]["decode_1_tok_s"]:
            continue
        rows, (share, speedup) = r["rows"], DECODE_TARGETS[r["format"]]
        checks = [(f"batch-1 decode >= {share:.0%} of its bound", rows["decode_1_tok_s"]["of_bound"], share),
                  (f"batch-1 decode >= {speedup}x bf16", rows["decode_1_tok_s"]["vs_bf16"], speedup),
                  ("16-concurrent >= bf16", rows["decode_16_tok_s"]["vs_bf16"], 1.0),
                  ("16-concurrent >= 3x its batch 1", r["decode16_over_decode1"], 3.0)]
        checks += [(f"{key.split('_tok')[0].replace('_', ' ')} >= bf16", rows[key]["vs_bf16"], 1.0)
                   for key in rows if key.startswith("prefill_")]
        out += [{"geometry": r["geometry"], "format": r["format"], "target": what, "value": value, "need": need,
                 "met": value >= need} for what, value, need in checks]
        rss = r["rss_over_weights_plus_cache"]  # the one target with an upper limit
        out.append({"geometry": r["geometry"], "format": r["format"], "target": "peak RSS <= 1.15x (weights + cache)",
                    "value": rss, "need": 1.15, "met": rss <= 1.15})
    return out


def print_table(results: list[dict], limits: dict, targets: list[dict]) -> None:
    print(f"\nmachine: read bandwidth {limits['read_bandwidth_GBps']:.1f} GB/s, matmul fp32 "
          f"{limits['matmul_GFLOPs']['float32']:.0f} / bf16 {limits['matmul_GFLOPs']['bfloat16']:.0f} GFLOP/s")
    head = f"{'geometry':14} {'dtype':9} {'format':6} {'metric':19} {'qwen35':>9} {'HF':>9} {'q/HF':>6} " \
           f"{'vs bf16':>7} {'bound':>9} {'q/bound':>8}"
    print(head + "\n" + "-" * len(head))
    for r in results:
        for key, row in r["rows"].items():
            hf = row.get("transformers")
            hf_text = "-" if hf is None else f"{hf:.1f}"
            speedup = "" if hf is None else f"{row['speedup']:.2f}x"
            vs = f"{row['vs_bf16']:.2f}x" if "vs_bf16" in row else ""
            print(f"{r['geometry']:14} {r['dtype']:9} {r['format']:6} {key:19} {row['qwen35']:9.1f} {hf_text:>9} "
                  f"{speedup:>6} {vs:>7} {row['bound']:9.1f} {100 * row['of_bound']:7.0f}%")
        q = r["qwen35"]
        ttft = next(k for k in q if k.startswith("ttft_"))
        print(f"{'':32} TTFT@{ttft.split('_')[1]} {1e3 * q[ttft]:.0f} ms; peak RSS {q['peak_rss_mb']:.0f} MB = "
              f"{r['rss_over_weights_plus_cache']:.2f} x (weights {q['weights_mb']:.0f} + cache {q['cache_mb']:.0f} MB)"
              f"; {CONCURRENT}-concurrent / batch-1 {r['decode16_over_decode1']:.1f}x; {CONCURRENT}-concurrent "
              f"compute roofline {r['rows']['decode_16_tok_s']['compute_bound']:.0f} tok/s; batch-1 step moves "
              f"{r['bytes_per_token_batch1']['total'] / 2**20:.0f} MiB")
    if targets:
        print("\nissue 14 targets (set for bench-moe):")
        for t in targets:
            print(f"  {t['geometry']:14} {t['format']:5} {t['target']:40} {t['value']:7.3f} (target {t['need']:.2f}) "
                  f"{'met' if t['met'] else 'MISSED'}")


def chart(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(results))
    rows_ = -(-len(results) // cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(5 * cols, 4 * rows_), squeeze=False)
    for ax in axes.flat[len(results):]:
        ax.axis("off")
    for ax, r in zip(axes.flat, results):
        keys = list(r["rows"])
        xs = range(len(keys))
        w = 0.27
        ax.bar([x - w for x in xs], [100 * r["rows"][k]["of_bound"] for k in keys], w, label="qwen35")
        if r["transformers"]:
            ax.bar(list(xs), [100 * r["rows"][k]["hf_of_bound"] for k in keys], w, label="transformers")
        ax.axhline(100, color="k", lw=0.8, ls="--", label="machine limit")
        ax.set_xticks(list(xs), [f"prefill\n{k.split('_')[1]}" if k.startswith("prefill") else
                                 f"decode\n{'batch 1' if k == 'decode_1_tok_s' else f'{CONCURRENT} conc.'}"
                                 for k in keys])
        ax.set_ylabel("% of the machine's limit")
        ax.set_title(f"{r['geometry']} {r['dtype']}" + (f" {r['format']}" if r["format"] in ("int8", "int4") else ""))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def formats_for(name: str, dtype: str, asked: list[str] | None) -> list[str]:
    """The weight formats a (geometry, dtype) runs: float32 only as fp32; bfloat16 the --quantization list, by
    default bf16, int8 and int4 for MoE geometries and bf16 alone for dense ones."""
    if dtype != "bfloat16":
        return [FLOAT_FORMATS[dtype]]
    if asked is not None:
        return asked
    return ["bf16", "int8", "int4"] if geometry(name).get("num_experts") else ["bf16"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--geometry", nargs="+", help="bench-moe, tiny-moe or a preset (default: bench-moe "
                    "qwen3.5-0.8b; --quick: tiny-moe)")
    ap.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--quantization", nargs="+", choices=["bf16", "int8", "int4"],
                    help="weight formats of the bfloat16 rows (default: bf16 int8 int4 for MoE geometries, bf16 "
                         "for dense ones)")
    ap.add_argument("--hf", nargs="*", help="geometry:dtype pairs transformers also runs (default: "
                    "bench-moe:bfloat16 bench-moe:float32 qwen3.5-0.8b:float32, all but 0.8B in bf16, which takes "
                    "transformers ~10 minutes: no bf16 matmul kernels on AVX2; --quick: none); --hf all for every "
                    "pair; transformers runs the unquantized weights only")
    ap.add_argument("--out", help="JSON record (default: benchmarks/results/cpu.json; --quick: a temporary file)")
    ap.add_argument("--chart")
    ap.add_argument("--checkpoints", help="folder to keep the random checkpoints in (default: a temporary one)")
    ap.add_argument("--quick", action="store_true", help="tiny-moe, short prompts, no transformers: checks this "
                    "script in a minute or two (its figures measure nothing)")
    ap.add_argument("--worker", choices=["qwen35", "hf"], help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--format", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    sizes = SIZES_QUICK if args.quick else SIZES
    if args.worker:
        if args.worker == "qwen35":
            print(json.dumps(worker_qwen35(args.path, args.dtype[0], args.format, sizes)))
        else:
            print(json.dumps(worker_hf(args.path, args.dtype[0], sizes)))
        return 0
    geometries = args.geometry or (["tiny-moe"] if args.quick else ["bench-moe", "qwen3.5-0.8b"])
    hf_pairs = args.hf if args.hf is not None else \
        [] if args.quick else ["bench-moe:bfloat16", "bench-moe:float32", "qwen3.5-0.8b:float32"]
    out_path = Path(args.out or (Path(tempfile.gettempdir()) / "qwen35-cpu-quick.json" if args.quick else
                                 ROOT / "benchmarks" / "results" / "cpu.json"))

    from qwen35.config import ModelConfig
    from qwen35.demo import write_random_checkpoint

    t_start = time.time()
    limits = machine_limits(1 if args.quick else 5)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.checkpoints or tmp)
        for name in geometries:
            config = geometry(name)
            path = root / name
            if not (path / "model.safetensors").is_file():
                path.mkdir(parents=True, exist_ok=True)
                t = time.time()
                write_random_checkpoint(path, config)
                print(f"[{name}] wrote a random checkpoint in {time.time() - t:.0f} s", flush=True)
            cfg = ModelConfig.from_hf(config)
            for dtype in args.dtype:
                for fmt in formats_for(name, dtype, args.quantization):
                    t = time.time()
                    q = run_worker("qwen35", path, dtype, fmt, args.quick)
                    print(f"[{name} {dtype} {fmt}] qwen35 {time.time() - t:.0f} s: {json.dumps(q)}", flush=True)
                    hf = None
                    if fmt in FLOAT_FORMATS.values() and ("all" in hf_pairs or f"{name}:{dtype}" in hf_pairs):
                        t = time.time()
                        hf = run_worker("hf", path, dtype, fmt, args.quick)
                        print(f"[{name} {dtype}] transformers {time.time() - t:.0f} s: {json.dumps(hf)}", flush=True)
                    results.append(summarize(name, cfg, dtype, fmt, limits, sizes, q, hf))
    compare_formats(results)
    targets = check_targets(results)
    print_table(results, limits, targets)
    import transformers

    record = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "machine": platform.processor() or
              platform.machine(), "cpus": torch.get_num_threads(), "torch": torch.__version__,
              "transformers": transformers.__version__, "sizes": sizes, "limits": limits, "results": results,
              "targets": targets, "wall_s": time.time() - t_start}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(record, indent=2))
    if args.chart:
        chart(results, Path(args.chart))
    print(f"\nwrote {out_path}" + (f" and {args.chart}" if args.chart else "") + f" in {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
