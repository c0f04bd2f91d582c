"""Partial rotary embedding with interleaved M-RoPE (Qwen3-VL / Qwen3.5 layout).

Only the first `rotary_dim` channels of each head rotate (NeoX halves); frequency slot j takes its angle from the
T, H or W position by `j mod 3` (H for j%3==1 below 3*section[1], W for j%3==2 below 3*section[2], T otherwise).
For text all three positions are equal and this is plain partial RoPE.
"""

import torch


def inv_freq(rotary_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32, device="cpu") / rotary_dim))


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, mrope_section, dtype: torch.dtype):
    """positions: [N] (text) or [3, N] (T/H/W). Returns cos, sin: [N, rotary_dim] in `dtype`; angles in fp32."""
    if positions.dim() == 1:
        freqs = positions.float()[:, None] * inv_freq[None, :]  # [N, rotary_dim/2]
    else:
        freqs_axes = positions.float()[..., None] * inv_freq  # [3, N, rotary_dim/2]
        freqs = freqs_axes[0].clone()
        for axis in (1, 2):
            sl = slice(axis, mrope_section[axis] * 3, 3)
            freqs[:, sl] = freqs_axes[axis][:, sl]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [N, H, D]; rotates x[..., :rotary_dim] with NeoX pairing (i, i + rotary_dim/2)."""
    rd = cos.shape[-1]
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    x1, x2 = x_rot[..., : rd // 2], x_rot[..., rd // 2:]
    cos, sin = cos[:, None, :], sin[:, None, :]
    rotated = x_rot * cos + torch.cat((-x2, x1), dim=-1) * sin
    return torch.cat((rotated, x_pass), dim=-1)
