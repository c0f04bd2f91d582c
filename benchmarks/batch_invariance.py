"""Batch invariance of greedy decoding: does a prompt get the same tokens alone as inside a batch?

Writes a small random-weight Qwen3.5-MoE text checkpoint (or takes the demo model or a checkpoint folder), then
for each dtype runs N prompts of different lengths greedily through `qwen35.LLM` (native CPU kernels), once each on
its own and once all together, and reports how many prompts diverge and at which generated token, and how many
differ at all in the chosen tokens' logprobs (bit for bit). The batch prefills the prompts packed into one step,
then decodes N rows per step; alone, a prompt is the only row. A difference means some reduction's order depends on
what else is in the batch; docs/benchmarks.md ("Batch invariance") says which ones do, by design.

    python benchmarks/batch_invariance.py [--model moe|demo|PATH] [--dtype bfloat16 float32] [--prompts 16]
                                          [--max-tokens 32] [--seeds 0] [--out benchmarks/results/batch-invariance.json]

Default run: ~1-2 minutes on an idle 2-core machine (~100 s of CPU time).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GEOMETRY = {  # small, but every block kind: Gated DeltaNet, gated attention, routed + shared experts
    "model_type": "qwen3_5_moe_text", "architectures": ["Qwen3_5MoeForCausalLM"], "dtype": "bfloat16",
    "vocab_size": 32000, "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 64, "linear_num_key_heads": 4, "linear_num_value_heads": 8,
    "linear_key_head_dim": 32, "linear_value_head_dim": 32, "linear_conv_kernel_dim": 4,
    "full_attention_interval": 4, "num_experts": 16, "num_experts_per_tok": 4, "moe_intermediate_size": 128,
    "shared_expert_intermediate_size": 128, "tie_word_embeddings": False, "rms_norm_eps": 1e-6,
    "max_position_embeddings": 4096, "eos_token_id": 2,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10_000_000, "partial_rotary_factor": 0.25,
                        "mrope_section": [4, 2, 2], "mrope_interleaved": True},
}


def prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(5, 120, (n,), generator=g).tolist()
    return [torch.randint(10, 30000, (t,), generator=g).tolist() for t in lengths]


def first_divergence(a: list, b: list) -> int | None:
    """Index of the first position where two sequences differ (None: identical)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def run(path: Path, dtype: str, batch: list[list[int]], max_tokens: int) -> dict:
    """Each prompt alone, then all together. Besides the tokens, the chosen tokens' logprobs are compared bit for
    bit: a sum taken in another order shows there long before it flips a greedy choice."""
    from qwen35 import LLM, SamplingParams

    llm = LLM(str(path), dtype=dtype, max_model_len=1024, max_num_seqs=len(batch), max_num_batched_tokens=4096,
              skip_tokenizer_init=True, native_kernels=True, language_model_only=True)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=0)

    def tokens_and_logprobs(out):
        c = out.outputs[0]
        return list(c.token_ids), [pos[t].logprob for t, pos in zip(c.token_ids, c.logprobs)]

    t = time.perf_counter()
    solo = [tokens_and_logprobs(llm.generate([p], params)[0]) for p in batch]
    together = [tokens_and_logprobs(out) for out in llm.generate(batch, params)]
    token_at = [first_divergence(a[0], b[0]) for a, b in zip(solo, together)]
    logprob_at = [first_divergence(a[1], b[1]) for a, b in zip(solo, together)]
    return {"dtype": dtype, "prompts": len(batch), "prompt_lengths": [len(p) for p in batch],
            "max_tokens": max_tokens, "diverged": sum(i is not None for i in token_at),
            "first_divergence": token_at, "logprobs_differ": sum(i is not None for i in logprob_at),
            "first_logprob_difference": logprob_at,
            "tokens_identical": sum(i if i is not None else max_tokens for i in token_at),
            "tokens_total": len(batch) * max_tokens, "seconds": time.perf_counter() - t}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--model", default="moe", help="'moe' (a random MoE checkpoint, GEOMETRY), 'demo' (the embedded "
                    "demo model) or a checkpoint folder")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="prompt seeds (and MoE checkpoint seeds)")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()

    from qwen35.demo import demo_checkpoint, write_random_checkpoint

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            if args.model == "moe":
                path = Path(tmp) / f"seed{seed}"
                path.mkdir()
                write_random_checkpoint(path, GEOMETRY, seed=seed)
            else:
                path = demo_checkpoint() if args.model == "demo" else Path(args.model)
            batch = prompts(args.prompts, seed)
            for dtype in args.dtype:
                r = run(path, dtype, batch, args.max_tokens) | {"seed": seed, "model": args.model}
                results.append(r)
                print(f"seed {seed} {dtype:9s} tokens diverged in {r['diverged']:2d}/{r['prompts']} prompts "
                      f"(identical tokens {r['tokens_identical']}/{r['tokens_total']}, first divergence per prompt "
                      f"{r['first_divergence']}); logprobs not bit-identical in {r['logprobs_differ']}/"
                      f"{r['prompts']} ({r['seconds']:.0f} s)", flush=True)
    for dtype in args.dtype:
        rs = [r for r in results if r["dtype"] == dtype]
        n = sum(r["prompts"] for r in rs)
        print(f"{dtype}: tokens diverged in {sum(r['diverged'] for r in rs)} of {n} prompts, logprobs in "
              f"{sum(r['logprobs_differ'] for r in rs)} of {n}")
    if args.out:
        record = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "machine": platform.processor()
                  or platform.machine(), "cpus": torch.get_num_threads(), "torch": torch.__version__,
                  "geometry": GEOMETRY if args.model == "moe" else args.model, "results": results}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
