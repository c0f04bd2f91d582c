"""What quantizing the weights costs in quality: each format's next-token distributions against the bf16 model's,
over the same token sequences, on two models:

  - demo: the trained demo model (qwen35/data/demo) over the held-out chats of its corpus, the split and the
    positions its recorded held-out perplexity was measured on (scripts/train_demo.py, docs/demo-model.md);
  - random-0.8b: a random-weight checkpoint of the Qwen3.5-0.8B text geometry over random prompts. On random
    weights the figures measure rounding only, not language quality (its perplexities are near the vocabulary size).

    python benchmarks/quant_quality.py [--models demo random-0.8b] [--formats int8 int4 int4-g64 ...]
                                       [--prompts 4 --prompt-len 512] [--chunk-tokens 2048]
                                       [--out benchmarks/results/quant-quality.json] [--quick]

Every model, the bf16 reference included, is loaded with `load_model(..., dtype="bfloat16")` and run through
`CpuDecoder` (the path users run): a prefill of whole sequences, packed `--chunk-tokens` at a time, with logits at
every position. Per format, over every position that has a next token: mean and max KL(p_bf16 || p_format) in nats,
top-1 agreement (the two argmaxes equal) and perplexity of the next token. Targets (issue 14): top-1 agreement
>= 99% for int8, >= 95% for int4. Prints a markdown table; writes the JSON record (`--out`).

The loader keeps a module in bf16 where a group size does not divide its input columns (e.g. int4-g128 on the demo,
hidden size 192): the table's last column says what each format really quantized. A tied model with a quantized LM
head keeps its embedding apart, in bf16 (hence more weight bytes than with lm_head_quantization "none").
`--quick` runs a 4-layer, 256-wide version of the random geometry on 2 prompts of 64 tokens and the first 4
held-out chats of the demo: a check of the script (about a minute), not a measurement.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cpu_bench import decoder_weight_bytes, geometry  # noqa: E402  (benchmarks/, this script's folder)

from qwen35.backends.cpu import CpuDecoder, library  # noqa: E402
from qwen35.demo import DEMO_DIR, write_random_checkpoint  # noqa: E402
from qwen35.models.batch import ForwardBatch, SeqChunk  # noqa: E402
from qwen35.models.loader import load_model  # noqa: E402
from qwen35.train.data import pack  # noqa: E402
from qwen35.train.loss import IGNORE_INDEX, shift_labels  # noqa: E402

# name -> load_model arguments. The LM head follows lm_head_quantization's default ("auto": int8 for a quantized
# model) unless the name says otherwise.
FORMATS = {
    "int8": {"quantization": "int8"},
    "int8-head-none": {"quantization": "int8", "lm_head_quantization": "none"},
    "int4": {"quantization": "int4"},
    "int4-g64": {"quantization": "int4", "group_size": 64},
    "int4-g128": {"quantization": "int4", "group_size": 128},
    "int4-head-none": {"quantization": "int4", "lm_head_quantization": "none"},
    "bf16-control": {},  # a second bf16 load: a control (KL 0, agreement 100%), not in the default list
}
DEFAULT_FORMATS = [f for f in FORMATS if f != "bf16-control"]
TARGET_TOP1 = {"int8": 0.99, "int4": 0.95}
ROWS = 256  # logits rows per block: the vocabulary-wide tensors of a block stay ~250 MB at 248k tokens


# ---------------------------------------------------------------------------------------------- evaluation sets

def demo_set(limit: int | None) -> tuple[Path, list[list[int]], str]:
    """The demo checkpoint and its corpus's held-out chats, tokenized as scripts/train_demo.py does."""
    from qwen35.tokenizer import Tokenizer
    from qwen35.train.corpus import build_corpus, encode_samples

    corpus = build_corpus(seed=0)
    seqs = [ids for ids, _ in encode_samples(Tokenizer.from_dir(DEMO_DIR), corpus.heldout)][:limit]
    recorded = json.loads((DEMO_DIR / "demo_metrics.json").read_text())
    note = (f"{len(seqs)} of the {len(corpus.heldout)} held-out chats of the demo corpus (recorded held-out "
            f"perplexity of the reference model: {recorded['heldout_perplexity']:.3f})")
    if corpus.sha256 != recorded["corpus"]["sha256"]:
        note += (f"; this Python's corpus differs from the one the demo was trained on (Python "
                 f"{recorded['corpus']['python_version']}), so its perplexity is not comparable to the recorded one")
    return DEMO_DIR, seqs, note


