"""The CPU backend's decode layers (backends/cpu/layers.py, csrc/layers.c: residual add + norm + mixer or FFN in one
call on a layer struct) and the native prefill conv against the PyTorch layers they stand in for, on awkward shapes:
scattered cache slots, fresh and carried states, NaN in slots and blocks nobody owns, bf16 and fp32 caches, head
ratios, contexts crossing block boundaries. Given the same inputs, what they write to bf16 caches must round exactly
as the backend's PyTorch path does."""

from types import SimpleNamespace

import pytest
import torch

from qwen35.config import TextConfig
from qwen35.models.batch import ForwardBatch, SeqChunk
from qwen35.backends.cpu import decoder as backend
from qwen35.backends.cpu import layers as L
from qwen35.backends.cpu import library
from qwen35.backends.cpu.layers import add_rms_norm
from qwen35.layers.norm import RMSNorm
from qwen35.ops.conv import causal_conv1d
from qwen35.ops.norms import rms_norm
from tests.tiny_models import BASE, MOE

pytestmark = pytest.mark.skipif(not library.available(), reason="native kernels unavailable (no C compiler/AVX2)")


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def config(**overrides) -> TextConfig:
    d = {**BASE, **MOE, "model_type": "qwen3_5_moe_text", **overrides}
    return TextConfig.from_hf(d, "qwen3_5_moe_text")


