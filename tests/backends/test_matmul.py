"""The native matmuls of every weight format (fp32, bf16, int8, int4 with and without zero points, groups of 32 /
64 / 128 columns and one group per row) against F.linear with the dequantized weight, within fp32 rounding; on row
counts on both sides of the kernel's 2-row path and
its tiles, with padded rows and columns; routed experts against ops.moe.experts_reference; a row's result alone
equals its result in any batch; embedding rows from a packed head; the error for a group the kernels cannot read.

Tolerance: against the exact product (float64) of the dequantized weight, |error| <= 16 eps (|x| @ |w|^T), eps the
fp32 unit roundoff: the sum of K products in fp32 in any order stays within a few eps of that scale (F.linear and
the kernels measure 1-4 eps at K = 128..4096; the quantized kernels apply scales and zero points once per group,
which costs no more), and a wrong scale, zero point or column order is off by a quantization step (~1e-1 of it).
Routed experts (two matmuls and SiLU) against the same computation in float64: 64 ulps of the largest output.
quantize_inputs=True (inputs rounded to int8 per 32 columns, integer products): the same bounds against the exact
product of the rounded inputs (their rounding is checked bit for bit against its formula)."""

import pytest
import torch
import torch.nn.functional as F

from qwen35.backends.cpu import library
from qwen35.backends.cpu.weights import (PackedWeight, experts, experts_ref, linear, matmul_ref, matmul_ref_q8in,
                                         quantize_activations)
from qwen35.ops.moe import experts_reference
from qwen35.quant import quantize

pytestmark = pytest.mark.skipif(not library.available(), reason="native kernels unavailable (no C compiler/AVX2)")


def groups(bits, group, symmetric=None):
    """quantize to `group` columns per scale, or one group per row where the weight has fewer columns"""
    return lambda w: quantize(w, bits, group if w.shape[-1] % group == 0 else None, symmetric)


# format id -> make(w [..., N, K]): what PackedWeight.pack takes
FORMATS = {
    "fp32": lambda w: w,
    "bf16": lambda w: w.bfloat16(),
    "int8-g32": groups(8, 32),
    "int8-row": groups(8, 1 << 30),
    "int4-g32": groups(4, 32),
    "int4-g64-sym": groups(4, 64, symmetric=True),
    "int4-g128": groups(4, 128),
    "int4-row": groups(4, 1 << 30),
}


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def packed(fmt, n, k, seed=0, lead=()):
    return PackedWeight.pack(FORMATS[fmt](rand(*lead, n, k, seed=seed)))


EPS = 2.0 ** -24


def assert_rounding_close(got, x, w):
    """got = x @ w^T up to fp32 rounding (see the module docstring)."""
    exact = x.double() @ w.double().T
    bound = 16 * EPS * (x.double().abs() @ w.double().abs().T)
    assert got.shape == exact.shape and bool(((got.double() - exact).abs() <= bound).all()), \
        ((got.double() - exact).abs() / bound).max()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("M", [1, 2, 3, 5, 17, 100, 300])
@pytest.mark.parametrize("N,K", [(5, 64), (37, 256)])
def test_matches_the_dequantized_weight(fmt, M, N, K):
    w = packed(fmt, N, K, seed=N + K)
    x = rand(M, K, seed=M)
    got = linear(x, w)
    assert got.shape == (M, N) and got.dtype == torch.float32
    assert_rounding_close(got, x, w.dequantize())


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8-row", "int4-row", "int4-g32"])
@pytest.mark.parametrize("K", [14, 96, 100])
def test_padded_columns(fmt, K):
    """Columns that are no multiple of the kernel's step (8 float; 32 int8, 64 int4 with one group per row or, int4,
    groups of 32)."""
    w, x = packed(fmt, 6, K, seed=K), rand(5, K, seed=1)
    assert_rounding_close(linear(x, w), x, w.dequantize())
    assert_rounding_close(matmul_ref(x, w), x, w.dequantize())


@pytest.mark.parametrize("fmt", FORMATS)
def test_packing_keeps_the_weight(fmt):
    w = FORMATS[fmt](rand(3, 10, 64, seed=2))
    p = PackedWeight.pack(w)
    assert p.shape == (3, 10, 64) and p.format == fmt.split("-")[0]
    want = w.float() if isinstance(w, torch.Tensor) else w.dequantize()
    assert torch.equal(p.dequantize(), want)
    assert p[1].data.data_ptr() == p.data[1].data_ptr() and torch.equal(p[1].dequantize(), want[1])
    expected = {"fp32": 4 * 12 * 64, "bf16": 2 * 12 * 64, "int8": 12 * 64, "int4": 12 * 32}[p.format] * 3
    assert p.data.numel() * p.data.element_size() == expected  # the padded weight at its bit width, no more
    groups_ = 0 if p.scales is None else 3 * 12 * 64 // p.group
    assert p.nbytes == expected + groups_ * (4 + (p.zeros is not None))


