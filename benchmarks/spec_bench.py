"""Speculative decoding with the MTP head: acceptance and decode speed against plain decoding.

    python benchmarks/spec_bench.py [--models demo bench-moe] [--batch 1 16] [--k 0 1 2 3] [--tokens 128]
                                    [--repeats 3] [--modes mtp oracle accept] [--oracle-accept 0.6]
                                    [--draft-vocab N] [--threads N] [--dtype bfloat16] [--checkpoint DIR]
                                    [--out benchmarks/results/spec.json] [--quick]

Models: `demo`, the embedded trained model (`LLM()`, with its trained MTP head), on chat prompts about the Python
standard library rendered with its chat template (what its corpus is); `bench-moe`, cpu_bench.py's 1.46B-total /
0.5B-active Qwen3.5-MoE with random weights and a random MTP head (`models.mtp.add_mtp`, written with the training
checkpoint writer), on random 128-token prompts. For each model, k (0: no speculation; one engine per k) and batch
size B: the first B prompts submitted at once, greedy, --tokens new tokens each (ignore-eos, so every run makes the same
number), one warm-up run, then --repeats timed runs, reported by their median:
  - decode tok/s: the output tokens made after the step in which the last request got its first token, over the
    wall time from the end of that step to the end of the last one. Prefill (with the first token, and with k > 0
    the MTP head's pass over the prompt) is measured apart, as the time to that step (TTFT);
  - speedup: decode tok/s over k=0's at the same B;
  - step: the median decode step (ms), and its cost relative to k=0's median step at the same B (a verify step of
    1 + k rows per request plus the MTP head's drafting, against a one-row decode step);
  - acceptance by draft position (accepted_per_pos / num_drafts: the share of verify steps that kept position i's
    draft; a request's last steps draft fewer than k, to leave room for --tokens, so the last positions read a
    little low: the JSON also has acceptance_per_drafted_pos, over the steps that drafted position i) and mean
    accepted length (tokens per verify step, the bonus token included);
  - greedy = k0: every request's tokens equal k=0's at the same B (a mismatch is printed loudly, with where).
Draft modes, set through `engine.draft_hook` (it replaces the head's drafts after the head ran, so the head's cost
stays in every mode):
  mtp     the head's own drafts;
  oracle  the true greedy continuation (k=0's outputs): every draft is accepted, the most speculation can gain;
  accept  each draft position is the true token with probability --oracle-accept (seeded), else a wrong one, so
          position i is reached and kept in a share p^(i+1) of the verify steps.
Default modes: the demo, mtp; bench-moe, all three (its random head accepts almost nothing: mtp shows the cost alone).
The k engines run one after the other (holding bench-moe four times over would not fit a small machine), so a
shared machine's drift between them shows in the ratios; the read bandwidth is probed before and after each engine's
runs (cpu_bench.read_bandwidth) and written to the JSON record. The bench-moe checkpoint (~3 GB) is written once
into --checkpoint (default: a folder in the temporary directory, kept between runs). `--quick` runs the demo and
tiny-moe (bench-moe's layout at toy sizes) at batch 1 and 4 with few tokens: a check of the script (a minute or
two), not a measurement.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_bench import ROOT, geometry, prompts, read_bandwidth  # noqa: E402  (cpu_bench puts ROOT on sys.path)
from structured_bench import machine  # noqa: E402

# The user's turns, in the wording of the demo corpus' questions (qwen35/train/corpus.py) about stdlib names.
QUESTIONS = (
    "Tell me about the module `json`.", "What does `os.path.join` do?", "Explain the class `collections.deque`.",
    "What is the `itertools` module for?", "How do I use `subprocess.run`?", "What does `str.split` do?",
    "Explain `functools.lru_cache`.", "What is `pathlib.Path`?", "What does the Python module `shutil` do?",
    "How do I use `re.sub`?", "Tell me about the module `argparse`.", "What is `dict.get` for?",
    "Explain the class `threading.Lock`.", "What does `sorted` do?", "Tell me about the module `heapq`.",
    "How does the with statement work in Python?",
)
FULL = {"tokens": 128, "repeats": 3, "prompt_len": 128}
QUICK = {"tokens": 12, "repeats": 1, "prompt_len": 16}
MODES = ("mtp", "oracle", "accept")
_RUNS = itertools.count()


# ---------------------------------------------------------------------------------------------- models

def bench_checkpoint(name: str, folder: Path | None) -> Path:
    """A random-weight checkpoint of `name` (bench-moe or tiny-moe) with a random MTP head, written once: the trunk
    by demo.write_random_checkpoint, the head by models.mtp.add_mtp on the loaded trunk, both saved by
    train.checkpoint.save_checkpoint with `mtp_num_hidden_layers: 1` in the config (written last: a folder whose
    config lacks it is unfinished and written again)."""
    from qwen35.demo import write_random_checkpoint
    from qwen35.models.loader import load_model
    from qwen35.models.mtp import add_mtp
    from qwen35.train.checkpoint import save_checkpoint

    path = folder or Path(tempfile.gettempdir()) / f"qwen35-spec-bench-{name}"
    cfg_file = path / "config.json"
    if (path / "model.safetensors").is_file() and cfg_file.is_file() \
            and json.loads(cfg_file.read_text()).get("mtp_num_hidden_layers") == 1:
        return path
    t = time.perf_counter()
    config = geometry(name)
    trunk = path.with_name(path.name + "-trunk")
    trunk.mkdir(parents=True, exist_ok=True)
    write_random_checkpoint(trunk, config)
    model, _, _ = load_model(trunk, dtype=torch.bfloat16)
    head = add_mtp(model, generator=torch.Generator().manual_seed(1))
    state = {f"mtp.{n}": p for n, p in head.state_dict().items()}
    del model, head  # the head holds the trunk too
    save_checkpoint(state, path, source_dir=trunk)
    shutil.rmtree(trunk)
    cfg_file.write_text(json.dumps(dict(config, mtp_num_hidden_layers=1, mtp_use_dedicated_embeddings=False),
                                   indent=2))
    print(f"[{name}] wrote a random checkpoint with a random MTP head into {path} in {time.perf_counter() - t:.0f} s",
          flush=True)
    return path


def make_llm(model: Path | None, k: int, dtype: str, max_len: int, batch: int, prompt_len: int, tokenizer: bool,
             draft_vocab: int | None = None):
    from qwen35 import LLM

    spec = {"method": "mtp", "num_speculative_tokens": k, "draft_vocab_size": draft_vocab} if k else None
    # prefix caching off: the repeated runs would otherwise find their prompts cached
    return LLM(model, dtype=dtype, max_model_len=max_len, max_num_seqs=batch,
               max_num_batched_tokens=max(2048, batch * prompt_len), enable_prefix_caching=False, native_kernels=True,
               skip_tokenizer_init=not tokenizer, speculative_config=spec)


def chat_prompts(llm, n: int) -> list[list[int]]:
    from qwen35.chat import render

    return [llm.tokenizer.encode(render(llm, [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]))
            for i in range(n)]


# ---------------------------------------------------------------------------------------------- runs

class Counted:
    """engine.draft_hook: counts the drafts verified at each position (the last steps of a request draft fewer than
    k, leaving room for max_tokens), passing through `inner`'s drafts, or the head's where it is None."""

    def __init__(self, k: int, inner=None):
        self.inner, self.drafted = inner, [0] * k

    def __call__(self, request, drafts: list[int]) -> list[int]:
        drafts = list(drafts if self.inner is None else self.inner(request, drafts))
        for i in range(len(drafts)):
            self.drafted[i] += 1
        return drafts


class Drafts:
    """engine.draft_hook: each draft position the reference's (k=0's greedy) token with probability `p`, else a
    token that is not it; the rng restarts at every run, so the repeats draw alike."""

    def __init__(self, refs: list[list[int]], p: float, vocab: int, seed: int = 0):
        self.refs, self.p, self.vocab, self.seed = refs, p, vocab, seed
        self.rng = random.Random(seed)

    def restart(self):
        self.rng = random.Random(self.seed)

    def __call__(self, request, drafts: list[int]) -> list[int]:
        ref = self.refs[int(request.parent_id.rsplit("-", 1)[1])]
        n = len(request.output_token_ids)  # the drafts are for output positions n, n + 1, ...
        out = []
        for i, d in enumerate(drafts):
            if n + i >= len(ref):
                out.append(d)
                continue
            true = ref[n + i]
            out.append(true if self.rng.random() < self.p else (true + 1) % self.vocab)
        return out


def run_once(llm, batch_prompts: list[list[int]], tokens: int, hook: Drafts | None) -> dict:
    """One greedy run of the batch through engine.step, timed step by step."""
    from qwen35 import SamplingParams
    from qwen35.engine.speculative import SpecDecodeStats

    engine = llm.engine
    engine.spec_stats = SpecDecodeStats(engine.num_spec)
    if hook is not None:
        hook.restart()
    counted = engine.draft_hook = Counted(engine.num_spec, hook) if engine.num_spec else None
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    tag = next(_RUNS)
    rids = [f"run{tag}-{i}" for i in range(len(batch_prompts))]
    for rid, p in zip(rids, batch_prompts):
        engine.add_request(rid, p, params)
    out = {rid: [] for rid in rids}
    steps, t0 = [], time.perf_counter()
    decode_start = prefill_tokens = None
    while engine.has_unfinished_requests():
        t = time.perf_counter()
        results = engine.step()
        now = time.perf_counter()
        for o in results:
            if o.error:
                raise SystemExit(f"request {o.request_id} failed: {o.error}")
            out[o.request_id] = o.outputs[0].token_ids
        if decode_start is not None:
            steps.append(now - t)
        elif all(out.values()):  # every request has its first token: prefill is over
            decode_start, prefill_tokens = now, sum(map(len, out.values()))
    end = time.perf_counter()
    total = sum(map(len, out.values()))
    s = engine.spec_stats
    engine.draft_hook = None
    return {"ttft_s": decode_start - t0, "decode_s": end - decode_start, "decode_tokens": total - prefill_tokens,
            "decode_tok_s": (total - prefill_tokens) / (end - decode_start), "decode_steps": len(steps),
            "step_s": statistics.median(steps) if steps else 0.0, "outputs": [out[r] for r in rids],
            "num_drafts": s.num_drafts, "num_draft_tokens": s.num_draft_tokens,
            "num_accepted_tokens": s.num_accepted_tokens, "accepted_per_pos": list(s.accepted_per_pos),
            "drafted_per_pos": counted.drafted if counted else [],
            "acceptance_rate": s.acceptance_rate, "mean_acceptance_length": s.mean_acceptance_length}


def mismatches(outputs: list[list[int]], refs: list[list[int]]) -> list[dict]:
    """[{request, at}]: the first output position where a request's tokens differ from the reference's."""
    out = []
    for i, (o, r) in enumerate(zip(outputs, refs)):
        if o != r:
            at = next((j for j, (a, b) in enumerate(zip(o, r)) if a != b), min(len(o), len(r)))
            out.append({"request": i, "at": at, "got": o[at:at + 4], "want": r[at:at + 4]})
    return out


def measure(llm, batch_prompts, tokens: int, repeats: int, hook: Drafts | None) -> dict:
    """A warm-up run, then `repeats` timed ones; the figures of the run with the median decode rate, every run's
    rate, and whether all runs made the same tokens."""
    run_once(llm, batch_prompts, tokens, hook)
    runs = [run_once(llm, batch_prompts, tokens, hook) for _ in range(repeats)]
    med = sorted(runs, key=lambda r: r["decode_tok_s"])[len(runs) // 2]
    return dict(med, runs_decode_tok_s=[r["decode_tok_s"] for r in runs],
                runs_step_s=[r["step_s"] for r in runs], deterministic=all(r["outputs"] == runs[0]["outputs"]
                                                                           for r in runs))


def bench_model(name: str, args, sizes: dict) -> list[dict]:
    """Every (k, B, mode) of one model; k=0 first, whose outputs are the reference of the others."""
    demo = name == "demo"
    path = None if demo else bench_checkpoint(name, args.checkpoint)
    modes = args.modes or (["mtp"] if demo else list(MODES))
    ks = sorted(set(args.k) | {0})
    refs, base, rows, batch_prompts = {}, {}, [], {}
    for k in ks:
        t = time.perf_counter()
        bw_before = read_bandwidth(1 if args.quick else 3)
        llm = make_llm(path, k, args.dtype, 4096, max(args.batch), sizes["prompt_len"], tokenizer=demo,
                       draft_vocab=args.draft_vocab)
        print(f"[{name} k={k}] loaded in {time.perf_counter() - t:.0f} s", flush=True)
        if not batch_prompts:
            n = max(args.batch)
            all_prompts = chat_prompts(llm, n) if demo else \
                prompts(n, sizes["prompt_len"], 7, llm.model_config.text.vocab_size)
            batch_prompts = {b: all_prompts[:b] for b in args.batch}
        vocab = llm.engine.vocab_limit
        for b in args.batch:
            for mode in (["plain"] if k == 0 else modes):
                t = time.perf_counter()
                p = {"mtp": None, "oracle": 1.0, "accept": args.oracle_accept}.get(mode)
                hook = Drafts(refs[b], p, vocab) if p is not None else None
                r = measure(llm, batch_prompts[b], sizes["tokens"], sizes["repeats"], hook)
                outputs = r.pop("outputs")
                if k == 0:
                    refs[b], base[b] = outputs, r
                bad = mismatches(outputs, refs[b])
                row = {"model": name, "batch": b, "k": k, "mode": mode, "p": p, **r,
                       "speedup": r["decode_tok_s"] / base[b]["decode_tok_s"],
                       "step_cost": r["step_s"] / base[b]["step_s"] if base[b]["step_s"] else None,
                       "acceptance_per_pos": [a / r["num_drafts"] for a in r["accepted_per_pos"]]
                       if r["num_drafts"] else [],
                       "acceptance_per_drafted_pos": [a / d if d else 0.0 for a, d in
                                                      zip(r["accepted_per_pos"], r["drafted_per_pos"])],
                       "greedy_match": not bad, "mismatches": bad[:8],
                       "eos_in_output": sum(any(t in llm.engine.eos_ids for t in o) for o in outputs)}
                if p is not None:
                    row["expected_mean_length"] = sum(p ** i for i in range(k + 1))
                if row["step_cost"]:
                    row["predicted_speedup"] = (r["mean_acceptance_length"] if k else 1.0) / row["step_cost"]
                rows.append(row)
                if bad:
                    print(f"!!! GREEDY MISMATCH: {name} B={b} k={k} {mode}: {len(bad)} of {b} requests differ from "
                          f"k=0, first at output position {min(x['at'] for x in bad)}: {bad[:3]}", flush=True)
                if not r["deterministic"]:
                    print(f"!!! NONDETERMINISTIC: {name} B={b} k={k} {mode}: the repeats made different tokens",
                          flush=True)
                accepted = f", mean accepted length {r['mean_acceptance_length']:.2f}" if k else ""
                print(f"[{name} B={b} k={k} {mode}] {r['decode_tok_s']:.1f} tok/s decode ({row['speedup']:.2f}x), "
                      f"step {1e3 * r['step_s']:.1f} ms{accepted} ({time.perf_counter() - t:.0f} s)", flush=True)
        bw_after = read_bandwidth(1 if args.quick else 3)
        for row in rows:
            if row["k"] == k:
                row["bandwidth_GBps"] = [bw_before, bw_after]
        del llm
        gc.collect()
    return rows


# ---------------------------------------------------------------------------------------------- report

def table(rows: list[dict]) -> str:
    """The markdown table for docs/benchmarks.md."""
    head = ("| model | batch | k | drafts | accepted by position | mean accepted length | decode step (ms) | "
            "step cost | decode tok/s | speedup | greedy = k0 |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        mode = "-" if r["mode"] == "plain" else f"accept {r['p']:.0%}" if r["mode"] == "accept" else r["mode"]
        acc = " / ".join(f"{a:.0%}" for a in r["acceptance_per_pos"]) or "-"
        length = f"{r['mean_acceptance_length']:.2f}" if r["k"] else "1"
        cost = f"{r['step_cost']:.2f}" if r["step_cost"] else "-"
        match = "-" if r["k"] == 0 else ("yes" if r["greedy_match"] else "**NO**")
        lines.append(f"| {r['model']} | {r['batch']} | {r['k']} | {mode} | {acc} | {length} | "
                     f"{1e3 * r['step_s']:.1f} | {cost} | {r['decode_tok_s']:.1f} | {r['speedup']:.2f}x | {match} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", help="demo, bench-moe, tiny-moe (default: demo bench-moe; --quick: demo "
                    "tiny-moe)")
    ap.add_argument("--batch", type=int, nargs="+", help="batch sizes (default: 1 16; --quick: 1 4); batch B takes "
                    "the first B prompts")
    ap.add_argument("--k", type=int, nargs="+", default=[0, 1, 2, 3], help="draft tokens per step (0, no "
                    "speculation, always runs: it is the reference)")
    ap.add_argument("--tokens", type=int, help=f"new tokens per request (default {FULL['tokens']}; --quick "
                    f"{QUICK['tokens']})")
    ap.add_argument("--repeats", type=int, help=f"timed runs after the warm-up (default {FULL['repeats']})")
    ap.add_argument("--prompt-len", type=int, help=f"bench-moe's random prompt length (default {FULL['prompt_len']})")
    ap.add_argument("--modes", nargs="+", choices=MODES, help="draft modes for k > 0 (default: demo mtp; bench-moe "
                    "mtp oracle accept)")
    ap.add_argument("--oracle-accept", type=float, default=0.6, help="accept mode: the chance each draft position "
                    "is the true token (default 0.6)")
    ap.add_argument("--draft-vocab", type=int, help="speculative_config draft_vocab_size: the head drafts among "
                    "the first N ids (and the added tokens) only (default: the whole vocabulary)")
    ap.add_argument("--threads", type=int, help="CPU threads (torch's and the native kernels' OpenMP)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--checkpoint", type=Path, help="folder to keep the bench-moe checkpoint in (default: in the "
                    "temporary directory)")
    ap.add_argument("--out", help="JSON record (default: benchmarks/results/spec.json; --quick: a temporary file)")
    ap.add_argument("--quick", action="store_true", help="demo and tiny-moe, batch 1 and 4, 12 tokens, one timed "
                    "run: checks the script (its figures measure nothing)")
    args = ap.parse_args(argv)
    sizes = dict(QUICK if args.quick else FULL)
    for key in sizes:
        if getattr(args, key) is not None:
            sizes[key] = getattr(args, key)
    args.batch = args.batch or ([1, 4] if args.quick else [1, 16])
    if min(args.batch) < 1 or sizes["repeats"] < 1 or sizes["tokens"] < 4 or sizes["prompt_len"] < 1:
        ap.error("--batch, --repeats and --prompt-len must be at least 1, --tokens at least 4")
    if min(args.k) < 0 or max(args.k) > 8:
        ap.error("--k takes 0 to 8")
    if not 0 <= args.oracle_accept <= 1:
        ap.error("--oracle-accept is a probability (0 to 1)")
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # read when the native kernels' OpenMP starts
        torch.set_num_threads(args.threads)
    models = args.models or (["demo", "tiny-moe"] if args.quick else ["demo", "bench-moe"])
    out_path = Path(args.out or (Path(tempfile.gettempdir()) / "qwen35-spec-quick.json" if args.quick else
                                 ROOT / "benchmarks" / "results" / "spec.json"))
    t_start = time.time()
    rows = []
    for name in models:
        rows += bench_model(name, args, sizes)
    md = table(rows)
    bad = [r for r in rows if not r["greedy_match"]]
    info = machine()
    print(f"\n{info['cpu']}, {torch.get_num_threads()} threads, {args.dtype}, {sizes['tokens']} new tokens per "
          f"request, greedy; decode tok/s: tokens after the last first token / wall time after it (prefill apart); "
          f"median of {sizes['repeats']} runs; accept mode p = {args.oracle_accept}; draft vocabulary "
          f"{args.draft_vocab or 'whole'}\n")
    print(md)
    if bad:
        print(f"\n!!! {len(bad)} configurations made different greedy tokens than k=0 (see 'mismatches' in the JSON)")
    record = {"command": " ".join(["python", "benchmarks/spec_bench.py", *(argv or sys.argv[1:])]),
              "machine": info, "torch": torch.__version__, "threads": torch.get_num_threads(), "dtype": args.dtype,
              "sizes": sizes, "oracle_accept": args.oracle_accept, "draft_vocab_size": args.draft_vocab, "rows": rows,
              "table": md,
              "wall_s": time.time() - t_start}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"\nwrote {out_path} in {time.time() - t_start:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
