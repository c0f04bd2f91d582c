"""Packed weights for the native CPU matmuls, in every format the kernels read (fp32, bf16, int8, int4), and the
two products over them: `linear` (one matrix) and `experts` (routed experts), with their references beside them.

A `PackedWeight` holds a weight [..., n, k] (leading dims: experts) in the layout csrc/matmul.c streams: one
contiguous stream per block of 4 output rows (float and int8: [n/4][k/8][4][8]; int4: [n/4][k/64][4][32 bytes], a
row's 64 columns as 8 nibbles in each of 8 32-bit lanes, nibble j of lane l holding column 8j + l), scales and zero
points as [n/4][k/group][4] beside it. Rows are padded to a multiple of 4; columns to 8 (float), or 32 (int8) / 64
(int4) where the weight has one group per row or (int4) groups of 32; int8/int4 groups must be a multiple of 32.
`face` is the weight as the C struct `qw_t` (csrc/weights.h) that every kernel takes. Quantized products equal
`dequantize()` followed by a matmul up to fp32 rounding, and a row's result never depends on the other rows of its
call. With `quantize_inputs=True` (prompts), quantized weights meet their inputs rounded to int8 per 32 columns
(`quantize_activations`) in integer products: faster for many rows, exact to those rounded inputs (`matmul_ref_q8in`).
"""

from __future__ import annotations

import ctypes
import math

import torch
import torch.nn.functional as F

from qwen35.backends.cpu import library
from qwen35.ops.moe import experts_reference
from qwen35.quant import QuantizedWeight

FORMATS = {"fp32": 0, "bf16": 1, "int8": 2, "int4": 3}


class QW(ctypes.Structure):
    """csrc/weights.h's qw_t."""
    _fields_ = [("format", ctypes.c_int64), ("n", ctypes.c_int64), ("k", ctypes.c_int64), ("group", ctypes.c_int64),
                ("count", ctypes.c_int64), ("data", ctypes.c_void_p), ("scales", ctypes.c_void_p),
                ("zeros", ctypes.c_void_p), ("data_stride", ctypes.c_int64), ("scale_stride", ctypes.c_int64),
                ("zero_stride", ctypes.c_int64)]


