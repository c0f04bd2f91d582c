"""Quantized weights, format-neutral: what a quantized linear or expert tensor holds, and its reference maths.

A `QuantizedWeight` stores a weight [..., N, K] (any leading dims: experts) as integers with one float scale per
row and group of `group` consecutive columns (K % group == 0):
  - bits 8: `q` int8 [..., N, K], symmetric: w = q * s;
  - bits 4: `q` uint8 [..., N, K // 2], columns 2j and 2j+1 in the low and high nibble of byte j, values 0..15,
    with an integer zero point per group (`zeros` uint8 [..., N, K // group]; None means 8): w = (q - z) * s.
`scales` is float32 [..., N, K // group]. `dequantize()` is the definition every kernel is tested against;
(q - z) * s is exact in float32 for the scales we store (|q - z| <= 255, fp16/bf16-representable or fp32 scales).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class QuantizedWeight:
    bits: int
    group: int
    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None = None

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ValueError(f"quantized weights have 4 or 8 bits, not {self.bits}")
        *lead, n, k = self.shape
        if self.group <= 0 or k % self.group:
            raise ValueError(f"group size {self.group} does not divide the {k} input columns")
        want = (*lead, n, k // self.group)
        if tuple(self.scales.shape) != want or (self.zeros is not None and tuple(self.zeros.shape) != want):
            raise ValueError(f"scales/zeros of shape {tuple(self.scales.shape)} for a [{n}, {k}] weight in groups "
                             f"of {self.group}: expected {want}")

    @property
    def shape(self) -> tuple[int, ...]:
        *lead, n, kq = self.q.shape
        return (*lead, n, kq * 2 if self.bits == 4 else kq)

    def __getitem__(self, i) -> "QuantizedWeight":
        """One matrix of a stacked (expert) weight."""
        return QuantizedWeight(self.bits, self.group, self.q[i], self.scales[i],
                               None if self.zeros is None else self.zeros[i])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.scales, self.zeros) if t is not None)

    def integers(self) -> torch.Tensor:
        """q - z as int16 [..., N, K]."""
        if self.bits == 8:
            return self.q.to(torch.int16)
        q = torch.stack([self.q & 0x0F, self.q >> 4], dim=-1).flatten(-2).to(torch.int16)
        z = 8 if self.zeros is None else self.zeros.to(torch.int16).repeat_interleave(self.group, dim=-1)
        return q - z

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        s = self.scales.float().repeat_interleave(self.group, dim=-1)
        return (self.integers().float() * s).to(dtype)


def quantize(w: torch.Tensor, bits: int, group: int | None = None, symmetric: bool | None = None) -> QuantizedWeight:
    """Round-to-nearest quantization of w [..., N, K] (group None: one scale per row). bits 8: symmetric,
    s = max|w| / 127. bits 4: asymmetric by default (s = (max - min) / 15 over the group, integer zero point
    round(-min / s) in 0..15); symmetric=True uses z = 8, s = max|w| / 7 (as GPTQ's sym)."""
    *lead, n, k = w.shape
    group = k if group is None else group
    if k % group:
        raise ValueError(f"group size {group} does not divide the {k} input columns")
    wg = w.float().reshape(*lead, n, k // group, group)
    if bits == 8:
        s = wg.abs().amax(-1) / 127
        s = torch.where(s > 0, s, torch.ones_like(s))
        q = torch.round(wg / s[..., None]).clamp(-127, 127).to(torch.int8).reshape(*lead, n, k)
        return QuantizedWeight(8, group, q, s.float())
    if bits != 4:
        raise ValueError(f"quantization to {bits} bits is not supported (4 or 8)")
    if symmetric is None:
        symmetric = False
    if symmetric:
        s = wg.abs().amax(-1) / 7
        s = torch.where(s > 0, s, torch.ones_like(s))
        z = torch.full_like(s, 8)
    else:
        lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
        s = (hi - lo) / 15
        s = torch.where(s > 0, s, torch.ones_like(s))
        z = torch.round(-lo / s).clamp(0, 15)
    q = torch.round(wg / s[..., None] + z[..., None]).clamp(0, 15).to(torch.uint8).reshape(*lead, n, k)
    packed = q[..., 0::2] | (q[..., 1::2] << 4)
    return QuantizedWeight(4, group, packed, s.float(), None if symmetric else z.to(torch.uint8))
