"""The `qwen35` console script (also `python -m qwen35`): one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _resolve_config(target: str):
    from qwen35.config import ModelConfig
    from qwen35.presets import PRESETS

    if target.lower() in PRESETS:
        return ModelConfig.from_hf(PRESETS[target.lower()])
    if Path(target).is_dir():
        return ModelConfig.from_dir(target)
    raise SystemExit(f"qwen35 info: {target!r} is neither a checkpoint directory nor a preset "
                     f"({', '.join(PRESETS)})")


def cmd_info(args) -> int:
    from qwen35.info import format_stats, model_stats
    from qwen35.presets import PRESETS

    targets = list(PRESETS) if args.target == "all" else [args.target]
    stats = {t: model_stats(_resolve_config(t)) for t in targets}
    if args.json:
        print(json.dumps(stats if len(targets) > 1 else stats[targets[0]], indent=2))
    else:
        print("\n\n".join(format_stats(t, s) for t, s in stats.items()))
    return 0


def cmd_forward(args) -> int:
    import torch

    from qwen35.demo import demo_checkpoint
    from qwen35.models.batch import ForwardBatch, SeqChunk
    from qwen35.models.loader import load_model

    path = args.model or demo_checkpoint()
    if args.model is None:
        print(f"Using the embedded default model at {path} (random weights: outputs are not meaningful).")
    t0 = time.time()
    model, config, report = load_model(path, dtype=args.dtype, device=args.device)
    print(f"Loaded {config.model_type}: {report.num_tensors} tensors, {report.num_bytes / 1e6:.1f} MB "
          f"in {time.time() - t0:.2f}s" + (f"; set aside {report.set_aside}" if report.set_aside else ""))
    ids = [int(x) for x in args.token_ids.split(",")] if args.token_ids else list(range(1, 65))
    batch = ForwardBatch.build([SeqChunk(ids)], device=args.device)
    with torch.inference_mode():
        t0 = time.time()
        logits = model.compute_logits(model(batch.input_ids, batch)[batch.logits_indices])[0].float()
        dt = time.time() - t0
    top = torch.topk(logits.log_softmax(-1), 5)
    print(f"Forward pass over {len(ids)} tokens in {dt * 1000:.1f} ms; top next-token ids: "
          + ", ".join(f"{i} ({lp:.2f})" for i, lp in zip(top.indices.tolist(), top.values.tolist())))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qwen35", description="Run Qwen3.5 / Qwen3-Next checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="parameters, memory, KV-cache and state sizes of a checkpoint or preset")
    p.add_argument("target", help="checkpoint directory, preset name (e.g. qwen3.5-397b-a17b) or 'all'")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("forward", help="load a checkpoint and run one forward pass (smoke test)")
    p.add_argument("--model", help="checkpoint directory (default: the embedded demo model)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--token-ids", help="comma-separated prompt token ids (default 1..64)")
    p.set_defaults(func=cmd_forward)

    args = parser.parse_args(argv)
    from qwen35.config import ConfigError
    from qwen35.models.loader import CheckpointError

    try:
        return args.func(args)
    except (ConfigError, CheckpointError) as e:
        print(f"qwen35 {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