def _blocks(t: torch.Tensor, cols: int) -> torch.Tensor:
    """[..., np, kp] -> [..., np/4, kp/cols, 4, cols]: each 4-row block one stream."""
    *lead, n, k = t.shape
    return t.reshape(*lead, n // 4, 4, k // cols, cols).transpose(-3, -2).contiguous()


def _unblock(t: torch.Tensor) -> torch.Tensor:
    *lead, nb, kb, four, cols = t.shape
    return t.transpose(-3, -2).reshape(*lead, nb * four, kb * cols)


def _per_group(t: torch.Tensor) -> torch.Tensor:
    """scales/zeros [..., np, G] -> [..., np/4, G, 4]"""
    *lead, n, g = t.shape
    return t.reshape(*lead, n // 4, 4, g).transpose(-1, -2).contiguous()


class PackedWeight:
    """A weight [..., n, k] in a native kernel's layout; build with `PackedWeight.pack`."""

    format: str
    n: int
    k: int
    group: int  # columns per scale group as packed (0 for float formats)
    data: torch.Tensor
    scales: torch.Tensor | None
    zeros: torch.Tensor | None

    @classmethod
    def pack(cls, w: torch.Tensor | QuantizedWeight) -> "PackedWeight":
        """From a float tensor [..., N, K] (bf16 stays bf16, fp32 stays fp32, fp16/fp64 become fp32) or a
        `QuantizedWeight` (int8 / int4, groups of a multiple of 32 columns or one group per row)."""
        self = cls.__new__(cls)
        self._face = None
        if isinstance(w, QuantizedWeight):
            *lead, n, k = w.shape
            group, step = w.group, 32 if w.bits == 8 else 64
            kp, np_ = -(-k // step) * step, -(-n // 4) * 4
            what = f"int{w.bits} weight of shape {list(w.shape)} quantized in groups of {group} columns"
            if group % 32 and group != k:
                raise ValueError(f"{what}: the CPU kernels need groups of a multiple of 32 columns (or one per row)")
            if w.bits == 8 and bool((w.q == -128).any()):  # the int8-input kernels negate weights (sign trick)
                raise ValueError(f"{what}: holds -128; int8 weights must lie in [-127, 127]")
            if kp != k and group not in (k, 32):
                raise ValueError(f"{what}: rows of {k} columns (not a multiple of {step}) need groups of 32 columns "
                                 f"or one group per row")
            extra = 0 if group == k else (kp - k) // group  # whole groups of padding columns (scale 0)
            self.format, self.n, self.k = ("int8" if w.bits == 8 else "int4"), n, k
            self.group = kp if group == k else group
            q = w.q if w.bits == 8 else torch.stack([w.q & 0x0F, w.q >> 4], dim=-1).flatten(-2)
            q = F.pad(q, (0, kp - k, 0, np_ - n))  # padding: zero rows (scale 0 below), columns that meet zero inputs
            if w.bits == 8:
                self.data = _blocks(q, 8)
            else:  # 64 columns a row in 8 lanes of 32 bits: lane l, nibble j = column 8j + l
                nib = q.reshape(*lead, np_, kp // 64, 4, 2, 8)  # [..., chunk, byte b, nibble of the byte, lane]
                lanes = (nib[..., 0, :] | (nib[..., 1, :] << 4)).transpose(-1, -2)  # [..., chunk, lane, byte]
                self.data = _blocks(lanes.flatten(-3), 32)
            self.scales = _per_group(F.pad(w.scales.float(), (0, extra, 0, np_ - n)))
            self.zeros = None if w.zeros is None else _per_group(F.pad(w.zeros, (0, extra, 0, np_ - n), value=8))
            return self
        w = w.detach()
        if not w.is_floating_point():
            raise ValueError(f"cannot pack a {w.dtype} tensor as a float weight (quantize it to a QuantizedWeight)")
        if w.dtype not in (torch.bfloat16, torch.float32):
            w = w.float()
        *lead, n, k = w.shape
        np_, kp = -(-n // 4) * 4, -(-k // 8) * 8
        self.format = "bf16" if w.dtype == torch.bfloat16 else "fp32"
        self.n, self.k, self.group = n, k, 0
        self.data = _blocks(F.pad(w, (0, kp - k, 0, np_ - n)), 8)
        self.scales = self.zeros = None
        return self

    @property
    def _padded(self) -> tuple[int, int]:
        """(rows, columns) as packed"""
        nb, kb, _, cols = self.data.shape[-4:]
        return nb * 4, kb * cols * (2 if self.format == "int4" else 1)

    @staticmethod
    def _nibbles(d: torch.Tensor) -> torch.Tensor:
        """int4 rows [..., 32 bytes] -> their 64 columns [..., 64] int16, in order"""
        d = d.to(torch.int16).unflatten(-1, (8, 4))  # [..., lane, byte]
        return torch.stack([d & 0x0F, d >> 4], dim=-1).flatten(-2).transpose(-1, -2).flatten(-2)

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.data.shape[:-4], self.n, self.k)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.scales, self.zeros) if t is not None)

    @property
    def face(self) -> QW:
        """This weight as the kernels' qw_t (its tensors live as long as this object)."""
        if self._face is None:
            lead = self.data.shape[:-4]
            np_, kp = self._padded
            one = lambda t: 0 if t is None or not lead else t[(0,) * len(lead)].numel()  # noqa: E731
            self._face = QW(FORMATS[self.format], np_, kp, self.group, math.prod(lead), self.data.data_ptr(),
                            None if self.scales is None else self.scales.data_ptr(),
                            None if self.zeros is None else self.zeros.data_ptr(),
                            one(self.data) * self.data.element_size(), one(self.scales), one(self.zeros))
        return self._face

    def __getitem__(self, e) -> "PackedWeight":
        """One matrix of a stacked (expert) weight, sharing storage."""
        out = PackedWeight.__new__(PackedWeight)
        out.format, out.n, out.k, out.group, out._face = self.format, self.n, self.k, self.group, None
        out.data = self.data[e]
        out.scales = None if self.scales is None else self.scales[e]
        out.zeros = None if self.zeros is None else self.zeros[e]
        return out

    def _integers(self) -> torch.Tensor:
        """The stored integers as packed, [..., np, kp] int16 (zero points not subtracted)."""
        if self.format == "int8":
            return _unblock(self.data).to(torch.int16)
        return _unblock(self._nibbles(self.data))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight this represents, [..., n, k] (the reference every kernel is tested against)."""
        if self.format in ("bf16", "fp32"):
            return _unblock(self.data)[..., :self.n, :self.k].to(dtype)
        q = self._integers()
        if self.format == "int4":
            q = q - self._expand(self.zeros, 8).to(torch.int16)
        return (q.float() * self._expand(self.scales, 1.0))[..., :self.n, :self.k].to(dtype)

    def _expand(self, t: torch.Tensor | None, default) -> torch.Tensor:
        """[..., np/4, G, 4] per-group values -> [..., np, kp]"""
        np_, kp = self._padded
        if t is None:
            return torch.full((*self.data.shape[:-4], np_, kp), default)
        return t.transpose(-1, -2).flatten(-3, -2).repeat_interleave(self.group, dim=-1)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """fp32 rows `ids` of a 2D weight (an embedding lookup from a packed, possibly quantized, tied head)."""
        if self.data.dim() != 4:
            raise ValueError(f"rows() reads a 2D weight, not one of shape {list(self.shape)}")
        blk, r = ids // 4, ids % 4
        d = self.data[blk, :, r, :]  # [*ids, kp/cols, cols]
        if self.format in ("bf16", "fp32"):
            return d.flatten(-2)[..., :self.k].float()
        if self.format == "int8":
            q = d.flatten(-2).to(torch.int16)
        else:
            q = self._nibbles(d).flatten(-2)
            z = 8 if self.zeros is None else self.zeros[blk, :, r].to(torch.int16).repeat_interleave(self.group, -1)
            q = q - z
        return (q.float() * self.scales[blk, :, r].repeat_interleave(self.group, -1))[..., :self.k]


def _matmul():
    return library.function("qwen35_matmul", [ctypes.c_void_p, ctypes.POINTER(QW), ctypes.c_int64, ctypes.c_void_p,
                                              ctypes.c_int64])


def _experts():
    return library.function("qwen35_experts", [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2
                            + [ctypes.POINTER(QW)] * 2 + [ctypes.c_void_p])


def _matmul_q8in():
    return library.function("qwen35_matmul_q8in", [ctypes.c_void_p, ctypes.POINTER(QW), ctypes.c_int64,
                                                   ctypes.c_void_p, ctypes.c_int64])


def _experts_q8in():
    return library.function("qwen35_experts_q8in", [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2
                            + [ctypes.POINTER(QW)] * 2 + [ctypes.c_void_p])


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' rounding of inputs x [M, K] (fp32, K % 32 == 0) for quantize_inputs=True: (q int8 [M, K],
    scales fp32 [M, K / 32]), per 32 columns s = max|x| / 127, q = round(x / s) (0 where s = 0)."""
    if x.dim() != 2 or x.shape[1] % 32:
        raise ValueError(f"inputs of shape {list(x.shape)}: expected [M, K] with K a multiple of 32")
    xf = x.to(torch.float32).contiguous()
    q, s = torch.empty(xf.shape, dtype=torch.int8), torch.empty(xf.shape[0], xf.shape[1] // 32)
    library.function("qwen35_quantize_q8", [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                            ctypes.c_void_p])(xf.data_ptr(), xf.shape[0], xf.shape[1],
                                                              q.data_ptr(), s.data_ptr())
    return q, s


def linear(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None = None,
           quantize_inputs: bool = False) -> torch.Tensor:
    """x [..., k] (any float dtype) @ w^T (+ bias) -> [..., n] in x's dtype; fp32 accumulation. quantize_inputs
    (int8/int4 weights; prompts): x rounded to int8 per 32 columns first and multiplied in integers (faster for
    many rows; the product of those rounded inputs, see matmul_ref_q8in)."""
    if w.data.dim() != 4:
        raise ValueError(f"linear takes one matrix, not a stack of shape {list(w.shape)} (index it first)")
    if x.shape[-1] != w.k:
        raise ValueError(f"input of shape {list(x.shape)} does not match a weight of shape {list(w.shape)}")
    lead = x.shape[:-1]
    xf = x.reshape(-1, w.k)
    if xf.dtype != torch.float32 or not xf.is_contiguous():
        xf = xf.to(torch.float32).contiguous()
    np_, kp = w._padded
    if kp != w.k:
        xf = F.pad(xf, (0, kp - w.k))
    y = torch.empty(xf.shape[0], np_)
    if xf.shape[0]:
        (_matmul_q8in if quantize_inputs else _matmul)()(xf.data_ptr(), ctypes.byref(w.face), 0, y.data_ptr(),
                                                         xf.shape[0])
    if np_ != w.n:
        y = y[:, :w.n]
    if bias is not None:
        y = y + bias
    return y.to(x.dtype).reshape(*lead, w.n)


def experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, gate_up: PackedWeight,
            down: PackedWeight, quantize_inputs: bool = False) -> torch.Tensor:
    """Routed experts: x [N, H], weights and ids [N, top-k]; gate_up [E, 2I, H] (gate rows first), down [E, H, I],
    of one format each -> [N, H] in x's dtype: sum over a token's experts of weight * down(silu(gate) * up).
    quantize_inputs: the inputs of quantized weights (x, the SwiGLU outputs) rounded to int8 as in linear."""
    if gate_up.data.dim() != 5 or down.data.dim() != 5:
        raise ValueError(f"experts take stacked weights [E, 2I, H] and [E, H, I], not {list(gate_up.shape)} and "
                         f"{list(down.shape)}")
    E, I2, H = gate_up.shape
    if I2 % 2 or tuple(down.shape) != (E, H, I2 // 2) or gate_up._padded != (I2, H) or down._padded != (H, I2 // 2):
        raise ValueError(f"expert weights of shapes {list(gate_up.shape)} and {list(down.shape)}: expected [E, 2I, H] "
                         f"and [E, H, I] with H and 2I multiples of 4 and no column padding")
    if x.dim() != 2 or x.shape[1] != H or ids.shape != weights.shape or ids.shape[0] != x.shape[0]:
        raise ValueError(f"x {list(x.shape)}, weights {list(weights.shape)}, ids {list(ids.shape)} do not fit "
                         f"experts of hidden size {H}")
    xf = x if x.dtype == torch.float32 and x.is_contiguous() else x.to(torch.float32).contiguous()
    ids64 = ids.to(torch.int64).contiguous()
    w = weights.to(torch.float32).contiguous()
    out = torch.zeros(x.shape[0], H)
    if x.shape[0]:
        fn = _experts_q8in() if quantize_inputs else _experts()
        fn(xf.data_ptr(), ids64.data_ptr(), w.data_ptr(), ids.shape[0], ids.shape[1], ctypes.byref(gate_up.face),
           ctypes.byref(down.face), out.data_ptr())
    return out.to(x.dtype)


def matmul_ref(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """linear's reference: the dequantized weight, F.linear in fp32."""
    return F.linear(x.float(), w.dequantize(), bias).to(x.dtype)


def _round_inputs(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] fp32 as quantize_inputs rounds it (per 32 columns), dequantized exactly in float64."""
    q, s = quantize_activations(x)
    return (q.double().unflatten(-1, (-1, 32)) * s.double()[..., None]).flatten(-2)


def matmul_ref_q8in(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """linear(..., quantize_inputs=True)'s reference for a quantized w: the rounded inputs @ dequantize()^T in
    float64 -> fp32. x [M, k]."""
    np_, kp = w._padded
    xr = _round_inputs(F.pad(x.float(), (0, kp - w.k)))[:, :w.k]
    return (xr @ w.dequantize(torch.float64).T).float()


def experts_ref(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, gate_up: PackedWeight,
                down: PackedWeight) -> torch.Tensor:
    """experts' reference: token by token on the dequantized weights, in fp32."""
    return experts_reference(x.float(), weights.float(), ids, gate_up.dequantize(), down.dequantize()).to(x.dtype)
