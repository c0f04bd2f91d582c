"""`qwen35 plan`: how a model lays out over N devices, from its config alone. For each parallel layout, tensor
parallelism ("TP") and TP with the routed experts split whole by expert ("TP+EP"), it gives what rank 0 (the
largest rank) holds: weights, KV-cache bytes per token, recurrent-state bytes per sequence, the memory left for them,
the number of sequences of a given context that fit, and the communication of one decode step; then which layout it
recommends. Parameters are counted by `qwen35.info`'s loop over the real module tree with each tensor's per-rank
shape, so at one device every figure is `qwen35 info`'s total.

The sharding rules are the engine's own (`qwen35.distributed.shard.ShardPlan`, whose docstring states them; the
slice of each parameter is the one the loader reads); a vision tower lives on rank 0 only."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from qwen35.config import ModelConfig, TextConfig
from qwen35.distributed.shard import ShardPlan
from qwen35.info import (GIB, count_parameters, kv_cache_bytes_per_token, parameter_shapes,
                         recurrent_state_bytes_per_sequence, weight_bytes)

RESERVE_BYTES = 2 * GIB  # per rank, for activations and workspace (a fixed allowance, stated in the output)
DEFAULT_GPU_MEMORY = "141GB"  # an H200
QUANTIZATIONS = {"none": "bf16", "fp8": "fp8", "int8": "int8", "int4": "int4"}  # --quantization -> info's format
LAYOUTS = ("TP", "TP+EP")


def parse_memory(text: str) -> int:
    """Bytes of "141GB" (10^9), "131GiB" (2^30) or a bare number of GiB."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(gib|gb)?\s*", text, re.IGNORECASE)
    if not m or float(m[1]) <= 0:
        raise ValueError(f"--gpu-memory {text!r}: expected a positive size such as 141GB (10^9 bytes), "
                         "131GiB (2^30 bytes) or a bare number of GiB")
    unit = 10**9 if (m[2] or "").lower() == "gb" else GIB
    return int(float(m[1]) * unit)


@dataclass(frozen=True)
class RankShare:
    """What rank 0 holds of each split dimension."""

    k_heads: int  # Gated DeltaNet key heads
    v_heads: int  # Gated DeltaNet value heads
    kv_heads: int  # full-attention KV heads
    kv_replicas: int  # ranks that hold a copy of each KV head (1: KV heads split, none replicated)
    q_heads: int  # full-attention query heads
    vocab: int
    intermediate: int  # dense FFN
    shared_intermediate: int  # shared expert
    experts: int  # routed experts held
    moe_intermediate: int  # of each routed expert held


def rank_share(cfg: TextConfig, gpus: int, layout: str) -> tuple[RankShare, ShardPlan]:
    """Rank 0's share under `layout`, from the engine's own plan (distributed/shard.py); a ValueError says why the
    head counts rule the layout out."""
    if gpus < 1:
        raise ValueError(f"--gpus must be at least 1, got {gpus}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r} ({', '.join(LAYOUTS)})")
    if layout == "TP+EP" and not cfg.num_experts:
        raise ValueError("a dense model has no routed experts to split (TP+EP is TP)")
    plan = ShardPlan(cfg, 0, gpus, expert_parallel=layout == "TP+EP")  # a ShardError (ValueError) says why not
    local = plan.local_config()
    return RankShare(k_heads=local.linear_num_key_heads, v_heads=local.linear_num_value_heads,
                     kv_heads=local.num_key_value_heads,
                     kv_replicas=gpus // cfg.num_key_value_heads if cfg.num_key_value_heads < gpus else 1,
                     q_heads=local.num_attention_heads, vocab=plan.vocab[1] - plan.vocab[0],
                     intermediate=local.intermediate_size, shared_intermediate=local.shared_expert_intermediate_size,
                     experts=plan.experts[1] - plan.experts[0], moe_intermediate=local.moe_intermediate_size), plan


