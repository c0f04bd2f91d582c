"""The packed CPU linear (the native kernel at every row count) against F.linear, on awkward shapes: row counts on
both sides of the kernel's 2-row path, its 3-row tiles and its 96-row tiles, sizes that need padding, 3D inputs,
bias, expert slices, and embedding rows read from a packed head; and the same row gives the same bits at every
row count."""

import pytest
import torch
import torch.nn.functional as F

from qwen35.backends.cpu import packed as L
from qwen35.backends.cpu.packed import Packed, linear

pytestmark = pytest.mark.skipif(not L.native_available(), reason="native kernels unavailable (no C compiler/AVX2)")


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 2, 3, 5, 6, 7, 12, 13, 16, 17, 40, 95, 96, 97, 200])
@pytest.mark.parametrize("N,K", [(1, 8), (4, 64), (5, 13), (37, 100), (64, 256)])
def test_matches_reference(dtype, M, N, K):
    x, w = rand(M, K, seed=M), rand(N, K, seed=N + K, dtype=dtype)
    ref = F.linear(x, w.float())
    got = linear(x, Packed(w))
    assert got.shape == (M, N) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=1e-5 * K ** 0.5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", [2, 3, 4, 5, 95, 96, 97, 200])
def test_rows_do_not_depend_on_the_batch(dtype, M):
    """Batch invariance: a row's product is bit for bit the same alone (the kernel's few-row path) as inside M
    rows (its many-row tiles, at every position in a tile), so greedy decoding does not depend on the batch."""
    x, w = rand(M, 100, seed=M), Packed(rand(37, 100, seed=1, dtype=dtype))
    together = linear(x, w)
    for i in range(M):
        assert torch.equal(linear(x[i:i + 1], w), together[i:i + 1]), i


def test_input_dtype_leading_dims_and_bias():
    x, w, b = rand(2, 3, 24, dtype=torch.bfloat16), rand(10, 24, seed=1, dtype=torch.bfloat16), rand(10, seed=2)
    got = linear(x, Packed(w), b)
    ref = F.linear(x.float(), w.float(), b).to(torch.bfloat16)
    assert got.shape == (2, 3, 10) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref.float(), atol=1e-2, rtol=1e-2)  # one bf16 rounding of the output


def test_expert_slices_and_unpack():
    w = rand(5, 12, 40, dtype=torch.bfloat16)
    p = Packed(w)
    assert p.shape == (5, 12, 40) and torch.equal(p.unpack(), w)
    x = rand(3, 40, seed=3)
    for e in range(5):
        torch.testing.assert_close(linear(x, p[e]), F.linear(x, w[e].float()), atol=1e-4, rtol=1e-5)


def test_embedding_rows_from_a_packed_head():
    w = rand(37, 21)
    ids = torch.tensor([[0, 36, 5], [4, 4, 3]])
    assert torch.equal(Packed(w).rows(ids), w[ids])
