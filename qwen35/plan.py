"""`qwen35 plan`: how a model lays out over N devices, from its config alone. For each parallel layout, tensor
parallelism ("TP") and TP with the routed experts split whole by expert ("TP+EP"), it gives what rank 0 (the
largest rank) holds: weights, KV-cache bytes per token, recurrent-state bytes per sequence, the memory left for them,
the number of sequences of a given context that fit, and the communication of one decode step; then which layout it
recommends. Parameters are counted by `qwen35.info`'s loop over the real module tree with each tensor's per-rank
shape, so at one device every figure is `qwen35 info`'s total.

The sharding rules (the engine's): n items over p ranks are split contiguously, rank r getting n // p, plus one when
r < n % p. Gated DeltaNet layers split by key heads, their value heads following; full attention splits the KV heads
and the query-head groups that read them, or, with fewer KV heads than ranks, replicates each KV head on N / kv ranks
and splits its group's query heads over them; dense FFNs and shared experts split their intermediate size; routed
experts split their intermediate size (TP) or whole experts (TP+EP); embedding and LM head split the vocabulary;
norms, the router and the shared-expert gate are replicated; a vision tower lives on rank 0 only."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from qwen35.config import ModelConfig, TextConfig
from qwen35.info import (GIB, count_parameters, kv_cache_bytes_per_token, parameter_shapes,
                         recurrent_state_bytes_per_sequence, weight_bytes)

RESERVE_BYTES = 2 * GIB  # per rank, for activations and workspace (a fixed allowance, stated in the output)
DEFAULT_GPU_MEMORY = "141GB"  # an H200
QUANTIZATIONS = {"none": "bf16", "fp8": "fp8", "int8": "int8", "int4": "int4"}  # --quantization -> info's format
LAYOUTS = ("TP", "TP+EP")


def split(n: int, p: int, rank: int = 0) -> int:
    """Rank `rank`'s share of n items split contiguously over p ranks (rank 0 is the largest)."""
    return n // p + (1 if rank < n % p else 0)


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


