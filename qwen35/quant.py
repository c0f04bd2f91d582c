"""Quantized weights, format-neutral: what a quantized linear or expert tensor holds, its reference maths, and the
converters from the released checkpoint formats (FP8 with block scales, GPTQ int4).

A `QuantizedWeight` stores a weight [..., N, K] (any leading dims: experts) as integers with one float scale per
row and group of `group` consecutive columns (K % group == 0):
  - bits 8: `q` int8 [..., N, K], symmetric: w = q * s;
  - bits 4: `q` uint8 [..., N, K // 2], columns 2j and 2j+1 in the low and high nibble of byte j, values 0..15,
    with an integer zero point per group (`zeros` uint8 [..., N, K // group]; None means 8; 0..15, or 16 from a
    GPTQ v1 checkpoint that stored zero - 1 = 15): w = (q - z) * s.
`scales` is float32 [..., N, K // group]. `dequantize()` is the definition every kernel is tested against;
(q - z) * s is exact in float32 for the scales we store (|q - z| <= 255, fp16/bf16-representable or fp32 scales).
"""

from __future__ import annotations

import math
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


CHUNK = 1 << 22  # elements quantized at a time: the fp32 temporaries stay ~16 MB whatever the tensor


def quantize(w: torch.Tensor, bits: int, group: int | None = None, symmetric: bool | None = None) -> QuantizedWeight:
    """Round-to-nearest quantization of w [..., N, K] (group None: one scale per row). bits 8: symmetric,
    s = max|w| / 127. bits 4: asymmetric by default (s = (max - min) / 15 over the group, integer zero point
    round(-min / s) in 0..15); symmetric=True uses z = 8, s = max|w| / 7 (as GPTQ's sym). Rows are quantized a
    chunk at a time into the result, so a large tensor (an LM head, stacked experts) never has fp32 copies."""
    *lead, n, k = w.shape
    group = k if group is None else group
    if k % group:
        raise ValueError(f"group size {group} does not divide the {k} input columns")
    if bits not in (4, 8):
        raise ValueError(f"quantization to {bits} bits is not supported (4 or 8)")
    rows = w.reshape(-1, k)
    step = max(1, CHUNK // k)
    if rows.shape[0] <= step:
        return _quantize_rows(w, bits, group, symmetric)
    parts = [_quantize_rows(rows[i:i + step], bits, group, symmetric) for i in range(0, rows.shape[0], step)]
    first = parts[0]
    out = QuantizedWeight(bits, group, torch.empty(*lead, n, first.q.shape[-1], dtype=first.q.dtype),
                          torch.empty(*lead, n, k // group), None if first.zeros is None else
                          torch.empty(*lead, n, k // group, dtype=torch.uint8))
    for name in ("q", "scales", "zeros"):
        dst = getattr(out, name)
        if dst is not None:
            torch.cat([getattr(p, name) for p in parts], out=dst.view(-1, dst.shape[-1]))
    return out


def _quantize_rows(w: torch.Tensor, bits: int, group: int, symmetric: bool | None) -> QuantizedWeight:
    *lead, n, k = w.shape
    wg = w.float().reshape(*lead, n, k // group, group)
    if bits == 8:
        s = wg.abs().amax(-1) / 127
        s = torch.where(s > 0, s, torch.ones_like(s))
        q = torch.round(wg / s[..., None]).clamp(-127, 127).to(torch.int8).reshape(*lead, n, k)
        return QuantizedWeight(8, group, q, s.float())
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


def fp8_block_dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128)
                         ) -> torch.Tensor:
    """An FP8 block checkpoint's weight in float32: w[i, j] = fp8[i, j] * scale_inv[i // bn, j // bk] (the
    `_inv` scale is the multiplier)."""
    _check_fp8(weight, scale_inv, block)
    n, k = weight.shape
    bn, bk = block
    s = scale_inv.float().repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    return weight.float() * s


def from_fp8_block(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128),
                   bits: int = 8, group: int | None = None) -> QuantizedWeight:
    """An FP8 block-scaled weight [N, K] as int8 in groups of gcd(K, bk) columns (each group inside one block).
    Each (row, group) takes the scale scale_inv * 2^e with the smallest e that fits the group's fp8 values in
    [-127, 127] when all of them are then integers, so those groups dequantize bit-exactly to
    `fp8_block_dequantize`; other groups round to scale_inv * max|fp8| / 127. bits=4 requantizes the dequantized
    weight (asymmetric, same groups). `group` (a divisor of gcd(K, bk)) asks for smaller groups."""
    _check_fp8(weight, scale_inv, block)
    n, k = weight.shape
    bn, bk = block
    group = group or math.gcd(k, bk)
    if math.gcd(k, bk) % group:
        raise ValueError(f"groups of {group} columns do not fit a [{n}, {k}] weight in {bn}x{bk} blocks")
    if bits == 4:
        return quantize(fp8_block_dequantize(weight, scale_inv, block), 4, group)
    if bits != 8:
        raise ValueError(f"quantization to {bits} bits is not supported (4 or 8)")
    v = weight.float().reshape(n, k // group, group)
    block_of_group = torch.arange(k // group) * group // bk
    s = scale_inv.float().repeat_interleave(bn, 0)[:n][:, block_of_group]  # [N, K // group]
    m = v.abs().amax(-1)
    pow2 = torch.exp2(torch.ceil(torch.log2(torch.where(m > 0, m, 1.0) / 127)))
    exact = ((v / pow2[..., None]).frac() == 0).all(-1) & (m / pow2 <= 127)
    step = torch.where(exact, pow2, torch.where(m > 0, m / 127, 1.0))
    q = torch.round(v / step[..., None]).clamp(-127, 127).to(torch.int8).reshape(n, k)
    return QuantizedWeight(8, group, q, (step * s).float())


def _check_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> None:
    if weight.dim() != 2:
        raise ValueError(f"an FP8 weight is 2D, got shape {list(weight.shape)}")
    n, k = weight.shape
    want = [-(-n // block[0]), -(-k // block[1])]
    if list(scale_inv.shape) != want:
        raise ValueError(f"weight_scale_inv has shape {list(scale_inv.shape)}, expected {want} for a [{n}, {k}] "
                         f"weight in {block[0]}x{block[1]} blocks")


def gptq_unpack(qweight: torch.Tensor, qzeros: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's 4-bit packing undone: qweight int32 [K/8, N] holds q[k, :] in bits 4*(k % 8) of row k // 8 (packed
    along K); qzeros int32 [G, ceil(N/8)] holds z[g, j] in bits 4*(j % 8) of column j // 8 (packed along N).
    Returns q uint8 [N, K] and the stored zeros uint8 [N, G]."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    q = ((qweight[:, None, :] >> shifts[None, :, None]) & 0xF).reshape(-1, qweight.shape[1])  # [K, N]
    z = ((qzeros[:, :, None] >> shifts[None, None, :]) & 0xF).reshape(qzeros.shape[0], -1)[:, :n]  # [G, N]
    return q.t().to(torch.uint8), z.t().to(torch.uint8)


def from_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
              bits: int = 4, group_size: int = 128, sym: bool = True, zero_offset: int = 1,
              group: int | None = None) -> QuantizedWeight:
    """A GPTQ linear as int4 in groups of gcd(K, group_size) columns, dequantizing to exactly GPTQ's
    w[n, k] = (q[k, n] - (z[g, n] + zero_offset)) * scales[g, n] with g = k // group_size. zero_offset is 1 for
    checkpoint_format "gptq" (v1 stores zero - 1), 0 for "gptq_v2". sym=True keeps no zero points (all are 8; a
    checkpoint whose stored zeros say otherwise is refused). A g_idx other than k // group_size (act-order,
    desc_act) is refused. `group` (a divisor of gcd(K, group_size)) asks for smaller groups."""
    if bits != 4:
        raise ValueError(f"GPTQ with {bits} bits is not supported (4)")
    k, n = 8 * qweight.shape[0], qweight.shape[1]
    num_groups = -(-k // group_size)
    for name, t, want in (("qzeros", qzeros, [num_groups, -(-n // 8)]), ("scales", scales, [num_groups, n]),
                          ("g_idx", g_idx, [k])):
        if t is not None and list(t.shape) != want:
            raise ValueError(f"{name} has shape {list(t.shape)}, expected {want} for qweight of shape "
                             f"{list(qweight.shape)} in groups of {group_size}")
    if g_idx is not None and not torch.equal(g_idx.long(), torch.arange(k) // group_size):
        raise ValueError("g_idx is not k // group_size (act-order / desc_act checkpoints are not supported)")
    q, z = gptq_unpack(qweight, qzeros, n)
    z = z.to(torch.int16) + zero_offset
    group = group or math.gcd(k, group_size)
    if math.gcd(k, group_size) % group:
        raise ValueError(f"groups of {group} columns do not fit {k} columns in GPTQ groups of {group_size}")
    src = torch.arange(k // group) * group // group_size  # the GPTQ group holding each of our groups
    s = scales.t().float()[:, src]
    z = z[:, src]
    if sym and not bool((z == 8).all()):
        raise ValueError(f"sym is true but the stored zero points are not all {8 - zero_offset} (zero point 8)")
    zeros = None if sym else z.to(torch.uint8)
    return QuantizedWeight(4, group, q[:, 0::2] | (q[:, 1::2] << 4), s, zeros)