@pytest.mark.parametrize("fmt", FORMATS)
def test_rows_do_not_depend_on_the_batch(fmt):
    """A row's product is bit for bit the same alone (the few-row path) as inside M rows (the many-row tiles, at
    every position in a tile), whatever the other rows hold."""
    w = packed(fmt, 37, 128, seed=3)
    x = rand(100, 128, seed=4)
    rows = [0, 1, 2, 3, 4, 16, 50, 98, 99]  # each position in a 3-row tile, the last rows of short tiles
    alone = {i: linear(x[i:i + 1], w) for i in rows}
    for M in (2, 3, 17, 100):
        together = linear(x[:M], w)
        assert all(torch.equal(together[i:i + 1], alone[i]) for i in rows if i < M), M
    other = torch.cat([x[:1], rand(16, 128, seed=5) * 100])
    assert torch.equal(linear(other, w)[:1], alone[0])


@pytest.mark.parametrize("fmt", FORMATS)
def test_expert_slices_leading_dims_and_dtypes(fmt):
    w = packed(fmt, 8, 64, seed=6, lead=(3,))
    x = rand(2, 4, 64, seed=7).bfloat16()
    for e in range(3):
        got = linear(x, w[e], bias=torch.ones(8))
        assert got.shape == (2, 4, 8) and got.dtype == torch.bfloat16
        ref = F.linear(x.float(), w[e].dequantize(), torch.ones(8)).bfloat16()
        torch.testing.assert_close(got.float(), ref.float(), atol=1e-2, rtol=1e-2)  # one bf16 rounding


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("T", [1, 3, 17])
def test_experts_match_the_reference(fmt, T):
    E, H, inter, k = 5, 64, 64, 2
    gate_up, down = packed(fmt, 2 * inter, H, seed=8, lead=(E,)), packed(fmt, H, inter, seed=9, lead=(E,))
    x = rand(T, H, seed=T)
    ids = torch.stack([torch.randperm(E - 1, generator=torch.Generator().manual_seed(t))[:k] for t in range(T)])
    weights = rand(T, k, seed=10).softmax(-1)
    got = experts(x, weights, ids, gate_up, down)
    exact = experts_reference(x.double(), weights.double(), ids, gate_up.dequantize(torch.float64),
                              down.dequantize(torch.float64))
    for y in (got, experts_ref(x, weights, ids, gate_up, down)):
        torch.testing.assert_close(y.double(), exact, atol=64 * EPS * exact.abs().max(), rtol=0)
    for t in range(T):  # a token's result does not depend on the batch
        assert torch.equal(experts(x[t:t + 1], weights[t:t + 1], ids[t:t + 1], gate_up, down), got[t:t + 1])


@pytest.mark.parametrize("fmt", FORMATS)
def test_embedding_rows_from_a_packed_head(fmt):
    w = packed(fmt, 37, 64, seed=11)
    ids = torch.tensor([[0, 36, 5], [4, 4, 3]])
    assert torch.equal(w.rows(ids), w.dequantize()[ids])


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="groups of 16 columns"):
        PackedWeight.pack(quantize(rand(8, 64, seed=0), 4, 16))
    with pytest.raises(ValueError, match=r"rows of 288 columns \(not a multiple of 64\) need groups of 32"):
        PackedWeight.pack(quantize(rand(8, 288, seed=0), 4, 96))
    assert PackedWeight.pack(quantize(rand(8, 288, seed=0), 4, 32)).dequantize().shape == (8, 288)
    with pytest.raises(ValueError, match="torch.int64"):
        PackedWeight.pack(torch.ones(4, 8, dtype=torch.int64))
    w = packed("int8-g32", 8, 64)
    with pytest.raises(ValueError, match=r"input of shape \[3, 32\]"):
        linear(rand(3, 32, seed=0), w)
    assert PackedWeight.pack(rand(4, 8, seed=0).half()).format == "fp32"
    q = quantize(rand(8, 64, seed=0), 8, 32)
    q.q[3, 5] = -128
    with pytest.raises(ValueError, match=r"holds -128; int8 weights must lie in \[-127, 127\]"):
        PackedWeight.pack(q)


QUANTIZED = [f for f in FORMATS if f.startswith("int")]


def rounded(x):
    """x [M, K] rounded as quantize_inputs does, by its formula: per 32 columns s = max|x| / 127, q = round(x / s)"""
    xb = x.float().unflatten(-1, (-1, 32))
    s = xb.abs().amax(-1) / 127
    q = torch.where(s[..., None] > 0, torch.round(xb / s[..., None]), 0).clamp(-127, 127)
    return q.to(torch.int8).flatten(-2), s