def shard_shape(plan: ShardPlan):
    """shard(name, shape) -> the shape rank 0 holds of that parameter: the slice the loader reads for it
    (`ShardPlan.piece`); the vision tower stays whole, on rank 0."""

    def shard(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        piece = None if name.startswith("visual.") else plan.piece(name)
        return tuple(piece.shape(list(shape))) if piece is not None else tuple(shape)

    return shard


def plan(config: ModelConfig, gpus: int, gpu_memory: int, quantization: str = "none", context: int = 32768,
         gpu_memory_utilization: float = 0.9) -> dict:
    """Each layout's rank-0 figures over `gpus` devices of `gpu_memory` bytes, and the recommended layout."""
    if gpus < 1:
        raise ValueError(f"--gpus must be at least 1, got {gpus}")
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r} ({', '.join(QUANTIZATIONS)})")
    if context < 1:
        raise ValueError(f"--context must be at least 1 token, got {context}")
    if not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"--gpu-memory-utilization must be in (0, 1], got {gpu_memory_utilization}")
    cfg, fmt = config.text, QUANTIZATIONS[quantization]
    shapes = parameter_shapes(config)
    usable = int(gpu_memory * gpu_memory_utilization)
    layouts = []
    for layout in LAYOUTS:
        entry = {"layout": layout, "flags": f"--tensor-parallel-size {gpus}" +
                 (" --enable-expert-parallel" if layout == "TP+EP" else "")}
        try:
            share, shard_plan = rank_share(cfg, gpus, layout)
        except ValueError as e:
            if layout == "TP":  # the head counts rule out every layout
                raise ValueError(str(e)) from None
            layouts.append({**entry, "possible": False, "reason": str(e), "fits": False})
            continue
        counts = count_parameters(shapes, shard_shape(shard_plan))
        weights, vision = weight_bytes(counts)[fmt], 2 * counts["vision"]  # the vision tower stays bf16
        local = shard_plan.local_config()
        kv, state = kv_cache_bytes_per_token(local), recurrent_state_bytes_per_sequence(local)
        free = usable - RESERVE_BYTES - weights - vision
        seqs = max(free, 0) // (context * kv + state)
        comm = (0, 0) if gpus == 1 else ((2 * cfg.num_hidden_layers + 1) * cfg.hidden_size * 2, cfg.vocab_size * 2)
        layouts.append({**entry, "possible": True, "reason": None, "rank_share": asdict(share), "params": counts,
                        "weight_bytes": weights, "vision_bytes": vision, "kv_cache_bytes_per_token": kv,
                        "recurrent_state_bytes_per_sequence": state, "free_bytes": free, "max_sequences": seqs,
                        "fits": free > 0 and seqs >= 1, "all_reduce_bytes_per_token": comm[0],
                        "all_gather_bytes_per_token": comm[1]})
    # The most sequences wins; on a tie a MoE model takes TP+EP (whole experts: full-width expert matmuls).
    fitting = [lay for lay in layouts if lay["fits"]]
    best = max(fitting, key=lambda lay: (lay["max_sequences"], lay["layout"] == "TP+EP"), default=None)
    return {"model_type": config.model_type, "gpus": gpus, "gpu_memory_bytes": gpu_memory,
            "gpu_memory_utilization": gpu_memory_utilization, "reserve_bytes": RESERVE_BYTES, "usable_bytes": usable,
            "weight_format": fmt, "context": context, "max_context_len": cfg.max_context_len,
            "layouts": layouts, "recommended": best["layout"] if best else None}


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def format_plan(name: str, p: dict) -> str:
    lines = [f"{name} ({p['model_type']}) on {p['gpus']} GPU{'s' if p['gpus'] > 1 else ''} of "
             f"{p['gpu_memory_bytes'] / 1e9:.2f} GB ({_gib(p['gpu_memory_bytes'])}), weights {p['weight_format']}, "
             f"context {p['context']} tokens"]
    if p["context"] > p["max_context_len"]:
        lines.append(f"  note: past the model's {p['max_context_len']} positions: needs YaRN")
    lines += [f"  per rank         {_gib(p['usable_bytes'])} usable (x {p['gpu_memory_utilization']} utilization), "
              f"less {_gib(p['reserve_bytes'])} for activations and workspace,",
              "                   less the weights: the rest holds KV cache + state (figures: rank 0, the largest)"]
    for lay in p["layouts"]:
        lines.append(f"  {lay['layout']:<6} ({lay['flags']})")
        if not lay["possible"]:
            lines.append(f"    impossible     {lay['reason']}")
            continue
        s = lay["rank_share"]
        kv = (f"{s['kv_heads']} KV head{'s' if s['kv_heads'] > 1 else ''}" +
              (f" (each on {s['kv_replicas']} ranks)" if s["kv_replicas"] > 1 else ""))
        ffn = (f"experts {s['experts']} x intermediate {s['moe_intermediate']}" if s["experts"]
               else f"FFN intermediate {s['intermediate']}")
        if s["shared_intermediate"]:
            ffn += f", shared expert {s['shared_intermediate']}"
        vision = f" + vision tower {_gib(lay['vision_bytes'])} bf16 (rank 0 only)" if lay["vision_bytes"] else ""
        lines += [
            f"    rank 0 holds   GDN {s['k_heads']} k / {s['v_heads']} v heads; attention {kv}, "
            f"{s['q_heads']} q heads;",
            f"                   {ffn}; vocab {s['vocab']} rows",
            f"    weights        {_gib(lay['weight_bytes'])} {p['weight_format']}{vision}",
            f"    KV cache       {lay['kv_cache_bytes_per_token'] / 1024:.2f} KiB per token",
            f"    state          {lay['recurrent_state_bytes_per_sequence'] / 2**20:.2f} MiB per sequence",
            f"    free           {_gib(lay['free_bytes'])}: {lay['max_sequences']} sequences of {p['context']} tokens"
            f" -> {'fits' if lay['fits'] else 'does NOT fit'}",
            f"    communication  {lay['all_reduce_bytes_per_token']:,} all-reduce bytes / "
            f"{lay['all_gather_bytes_per_token']:,} all-gather bytes per decode token (batch 1, bf16)",
        ]
    if p["recommended"]:
        best = next(lay for lay in p["layouts"] if lay["layout"] == p["recommended"])
        lines.append(f"  recommended      {best['layout']}: {best['flags']}")
    else:
        lines.append("  recommended      none fits: more GPUs, a smaller --quantization or a shorter --context")
    return "\n".join(lines)
