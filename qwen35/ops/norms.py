"""RMSNorm variants of Qwen3.5: the zero-centred norm (weight stores an offset from 1) and the SiLU-gated norm
on the Gated DeltaNet output (plain weight). Both normalise in float32, as the reference does."""

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Zero-centred RMSNorm: `norm(x) * (1 + w)`, multiplied in fp32 before casting back (unlike Llama)."""
    if x.dtype == torch.float32:  # one fused op for the normalisation (same maths)
        return F.rms_norm(x, (x.shape[-1],), eps=eps) * (1.0 + weight.float())
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * (1.0 + weight.float())).to(x.dtype)


def gated_rms_norm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`w * norm(x)` then `* silu(z)`: norm before gate, plain (not zero-centred) weight.

    The reference casts the normalised value back to the input dtype before the weight multiply; we do the same so
    bfloat16 runs round where it rounds.
    """
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    y = weight * xf.to(dtype)
    return (y * F.silu(z.float())).to(dtype)
