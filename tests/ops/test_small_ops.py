"""Fast paths of the small ops against their references (and transformers' functions) on awkward shapes."""

import pytest
import torch

from qwen35.cache.hybrid import HybridCache  # noqa: F401  (import check: cache imports models cleanly)
from qwen35.ops.attention import attention_reference, gather_kv, varlen_attention, write_kv
from qwen35.ops.conv import causal_conv1d, causal_conv1d_reference
from qwen35.ops.moe import experts_grouped, experts_grouped_mm, experts_reference, route
from qwen35.ops.rope import apply_rotary, inv_freq, rope_cos_sin

LENS = {"single token": [1], "chunk edges": [63, 64, 65], "unequal": [1, 7, 200, 3], "many short": [1] * 9}


def cu(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist())


@pytest.mark.parametrize("lens", list(LENS.values()), ids=list(LENS))
@pytest.mark.parametrize("width", [2, 4])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero history", "with history"])
def test_conv_matches_reference(lens, width, with_state):
    g = torch.Generator().manual_seed(0)
    C = 12
    x = torch.randn(sum(lens), C, generator=g)
    w = torch.randn(C, width, generator=g)
    state = torch.randn(len(lens), C, width - 1, generator=g) if with_state else None
    y, s = causal_conv1d(x, w, cu(lens), state)
    y_ref, s_ref = causal_conv1d_reference(x, w, cu(lens), state)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(s, s_ref)


def test_conv_matches_transformers_and_continues():
    from transformers.models.qwen3_5.modeling_qwen3_5 import causal_conv1d_fn

    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 6, generator=g)
    w = torch.randn(6, 4, generator=g)
    ref = causal_conv1d_fn(x.t()[None], w, None, activation="silu")[0].t()
    y, _ = causal_conv1d(x, w, cu([50]))
    torch.testing.assert_close(y, ref)
    y1, s1 = causal_conv1d(x[:2], w, cu([2]))  # shorter than the kernel: history keeps zeros in front
    y2, _ = causal_conv1d(x[2:], w, cu([48]), s1)
    torch.testing.assert_close(torch.cat([y1, y2]), y)