def random_set(root: Path, geometry_config: dict, prompts: int, length: int) -> tuple[Path, list[list[int]], str]:
    path = root / "random"
    if not (path / "model.safetensors").is_file():
        path.mkdir(parents=True, exist_ok=True)
        t = time.time()
        write_random_checkpoint(path, geometry_config)
        print(f"wrote a random checkpoint in {time.time() - t:.0f} s", file=sys.stderr, flush=True)
    g = torch.Generator().manual_seed(0)
    vocab = geometry_config["vocab_size"]
    seqs = [torch.randint(0, vocab, (length,), generator=g).tolist() for _ in range(prompts)]
    return path, seqs, (f"{prompts} random prompts of {length} tokens; random weights: these figures measure "
                        "rounding, not language quality")


def quick_geometry() -> dict:
    """The 0.8B text geometry cut to 4 layers of width 256 and a 32k vocabulary (for --quick)."""
    return dict(geometry("qwen3.5-0.8b"), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                vocab_size=32768)


# ---------------------------------------------------------------------------------------------- models

def load_decoder(path: Path, fmt: str) -> tuple[CpuDecoder, str]:
    """(the model of `path` in format `fmt`, on the CPU backend; what the loader says it quantized)."""
    kwargs = FORMATS.get(fmt, {})
    params = inspect.signature(load_model).parameters
    missing = [k for k in kwargs if k not in params]
    if missing:
        raise SystemExit(f"format {fmt}: load_model takes no {', '.join(missing)} argument in this checkout")
    model, _, report = load_model(path, dtype="bfloat16", vision=False, **kwargs)
    return CpuDecoder(model), getattr(report, "quantization", "none")


@torch.inference_mode()
def hidden_states(decoder: CpuDecoder, chunks: list[list[list[int]]]) -> list[torch.Tensor]:
    """Final-normed hidden [N, H] of every chunk (a prefill of whole sequences, no cache)."""
    out = []
    for seqs in chunks:
        batch = ForwardBatch.build([SeqChunk(s, want_logits="all") for s in seqs])
        out.append(decoder(batch.input_ids, batch)[batch.logits_indices].float())
    return out


