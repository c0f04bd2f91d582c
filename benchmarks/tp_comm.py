"""Communication volume of one decode step under tensor parallelism, measured: bytes each rank hands to all-reduce
and all-gather (`qwen35.distributed.parallel.CommStats`), and the pickled step messages rank 0 broadcasts, over 2
gloo ranks on a random-weight checkpoint with Qwen3.5-397B-A17B's hidden size, head counts and vocabulary but
`--layers` layers and `--experts` experts (neither changes what one layer sends). Prints a table and writes JSON;
the per-layer figures extrapolate to the full 60 layers by the layer count.

    python benchmarks/tp_comm.py [--layers 4] [--experts 16] [--batch 1 8]
"""

from __future__ import annotations

import argparse
import json
import pickle
import platform
import tempfile
import time
from pathlib import Path


from qwen35 import LLM, SamplingParams
from qwen35.demo import write_random_checkpoint
from qwen35.presets import preset

RESULTS = Path(__file__).parent / "results" / "tp-comm.json"


def checkpoint(layers: int, experts: int) -> Path:
    path = Path(tempfile.gettempdir()) / f"qwen35-tp-comm-397b-{layers}l-{experts}e"
    if (path / "model.safetensors").is_file():
        return path
    config = preset("qwen3.5-397b-a17b")
    config = {k: v for k, v in config.items() if k != "vision_config"}
    config["text_config"] = dict(config["text_config"], num_hidden_layers=layers, num_experts=experts,
                                 num_experts_per_tok=min(10, experts))
    path.mkdir(parents=True, exist_ok=True)
    write_random_checkpoint(path, config)
    return path


def measure(llm: LLM, batch: int) -> dict:
    """Bytes of one decode step of `batch` sequences (after their prefill), as rank 0 counts them."""
    engine, comm = llm.engine, llm.workers.comm
    sent = []
    broadcast = comm.broadcast

    def counting(obj=None):
        sent.append(len(pickle.dumps(obj)))
        return broadcast(obj)

    comm.broadcast = counting
    try:
        for i in range(batch):
            engine.add_request(f"b{batch}-{i}", list(range(100 + i, 132 + i)),
                               SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
        while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running) or \
                engine.scheduler.waiting:
            engine.step()
        before = dict(vars(comm.stats), calls=dict(comm.stats.calls))
        sent.clear()
        engine.step()  # one decode step of every sequence
        after = vars(comm.stats)
        out = {k: after[k] - before[k] for k in ("all_reduce_bytes", "all_gather_bytes")}
        out["calls"] = {k: after["calls"][k] - before["calls"].get(k, 0) for k in after["calls"]}
        out["broadcast_bytes"] = sum(sent)
        while engine.has_unfinished_requests():
            engine.step()
        return out
    finally:
        comm.broadcast = broadcast


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    a = p.parse_args()
    path = checkpoint(a.layers, a.experts)
    cfg = json.loads((path / "config.json").read_text())["text_config"]
    results = {"command": "python benchmarks/tp_comm.py " + " ".join(
        f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(a).items()),
        "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
        "geometry": {k: cfg[k] for k in ("hidden_size", "vocab_size", "num_hidden_layers", "num_experts")},
        "ranks": 2, "dtype": "bfloat16", "runs": {}}
    full_layers = preset("qwen3.5-397b-a17b")["text_config"]["num_hidden_layers"]
    for ep in (False, True):
        llm = LLM(path, dtype="bfloat16", skip_tokenizer_init=True, tensor_parallel_size=2,
                  enable_expert_parallel=ep, max_model_len=256, max_num_seqs=max(a.batch), enable_prefix_caching=False)
        for b in a.batch:
            r = measure(llm, b)
            layer_ar = (r["all_reduce_bytes"] - b * cfg["hidden_size"] * 2) / a.layers  # less the embedding's
            r["all_reduce_bytes_per_layer"] = layer_ar
            r["all_reduce_bytes_397b"] = layer_ar * full_layers + b * cfg["hidden_size"] * 2
            name = f"{'EP' if ep else 'TP'} batch {b}"
            results["runs"][name] = r
            print(f"{name:<12} all-reduce {r['all_reduce_bytes']:>10,} B ({layer_ar:,.0f} per layer; 60 layers: "
                  f"{r['all_reduce_bytes_397b']:,.0f}), all-gather {r['all_gather_bytes']:>10,} B, step messages "
                  f"{r['broadcast_bytes']:,} B, calls {r['calls']}")
        llm.shutdown()
    RESULTS.write_text(json.dumps(results, indent=1))
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
