"""Qwen3-Next: the same decoder as Qwen3.5; only its Gated DeltaNet projections are stored fused and interleaved
by key-head group. Converting them to Qwen3.5's split layout is a pure row permutation (spec §2.4), done once at
load time so one forward serves both families."""

import torch

from qwen35.config import TextConfig


def split_fused_gdn(cfg: TextConfig, name: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """`...linear_attn.in_proj_qkvz.weight` -> in_proj_qkv + in_proj_z; `...in_proj_ba.weight` -> in_proj_b + in_proj_a.

    Fused rows, per key-head group g (r = Nv / Nk value heads each):
    qkvz: [q_g (dk) | k_g (dk) | v_g (r*dv) | z_g (r*dv)];  ba: [b_g (r) | a_g (r)].
    """
    prefix = name.rsplit(".", 2)[0]  # "model.layers.{i}.linear_attn"
    Nk, dk, dv = cfg.linear_num_key_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim
    r = cfg.linear_num_value_heads // Nk
    H = w.shape[-1]
    if name.endswith("in_proj_qkvz.weight"):
        groups = w.reshape(Nk, 2 * dk + 2 * r * dv, H)
        q, k, v, z = groups.split([dk, dk, r * dv, r * dv], dim=1)
        qkv = torch.cat([q.reshape(-1, H), k.reshape(-1, H), v.reshape(-1, H)])
        return {f"{prefix}.in_proj_qkv.weight": qkv, f"{prefix}.in_proj_z.weight": z.reshape(-1, H)}
    groups = w.reshape(Nk, 2 * r, H)
    b, a = groups.split([r, r], dim=1)
    return {f"{prefix}.in_proj_b.weight": b.reshape(-1, H), f"{prefix}.in_proj_a.weight": a.reshape(-1, H)}


def fused_gdn_shape(cfg: TextConfig, name: str) -> tuple[int, int]:
    if name.endswith("in_proj_qkvz.weight"):
        return (2 * cfg.key_dim + 2 * cfg.value_dim, cfg.hidden_size)
    return (2 * cfg.linear_num_value_heads, cfg.hidden_size)