def randomize(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = 0.5 if "norm" in name or "conv" in name else p.shape[-1] ** -0.5
            p.copy_(torch.randn(p.shape, generator=g) * scale)
            if name.endswith("A_log"):
                p.copy_(torch.empty(p.shape).uniform_(0.05, 2.0, generator=g).log())


def packed(kind, module, norm, dtype):
    """(the backend's layer over a copy of module in `dtype`, the reference: the same weights in fp32, run on fp32
    activations as the backend runs them). Packing releases the packed copy's matrices."""
    import copy

    ref = copy.deepcopy(module).to(dtype)
    return kind(copy.deepcopy(ref), norm), ref.float()


def run(fn, layer, cache, batch, h, y_prev, cos=None, sin=None):
    st, keep = L.step(batch, batch_block_size(batch), cos, sin)
    return L.run(fn, layer.struct(cache), st, h, y_prev)


def batch_block_size(batch):
    return 4


def residual(H, S, seed):
    """(h, y_prev, norm, reference input): the native layer gets h and y_prev, the PyTorch layer norm(h + y_prev).
    The reference input is normalised by the native norm (checked against PyTorch's in test_add_rms_norm) so both
    paths see bit-identical inputs and bf16 cache writes can be compared exactly."""
    h, y_prev = rand(S, H, seed=seed), rand(S, H, seed=seed + 1)
    norm = RMSNorm(H, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(rand(H, seed=seed + 2) * 0.2)
    return h, y_prev, norm, add_rms_norm(h, y_prev, 1.0 + norm.weight.float(), norm.eps)[1]


def check_residual(h, ref_h):
    assert torch.equal(h, ref_h)  # y_prev added in place


def decode_batch(num_past: list[int], slots: list[int], block_ids: list[list[int]], block_size=4, positions=None):
    chunks = [SeqChunk([1], num_past=p, state_slot=s, block_ids=b, positions=None if positions is None else pos)
              for p, s, b, pos in zip(num_past, slots, block_ids, positions or [None] * len(num_past))]
    return ForwardBatch.build(chunks, block_size)


@pytest.mark.parametrize("M,H", [(1, 24), (3, 1024), (5, 36)])
def test_add_rms_norm(M, H):
    h, y, w = rand(M, H, seed=1), rand(M, H, seed=2), rand(H, seed=3) * 0.3
    h_out, a = add_rms_norm(h, y, 1.0 + w, 1e-6)
    torch.testing.assert_close(h_out, h + y, rtol=0, atol=0)
    torch.testing.assert_close(a, rms_norm(h + y, w, 1e-6), rtol=1e-6, atol=1e-6)
    h_out, a = add_rms_norm(h, None, 1.0 + w, 1e-6)
    torch.testing.assert_close(a, rms_norm(h, w, 1e-6), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("C,Kw,lengths,with_state", [
    (20, 4, [1, 5, 2, 9], True), (20, 4, [1, 5, 2, 9], False), (13, 3, [3, 1, 1], True), (8, 2, [4], False),
    (96, 4, [70], True),
])
def test_causal_conv_native(C, Kw, lengths, with_state):
    N = sum(lengths)
    cu = torch.tensor([0, *lengths]).cumsum(0)
    x, w = rand(N, C, seed=C), rand(C, Kw, seed=Kw)
    state = rand(len(lengths), C, Kw - 1, seed=7) if with_state else None
    y_ref, s_ref = causal_conv1d(x, w, cu, state)
    y, s = L.causal_conv1d(x, w, cu, state)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(s, s_ref)


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("heads", [(2, 4, 16, 24), (2, 2, 16, 8), (1, 4, 8, 40)])
def test_gdn_step_matches_layer(cache_dtype, heads):
    """The fused Gated DeltaNet half against the layer's PyTorch decode step."""
    from qwen35.models.qwen3_5 import GatedDeltaNet

    Hk, Hv, K, V = heads
    cfg = config(linear_num_key_heads=Hk, linear_num_value_heads=Hv, linear_key_head_dim=K, linear_value_head_dim=V)
    layer = GatedDeltaNet(cfg, 0)
    randomize(layer, seed=Hv + K)
    S, num_slots = 3, 5
    slots, has = [3, 0, 4], [True, False, True]
    batch = decode_batch([5 if h else 0 for h in has], slots, [[0, 1]] * S)
    conv = rand(num_slots, cfg.conv_dim, 3, seed=8).to(cache_dtype)
    ssm = rand(num_slots, Hv, K, V, seed=9) * 0.3
    conv[1], ssm[1] = float("nan"), float("nan")  # nobody's slot
    conv[0], ssm[0] = float("nan"), float("nan")  # a fresh sequence's slot must not be read
    ref_cache = SimpleNamespace(conv={0: conv.clone()}, ssm={0: ssm.clone()})
    nat_cache = SimpleNamespace(conv={0: conv.clone()}, ssm={0: ssm.clone()})
    py_cache = SimpleNamespace(conv={0: conv.clone()}, ssm={0: ssm.clone()})
    h, y_prev, norm, x = residual(cfg.hidden_size, S, seed=10)
    nat, layer = packed(backend._GatedDeltaNet, layer, norm, cache_dtype)
    assert nat.fused(cfg.hidden_size)
    ref_h = h + y_prev
    with torch.no_grad():
        ref = layer(x, batch, ref_cache)
        got = run(L.gdn_layer(), nat, nat_cache, batch, h, y_prev)
        nat(x, None, None, batch, py_cache)  # the backend's PyTorch path: the same packed projections
    check_residual(h, ref_h)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    used = torch.tensor(slots)
    assert torch.equal(nat_cache.conv[0][used], py_cache.conv[0][used])  # same rounding of the same inputs
    torch.testing.assert_close(nat_cache.conv[0][used].float(), ref_cache.conv[0][used].float(),
                               rtol=2**-7 if cache_dtype == torch.bfloat16 else 1e-5, atol=1e-6)
    torch.testing.assert_close(nat_cache.ssm[0][used], ref_cache.ssm[0][used], rtol=1e-5, atol=1e-5)
    assert nat_cache.conv[0][1].isnan().all() and nat_cache.ssm[0][1].isnan().all()


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("Hq,Hkv", [(4, 2), (4, 4), (6, 1)])
def test_attn_decode_matches_layer(cache_dtype, Hq, Hkv):
    """The fused attention half against the layer's PyTorch path over a paged cache: contexts of 1, 4 (a block
    boundary) and 11 tokens through scattered blocks, M-RoPE positions, NaN in blocks nobody owns."""
    from qwen35.models.qwen3_5 import Attention
    from qwen35.ops.rope import inv_freq, rope_cos_sin

    cfg = config(num_attention_heads=Hq, num_key_value_heads=Hkv)
    layer = Attention(cfg, 0)
    randomize(layer, seed=Hq * 10 + Hkv)
    bs, D = 4, cfg.head_dim
    k = (rand(9, bs, Hkv, D, seed=1)).to(cache_dtype)
    v = (rand(9, bs, Hkv, D, seed=2)).to(cache_dtype)
    k[5], v[5] = float("nan"), float("nan")
    num_past, tables = [0, 3, 10], [[7], [2], [8, 0, 3]]
    positions = [torch.tensor([[0], [0], [0]]), torch.tensor([[3], [5], [2]]), torch.tensor([[10], [10], [10]])]
    batch = decode_batch(num_past, [0, 1, 2], tables, bs, positions)
    cos, sin = rope_cos_sin(batch.positions, inv_freq(cfg.rotary_dim, cfg.rope_theta), cfg.mrope_section,
                            torch.float32)
    ref_cache = SimpleNamespace(k={0: k.clone()}, v={0: v.clone()})
    nat_cache = SimpleNamespace(k={0: k.clone()}, v={0: v.clone()})
    h, y_prev, norm, x = residual(cfg.hidden_size, 3, seed=3)
    nat, layer = packed(backend._Attention, layer, norm, cache_dtype)
    assert nat.fused(cfg.hidden_size)
    ref_h = h + y_prev
    with torch.no_grad():
        ref = layer(x, cos, sin, batch, ref_cache)
        got = run(L.attn_layer(), nat, nat_cache, batch, h, y_prev, cos, sin)
    check_residual(h, ref_h)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    check_new_kv(nat_cache, ref_cache, cache_dtype)


def check_new_kv(nat_cache, ref_cache, cache_dtype) -> list[torch.Tensor]:
    """The new K/V entries: equal up to a rare last-bit flip of the same fp32 value. Returns the native K and V."""
    out = []
    for name in ("k", "v"):
        a, b = getattr(nat_cache, name)[0].float(), getattr(ref_cache, name)[0].float()
        torch.testing.assert_close(a, b, rtol=2**-7 if cache_dtype == torch.bfloat16 else 1e-5, atol=1e-6,
                                   equal_nan=True)
        out.append(a)
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("N", [1, 2, 5, 16])
@pytest.mark.parametrize("renormalize", [True, False])
def test_moe_block_matches_layer(dtype, N, renormalize):
    from qwen35.layers.mlp import SparseMoeBlock

    block = SparseMoeBlock(64, 8, 3, 40, 48, renormalize=renormalize)
    randomize(block, seed=N)
    with torch.no_grad():
        block.experts.gate_up_proj.copy_(rand(8, 80, 64, seed=4) / 8)
        block.experts.down_proj.copy_(rand(8, 64, 40, seed=5) / 6)
    h, y_prev, norm, x = residual(64, N, seed=6)
    nat, block = packed(backend._SparseMoe, block, norm, dtype)
    assert nat.fused(64)
    ref_h = h + y_prev
    with torch.no_grad():
        ref = block(x)
        got = run(L.moe_layer(), nat, None, decode_batch([1] * N, list(range(N)), [[0]] * N), h, y_prev)
    check_residual(h, ref_h)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_moe_layer_takes_nan_rows():
    """A NaN hidden state (a NaN weight, a stale state read by mistake) makes NaN routing probabilities: the router
    then takes unchosen experts as torch.topk takes NaN, instead of expert id -1 (which wrote past the weights and
    corrupted the heap)."""
    from qwen35.layers.mlp import SparseMoeBlock

    block = SparseMoeBlock(64, 8, 3, 40, 48)
    randomize(block, seed=1)
    h, y_prev, norm, _ = residual(64, 2, seed=6)
    h[1] = float("nan")
    nat, block = packed(backend._SparseMoe, block, norm, torch.float32)
    got = run(L.moe_layer(), nat, None, decode_batch([1, 1], [0, 1], [[0], [0]]), h, y_prev)
    assert got[1].isnan().all() and not got[0].isnan().any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("N", [1, 3])
def test_mlp_layer_matches_module(dtype, N):
    from qwen35.layers.mlp import MLP

    mlp = MLP(64, 40)
    randomize(mlp, seed=N)
    h, _, norm, _ = residual(64, N, seed=8)
    nat, mlp = packed(backend._Mlp, mlp, norm, dtype)
    assert nat.fused(64)
    with torch.no_grad():  # no residual to add: the first half of a step
        got = run(L.mlp_layer(), nat, None, decode_batch([1] * N, list(range(N)), [[0]] * N), h, None)
        ref = mlp(add_rms_norm(h, None, 1.0 + norm.weight.float(), norm.eps)[1])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