class Scores:
    """Sums over positions of one format against the reference."""

    def __init__(self):
        self.n = self.kl = self.agree = self.nll = 0.0
        self.kl_max = 0.0

    def add(self, ref_logits: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        lp_ref, lp = F.log_softmax(ref_logits, -1), F.log_softmax(logits, -1)
        kl = (lp_ref.exp() * (lp_ref - lp)).sum(-1)  # KL(p_ref || p) per position
        self.n += labels.numel()
        self.kl += float(kl.double().sum())
        self.kl_max = max(self.kl_max, float(kl.max()))
        self.agree += float((ref_logits.argmax(-1) == logits.argmax(-1)).sum())
        self.nll -= float(lp.gather(-1, labels[:, None]).double().sum())

    def result(self) -> dict:
        return {"positions": int(self.n), "mean_kl": self.kl / self.n, "max_kl": self.kl_max,
                "top1_agreement": self.agree / self.n, "perplexity": math.exp(self.nll / self.n)}


@torch.inference_mode()
def score(ref: CpuDecoder, ref_hidden: list[torch.Tensor], decoder: CpuDecoder, hidden: list[torch.Tensor],
          labels: list[torch.Tensor]) -> dict:
    """KL, top-1 agreement and perplexity of `decoder` against `ref`, from their hidden states (the reference's
    logits are recomputed block by block: keeping them all would take N x vocabulary floats)."""
    s = Scores()
    for h_ref, h, lab in zip(ref_hidden, hidden, labels):
        keep = lab != IGNORE_INDEX
        h_ref, h, lab = h_ref[keep], h[keep], lab[keep]
        for i in range(0, lab.numel(), ROWS):
            rows = slice(i, i + ROWS)
            s.add(ref.compute_logits(h_ref[rows]).float(), decoder.compute_logits(h[rows]).float(), lab[rows])
    return s.result()


def evaluate(name: str, path: Path, seqs: list[list[int]], note: str, formats: list[str],
             chunk_tokens: int) -> dict:
    chunks = [[seqs[i] for i in micro] for micro in pack([len(s) for s in seqs], chunk_tokens)]
    labels = [shift_labels(c) for c in chunks]
    t = time.time()
    ref, _ = load_decoder(path, "bf16")
    ref_hidden = hidden_states(ref, chunks)
    rows = {"bf16": {**score(ref, ref_hidden, ref, ref_hidden, labels), "weights_mb": decoder_weight_bytes(ref) / 2**20,
                     "quantized": "none", "seconds": time.time() - t}}
    print(f"[{name}] bf16: perplexity {rows['bf16']['perplexity']:.3f} over {rows['bf16']['positions']} positions "
          f"({time.time() - t:.0f} s)", file=sys.stderr, flush=True)
    for fmt in formats:
        t = time.time()
        decoder, quantized = load_decoder(path, fmt)
        rows[fmt] = {**score(ref, ref_hidden, decoder, hidden_states(decoder, chunks), labels),
                     "weights_mb": decoder_weight_bytes(decoder) / 2**20, "quantized": quantized,
                     "seconds": time.time() - t}
        del decoder
        r = rows[fmt]
        print(f"[{name}] {fmt}: mean KL {r['mean_kl']:.3g}, top-1 {100 * r['top1_agreement']:.2f}%, perplexity "
              f"{r['perplexity']:.3f} ({r['seconds']:.0f} s; {quantized})", file=sys.stderr, flush=True)
    for fmt, r in rows.items():
        target = TARGET_TOP1.get(FORMATS.get(fmt, {}).get("quantization"))
        r["target_top1"] = target
        r["meets_target"] = None if target is None else r["top1_agreement"] >= target
    return {"model": name, "checkpoint": str(path), "data": note, "sequences": len(seqs),
            "tokens": sum(map(len, seqs)), "formats": rows}


def markdown(results: list[dict]) -> str:
    lines = ["| model | format | weights MB | mean KL (nats) | max KL | top-1 agreement | target | perplexity | "
             "vs bf16 | quantized (the loader's report) |", "|---|---|---:|---:|---:|---:|---|---:|---:|---|"]
    for res in results:
        base = res["formats"]["bf16"]["perplexity"]
        for fmt, r in res["formats"].items():
            if fmt == "bf16":  # the reference
                kl = kl_max = top1 = "-"
            else:
                kl, kl_max, top1 = f"{r['mean_kl']:.4f}", f"{r['max_kl']:.3f}", f"{100 * r['top1_agreement']:.2f}%"
            target = "" if r["target_top1"] is None else \
                f"≥ {100 * r['target_top1']:.0f}% {'met' if r['meets_target'] else '**missed**'}"
            lines.append(f"| {res['model']} | {fmt} | {r['weights_mb']:.1f} | {kl} | {kl_max} | {top1} | {target} | "
                         f"{r['perplexity']:.3f} | {100 * (r['perplexity'] / base - 1):+.2f}% | {r['quantized']} |")
    notes = [f"- {res['model']}: {res['data']}; {res['tokens']} tokens" for res in results]
    return "\n".join(lines + [""] + notes)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["demo", "random-0.8b"], choices=["demo", "random-0.8b"])
    ap.add_argument("--formats", nargs="+", default=DEFAULT_FORMATS, choices=list(FORMATS))
    ap.add_argument("--prompts", type=int, default=4, help="random prompts for random-0.8b (default 4)")
    ap.add_argument("--prompt-len", type=int, default=512, help="their length in tokens (default 512)")
    ap.add_argument("--chunk-tokens", type=int, default=2048, help="tokens per prefill (default 2048)")
    ap.add_argument("--checkpoints", help="folder to keep the random checkpoint in (default: a temporary one)")
    ap.add_argument("--out", help="JSON record (default: benchmarks/results/quant-quality.json; --quick: a "
                    "temporary file)")
    ap.add_argument("--quick", action="store_true", help="a tiny random geometry, 2 prompts of 64 tokens, and the "
                    "first 4 held-out chats of the demo: checks the script in seconds")
    args = ap.parse_args()
    if not library.available():
        raise SystemExit("the native CPU kernels are not available here (no C compiler, no AVX2+FMA, or "
                         "QWEN35_NATIVE=0): CpuDecoder cannot run")
    out_path = Path(args.out or (Path(tempfile.gettempdir()) / "qwen35-quant-quality-quick.json" if args.quick else
                                 ROOT / "benchmarks" / "results" / "quant-quality.json"))
    t_start = time.time()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            if name == "demo":
                path, seqs, note = demo_set(4 if args.quick else None)
            else:
                config = quick_geometry() if args.quick else geometry("qwen3.5-0.8b")
                prompts, length = (2, 64) if args.quick else (args.prompts, args.prompt_len)
                path, seqs, note = random_set(Path(args.checkpoints or tmp), config, prompts, length)
                if args.quick:
                    note += " (--quick: 4 layers of width 256, 32k vocabulary)"
            too_long = max(map(len, seqs))
            if too_long > args.chunk_tokens:
                raise SystemExit(f"--chunk-tokens {args.chunk_tokens} is shorter than a {too_long}-token sequence")
            results.append(evaluate(name, path, seqs, note, args.formats, args.chunk_tokens))
    table = markdown(results)
    print(table)
    record = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "results": results, "markdown": table,
              "wall_s": time.time() - t_start}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {out_path} in {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