@pytest.mark.parametrize("lens", [[1], [5, 17], [64, 1, 33]], ids=["one", "two", "three"])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 2), (3, 1)], ids=lambda h: f"q{h[0]}kv{h[1]}")
@pytest.mark.parametrize("past", [0, 5, 16], ids=lambda p: f"past{p}")
def test_paged_attention_matches_reference(lens, heads, past):
    g = torch.Generator().manual_seed(2)
    Hq, Hkv, D, bs = *heads, 8, 4
    N = sum(lens)
    q = torch.randn(N, Hq, D, generator=g)
    k, v = torch.randn(N, Hkv, D, generator=g), torch.randn(N, Hkv, D, generator=g)
    pk = [torch.randn(past, Hkv, D, generator=g) for _ in lens]
    pv = [torch.randn(past, Hkv, D, generator=g) for _ in lens]
    # scattered, out-of-order blocks per sequence
    nblocks = [-(-(past + n) // bs) for n in lens]
    perm = torch.randperm(sum(nblocks) + 3, generator=g).tolist()
    tables, at = [], 0
    for nb in nblocks:
        tables.append(perm[at:at + nb])
        at += nb
    k_cache = torch.zeros(len(perm), bs, Hkv, D)
    v_cache = torch.zeros_like(k_cache)
    slot_map, bounds = [], cu(lens).tolist()
    for s, n in enumerate(lens):
        past_slots = torch.tensor([tables[s][i // bs] * bs + i % bs for i in range(past)], dtype=torch.long)
        if past:
            write_kv(k_cache, v_cache, past_slots, pk[s], pv[s])
        slot_map += [tables[s][i // bs] * bs + i % bs for i in range(past, past + n)]
    write_kv(k_cache, v_cache, torch.tensor(slot_map), k, v)
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    ctx = torch.tensor([past + n for n in lens])
    out = varlen_attention(q, k, v, cu(lens), 0.3, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables,
                           context_lens=ctx)
    for s in range(len(lens)):
        a, b = bounds[s], bounds[s + 1]
        ks, vs = gather_kv(k_cache, v_cache, block_tables[s], past + lens[s])
        torch.testing.assert_close(ks, torch.cat([pk[s], k[a:b]]))
        ref = attention_reference(q[a:b], torch.cat([pk[s], k[a:b]]), torch.cat([pv[s], v[a:b]]), 0.3)
        torch.testing.assert_close(out[a:b], ref)
    if past == 0:  # cache-less path agrees
        torch.testing.assert_close(varlen_attention(q, k, v, cu(lens), 0.3), out)


@pytest.mark.parametrize("shape", [(1, 4, 1), (37, 8, 3), (200, 16, 4), (5, 3, 3)],
                         ids=lambda s: f"N{s[0]}E{s[1]}k{s[2]}")
def test_grouped_experts_match_reference(shape):
    N, E, k = shape
    g = torch.Generator().manual_seed(3)
    H, inter = 16, 24
    x = torch.randn(N, H, generator=g)
    router = torch.randn(E, H, generator=g)
    gate_up, down = torch.randn(E, 2 * inter, H, generator=g) / 4, torch.randn(E, H, inter, generator=g) / 5
    w, ids = route(x, router, k)
    torch.testing.assert_close(w.sum(-1), torch.ones(N))
    ref = experts_reference(x, w, ids, gate_up, down)
    torch.testing.assert_close(experts_grouped(x, w, ids, gate_up, down), ref)
    torch.testing.assert_close(experts_grouped_mm(x, w, ids, gate_up, down), ref)  # the GPU path, run on CPU


@pytest.mark.parametrize("first, num", [(0, 3), (3, 2), (5, 3)])
@pytest.mark.parametrize("fn", [experts_grouped, experts_grouped_mm])
def test_a_slice_of_the_experts_adds_only_its_own(fn, first, num):
    """Expert parallelism: weights of experts first..first+num only; the slices of all ranks add up to the whole."""
    g = torch.Generator().manual_seed(5)
    N, E, k, H, inter = 29, 8, 3, 16, 24
    x = torch.randn(N, H, generator=g)
    gate_up, down = torch.randn(E, 2 * inter, H, generator=g) / 4, torch.randn(E, H, inter, generator=g) / 5
    w, ids = route(x, torch.randn(E, H, generator=g), k)
    mine = (ids >= first) & (ids < first + num)
    want = experts_reference(x, w * mine, ids, gate_up, down)  # the others' choices weigh nothing
    got = fn(x, w, ids, gate_up[first:first + num], down[first:first + num], first)
    torch.testing.assert_close(got, want)
    parts = [fn(x, w, ids, gate_up[a:b], down[a:b], a) for a, b in ((0, 3), (3, 5), (5, 8))]
    torch.testing.assert_close(sum(parts), experts_reference(x, w, ids, gate_up, down))


def test_rope_text_positions_equal_mrope_with_equal_axes_and_match_transformers():
    from transformers.models.qwen3_5.modeling_qwen3_5 import apply_rotary_pos_emb

    g = torch.Generator().manual_seed(4)
    D, rd = 32, 8
    f = inv_freq(rd, 1e4)
    pos = torch.arange(3, 20)
    cos, sin = rope_cos_sin(pos, f, (2, 1, 1), torch.float32)
    cos3, sin3 = rope_cos_sin(pos.expand(3, -1), f, (2, 1, 1), torch.float32)
    torch.testing.assert_close((cos, sin), (cos3, sin3))
    x = torch.randn(len(pos), 2, D, generator=g)
    ours = apply_rotary(x, cos, sin)
    ref, _ = apply_rotary_pos_emb(x.transpose(0, 1)[None], x.transpose(0, 1)[None], cos[None], sin[None])
    torch.testing.assert_close(ours, ref[0].transpose(0, 1))
    assert torch.equal(ours[..., rd:], x[..., rd:])


def test_mrope_axes_are_interleaved():
    f = inv_freq(64, 1e7)
    pos = torch.stack([torch.tensor([5]), torch.tensor([7]), torch.tensor([9])])
    cos, _ = rope_cos_sin(pos, f, (11, 11, 10), torch.float64)
    half = cos[0, :32]
    for j in range(32):
        axis = 1 if j % 3 == 1 and j < 33 else 2 if j % 3 == 2 and j < 30 else 0
        assert torch.isclose(half[j], torch.cos(pos[axis, 0].double() * f[j].double()), atol=1e-6)
