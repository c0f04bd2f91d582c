"""The packed CPU linear (native kernel for few rows, unpack + sgemm for many) against F.linear, on awkward shapes:
row counts on both sides of the kernel's 2-row and 6-row blocks and of SMALL_M, sizes that need padding, 3D inputs,
bias, expert slices, and embedding rows read from a packed head."""

import pytest
import torch
import torch.nn.functional as F

from qwen35.ops import linear as L
from qwen35.ops.linear import Packed, linear

pytestmark = pytest.mark.skipif(not L.native_available(), reason="native kernels unavailable (no C compiler/AVX2)")


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 2, 3, 5, 6, 7, 12, 13, 16, 17, 40])
@pytest.mark.parametrize("N,K", [(1, 8), (4, 64), (5, 13), (37, 100), (64, 256)])
def test_matches_reference(dtype, M, N, K):
    x, w = rand(M, K, seed=M), rand(N, K, seed=N + K, dtype=dtype)
    ref = F.linear(x, w.float())
    got = linear(x, Packed(w))
    assert got.shape == (M, N) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=1e-5 * K ** 0.5, rtol=1e-5)


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


@pytest.mark.parametrize("kind", ["moe_vl", "dense"])
def test_packed_model_matches_unpacked(checkpoint, kind):
    """A whole tiny model in bf16 (MoE; dense with a tied head the embedding then reads from the packed copy):
    packing changes where fp32 sums happen, not the result beyond bf16 rounding."""
    from qwen35.models.batch import ForwardBatch, SeqChunk
    from qwen35.models.loader import load_model

    path, _ = checkpoint(kind)
    plain = load_model(path, dtype="bfloat16", pack=False)[0]
    packed = load_model(path, dtype="bfloat16", pack=True)[0]
    assert isinstance(packed.lm_head.weight, Packed)
    if kind == "dense":
        assert packed.model.embed_tokens.weight is packed.lm_head.weight
    else:
        assert isinstance(packed.model.layers[0].mlp.experts.gate_up_proj, Packed)
    ids = torch.randint(0, 150, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    outs = []
    for model in (plain, packed):
        for chunks in ([SeqChunk(ids, want_logits="all")], [SeqChunk(ids[:1], want_logits="all")]):
            batch = ForwardBatch.build(chunks)
            with torch.no_grad():
                outs.append(model.compute_logits(model(batch.input_ids, batch)[batch.logits_indices]).float())
    full_diff = (outs[0] - outs[2]).abs().mean() / outs[0].abs().mean()
    one_diff = (outs[1] - outs[3]).abs().mean() / outs[1].abs().mean()
    assert full_diff < 0.02 and one_diff < 0.02, (full_diff, one_diff)
