"""The native decode kernels against their references: the in-place gated-delta step (scattered slots, fresh and
carried states, head ratios 1/2/4, NaN in unused slots) and the fused routed-experts call (1 to 17 tokens, experts
hit by many tokens or none), whose rows do not depend on the batch; then a packed model's decode steps give each
sequence the same bits alone or batched, and a bf16 packed model decoding through the cache equals the same model
prefilling the whole sequence, within bf16 rounding."""

import pytest
import torch

from qwen35.ops import linear as L
from qwen35.ops.gated_delta import gated_delta_decode_native, gated_delta_rule_recurrent
from qwen35.ops.linear import Packed
from qwen35.ops.moe import experts_native, experts_reference

pytestmark = pytest.mark.skipif(not L.native_available(), reason="native kernels unavailable (no C compiler/AVX2)")


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("Hk,Hv,K,V", [(2, 2, 16, 8), (2, 4, 32, 24), (1, 4, 8, 40), (4, 8, 128, 128)])
def test_gdn_step_matches_recurrence(Hk, Hv, K, V):
    S, slots_total = 5, 9
    q, k = rand(S, Hk, K, seed=1), rand(S, Hk, K, seed=2)
    v, g, beta = rand(S, Hv, V, seed=3), -rand(S, Hv, seed=4).abs(), rand(S, Hv, seed=5).sigmoid()
    pool = rand(slots_total, Hv, K, V, seed=6)
    pool[0] = float("nan")  # an unused slot: must never be read
    slots = torch.tensor([3, 8, 1, 5, 2])
    has = torch.tensor([True, False, True, True, False])
    before = pool.clone()
    ref_init = torch.where(has[:, None, None, None], before[slots], 0)
    ref_o, ref_state = gated_delta_rule_recurrent(q, k, v, g, beta, torch.arange(S + 1), ref_init)
    o = gated_delta_decode_native(q, k, v, g, beta, pool, slots, has)
    torch.testing.assert_close(o, ref_o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pool[slots], ref_state, atol=1e-5, rtol=1e-5)
    untouched = torch.ones(slots_total, dtype=torch.bool)
    untouched[slots] = False
    assert torch.equal(pool[untouched].nan_to_num(7.0), before[untouched].nan_to_num(7.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N", [1, 2, 3, 8, 17])
def test_fused_experts_match_reference(dtype, N):
    E, H, inter, top_k = 8, 64, 40, 3
    x = rand(N, H, seed=N).to(dtype)
    gate_up, down = (rand(E, 2 * inter, H, seed=12) / 8).to(dtype), (rand(E, H, inter, seed=13) / 6).to(dtype)
    g = torch.Generator().manual_seed(N)
    allowed = torch.tensor([0, 1, 2, 3, 4, 6, 7])  # expert 5 is never chosen
    ids = torch.stack([allowed[torch.randperm(7, generator=g)[:top_k]] for _ in range(N)])
    weights = torch.softmax(rand(N, top_k, seed=14), -1).to(dtype)
    got = experts_native(x, weights, ids, Packed(gate_up), Packed(down))
    ref = experts_reference(x.float(), weights.float(), ids, gate_up.float(), down.float())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_experts_rows_do_not_depend_on_the_batch(dtype):
    """A token's routed-experts output is bit for bit the same alone as among 50 tokens (experts then multiply
    many rows at once, in tiles)."""
    E, H, inter, N = 4, 64, 40, 50
    x = rand(N, H, seed=1)
    gate_up = Packed((rand(E, 2 * inter, H, seed=2) / 8).to(dtype))
    down = Packed((rand(E, H, inter, seed=3) / 6).to(dtype))
    g = torch.Generator().manual_seed(4)
    ids = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(N)])
    weights = torch.softmax(rand(N, 2, seed=5), -1)
    together = experts_native(x, weights, ids, gate_up, down)
    for i in range(N):
        assert torch.equal(experts_native(x[i:i + 1], weights[i:i + 1], ids[i:i + 1], gate_up, down),
                           together[i:i + 1]), i


@pytest.mark.parametrize("kind", ["moe_vl", "dense"])
def test_packed_decode_is_batch_invariant(checkpoint, kind):
    """Decode steps (the native decode layers and the LM head) give each sequence bit-identical logits whether it
    runs alone or with others, the batch shrinking as prompts end: greedy output does not depend on the batch."""
    from qwen35.models.loader import load_model
    from tests.tiny_models import run_pieces

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 150, (n,), generator=g).tolist() for n in (6, 2, 1, 4)]
    cuts = [list(range(1, len(p))) for p in prompts]  # one token per sequence per step, from the first
    for dtype in (torch.float32, torch.bfloat16):
        model = load_model(checkpoint(kind)[0], dtype=dtype, pack=True)[0]
        together = run_pieces(model, prompts, cuts)
        for p, c, logits in zip(prompts, cuts, together):
            assert torch.equal(run_pieces(model, [p], [c])[0], logits), (dtype, len(p))


@pytest.mark.parametrize("kind", ["moe_vl", "dense"])
def test_packed_decode_through_the_cache_equals_prefill(checkpoint, kind):
    """A packed model prefilling in pieces, then one token per step (the native decode blocks, with the batch
    shrinking as a prompt ends) equals the same model prefilling each whole prompt.

    In fp32 the two differ by summation order only. In bf16 what crosses a step boundary is rounded to bf16 on
    both paths (K/V are read back from the cache, conv inputs are rounded to the cache's precision), so they agree
    to fp32 rounding until an input that lies within that rounding of a bf16 tie rounds the other way; one such
    flip moves later logits by ~1e-4 (relative). Wrong slots, histories or rounding show at 1e-2 and above, and
    the block tests check the rounding itself exactly."""
    from qwen35.models.loader import load_model
    from tests.tiny_models import run_pieces

    prompts = [torch.randint(0, 150, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (30, 9)]
    cuts = [list(range(5, 30)), list(range(1, 9))]  # then one token per step
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-3)):
        model = load_model(checkpoint(kind)[0], dtype=dtype, pack=True)[0]
        assert model.model.native_decode
        whole = run_pieces(model, prompts, [[], []])
        stepped = run_pieces(model, prompts, cuts, poison=True)
        gap = sum((a - b).abs().mean() / a.abs().mean() for a, b in zip(whole, stepped)) / len(prompts)
        assert gap < tol, (dtype, gap)
