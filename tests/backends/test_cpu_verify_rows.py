"""The CPU backend's fused decode layers on speculative (verify) batches: a few new rows per sequence, run one after
another through the Gated DeltaNet state, the state after some of them copied into other slots (a request's ring,
`SeqChunk.snapshots`), each row attending as its own pseudo-sequence. Against the reference model on the same
ForwardBatch and a copy of the cache: hidden states, the K/V written, the conv and recurrent state in every slot
written; `fits_step` refusing what the fused layers cannot run (the decoder then takes the unfused path); and the MTP
head on packed weights (`CpuDecoder.mtp`) against `models.mtp.MTP`."""

import copy
from types import SimpleNamespace

import pytest
import torch

from qwen35.backends.cpu import CpuDecoder, library
from qwen35.backends.cpu import decoder as backend
from qwen35.backends.cpu import layers as L
from qwen35.cache.hybrid import HybridCache
from qwen35.models.batch import ForwardBatch, SeqChunk
from qwen35.models.loader import load_model
from qwen35.models.qwen3_5 import Attention, GatedDeltaNet
from qwen35.ops.rope import inv_freq, rope_cos_sin
from tests.backends.test_cpu_layers import check_new_kv, check_residual, config, packed, rand, randomize, residual
from tests.test_mtp import with_mtp

pytestmark = pytest.mark.skipif(not library.available(), reason="native kernels unavailable (no C compiler/AVX2)")

BS = 4  # K/V block size: contexts cross block boundaries
# (new rows, past tokens, ring copies: the state after j of the new rows). Lengths 1..9 mixed, fresh and carried
# sequences; rows without a copy between rows with one (the state flows on through the sequence's own slot); a
# fresh sequence whose first state goes to the ring.
SEQS = [(3, 5, [1, 2]), (1, 0, []), (9, 6, [1, 4, 8]), (2, 0, [1]), (5, 11, [1, 3]), (1, 3, []), (4, 0, [2, 3])]


