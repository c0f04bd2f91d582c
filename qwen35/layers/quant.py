"""Quantized stand-ins for the model's linears and routed experts, as the loader builds them: each holds
`qwen35.quant.QuantizedWeight`s as buffers (so `.to()` and `state_dict` carry them) and computes the reference
maths on the dequantized weight. A CPU backend reads `.quantized` and repacks it for its kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen35.ops.moe import experts_grouped
from qwen35.quant import QuantizedWeight


class QuantLinear(nn.Module):
    """y = x @ W^T for a bias-free W [out_features, in_features] stored as `bits`-bit integers in column groups."""

    def __init__(self, in_features: int, out_features: int, bits: int, group: int, has_zeros: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group = in_features, out_features, bits, group
        _register(self, "", (out_features, in_features), bits, group, has_zeros)

    @property
    def quantized(self) -> QuantizedWeight:
        return QuantizedWeight(self.bits, self.group, self.q, self.scales, self.zeros)

    def fill(self, qw: QuantizedWeight) -> None:
        """Take the weight's integers and scales (checked against this module's format and shape)."""
        _fill(self, "", qw, slice(None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized.dequantize(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, " \
               f"group={self.group}"


class QuantExperts(nn.Module):
    """`layers.mlp.Experts` with quantized gate_up_proj [E, 2I, H] (gate rows first) and down_proj [E, H, I]."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, bits: int,
                 groups: tuple[int, int], has_zeros: bool = False, first_expert: int | None = None):
        """groups: the column group of gate_up_proj (over H) and of down_proj (over I); first_expert: as
        `layers.mlp.Experts`."""
        super().__init__()
        self.bits, (self.gate_up_group, self.down_group) = bits, groups
        self.first_expert = first_expert
        E, H, inter = num_experts, hidden_size, intermediate_size
        _register(self, "gate_up_", (E, 2 * inter, H), bits, groups[0], has_zeros)
        _register(self, "down_", (E, H, inter), bits, groups[1], has_zeros)

    @property
    def gate_up_proj(self) -> QuantizedWeight:
        return QuantizedWeight(self.bits, self.gate_up_group, self.gate_up_q, self.gate_up_scales, self.gate_up_zeros)

    @property
    def down_proj(self) -> QuantizedWeight:
        return QuantizedWeight(self.bits, self.down_group, self.down_q, self.down_scales, self.down_zeros)

    def fill(self, which: str, qw: QuantizedWeight, index=slice(None)) -> None:
        """which: "gate_up" or "down"; index: where in the stacked tensors (e.g. (expert, rows)) qw goes."""
        _fill(self, which + "_", qw, index)

    def forward(self, x, weights, ids):
        """sum over each token's chosen experts ids [N, k] of weights [N, k] * expert(x); only the experts hit are
        dequantized (`experts_grouped` indexes one expert at a time)."""
        return experts_grouped(x, weights, ids, _Dequantized(self.gate_up_proj, x.dtype),
                               _Dequantized(self.down_proj, x.dtype), self.first_expert)


class _Dequantized:
    """A stacked QuantizedWeight that dequantizes one matrix when indexed."""

    def __init__(self, qw: QuantizedWeight, dtype: torch.dtype):
        self.qw, self.dtype, self.shape = qw, dtype, qw.shape

    def __getitem__(self, e: int) -> torch.Tensor:
        return self.qw[e].dequantize(self.dtype)


def _register(module: nn.Module, prefix: str, shape: tuple[int, ...], bits: int, group: int, has_zeros: bool):
    *lead, n, k = shape
    if bits not in (4, 8) or group <= 0 or k % group:
        raise ValueError(f"cannot hold a {list(shape)} weight in {bits} bits, groups of {group} columns")
    q_shape = (*lead, n, k // 2) if bits == 4 else tuple(shape)
    module.register_buffer(prefix + "q", torch.empty(q_shape, dtype=torch.uint8 if bits == 4 else torch.int8))
    module.register_buffer(prefix + "scales", torch.empty(*lead, n, k // group))
    zeros = torch.empty(*lead, n, k // group, dtype=torch.uint8) if has_zeros and bits == 4 else None
    module.register_buffer(prefix + "zeros", zeros)


def _fill(module: nn.Module, prefix: str, qw: QuantizedWeight, index) -> None:
    q, scales, zeros = (getattr(module, prefix + n) for n in ("q", "scales", "zeros"))
    group = getattr(module, prefix + "group")
    if (qw.bits, qw.group) != (module.bits, group) or (qw.zeros is not None and zeros is None):
        raise ValueError(f"a {qw.bits}-bit weight in groups of {qw.group}{' with zero points' * (qw.zeros is not None)}"
                         f" cannot fill a {module.bits}-bit module in groups of {group}")
    if q.is_meta:  # first fill: allocate for real
        q, scales = torch.zeros_like(q, device=qw.q.device), torch.zeros_like(scales, device=qw.q.device)
        zeros = None if zeros is None else torch.full_like(zeros, 8, device=qw.q.device)
        for n, t in (("q", q), ("scales", scales), ("zeros", zeros)):
            setattr(module, prefix + n, t)
    if tuple(q[index].shape) != tuple(qw.q.shape):
        raise ValueError(f"a weight of shape {list(qw.shape)} does not fit this module's {list(q[index].shape)} "
                         f"integers")
    q[index] = qw.q
    scales[index] = qw.scales
    if zeros is not None:
        zeros[index] = 8 if qw.zeros is None else qw.zeros