def rank_share(cfg: TextConfig, gpus: int, layout: str) -> RankShare:
    """Rank 0's share under `layout`; a ValueError says why the head counts rule the layout out."""
    if gpus < 1:
        raise ValueError(f"--gpus must be at least 1, got {gpus}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r} ({', '.join(LAYOUTS)})")
    hk, hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
    if cfg.num_linear_attention_layers and hk < gpus:
        raise ValueError(f"Gated DeltaNet has {hk} key heads and each of the {gpus} ranks needs at least one "
                         f"(at most {hk} ranks)")
    k_heads = split(hk, gpus)
    kv, heads = cfg.num_key_value_heads, cfg.num_attention_heads
    group = heads // kv  # query heads per KV head
    if kv >= gpus:
        kv_heads, replicas, q_heads = split(kv, gpus), 1, split(kv, gpus) * group
    else:
        replicas = gpus // kv
        if cfg.num_full_attention_layers and gpus % kv:
            raise ValueError(f"full attention has {kv} KV heads, fewer than the {gpus} ranks: each KV head is then "
                             f"replicated, which needs the ranks to be a multiple of {kv}")
        if cfg.num_full_attention_layers and group < replicas:
            raise ValueError(f"full attention has {kv} KV heads of {group} query heads each; over {gpus} ranks each "
                             f"KV head is replicated on {replicas} ranks, and its {group} query heads cannot split "
                             f"over {replicas} ranks")
        kv_heads, q_heads = 1, split(group, replicas)
    experts, moe_intermediate = cfg.num_experts, cfg.moe_intermediate_size
    if layout == "TP+EP":
        if not cfg.num_experts:
            raise ValueError("a dense model has no routed experts to split (TP+EP is TP)")
        if experts < gpus:
            raise ValueError(f"{experts} routed experts over {gpus} ranks would leave ranks without an expert")
        experts = split(experts, gpus)
    else:
        moe_intermediate = split(moe_intermediate, gpus)
    return RankShare(k_heads=k_heads, v_heads=k_heads * (hv // hk), kv_heads=kv_heads, kv_replicas=replicas,
                     q_heads=q_heads, vocab=split(cfg.vocab_size, gpus),
                     intermediate=split(cfg.intermediate_size, gpus),
                     shared_intermediate=split(cfg.shared_expert_intermediate_size, gpus), experts=experts,
                     moe_intermediate=moe_intermediate)


def shard_shape(cfg: TextConfig, s: RankShare):
    """shard(name, shape) -> the shape rank 0 holds of that parameter; an unknown parameter is an error, so a tensor
    added to the model cannot go uncounted."""
    hv, heads, kv = cfg.linear_num_value_heads, cfg.num_attention_heads, cfg.num_key_value_heads
    conv_dim = 2 * s.k_heads * cfg.linear_key_head_dim + s.v_heads * cfg.linear_value_head_dim

    def rows(n):
        return lambda sh: (n(sh), *sh[1:])

    def cols(n):
        return lambda sh: (*sh[:-1], n(sh))

    def same(sh):
        return sh

    per_v_head, per_q_head = (lambda sh: sh[0] // hv * s.v_heads), (lambda sh: sh[0] // heads * s.q_heads)
    rules = {
        "linear_attn.in_proj_qkv.weight": rows(lambda sh: conv_dim),  # q, k and v segments: the rank's heads of each
        "linear_attn.conv1d.weight": rows(lambda sh: conv_dim),
        "linear_attn.in_proj_z.weight": rows(per_v_head), "linear_attn.in_proj_b.weight": rows(per_v_head),
        "linear_attn.in_proj_a.weight": rows(per_v_head), "linear_attn.A_log": rows(per_v_head),
        "linear_attn.dt_bias": rows(per_v_head),
        "linear_attn.out_proj.weight": cols(lambda sh: sh[-1] // hv * s.v_heads),
        "linear_attn.norm.weight": same,
        "self_attn.q_proj.weight": rows(per_q_head),  # the output gate's half with its heads
        "self_attn.k_proj.weight": rows(lambda sh: sh[0] // kv * s.kv_heads),
        "self_attn.v_proj.weight": rows(lambda sh: sh[0] // kv * s.kv_heads),
        "self_attn.o_proj.weight": cols(lambda sh: sh[-1] // heads * s.q_heads),
        "self_attn.q_proj.bias": rows(per_q_head), "self_attn.k_proj.bias": rows(lambda sh: sh[0] // kv * s.kv_heads),
        "self_attn.v_proj.bias": rows(lambda sh: sh[0] // kv * s.kv_heads), "self_attn.o_proj.bias": same,
        "self_attn.q_norm.weight": same, "self_attn.k_norm.weight": same,
        "mlp.gate_proj.weight": rows(lambda sh: s.intermediate), "mlp.up_proj.weight": rows(lambda sh: s.intermediate),
        "mlp.down_proj.weight": cols(lambda sh: s.intermediate),
        "mlp.shared_expert.gate_proj.weight": rows(lambda sh: s.shared_intermediate),
        "mlp.shared_expert.up_proj.weight": rows(lambda sh: s.shared_intermediate),
        "mlp.shared_expert.down_proj.weight": cols(lambda sh: s.shared_intermediate),
        "mlp.experts.gate_up_proj": lambda sh: (s.experts, 2 * s.moe_intermediate, sh[2]),  # [E, 2I, hidden]
        "mlp.experts.down_proj": lambda sh: (s.experts, sh[1], s.moe_intermediate),  # [E, hidden, I]
        "mlp.gate.weight": same, "mlp.shared_expert_gate.weight": same,
        "input_layernorm.weight": same, "post_attention_layernorm.weight": same,
    }
    top = {"model.embed_tokens.weight": rows(lambda sh: s.vocab), "lm_head.weight": rows(lambda sh: s.vocab),
           "model.norm.weight": same}

    def shard(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        if name.startswith("visual."):  # whole, on rank 0
            return shape
        layer = re.match(r"model\.layers\.\d+\.(.+)$", name)
        rule = rules.get(layer[1]) if layer else top.get(name)
        if rule is None:
            raise ValueError(f"no sharding rule for parameter {name} {tuple(shape)}")
        return rule(shape)

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
            share = rank_share(cfg, gpus, layout)
        except ValueError as e:
            if layout == "TP":  # the head counts rule out every layout
                raise ValueError(f"cannot lay the model over {gpus} ranks: {e}") from None
            layouts.append({**entry, "possible": False, "reason": str(e), "fits": False})
            continue
        counts = count_parameters(shapes, shard_shape(cfg, share))
        weights, vision = weight_bytes(counts)[fmt], 2 * counts["vision"]  # the vision tower stays bf16
        kv = kv_cache_bytes_per_token(cfg, share.kv_heads)
        state = recurrent_state_bytes_per_sequence(cfg, share.k_heads, share.v_heads)
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