def layout(seqs, seed, block_size=BS):
    """Scattered state slots, ring slots and shuffled K/V blocks for `seqs`; slots 0 and 1, block 0 and the last
    block belong to nobody. Returns (one dict per sequence: its sizes, slot, blocks, snapshots; num_slots,
    num_blocks)."""
    g = torch.Generator().manual_seed(seed)
    nslots = 2 + len(seqs) + sum(len(r) for _, _, r in seqs)
    nblocks = 2 + sum(-(-(n + p) // block_size) for n, p, _ in seqs)
    slot_order = (torch.randperm(nslots - 2, generator=g) + 2).tolist()  # slots 0, 1 unused
    block_order = (torch.randperm(nblocks - 2, generator=g) + 1).tolist()  # blocks 0, last unused
    out = []
    for n, p, ring in seqs:
        slot = slot_order.pop()
        blocks = [block_order.pop() for _ in range(-(-(n + p) // block_size))]
        out.append(dict(n=n, past=p, slot=slot, blocks=blocks, snapshots=[(j, slot_order.pop()) for j in ring]))
    return out, nslots, nblocks


def verify_batch(lay, tokens, block_size=BS):
    return ForwardBatch.build([SeqChunk(t[s["past"]:], num_past=s["past"], state_slot=s["slot"], block_ids=s["blocks"],
                                        want_logits="all", snapshots=s["snapshots"] or None)
                               for s, t in zip(lay, tokens)], block_size)


def written_slots(lay):
    return [s["slot"] for s in lay] + [to for s in lay for _, to in s["snapshots"]]


# ---- one layer half, bit-identical inputs (as tests/backends/test_cpu_layers.py) ----

@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("heads", [(2, 4, 16, 24), (1, 4, 8, 40), (2, 2, 16, 8)])
def test_gdn_rows_match_layer(cache_dtype, heads):
    """The fused Gated DeltaNet half over several rows per sequence with ring copies, against the layer's PyTorch
    forward (the delta rule capturing the states inside each sequence): output, and conv history + recurrent state in
    each sequence's slot and each ring slot; slots nobody owns, and fresh sequences' stale slots, hold NaN that must
    never be read."""
    Hk, Hv, K, V = heads
    cfg = config(linear_num_key_heads=Hk, linear_num_value_heads=Hv, linear_key_head_dim=K, linear_value_head_dim=V)
    layer = GatedDeltaNet(cfg, 0)
    randomize(layer, seed=Hv + K + 1)
    lay, nslots, _ = layout(SEQS, seed=Hv)
    batch = ForwardBatch.build([SeqChunk([1] * s["n"], num_past=s["past"], state_slot=s["slot"], block_ids=[0] * 9,
                                         snapshots=s["snapshots"] or None) for s in lay], BS)
    assert L.fits_step(batch) and batch.input_ids.shape[0] == sum(n for n, _, _ in SEQS)
    conv = rand(nslots, cfg.conv_dim, 3, seed=8).to(cache_dtype)
    ssm = rand(nslots, Hv, K, V, seed=9) * 0.3
    carried = [s["slot"] for s in lay if s["past"]]
    for slot in range(nslots):
        if slot not in carried:  # nobody's, a fresh sequence's or a ring slot: never read
            conv[slot], ssm[slot] = float("nan"), float("nan")
    caches = [SimpleNamespace(conv={0: conv.clone()}, ssm={0: ssm.clone()}) for _ in range(3)]
    N = batch.input_ids.shape[0]
    h, y_prev, norm, x = residual(cfg.hidden_size, N, seed=10)
    nat, layer = packed(backend._GatedDeltaNet, layer, norm, cache_dtype)
    ref_h = h + y_prev
    with torch.no_grad():
        ref = layer(x, batch, caches[0])
        st, keep = L.step(batch, BS)
        got = L.run(L.gdn_layer(), nat.struct(caches[1]), st, h, y_prev)
        nat(x, None, None, batch, caches[2])  # the backend's PyTorch path: the same packed projections
    check_residual(h, ref_h)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    ref_c, nat_c, py_c = caches
    used = torch.tensor(written_slots(lay))
    assert torch.equal(nat_c.conv[0][used], py_c.conv[0][used])  # same rounding of the same inputs
    torch.testing.assert_close(nat_c.conv[0][used].float(), ref_c.conv[0][used].float(),
                               rtol=2**-7 if cache_dtype == torch.bfloat16 else 1e-5, atol=1e-6)
    torch.testing.assert_close(nat_c.ssm[0][used], ref_c.ssm[0][used], rtol=1e-5, atol=1e-5)
    for slot in sorted(set(range(nslots)) - set(used.tolist())):
        assert nat_c.conv[0][slot].isnan().all() and nat_c.ssm[0][slot].isnan().all(), slot


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("Hq,Hkv", [(4, 2), (6, 1)])
def test_attn_rows_match_layer(cache_dtype, Hq, Hkv):
    """The fused attention half over several rows per sequence (each row attends to its sequence's blocks up to its
    own position, the rows after it not yet visible) against the layer's PyTorch path: shuffled blocks, contexts
    across block boundaries, M-RoPE positions, NaN in blocks nobody owns and beyond each sequence's rows."""
    cfg = config(num_attention_heads=Hq, num_key_value_heads=Hkv)
    layer = Attention(cfg, 0)
    randomize(layer, seed=Hq * 10 + Hkv)
    lay, _, nblocks = layout(SEQS, seed=Hq)
    D = cfg.head_dim
    k, v = rand(nblocks, BS, Hkv, D, seed=1).to(cache_dtype), rand(nblocks, BS, Hkv, D, seed=2).to(cache_dtype)
    for s in lay:  # only the past positions of each sequence hold K/V: the rest must be written before it is read
        for i in range(s["past"], len(s["blocks"]) * BS):
            k[s["blocks"][i // BS], i % BS], v[s["blocks"][i // BS], i % BS] = float("nan"), float("nan")
    owned = {b for s in lay for b in s["blocks"]}
    for b in set(range(nblocks)) - owned:
        k[b], v[b] = float("nan"), float("nan")
    g = torch.Generator().manual_seed(5)
    chunks = [SeqChunk([1] * s["n"], num_past=s["past"], state_slot=s["slot"], block_ids=s["blocks"],
                       positions=torch.randint(0, 40, (3, s["n"]), generator=g)) for s in lay]
    batch = ForwardBatch.build(chunks, BS)
    cos, sin = rope_cos_sin(batch.positions, inv_freq(cfg.rotary_dim, cfg.rope_theta), cfg.mrope_section,
                            torch.float32)
    ref_cache = SimpleNamespace(k={0: k.clone()}, v={0: v.clone()})
    nat_cache = SimpleNamespace(k={0: k.clone()}, v={0: v.clone()})
    N = batch.input_ids.shape[0]
    h, y_prev, norm, x = residual(cfg.hidden_size, N, seed=3)
    nat, layer = packed(backend._Attention, layer, norm, cache_dtype)
    ref_h = h + y_prev
    with torch.no_grad():
        ref = layer(x, cos, sin, batch, ref_cache)
        st, keep = L.step(batch, BS, cos, sin)
        got = L.run(L.attn_layer(), nat.struct(nat_cache), st, h, y_prev)
    check_residual(h, ref_h)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for a in check_new_kv(nat_cache, ref_cache, cache_dtype):  # every row's entry written
        assert not a.flatten(0, 1)[batch.slot_mapping].isnan().any()


# ---- whole models: the decoder against the reference model on the same batch and a copy of the cache ----

def poisoned(model, nslots, nblocks, cache_dtype, mtp=False):
    """A cache full of NaN: anything read before this test wrote it shows."""
    cache = HybridCache(model.cache_spec(mtp=mtp), nblocks, BS, nslots, cache_dtype)
    for pool in (cache.k, cache.v, cache.conv, cache.ssm):
        for t in pool.values():
            t.fill_(float("nan"))
    return cache


def prepared(model, lay, nslots, nblocks, cache_dtype, seed):
    """A poisoned cache holding each sequence's past tokens (prefilled by `model`, the reference), and every
    sequence's tokens (past + new)."""
    g = torch.Generator().manual_seed(seed)
    tokens = [torch.randint(0, 150, (s["past"] + s["n"],), generator=g).tolist() for s in lay]
    cache = poisoned(model, nslots, nblocks, cache_dtype)
    past = ForwardBatch.build([SeqChunk(t[:s["past"]], state_slot=s["slot"], block_ids=s["blocks"])
                               for s, t in zip(lay, tokens) if s["past"]], BS)
    with torch.no_grad():
        model(past.input_ids, past, cache)
    return cache, tokens


def clone(cache):
    out = copy.copy(cache)
    for name in ("k", "v", "conv", "ssm"):
        setattr(out, name, {i: t.clone() for i, t in getattr(cache, name).items()})
    return out


def gap(a, b):
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / a.abs().max()).item()


def close(a, b, what, bf16):
    """The decoder's result b against the reference's a. fp32 caches: the backend's tolerance against the reference
    (fp32 summation order). bf16 caches: an fp32 value within rounding of a bf16 tie may round the other way on the
    two paths (a K/V entry or conv input one bf16 step off; the layer tests above check the rounding itself on
    identical inputs) and later layers carry that on, so the backend's bf16 decode tolerance (mean relative gap
    1e-3; measured ~1e-5) applies."""
    a, b = a.float(), b.float()
    if bf16:
        assert (a - b).abs().mean() <= 1e-3 * a.abs().mean(), what
    else:
        assert gap(a, b) <= 1e-4, (what, gap(a, b))


def spy(dec):
    """Records, per call of dec that took the fused layers (CpuDecoder._decode), whether it was the MTP head's."""
    calls, fused = [], dec._decode
    dec._decode = lambda *a, **k: calls.append(k.get("mtp", False)) or fused(*a, **k)
    return calls


def check_kv(ref_cache, dec_cache, batch, layers):
    """Both caches hold NaN in the same places in every attention layer (the decoder writes nothing the reference
    does not); the batch rows' K/V in `layers`."""
    bf16 = next(iter(dec_cache.k.values())).dtype == torch.bfloat16
    for i in ref_cache.k:
        for name in ("k", "v"):
            a, b = getattr(ref_cache, name)[i], getattr(dec_cache, name)[i]
            assert torch.equal(a.isnan(), b.isnan()), (name, i)
            if i in layers:
                close(a.flatten(0, 1)[batch.slot_mapping], b.flatten(0, 1)[batch.slot_mapping], (name, i), bf16)


def check_step(ref_cache, dec_cache, ref_h, dec_h, lay, batch, carried=()):
    """Hidden states, the K/V of every row and the conv + recurrent state in every slot written, against the
    reference's; NaN in the same places."""
    bf16 = next(iter(dec_cache.conv.values())).dtype == torch.bfloat16
    close(ref_h, dec_h, "hidden", bf16)
    check_kv(ref_cache, dec_cache, batch, ref_cache.k)
    slots = torch.tensor(written_slots(lay) + list(carried))
    for i in ref_cache.conv:
        for name in ("conv", "ssm"):
            a, b = getattr(ref_cache, name)[i], getattr(dec_cache, name)[i]
            assert torch.equal(a.isnan(), b.isnan()), (name, i)
            assert not a[slots].isnan().any()
            close(a[slots], b[slots], (name, i), bf16)


def one_step(ref, dec, seqs, cache_dtype, seed, fused=True):
    """Prefill each sequence's past with the reference, then one step of seqs' new rows on both models, checked."""
    lay, nslots, nblocks = layout(seqs, seed=seed)
    ref_cache, tokens = prepared(ref, lay, nslots, nblocks, cache_dtype, seed=seed + 1)
    dec_cache, calls = clone(ref_cache), spy(dec)
    batch = verify_batch(lay, tokens)
    assert L.fits_step(batch) == fused
    with torch.no_grad():
        ref_h, dec_h = ref(batch.input_ids, batch, ref_cache), dec(batch.input_ids, batch, dec_cache)
    assert calls == ([False] if fused else [])
    check_step(ref_cache, dec_cache, ref_h, dec_h, lay, batch)
    return lay, ref_cache, dec_cache, calls


def verify_then_continue(ref, dec, cache_dtype, seed):
    """A verify step over SEQS, then every sequence with ring copies continues from the state after its last copied
    row (a ring slot, as the engine swaps in the slot of the last accepted token), its rejected rows' K/V
    overwritten. Both steps fused, both checked against the reference."""
    lay, ref_cache, dec_cache, calls = one_step(ref, dec, SEQS, cache_dtype, seed)
    g = torch.Generator().manual_seed(seed + 2)
    nxt = []
    for s in lay:
        if s["snapshots"]:
            j, ring = s["snapshots"][-1]
            past = s["past"] + j
            nxt.append(dict(s, n=s["n"] - j, past=past, slot=ring, snapshots=[],
                            tokens=[0] * past + torch.randint(0, 150, (s["n"] - j,), generator=g).tolist()))
    batch = verify_batch(nxt, [s["tokens"] for s in nxt])
    with torch.no_grad():
        ref_h, dec_h = ref(batch.input_ids, batch, ref_cache), dec(batch.input_ids, batch, dec_cache)
    assert calls == [False, False]
    check_step(ref_cache, dec_cache, ref_h, dec_h, nxt, batch, carried=written_slots(lay))


@pytest.mark.parametrize("kind", ["dense", "moe"])
@pytest.mark.parametrize("weights", ["float32", "bfloat16"])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_decoder_verify_steps_match_reference(checkpoint, kind, weights, cache_dtype):
    """The whole decoder (fp32 or bf16 weights; the reference holds the same weights in fp32 and runs fp32
    activations, as the decoder does) on verify steps of 1..9 rows per sequence."""
    path, _ = checkpoint(kind)
    ref = load_model(path, dtype=weights)[0].float()
    dec = CpuDecoder(load_model(path, dtype=weights)[0])
    assert dec.fused
    verify_then_continue(ref, dec, cache_dtype, seed=3)


@pytest.mark.parametrize("kind", ["dense", "moe_vl"])
@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_decoder_verify_steps_match_reference(checkpoint, kind, quantization):
    """A model quantized at load time (the int8/int4 kernels in every fused layer) against the reference on the same
    quantized weights (sizes the int4 layout takes whole, as in test_cpu_decoder)."""
    path, _ = checkpoint(kind, linear_value_head_dim=32, intermediate_size=128, moe_intermediate_size=64,
                         shared_expert_intermediate_size=64)
    ref = load_model(path, dtype="float32", quantization=quantization)[0]
    dec = CpuDecoder(load_model(path, dtype="float32", quantization=quantization)[0])
    assert dec.fused and dec.layers[0][1].in_qkvz.format == quantization
    verify_then_continue(ref, dec, torch.float32, seed=4)


M = L.MAX_ROWS_PER_SEQ


@pytest.mark.parametrize("seqs,fused", [
    ([(3, 5, [1, 3]), (2, 0, [1])], False),  # a copy after a sequence's last row
    ([(4, 2, [2, 2]), (1, 4, [])], False),  # two copies after the same row
    ([(M + 1, 3, [1, 2]), (2, 0, [1])], False),  # more rows than the fused layers take
    ([(M, 0, list(range(1, M))), (1, 6, [])], True),  # the most rows, a copy after every row but the last
    ([(1, 5, [1]), (1, 0, [])], False),  # one row per sequence: a copy can only follow the last row
], ids=["copy-after-last", "two-copies-one-row", "too-many-rows", "most-rows", "plain-decode-copy"])
def test_fits_step_refuses_what_the_fused_layers_cannot_run(checkpoint, seqs, fused):
    """fits_step refuses a state copy after a sequence's last row, two copies after one row and more than
    MAX_ROWS_PER_SEQ rows (the decoder then runs the batch layer by layer, and still matches the reference); it takes
    MAX_ROWS_PER_SEQ rows with a copy after every row but the last."""
    path, _ = checkpoint("dense")
    ref = load_model(path, dtype="float32")[0]
    dec = CpuDecoder(load_model(path, dtype="float32")[0])
    one_step(ref, dec, seqs, torch.float32, seed=5, fused=fused)


@pytest.mark.parametrize("kind", ["dense", "moe"])
@pytest.mark.parametrize("seqs,cache_dtype", [
    ([(3, 5), (1, 0), (9, 6), (2, 3)], torch.float32),
    ([(3, 5), (1, 0), (9, 6), (2, 3)], torch.bfloat16),
    ([(M + 3, 4), (2, 0)], torch.float32),  # a sequence longer than the fused layers take: unfused
], ids=["fused", "fused-bf16-cache", "unfused"])
def test_mtp_head_matches_reference(checkpoint, kind, seqs, cache_dtype):
    """CpuDecoder.mtp (the head's layer fused when the batch fits) against models.mtp.MTP.forward on the same cache:
    its output and the K/V it keeps at its own layer index, after earlier positions written by the reference."""
    ref = with_mtp(kind, checkpoint)[0]
    dec = CpuDecoder(with_mtp(kind, checkpoint)[0])  # the same weights, packed (the model's copies released)
    assert dec.mtp_fused
    lay, nslots, nblocks = layout([(n, p, []) for n, p in seqs], seed=6)
    cache = poisoned(ref, nslots, nblocks, cache_dtype, mtp=True)
    g = torch.Generator().manual_seed(7)
    H, layer = ref.cfg.hidden_size, ref.cfg.num_hidden_layers
    past = ForwardBatch.build([SeqChunk(torch.randint(0, 150, (s["past"],), generator=g).tolist(),
                                        state_slot=s["slot"], block_ids=s["blocks"]) for s in lay if s["past"]], BS)
    with torch.no_grad():
        ref.mtp(torch.randn(past.input_ids.shape[0], H, generator=g), past.input_ids, past, cache)
    dec_cache, calls = clone(cache), spy(dec)
    batch = verify_batch(lay, [[0] * s["past"] + torch.randint(0, 150, (s["n"],), generator=g).tolist()
                               for s in lay])
    hidden = torch.randn(batch.input_ids.shape[0], H, generator=g)
    with torch.no_grad():
        want = ref.mtp(hidden, batch.input_ids, batch, cache)
        got = dec.mtp(hidden, batch, dec_cache, dec.embed(batch.input_ids))
    assert calls == ([True] if max(n for n, _ in seqs) <= M else [])
    close(want, got, "mtp", cache_dtype == torch.bfloat16)
    check_kv(cache, dec_cache, batch, [layer])
    assert all(t.isnan().all() for t in (*dec_cache.conv.values(), *dec_cache.ssm.values()))  # no recurrent state
