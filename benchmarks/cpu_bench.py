"""CPU performance of qwen35 against transformers and against the machine's limits, on random-weight checkpoints of
two geometries (`bench-moe`, a 1.46B-total / 0.5B-active Qwen3.5-MoE; `qwen3.5-0.8b`, the released 0.8B text
model), in bfloat16 and float32.

    pip install -e '.[bench]'
    python benchmarks/cpu_bench.py [--geometry bench-moe qwen3.5-0.8b] [--dtype bfloat16 float32]
                                   [--hf bench-moe:bfloat16 ... | all] [--out benchmarks/results/cpu.json]
                                   [--chart docs/cpu-benchmarks.png] [--checkpoints DIR]

Per geometry and dtype, each system runs in its own process (so peak RSS is its own):
  - batch 1: a 512-token prompt, 128 new tokens (transformers: 32, its per-token rate is steady): time to first
    token (= prefill tokens/s at 512) and decode tokens/s after it;
  - prefill tokens/s at 2048 prompt tokens (time to the first token);
  - 16 concurrent requests of 128 prompt tokens, 64 new tokens each (transformers: one left-padded static batch of
    16, 16 new tokens): aggregate decode tokens/s once every request has its first token;
  - peak RSS (and, for qwen35, the bytes of weights and cache it holds).
The machine is measured in the same run: read bandwidth (a sum over 1 GiB, taken again right before and right after
every decode measurement, whose mean is that run's bandwidth, because it moves by +-30% on a shared VM; the probe's
buffer is left out of the peak RSS) and fp32/bf16 matmul peak (2048^3 products). Printed ratios:
qwen35 / transformers; decode / bandwidth bound (bytes of weights and state one step touches / bandwidth; with 16
requests, the distinct experts they hit); prefill / matmul bound (2 FLOPs per active weight per token + causal
attention, at the best matmul peak of any dtype). Greedy decoding, ignore-eos.
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


def geometry(name: str) -> dict:
    if name == "bench-moe":
        return dict(BENCH_MOE)
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


# ---------------------------------------------------------------------------------------------- analytic bounds

def per_token_bytes(cfg, dtype_bytes: int, context: int, batch: int = 1) -> dict:
    """Bytes one decode step of `batch` requests moves: every weight it multiplies (routed experts: the distinct
    ones the batch hits, expected under uniform routing), recurrent state read and written, K/V read."""
    t = cfg.text
    H, L = t.hidden_size, t.num_hidden_layers
    lin = t.num_linear_attention_layers
    full = t.num_full_attention_layers
    gdn = H * (t.conv_dim + t.value_dim + 2 * t.linear_num_value_heads) + t.value_dim * H
    attn = H * (2 * t.num_attention_heads * t.head_dim + 2 * t.num_key_value_heads * t.head_dim) \
        + t.num_attention_heads * t.head_dim * H
    if t.num_experts:
        E, k = t.num_experts, t.num_experts_per_tok
        distinct = E * (1 - (1 - k / E) ** batch)
        ffn = 3 * H * t.moe_intermediate_size * distinct + 3 * H * t.shared_expert_intermediate_size + (E + 1) * H
        ffn_all_layers = ffn * L
    else:
        ffn_all_layers = 3 * H * t.intermediate_size * L
    head = t.vocab_size * H
    weights = (gdn * lin + attn * full + ffn_all_layers + head) * dtype_bytes
    state = batch * lin * (2 * t.linear_num_value_heads * t.linear_key_head_dim * t.linear_value_head_dim * 4
                           + 2 * t.conv_dim * (t.linear_conv_kernel_dim - 1) * dtype_bytes)
    kv = batch * full * context * 2 * t.num_key_value_heads * t.head_dim * dtype_bytes
    return {"weights": weights, "state": state, "kv": kv, "total": weights + state + kv}


def prefill_flops(cfg, tokens: int) -> float:
    t = cfg.text
    b = per_token_bytes(cfg, 1, 0)
    active = b["weights"] - t.vocab_size * t.hidden_size  # the LM head runs for the last token only
    attention = t.num_full_attention_layers * 2 * t.num_attention_heads * t.head_dim * tokens * tokens  # causal
    return 2 * active * tokens + 2 * t.vocab_size * t.hidden_size + attention


# ---------------------------------------------------------------------------------------------- workers

def prompts(n: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 200_000, (length,), generator=g).tolist() for _ in range(n)]


def peak_rss_mb() -> float:
    return PEAK.peak_mb()


def worker_qwen35(path: str, dtype: str) -> dict:
    from qwen35 import LLM, SamplingParams

    t0 = time.perf_counter()
    # native_kernels=True: the fast CPU configuration for every dtype (bf16 gets it by default; fp32 by default
    # stays on PyTorch's matmuls, the mode that matches transformers to 1e-4)
    llm = LLM(path, dtype=dtype, max_model_len=4096, max_num_seqs=16, max_num_batched_tokens=2048,
              skip_tokenizer_init=True, native_kernels=True)
    out = {"load_s": time.perf_counter() - t0}
    llm.generate(prompts(1, 64, 0), SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # warm-up
    out["bw_1_before_GBps"] = read_bandwidth()
    out["ttft_512_s"], out["decode_1_tok_s"] = _qwen35_run(llm, prompts(1, 512, 7), 128)
    out["bw_1_after_GBps"] = read_bandwidth()
    out["ttft_2048_s"], _ = _qwen35_run(llm, prompts(1, 2048, 9), 1)
    out["bw_16_before_GBps"] = read_bandwidth()
    _, out["decode_16_tok_s"] = _qwen35_run(llm, prompts(16, 128, 8), 64)
    out["bw_16_after_GBps"] = read_bandwidth()
    out["peak_rss_mb"] = peak_rss_mb()
    out["weights_mb"] = _weight_bytes(llm.model) / 2**20
    out["cache_mb"] = _cache_bytes(llm.engine.cache) / 2**20
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


def _weight_bytes(model) -> int:
    from qwen35.ops.linear import Packed

    seen, total = set(), 0
    for m in model.modules():
        for v in list(vars(m).get("_parameters", {}).values()) + [x for x in vars(m).values() if isinstance(x, Packed)]:
            if v is None:
                continue
            t = v.data if isinstance(v, Packed) else v
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def _cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for pool in (cache.k, cache.v, cache.conv, cache.ssm)
               for t in pool.values())


HF_NEW_TOKENS = (32, 16)  # batch 1, batch 16: transformers decodes at a steady rate; fewer tokens, same rate


def worker_hf(path: str, dtype: str) -> dict:
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

    run(prompts(1, 64, 0), 4)  # warm-up
    out["bw_1_before_GBps"] = read_bandwidth()
    out["ttft_512_s"], out["decode_1_tok_s"] = run(prompts(1, 512, 7), HF_NEW_TOKENS[0])
    out["bw_1_after_GBps"] = read_bandwidth()
    out["ttft_2048_s"], _ = run(prompts(1, 2048, 9), 1)
    out["bw_16_before_GBps"] = read_bandwidth()
    _, out["decode_16_tok_s"] = run(prompts(16, 128, 8), HF_NEW_TOKENS[1])
    out["bw_16_after_GBps"] = read_bandwidth()
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def run_worker(system: str, path: Path, dtype: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", system, "--path", str(path), "--dtype", dtype]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{system} worker failed:\n{r.stderr[-3000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for L in (512, 2048):
        out[f"prefill_{L}_tok_s"] = L / out[f"ttft_{L}_s"]
    for n in (1, 16):  # the bandwidth during a decode run: the mean of the probes right before and right after it
        out[f"bw_{n}_GBps"] = (out[f"bw_{n}_before_GBps"] + out[f"bw_{n}_after_GBps"]) / 2
    return out


def summarize(name: str, cfg, dtype: str, limits: dict, q: dict, hf: dict | None) -> dict:
    """Rates against their bounds. Decode bounds use the bandwidth each system measured around its decode run (the
    mean of the probes right before and after it); prefill bounds the best matmul peak of any dtype (bf16 weights
    are multiplied in fp32 here)."""
    nbytes = 2 if dtype == "bfloat16" else 4
    peak = max(limits["matmul_GFLOPs"].values()) * 1e9
    b1 = per_token_bytes(cfg, nbytes, context=512 + 64)
    b16 = per_token_bytes(cfg, nbytes, context=128 + 32, batch=16)

    def bound(key, run):
        if key == "decode_1_tok_s":
            return run["bw_1_GBps"] * 1e9 / b1["total"]
        if key == "decode_16_tok_s":
            return 16 * run["bw_16_GBps"] * 1e9 / b16["total"]
        L = int(key.split("_")[1])
        return L * peak / prefill_flops(cfg, L)

    rows = {}
    for key in ("prefill_512_tok_s", "prefill_2048_tok_s", "decode_1_tok_s", "decode_16_tok_s"):
        rows[key] = {"qwen35": q[key], "bound": bound(key, q), "of_bound": q[key] / bound(key, q)}
        if hf:
            rows[key].update(transformers=hf[key], speedup=q[key] / hf[key], hf_of_bound=hf[key] / bound(key, hf))
    # compute roofline of the 16-request step: 2 FLOPs per active weight per token at the best matmul peak
    flops16 = 16 * 2 * (b1["weights"] / nbytes)
    rows["decode_16_tok_s"]["compute_bound"] = 16 * peak / flops16
    rss_budget = q["weights_mb"] + q["cache_mb"]
    return {"geometry": name, "dtype": dtype, "rows": rows, "qwen35": q, "transformers": hf,
            "bytes_per_token_batch1": b1, "bytes_per_step_batch16": b16,
            "rss_over_weights_plus_cache": q["peak_rss_mb"] / rss_budget,
            "decode16_over_decode1": q["decode_16_tok_s"] / q["decode_1_tok_s"]}


def print_table(results: list[dict], limits: dict) -> None:
    print(f"\nmachine: read bandwidth {limits['read_bandwidth_GBps']:.1f} GB/s, matmul fp32 "
          f"{limits['matmul_GFLOPs']['float32']:.0f} / bf16 {limits['matmul_GFLOPs']['bfloat16']:.0f} GFLOP/s")
    head = f"{'geometry':14} {'dtype':9} {'metric':19} {'qwen35':>9} {'HF':>9} {'q/HF':>6} {'bound':>9} {'q/bound':>8}"
    print(head + "\n" + "-" * len(head))
    for r in results:
        for key, row in r["rows"].items():
            if key.startswith("ttft"):
                continue
            hf = row.get("transformers")
            hf_text = "-" if hf is None else f"{hf:.1f}"
            speedup = "" if hf is None else f"{row['speedup']:.2f}x"
            print(f"{r['geometry']:14} {r['dtype']:9} {key:19} {row['qwen35']:9.1f} {hf_text:>9} {speedup:>6} "
                  f"{row['bound']:9.1f} {100 * row['of_bound']:7.0f}%")
        q = r["qwen35"]
        print(f"{'':25} TTFT@512 {1e3 * q['ttft_512_s']:.0f} ms; peak RSS {q['peak_rss_mb']:.0f} MB = "
              f"{r['rss_over_weights_plus_cache']:.2f} x (weights {q['weights_mb']:.0f} + cache {q['cache_mb']:.0f} MB)"
              f"; 16-concurrent / batch-1 {r['decode16_over_decode1']:.1f}x; 16-concurrent compute roofline "
              f"{r['rows']['decode_16_tok_s']['compute_bound']:.0f} tok/s")


def chart(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["prefill_512_tok_s", "prefill_2048_tok_s", "decode_1_tok_s", "decode_16_tok_s"]
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, r in zip(axes[0], results):
        xs = range(len(keys))
        w = 0.27
        ax.bar([x - w for x in xs], [100 * r["rows"][k]["of_bound"] for k in keys], w, label="qwen35")
        if r["transformers"]:
            ax.bar(list(xs), [100 * r["rows"][k]["hf_of_bound"] for k in keys], w, label="transformers")
        ax.axhline(100, color="k", lw=0.8, ls="--", label="machine limit")
        ax.set_xticks(list(xs), ["prefill\n512", "prefill\n2048", "decode\nbatch 1", "decode\n16 conc."])
        ax.set_ylabel("% of the machine's limit")
        ax.set_title(f"{r['geometry']} {r['dtype']}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--geometry", nargs="+", default=["bench-moe", "qwen3.5-0.8b"])
    ap.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--hf", nargs="*", default=["bench-moe:bfloat16", "bench-moe:float32", "qwen3.5-0.8b:float32"],
                    help="geometry:dtype pairs transformers also runs (default: all but 0.8B in bf16, which takes "
                         "transformers ~10 minutes: no bf16 matmul kernels on AVX2); --hf all for every pair")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu.json"))
    ap.add_argument("--chart")
    ap.add_argument("--checkpoints", help="folder to keep the random checkpoints in (default: a temporary one)")
    ap.add_argument("--worker", choices=["qwen35", "hf"], help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    if args.worker:
        fn = worker_qwen35 if args.worker == "qwen35" else worker_hf
        print(json.dumps(fn(args.path, args.dtype[0])))
        return 0

    from qwen35.config import ModelConfig
    from qwen35.demo import write_random_checkpoint

    t_start = time.time()
    limits = machine_limits()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.checkpoints or tmp)
        for name in args.geometry:
            config = geometry(name)
            path = root / name
            if not (path / "model.safetensors").is_file():
                path.mkdir(parents=True, exist_ok=True)
                t = time.time()
                write_random_checkpoint(path, config)
                print(f"[{name}] wrote a random checkpoint in {time.time() - t:.0f} s", flush=True)
            cfg = ModelConfig.from_hf(config)
            for dtype in args.dtype:
                t = time.time()
                q = run_worker("qwen35", path, dtype)
                print(f"[{name} {dtype}] qwen35 {time.time() - t:.0f} s: {json.dumps(q)}", flush=True)
                hf = None
                if "all" in args.hf or f"{name}:{dtype}" in args.hf:
                    t = time.time()
                    hf = run_worker("hf", path, dtype)
                    print(f"[{name} {dtype}] transformers {time.time() - t:.0f} s: {json.dumps(hf)}", flush=True)
                results.append(summarize(name, cfg, dtype, limits, q, hf))
    print_table(results, limits)
    import transformers

    record = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "machine": platform.processor() or
              platform.machine(), "cpus": torch.get_num_threads(), "torch": torch.__version__,
              "transformers": transformers.__version__, "limits": limits, "results": results,
              "wall_s": time.time() - t_start}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    if args.chart:
        chart(results, Path(args.chart))
    print(f"\nwrote {args.out}" + (f" and {args.chart}" if args.chart else "") + f" in {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
