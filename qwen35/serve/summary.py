"""The summary `qwen35 serve` prints once the model is loaded: which model is served under which name, its dtype and
weight format, what the KV cache and the state slots hold, how many max-length requests fit at once, whether prefix
caching is on, and the URL; with a warning first when the model is the embedded demo or has random weights."""

from __future__ import annotations

import json
from pathlib import Path

from qwen35.demo import DEMO_DIR

MiB = 1 << 20


def weights_warning(model_path: Path) -> str | None:
    """A warning for the embedded demo model or a checkpoint written with random weights; None otherwise."""
    if Path(model_path).resolve() == DEMO_DIR:
        return ("WARNING: serving the embedded demo model, a 7M-parameter model trained in minutes on the Python "
                "documentation: it knows a little about Python and nothing else; pass --model DIR for a real "
                "checkpoint.")
    config = Path(model_path) / "config.json"
    try:
        random = json.loads(config.read_text()).get("random_weights", False)
    except (OSError, ValueError, AttributeError):
        random = False
    if random:
        return f"WARNING: {model_path} has random weights (config.json: random_weights): its output is noise."
    return None


def startup_summary(llm, served_model_name: str, url: str) -> str:
    """The lines `qwen35 serve` prints when ready; `llm` is the loaded LLM, `url` where the server listens."""
    e, report = llm.engine, llm.load_report
    cache = e.cache
    kv_bytes = sum(t.nbytes for t in (*cache.k.values(), *cache.v.values()))
    state_bytes = sum(t.nbytes for t in (*cache.conv.values(), *cache.ssm.values()))
    kv_tokens = e.blocks.num_blocks * e.blocks.block_size
    fits = kv_tokens / e.max_model_len if cache.k else float("inf")  # no attention layer: no KV limit
    max_seqs = e.config.max_num_seqs
    concurrency = min(max_seqs, int(fits))
    dtype = str(llm.model.dtype).removeprefix("torch.")
    weights = report.quantization if report.quantization != "none" else dtype
    warning = weights_warning(llm.model_path)
    lines = [warning] if warning else []
    lines += [
        f"model: {llm.model_path} (served as {served_model_name!r})",
        f"dtype: {dtype}; weights: {weights} (checkpoint: {report.checkpoint_format})",
        f"KV cache: {e.blocks.num_blocks} blocks x {e.blocks.block_size} tokens = {kv_tokens} tokens "
        f"({kv_bytes / MiB:.1f} MiB)",
        f"state slots: {max_seqs} sequences" + (f" x {1 + e.num_spec} (speculative rings)" if e.num_spec else "")
        + f" + {e.snapshots.num_slots} prefix snapshots ({state_bytes / MiB:.1f} MiB)",
        f"max concurrency at max_model_len {e.max_model_len}: {concurrency} requests "
        f"(the KV cache holds {fits:.2f}x, max_num_seqs {max_seqs})",
        f"decoder: {e.runner.describe()}",
        f"prefix caching: {'on' if e.prefix is not None else 'off'}",
        "speculative decoding: " + (f"MTP, {e.num_spec} draft tokens per step" if e.num_spec else "off"),
        "tensor parallel: " + (f"{llm.workers.describe()}, experts split "
                               f"{'by expert (EP)' if llm.args.enable_expert_parallel else 'by width'}; KV cache and "
                               "state above are rank 0's share" if llm.workers else "off (one process)"),
        f"serving on {url} (OpenAI API under {url}/v1)",
    ]
    return "\n".join(lines)
