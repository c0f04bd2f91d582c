"""Linear maps on CPU: weights packed for a native kernel, with `F.linear` as the reference.

Decoding multiplies a few rows by every weight, so it is bound by how fast weights stream from memory. PyTorch's
CPU matmuls reach ~60% of the read bandwidth for one row and fall apart for 2-32 rows (MKL's small-M paths;
bfloat16 has no AVX2 kernel at all: ~17 GFLOP/s at any size). `Packed` stores a weight once, in the layout
`csrc/linear_avx2.c` streams (4 output rows interleaved per 8-wide chunk), in its checkpoint dtype (bf16 or fp32),
and the native kernel runs every product with it, fp32 accumulation:

  - 1-2 rows: ~90% of the read bandwidth;
  - more rows (16-request decode, prompts): each 4-row block widened to fp32 once and multiplied against tiles of
    96 input rows; measured against unpacking to fp32 for MKL's sgemm (6176x1024 weight): 3-4x at 64 rows, 1.4x
    at 512, 1.0-1.3x at 2048, and no fp32 copy of the weight.

Both paths sum each output in the same order, so a row's result is bit for bit the same at any row count (decode
does not depend on the batch; tests/ops/test_linear.py). Outputs come back in the input's dtype. `linear(x, w)`
takes a plain tensor (reference path) or a `Packed`. The kernel is compiled on first use with the system C compiler
into the qwen35 cache (~1 s); without a compiler, on other CPUs, or with QWEN35_NATIVE=0, nothing is packed and
`F.linear` runs.
"""

from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn.functional as F

from qwen35.backends.cpu import library

class Packed:
    """A weight [..., n, k] stored as [..., ceil(n/4), ceil(k/8), 4, 8] (zero padded), any leading dims."""

    def __init__(self, w: torch.Tensor):
        *lead, n, k = w.shape
        self.n, self.k, self.dtype = n, k, w.dtype
        np_, kp = -(-n // 4) * 4, -(-k // 8) * 8
        if (np_, kp) != (n, k):
            w = F.pad(w, (0, kp - k, 0, np_ - n))
        self.data = w.reshape(*lead, np_ // 4, 4, kp // 8, 8).transpose(-3, -2).contiguous()
        self._ptr = None  # data_ptr, for linear's fast path

    def __getitem__(self, i: int) -> "Packed":
        out = Packed.__new__(Packed)
        out.n, out.k, out.dtype, out.data, out._ptr = self.n, self.k, self.dtype, self.data[i], None
        return out

    @classmethod
    def pack(cls, w):
        if isinstance(w, torch.Tensor) and w.dtype == torch.float16:
            w = w.float()
        return cls(w)

    @property
    def face(self):
        from qwen35.backends.cpu.layers import QW

        d = self.data
        count = d.shape[0] if d.dim() == 5 else 1
        per = d[0] if d.dim() == 5 else d
        return QW(format=1 if self.dtype == torch.bfloat16 else 0, n=d.shape[-4] * 4, k=d.shape[-3] * 8, group=0,
                  count=count, data=d.data_ptr(), data_stride=per.numel() * per.element_size())

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.data.shape[:-4], self.n, self.k)

    def unpack(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        d = self.data
        w = d.transpose(-3, -2).reshape(*d.shape[:-4], d.shape[-4] * 4, d.shape[-3] * 8)
        return w[..., :self.n, :self.k].to(dtype or self.dtype)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the weight (an embedding lookup from the packed layout)."""
        return self.data[ids // 4, :, ids % 4, :].reshape(*ids.shape, -1)[..., :self.k]


def linear(x: torch.Tensor, w, bias: torch.Tensor | None = None) -> torch.Tensor:
    if not isinstance(w, Packed):
        return F.linear(x, w, bias)
    if bias is None and x.dim() == 2 and x.dtype == torch.float32 and x.shape[0] > 0 and x.is_contiguous() \
            and w.data.dim() == 4:  # the common case, with the least Python in the way
        if w._ptr is None:
            fn = native().qwen35_linear_bf16 if w.dtype == torch.bfloat16 else native().qwen35_linear_f32
            w._ptr = (w.data.data_ptr(), fn, w.data.shape[-4] * 4, w.data.shape[-3] * 8)
        ptr, fn, np_, kp = w._ptr
        if kp == w.k:
            y = torch.empty(x.shape[0], np_)
            fn(x.data_ptr(), ptr, y.data_ptr(), x.shape[0], np_, kp)
            return y if np_ == w.n else y[:, :w.n]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    M = x2.shape[0]
    xf = x2 if x2.dtype == torch.float32 and x2.is_contiguous() else x2.to(torch.float32).contiguous()
    kp, np_ = w.data.shape[-3] * 8, w.data.shape[-4] * 4
    if kp != w.k:
        xf = F.pad(xf, (0, kp - w.k))
    y = torch.empty(M, np_, dtype=torch.float32)
    if M:
        fn = native().qwen35_linear_bf16 if w.dtype == torch.bfloat16 else native().qwen35_linear_f32
        fn(xf.data_ptr(), w.data.data_ptr(), y.data_ptr(), M, np_, kp)
    if np_ != w.n:
        y = y[:, :w.n]
    if bias is not None:
        y = y + bias
    return y.to(x.dtype).reshape(*lead, w.n)


def native_available() -> bool:
    return library.available()


@functools.cache
def _lib():
    lib = library.lib()
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    signatures = {"qwen35_linear_bf16": [ptr] * 3 + [i64] * 3, "qwen35_linear_f32": [ptr] * 3 + [i64] * 3,
                  "qwen35_moe_bf16": [ptr] * 3 + [i64] * 3 + [ptr] * 3 + [i64] * 2,
                  "qwen35_moe_f32": [ptr] * 3 + [i64] * 3 + [ptr] * 3 + [i64] * 2}
    for name, args in signatures.items():
        getattr(lib, name).argtypes = args
        getattr(lib, name).restype = None
    return lib


def native():
    """The loaded kernel library (call native_available() first)."""
    return _lib()


def experts(x, weights, ids, gate_up: Packed, down: Packed):
    """Routed experts in one native call over packed weights."""
    N, k = ids.shape
    xf = x if x.dtype == torch.float32 and x.is_contiguous() else x.to(torch.float32).contiguous()
    ids = ids.to(torch.int64).contiguous()
    w = weights.to(torch.float32).contiguous()
    out = torch.zeros(N, x.shape[1])
    fn = native().qwen35_moe_bf16 if gate_up.dtype == torch.bfloat16 else native().qwen35_moe_f32
    fn(xf.data_ptr(), ids.data_ptr(), w.data_ptr(), N, k, gate_up.shape[0], gate_up.data.data_ptr(),
       down.data.data_ptr(), out.data_ptr(), x.shape[1], down.k)
    return out.to(x.dtype)


PackedWeight = Packed
