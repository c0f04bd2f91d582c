"""Engine benchmark: offline throughput (many requests of mixed lengths) and batch-1 latency (time to first token,
inter-token latency), qwen35 against transformers' `generate` on the same random-weight checkpoint, in one run.

    python benchmarks/engine_bench.py [--dtype float32|bfloat16] [--requests 32] [--out benchmarks/results/engine.json]

transformers cannot batch requests continuously for this architecture; it is measured request by request and with
static left-padded batches of 8 (its best offline mode here). Greedy decoding, ignore-eos, so every system produces
exactly the requested number of tokens.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

GEOMETRY = dict(  # a small Qwen3.5-MoE text model: 3 Gated DeltaNet : 1 attention, 16 experts top-4
    vocab_size=32000, hidden_size=512, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
    head_dim=128, linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=64, linear_value_head_dim=64,
    num_experts=16, num_experts_per_tok=4, moe_intermediate_size=256, shared_expert_intermediate_size=256,
    max_position_embeddings=4096,
    rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25},
)


def build_checkpoint(path: Path, dtype: torch.dtype):
    import transformers as tf

    torch.manual_seed(0)
    model = tf.Qwen3_5MoeForCausalLM(tf.Qwen3_5MoeTextConfig(**GEOMETRY)).to(dtype).eval()
    model.save_pretrained(path)
    return model


def workload(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    prompt_lens = torch.randint(16, 512, (n,), generator=g).tolist()
    out_lens = torch.randint(16, 128, (n,), generator=g).tolist()
    prompts = [torch.randint(0, GEOMETRY["vocab_size"], (p,), generator=g).tolist() for p in prompt_lens]
    return prompts, out_lens


def hf_generate(model, ids_list, max_new):
    """Left-padded static batch; returns generated token lists."""
    B, L = len(ids_list), max(len(x) for x in ids_list)
    ids = torch.zeros(B, L, dtype=torch.long)
    mask = torch.zeros(B, L, dtype=torch.long)
    for i, x in enumerate(ids_list):
        ids[i, L - len(x):] = torch.tensor(x)
        mask[i, L - len(x):] = 1
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=max_new,
                             do_sample=False, pad_token_id=0)
    return out[:, L:]


def bench_offline(llm, hf, prompts, out_lens, hf_batch: int):
    from qwen35 import SamplingParams

    total_new = sum(out_lens)
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in out_lens]
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    q_time = time.perf_counter() - t
    assert sum(len(o.outputs[0].token_ids) for o in outs) == total_new

    t = time.perf_counter()
    for p, m in zip(prompts, out_lens):
        hf_generate(hf, [p], m)
    hf_seq = time.perf_counter() - t

    # static batches: each batch runs to its longest requested output (the rest is wasted work, as in practice)
    t = time.perf_counter()
    for i in range(0, len(prompts), hf_batch):
        hf_generate(hf, prompts[i:i + hf_batch], max(out_lens[i:i + hf_batch]))
    hf_static = time.perf_counter() - t
    return {
        "requests": len(prompts), "prompt_tokens": sum(map(len, prompts)), "generated_tokens": total_new,
        "qwen35_s": q_time, "hf_sequential_s": hf_seq, f"hf_static_batch{hf_batch}_s": hf_static,
        "qwen35_gen_tok_per_s": total_new / q_time, "hf_sequential_gen_tok_per_s": total_new / hf_seq,
        "hf_static_gen_tok_per_s": total_new / hf_static,
        "speedup_vs_hf_sequential": hf_seq / q_time, "speedup_vs_hf_static": hf_static / q_time,
    }


def bench_latency(llm, hf, prompt_len: int, new_tokens: int, repeats: int = 3):
    from qwen35 import SamplingParams

    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, GEOMETRY["vocab_size"], (prompt_len,), generator=g).tolist()
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    q_ttft, q_itl, h_ttft, h_itl = [], [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        times = [time.perf_counter() - t0 for _ in llm.stream(prompt, params)]
        q_ttft.append(times[0])
        q_itl.append((times[-1] - times[0]) / (len(times) - 1))
        t0 = time.perf_counter()
        hf_generate(hf, [prompt], 1)
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        hf_generate(hf, [prompt], new_tokens)
        total = time.perf_counter() - t0
        h_ttft.append(ttft)
        h_itl.append((total - ttft) / (new_tokens - 1))
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    r = {"prompt_tokens": prompt_len, "new_tokens": new_tokens, "qwen35_ttft_ms": 1e3 * med(q_ttft),
         "qwen35_itl_ms": 1e3 * med(q_itl), "hf_ttft_ms": 1e3 * med(h_ttft), "hf_itl_ms": 1e3 * med(h_itl)}
    r["ttft_speedup"] = r["hf_ttft_ms"] / r["qwen35_ttft_ms"]
    r["itl_speedup"] = r["hf_itl_ms"] / r["qwen35_itl_ms"]
    return r


def machine_limits(dtype: torch.dtype, trials: int = 5) -> dict:
    """Read bandwidth (a reduction over a tensor far larger than the caches) and matmul peak in `dtype`; the best
    of several trials, since a shared machine only ever slows a trial down."""
    x = torch.ones(256 * 2**20 // 4, dtype=torch.float32)  # 256 MiB
    a = torch.randn(2048, 2048, dtype=dtype)
    x.sum(), a @ a
    bandwidth = flops = 0.0
    for _ in range(trials):
        t = time.perf_counter()
        for _ in range(4):
            x.sum()
        bandwidth = max(bandwidth, 4 * x.numel() * 4 / (time.perf_counter() - t))
        t = time.perf_counter()
        for _ in range(4):
            a @ a
        flops = max(flops, 4 * 2 * 2048**3 / (time.perf_counter() - t))
    return {"read_bandwidth_GBps": bandwidth / 1e9, "matmul_GFLOPs": flops / 1e9}


def bounds(config, dtype: torch.dtype, limits: dict, latency: dict) -> dict:
    """Decode at batch 1 moves every active weight once per token; prefill does 2 FLOPs per active weight per token."""
    from qwen35.info import model_stats

    s = model_stats(config)
    active = s["params"]["active"] - s["params"]["embedding"]  # the embedding is a lookup, not a read of all rows
    size = torch.empty(0, dtype=dtype).element_size()
    decode_bytes = active * size + s["recurrent_state_bytes_per_sequence"] * 2  # state read + written
    decode_bound_ms = 1e3 * decode_bytes / (limits["read_bandwidth_GBps"] * 1e9)
    prefill_flops = 2 * active * latency["prompt_tokens"]
    prefill_bound_ms = 1e3 * prefill_flops / (limits["matmul_GFLOPs"] * 1e9)
    return {"decode_bytes_per_token": decode_bytes, "decode_bound_ms": decode_bound_ms,
            "qwen35_decode_fraction_of_bound": decode_bound_ms / latency["qwen35_itl_ms"],
            "hf_decode_fraction_of_bound": decode_bound_ms / latency["hf_itl_ms"],
            "prefill_bound_ms": prefill_bound_ms,
            "qwen35_prefill_fraction_of_bound": prefill_bound_ms / latency["qwen35_ttft_ms"],
            "hf_prefill_fraction_of_bound": prefill_bound_ms / latency["hf_ttft_ms"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--hf-batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default="benchmarks/results/engine.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from qwen35 import LLM

    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory() as d:
        hf = build_checkpoint(Path(d), dtype)
        llm = LLM(d, dtype=args.dtype, skip_tokenizer_init=True, max_model_len=1024, max_num_seqs=32,
                  max_num_batched_tokens=2048)
        prompts, out_lens = workload(args.requests)
        llm.generate(prompts[:2], None)  # warm-up
        offline = bench_offline(llm, hf, prompts, out_lens, args.hf_batch)
        latency = bench_latency(llm, hf, 512, 64)
        limits = machine_limits(dtype)
        limit_ratios = bounds(llm.model_config, dtype, limits, latency)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {args.threads} threads, "
              f"{platform.processor() or 'cpu'}", "torch": torch.__version__, "dtype": args.dtype,
              "geometry": GEOMETRY, "offline": offline, "batch1_latency": latency, "machine_limits": limits,
              "fraction_of_limits": limit_ratios}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    o, lat = offline, latency
    print(f"offline, {o['requests']} requests, {o['prompt_tokens']} prompt + {o['generated_tokens']} generated tokens "
          f"({args.dtype}):")
    print(f"  qwen35               {o['qwen35_s']:7.1f} s  {o['qwen35_gen_tok_per_s']:7.1f} gen tok/s")
    print(f"  transformers seq.    {o['hf_sequential_s']:7.1f} s  {o['hf_sequential_gen_tok_per_s']:7.1f} gen tok/s"
          f"   -> qwen35 x{o['speedup_vs_hf_sequential']:.2f}")
    print(f"  transformers batch{args.hf_batch}  {o[f'hf_static_batch{args.hf_batch}_s']:7.1f} s  "
          f"{o['hf_static_gen_tok_per_s']:7.1f} gen tok/s   -> qwen35 x{o['speedup_vs_hf_static']:.2f}")
    print(f"batch-1, {lat['prompt_tokens']}-token prompt, {lat['new_tokens']} new tokens:")
    print(f"  time to first token  qwen35 {lat['qwen35_ttft_ms']:7.1f} ms   transformers {lat['hf_ttft_ms']:7.1f} ms"
          f"   x{lat['ttft_speedup']:.2f}")
    print(f"  inter-token latency  qwen35 {lat['qwen35_itl_ms']:7.1f} ms   transformers {lat['hf_itl_ms']:7.1f} ms"
          f"   x{lat['itl_speedup']:.2f}")
    b = limit_ratios
    print(f"machine: read bandwidth {limits['read_bandwidth_GBps']:.1f} GB/s, {args.dtype} matmul "
          f"{limits['matmul_GFLOPs']:.0f} GFLOP/s")
    print(f"  decode bound {b['decode_bound_ms']:.1f} ms/token: "
          f"qwen35 at {100 * b['qwen35_decode_fraction_of_bound']:.0f}%,"
          f" transformers at {100 * b['hf_decode_fraction_of_bound']:.0f}%")
    print(f"  prefill bound {b['prefill_bound_ms']:.1f} ms: "
          f"qwen35 at {100 * b['qwen35_prefill_fraction_of_bound']:.0f}%,"
          f" transformers at {100 * b['hf_prefill_fraction_of_bound']:.0f}%")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
