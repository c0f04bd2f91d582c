"""Norm modules owning their weights; the maths lives in qwen35.ops.norms."""

import torch
from torch import nn

from qwen35.ops.norms import gated_rms_norm, rms_norm


class RMSNorm(nn.Module):
    """Zero-centred RMSNorm: the stored weight is an offset from 1 (HF `Qwen3_5RMSNorm`)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class GatedRMSNorm(nn.Module):
    """SiLU-gated RMSNorm on the Gated DeltaNet output; plain weight, shared by all value heads."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x, z):
        return gated_rms_norm(x, z, self.weight, self.eps)