def test_input_rounding_matches_its_formula():
    x = rand(7, 256, seed=0) * torch.logspace(-30, 30, 7)[:, None]
    x[1, 32:64] = 0  # a zero block: scale 0, q 0
    x[2, :32] = torch.arange(32) - 15.5  # ties
    x[3, 64:96] = 1e-42  # denormals
    q, s = quantize_activations(x)
    want_q, want_s = rounded(x)
    assert torch.equal(s, want_s) and torch.equal(q, want_q)
    assert s[1, 1] == 0 and (q[1, 32:64] == 0).all() and q.abs().max() == 127


@pytest.mark.parametrize("M", [1, 3, 17, 100, 300])
@pytest.mark.parametrize("fmt,N,K", [(fmt, 37, 256) for fmt in QUANTIZED] +  # K = 96: the groups that divide it
                         [(fmt, 6, 96) for fmt in QUANTIZED if fmt in ("int8-g32", "int8-row", "int4-g32", "int4-row")])
def test_q8in_matches_the_rounded_inputs(fmt, M, N, K):
    w = packed(fmt, N, K, seed=N + K)
    x = rand(M, K, seed=M)
    got = linear(x, w, quantize_inputs=True)
    assert got.shape == (M, N) and got.dtype == torch.float32
    kp = w._padded[1]
    q, s = rounded(F.pad(x, (0, kp - K)))
    xr = (q.double().unflatten(-1, (-1, 32)) * s.double()[..., None]).flatten(-2)[:, :K]
    assert_rounding_close(got, xr, w.dequantize(torch.float64))
    assert torch.equal(matmul_ref_q8in(x, w), (xr @ w.dequantize(torch.float64).T).float())


@pytest.mark.parametrize("fmt", QUANTIZED)
def test_q8in_rows_do_not_depend_on_the_batch(fmt):
    w = packed(fmt, 37, 128, seed=3)
    x = rand(100, 128, seed=4)
    rows = [0, 1, 2, 3, 4, 16, 50, 98, 99]
    alone = {i: linear(x[i:i + 1], w, quantize_inputs=True) for i in rows}
    for M in (2, 3, 17, 100):
        together = linear(x[:M], w, quantize_inputs=True)
        assert all(torch.equal(together[i:i + 1], alone[i]) for i in rows if i < M), M
    other = torch.cat([x[:1], rand(16, 128, seed=5) * 100])
    assert torch.equal(linear(other, w, quantize_inputs=True)[:1], alone[0])


@pytest.mark.parametrize("fmt", ["fp32", "bf16"])
def test_q8in_float_weights_take_the_plain_path(fmt):
    w, x = packed(fmt, 37, 128, seed=3), rand(17, 128, seed=4)
    assert torch.equal(linear(x, w, quantize_inputs=True), linear(x, w))


def q8in_experts_exact(x, weights, ids, gate_up, down):
    """experts with the inputs of both matmuls rounded as the kernel does, in float64 (the SwiGLU output rounded
    to fp32 before its own rounding, as the kernel holds it)"""
    gu, dn = gate_up.dequantize(torch.float64), down.dequantize(torch.float64)
    inter = dn.shape[-1]

    def r(v):
        q, s = rounded(v.float())
        return (q.double().unflatten(-1, (-1, 32)) * s.double()[..., None]).flatten(-2)

    xr, out = r(x), torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            h = xr[t] @ gu[ids[t, j]].T
            a = F.silu(h[:inter]) * h[inter:]
            out[t] += weights[t, j].double() * (r(a[None])[0] @ dn[ids[t, j]].T)
    return out


@pytest.mark.parametrize("fmt", QUANTIZED + ["bf16"])
@pytest.mark.parametrize("T", [1, 17])
def test_q8in_experts_match_the_reference(fmt, T):
    E, H, inter, k = 5, 64, 64, 2
    gate_up, down = packed(fmt, 2 * inter, H, seed=8, lead=(E,)), packed(fmt, H, inter, seed=9, lead=(E,))
    x = rand(T, H, seed=T)
    ids = torch.stack([torch.randperm(E - 1, generator=torch.Generator().manual_seed(t))[:k] for t in range(T)])
    weights = rand(T, k, seed=10).softmax(-1)
    got = experts(x, weights, ids, gate_up, down, quantize_inputs=True)
    if fmt == "bf16":
        assert torch.equal(got, experts(x, weights, ids, gate_up, down))
        return
    exact = q8in_experts_exact(x, weights, ids, gate_up, down)
    torch.testing.assert_close(got.double(), exact, atol=64 * EPS * exact.abs().max(), rtol=0)
    for t in range(T):  # a token's result does not depend on the batch
        one = experts(x[t:t + 1], weights[t:t + 1], ids[t:t + 1], gate_up, down, quantize_inputs=True)
        assert torch.equal(one, got[t:t + 1])
