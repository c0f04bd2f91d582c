"""Sizes of a model from its config alone: parameters (total and active per token), weight memory at several
precisions, KV-cache bytes per token and recurrent-state bytes per sequence. Parameters are counted on the real
module tree built on the meta device, so the numbers cannot drift from the model code. The totals are the language
model's (as the released sizes are quoted); a vision tower is counted on its own, under "vision"."""

from __future__ import annotations

import math

import torch

from qwen35.config import ModelConfig, TextConfig
from qwen35.models.quantized import QUANTIZED
from qwen35.models.qwen3_5 import Qwen3_5ForCausalLM

GIB = 1024**3
LONG_CONTEXTS = {"262k": 262_144, "1M": 1_048_576}  # one sequence's cache is quoted at these lengths
GROUPS = ("embedding", "lm_head", "routed_experts", "attention", "linear_attention", "shared_ffn", "dense_ffn",
          "router", "norms", "vision", "quantized_rows")


def parameter_shapes(config: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Every parameter's name and shape, from the real module tree built on the meta device (a tied head appears
    once, as the embedding)."""
    with torch.device("meta"):
        model = Qwen3_5ForCausalLM(config.text, config.vision)
    return [(name, tuple(p.shape)) for name, p in model.named_parameters()]


def count_parameters(shapes: list[tuple[str, tuple[int, ...]]], shard=None) -> dict[str, int]:
    """Parameter counts per group (GROUPS). `shard(name, shape)` gives the shape one rank holds of each tensor
    (default: the whole tensor), so a parallel plan counts with this same loop. "quantized_rows" counts the output
    rows of the matrices an int8 / int4 model quantizes (one int8 scale each)."""
    c = dict.fromkeys(GROUPS, 0)
    for name, shape in shapes:
        if shard is not None:
            shape = shard(name, shape)
        n = math.prod(shape)
        if name == "model.embed_tokens.weight":
            c["embedding"] += n
            continue
        if name == "lm_head.weight":
            c["lm_head"] += n
            continue
        if len(shape) >= 2 and QUANTIZED.match(name.rsplit(".", 1)[0]):
            c["quantized_rows"] += math.prod(shape[:-1])
        if name.startswith("visual."):
            c["vision"] += n
        elif ".mlp.experts." in name:
            c["routed_experts"] += n
        elif ".mlp.gate." in name:
            c["router"] += n
        elif ".mlp.shared_expert" in name:
            c["shared_ffn"] += n
        elif ".mlp." in name:
            c["dense_ffn"] += n
        elif ".self_attn." in name:
            c["attention"] += n
        elif ".linear_attn." in name:
            c["linear_attention"] += n
        else:
            c["norms"] += n
    return c


def weight_bytes(c: dict[str, int]) -> dict[str, int]:
    """The language model's weight bytes per format, from count_parameters' groups (the vision tower excluded)."""
    total = sum(n for g, n in c.items() if g not in ("vision", "quantized_rows"))
    # Quantised releases keep embeddings, LM head, norms, convs, gates and routers in bf16 (spec §4.4).
    quantisable = c["routed_experts"] + c["shared_ffn"] + c["dense_ffn"] + c["attention"] + c["linear_attention"]
    keep16 = total - quantisable
    return {
        "bf16": 2 * total,
        "int8": quantisable + 4 * c["quantized_rows"] + 2 * keep16,  # load-time int8: 1 B + an fp32 scale per row
        "fp8": quantisable + quantisable * 2 // (128 * 128) + 2 * keep16,  # 1 B + bf16 128x128 block scales
        "int4": quantisable // 2 + quantisable * 2 // 128 + 2 * keep16,  # 0.5 B + bf16 scale per 128 group
        # (as GPTQ-Int4 releases); load-time int4 in groups of 32 adds an fp32 scale and a zero byte per group
    }


def kv_cache_bytes_per_token(cfg: TextConfig) -> int:
    """bf16 K and V of every full-attention layer (of one rank, given its local config)."""
    return cfg.num_full_attention_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 2


def recurrent_state_bytes_per_sequence(cfg: TextConfig) -> int:
    """Every Gated DeltaNet layer's bf16 conv history and fp32 recurrent state (of one rank, given its local
    config)."""
    conv = cfg.num_linear_attention_layers * cfg.conv_dim * (cfg.linear_conv_kernel_dim - 1) * 2
    ssm = cfg.num_linear_attention_layers * cfg.linear_num_value_heads * cfg.linear_key_head_dim * \
        cfg.linear_value_head_dim * 4
    return conv + ssm


def model_stats(config: ModelConfig) -> dict:
    cfg = config.text
    c = count_parameters(parameter_shapes(config))
    routed, embed, lm_head = c["routed_experts"], c["embedding"], c["lm_head"]
    body = sum(c[g] for g in GROUPS if g not in ("embedding", "lm_head", "vision", "quantized_rows"))
    total = body + embed + lm_head
    active_routed = routed * cfg.num_experts_per_tok // cfg.num_experts if cfg.num_experts else 0
    active = body - routed + active_routed + embed + lm_head  # the embedding is a lookup, counted as HF cards do
    kv_per_token = kv_cache_bytes_per_token(cfg)
    state = recurrent_state_bytes_per_sequence(cfg)
    return {
        "model_type": config.model_type,
        "layers": {"total": cfg.num_hidden_layers, "linear_attention": cfg.num_linear_attention_layers,
                   "full_attention": cfg.num_full_attention_layers},
        "experts": {"routed": cfg.num_experts, "per_token": cfg.num_experts_per_tok} if cfg.num_experts else None,
        "params": {
            "total": total, "active": active, "embedding": embed, "lm_head": lm_head,
            "tied_embeddings": cfg.tie_word_embeddings, "decoder": body, "routed_experts": routed,
            "attention": c["attention"], "linear_attention": c["linear_attention"],
            "ffn_dense_or_shared": c["dense_ffn"] + c["shared_ffn"],
            "vision": c["vision"],  # not in total or active
        },
        "weight_bytes": weight_bytes(c),
        "checkpoint_quantization": config.quantization.describe() if config.quantization else None,
        "kv_cache_bytes_per_token": kv_per_token,
        "recurrent_state_bytes_per_sequence": state,
        "max_context_len": cfg.max_context_len,  # max_position_embeddings, or its YaRN extension
        "one_sequence_cache_bytes": {k: n * kv_per_token + state for k, n in LONG_CONTEXTS.items()},
    }


def _fmt(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def format_stats(name: str, s: dict) -> str:
    p, w = s["params"], s["weight_bytes"]
    lines = [
        f"{name} ({s['model_type']})",
        f"  layers           {s['layers']['total']} ({s['layers']['linear_attention']} Gated DeltaNet, "
        f"{s['layers']['full_attention']} full attention)",
    ]
    if s["experts"]:
        e = s["experts"]
        lines.append(f"  experts          {e['routed']} routed, {e['per_token']} per token + shared")
    lm = "tied to the embedding" if p["tied_embeddings"] else _fmt(p["lm_head"])
    routed = f" (routed experts {_fmt(p['routed_experts'])})" if s["experts"] else ""
    lines += [
        f"  parameters       {_fmt(p['total'])} total, {_fmt(p['active'])} active per token (language model)",
        f"    embedding      {_fmt(p['embedding'])}",
        f"    lm head        {lm}",
        f"    decoder        {_fmt(p['decoder'])}{routed}",
        f"  weights          bf16 {w['bf16'] / GIB:.2f} GiB, int8 {w['int8'] / GIB:.2f} GiB, fp8 "
        f"{w['fp8'] / GIB:.2f} GiB, int4 {w['int4'] / GIB:.2f} GiB (language model)",
    ]
    if s["checkpoint_quantization"]:
        lines.append(f"  checkpoint       quantized: {s['checkpoint_quantization']}")
    if p["vision"]:
        lines.append(f"  vision tower     {_fmt(p['vision'])} parameters, bf16 {2 * p['vision'] / GIB:.2f} GiB "
                     "(not in the figures above)")
    lines += [
        f"  KV cache         {s['kv_cache_bytes_per_token'] / 1024:.1f} KiB per token (bf16)",
        f"  recurrent state  {s['recurrent_state_bytes_per_sequence'] / 2**20:.1f} MiB per sequence "
        "(fp32 state + bf16 conv history)",
    ]
    for label, n in LONG_CONTEXTS.items():
        yarn = "" if n <= s["max_context_len"] else f"; past the model's {s['max_context_len']} positions: needs YaRN"
        lines.append(f"  at {label + ' tokens':<13} {s['one_sequence_cache_bytes'][label] / GIB:.2f} GiB KV cache + "
                     f"state, one sequence{yarn}")
    return "\n".join(lines)
