"""Partial rotary embedding with interleaved M-RoPE (Qwen3-VL / Qwen3.5 layout).

Only the first `rotary_dim` channels of each head rotate (NeoX halves); frequency slot j takes its angle from the
T, H or W position by `j mod 3` (H for j%3==1 below 3*section[1], W for j%3==2 below 3*section[2], T otherwise).
For text all three positions are equal and this is plain partial RoPE.

YaRN (long context) only changes the frequencies and scales cos/sin by an attention factor; the M-RoPE slot layout
is the same, so `yarn_inv_freq` feeds `rope_cos_sin` like `inv_freq` does.
"""

import math

import torch


def inv_freq(rotary_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32, device="cpu") / rotary_dim))


def yarn_inv_freq(rotary_dim: int, theta: float, factor: float, original_max_position_embeddings: int,
                  beta_fast: float | None = None, beta_slow: float | None = None, truncate: bool = True,
                  **_) -> torch.Tensor:
    """YaRN frequencies: slots turning more than beta_fast times over the original context keep their frequency,
    slots turning fewer than beta_slow times are divided by `factor`, with a linear ramp between."""
    beta_fast, beta_slow = beta_fast or 32.0, beta_slow or 1.0  # 0 / None mean the paper's defaults, as HF

    def slot_of(turns: float) -> float:  # the (fractional) frequency slot that turns `turns` times
        return rotary_dim * math.log(original_max_position_embeddings / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = slot_of(beta_fast), slot_of(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001
    # on the CPU even while the model is built on the meta device (as `inv_freq`): a buffer has no checkpoint tensor
    ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    denom = theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32, device="cpu") / rotary_dim)
    # in transformers' order of operations, so the fp32 frequencies agree bit for bit
    keep = 1 - ramp
    return 1.0 / (factor * denom) * (1 - keep) + 1.0 / denom * keep


def yarn_attention_factor(factor: float, mscale: float | None = None, mscale_all_dim: float | None = None,
                          attention_factor: float | None = None, **_) -> float:
    """The cos/sin scale: `attention_factor` if given, else 0.1*ln(factor)+1 (a ratio of two such terms when both
    mscale and mscale_all_dim are set)."""
    if attention_factor is not None:
        return attention_factor

    def m(scale: float) -> float:
        return 1.0 if factor <= 1 else 0.1 * scale * math.log(factor) + 1.0

    return m(mscale) / m(mscale_all_dim) if mscale and mscale_all_dim else m(1.0)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, mrope_section, dtype: torch.dtype,
                 scale: float = 1.0):
    """positions: [N] (text) or [3, N] (T/H/W). Returns cos, sin: [N, rotary_dim] in `dtype`; angles in fp32;
    both times `scale` (YaRN's attention factor)."""
    if positions.dim() == 1:
        freqs = positions.float()[:, None] * inv_freq[None, :]  # [N, rotary_dim/2]
    else:
        freqs_axes = positions.float()[..., None] * inv_freq  # [3, N, rotary_dim/2]
        freqs = freqs_axes[0].clone()
        for axis in (1, 2):
            sl = slice(axis, mrope_section[axis] * 3, 3)
            freqs[:, sl] = freqs_axes[axis][:, sl]
    emb = torch.cat((freqs, freqs), dim=-1)
    if scale == 1.0:
        return emb.cos().to(dtype), emb.sin().to(dtype)
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [N, H, D]; rotates x[..., :rotary_dim] with NeoX pairing (i, i + rotary_dim/2)."""
    rd = cos.shape[-1]
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    x1, x2 = x_rot[..., : rd // 2], x_rot[..., rd // 2:]
    cos, sin = cos[:, None, :], sin[:, None, :]
    rotated = x_rot * cos + torch.cat((-x2, x1), dim=-1) * sin
    return torch.cat((rotated, x_pass), dim=-1)
