"""The CPU backend's decoder (backends/cpu/decoder.py) on whole tiny models against the reference model: a packed
model strays from the fp32 model no more than PyTorch's own bf16 run does; its decode steps give each sequence
the same bits alone or batched; decoding through the cache equals prefilling the whole sequence; the engine's runner
picks it by default for bf16 weights and never for fp32 ones; the model's packed matrices are released."""

import pytest
import torch

from qwen35.backends.cpu import CpuDecoder, decoder_for, library
from qwen35.models.batch import ForwardBatch, SeqChunk
from qwen35.models.loader import load_model
from tests.tiny_models import run_pieces

pytestmark = pytest.mark.skipif(not library.available(), reason="native kernels unavailable (no C compiler/AVX2)")


def decoder(path, dtype):
    return CpuDecoder(load_model(path, dtype=dtype)[0])


@pytest.mark.parametrize("kind", ["moe_vl", "dense"])
def test_packed_model_strays_from_fp32_no_more_than_plain_bf16(checkpoint, kind):
    """A whole tiny model in bf16 (MoE; dense with a tied head the embedding then reads from the packed copy),
    prefill and one-token steps: the decoder (fp32 accumulation and activations) is no farther from the float32
    model than PyTorch's own bf16 matmuls are."""
    path, _ = checkpoint(kind)
    exact = load_model(path, dtype="float32")[0]
    plain = load_model(path, dtype="bfloat16")[0]
    packed = decoder(path, "bfloat16")
    assert packed.model.lm_head.weight.device.type == "meta"  # the matrices moved into the decoder
    if kind == "dense":
        assert packed.tied and packed.model.model.embed_tokens.weight.device.type == "meta"
    prompts = [torch.randint(0, 150, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (40, 1, 7)]

    def logits(model, chunks):
        batch = ForwardBatch.build(chunks)
        with torch.no_grad():
            return model.compute_logits(model(batch.input_ids, batch)[batch.logits_indices]).float()

    for chunks in ([SeqChunk(p, want_logits="all") for p in prompts], [SeqChunk(p[:1]) for p in prompts]):
        ref = logits(exact, chunks)
        err_plain = (logits(plain, chunks) - ref).abs().mean()
        err_packed = (logits(packed, chunks) - ref).abs().mean()
        assert err_packed <= 1.25 * err_plain, (err_packed, err_plain)


@pytest.mark.parametrize("kind", ["moe_vl", "dense"])
def test_packed_decode_is_batch_invariant(checkpoint, kind):
    """Decode steps (the native decode layers and the LM head) give each sequence bit-identical logits whether it
    runs alone or with others, the batch shrinking as prompts end: greedy output does not depend on the batch."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 150, (n,), generator=g).tolist() for n in (6, 2, 1, 4)]
    cuts = [list(range(1, len(p))) for p in prompts]  # one token per sequence per step, from the first
    for dtype in (torch.float32, torch.bfloat16):
        model = decoder(checkpoint(kind)[0], dtype)
        assert model.fused
        together = run_pieces(model, prompts, cuts)
        for p, c, logits in zip(prompts, cuts, together):
            assert torch.equal(run_pieces(model, [p], [c])[0], logits), (dtype, len(p))


@pytest.mark.parametrize("kind", ["moe_vl", "dense"])
def test_packed_decode_through_the_cache_equals_prefill(checkpoint, kind):
    """The decoder prefilling in pieces, then one token per step (the native decode layers, with the batch
    shrinking as a prompt ends) equals the same decoder prefilling each whole prompt.

    In fp32 the two differ by summation order only. In bf16 what crosses a step boundary is rounded to bf16 on
    both paths (K/V are read back from the cache, conv inputs are rounded to the cache's precision), so they agree
    to fp32 rounding until an input that lies within that rounding of a bf16 tie rounds the other way; one such
    flip moves later logits by ~1e-4 (relative). Wrong slots, histories or rounding show at 1e-2 and above, and
    the layer tests check the rounding itself exactly."""
    prompts = [torch.randint(0, 150, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (30, 9)]
    cuts = [list(range(5, 30)), list(range(1, 9))]  # then one token per step
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-3)):
        model = decoder(checkpoint(kind)[0], dtype)
        assert model.fused
        whole = run_pieces(model, prompts, [[], []])
        stepped = run_pieces(model, prompts, cuts, poison=True)
        gap = sum((a - b).abs().mean() / a.abs().mean() for a, b in zip(whole, stepped)) / len(prompts)
        assert gap < tol, (dtype, gap)


def test_runner_picks_the_backend(checkpoint):
    """bf16 weights on CPU: the decoder; fp32: the model itself unless asked; never off the CPU or when refused."""
    path, _ = checkpoint("moe_vl")
    assert isinstance(decoder_for(load_model(path, dtype="bfloat16")[0], "cpu"), CpuDecoder)
    assert decoder_for(load_model(path, dtype="float32")[0], "cpu") is None
    assert isinstance(decoder_for(load_model(path, dtype="float32")[0], "cpu", True), CpuDecoder)
    assert decoder_for(load_model(path, dtype="bfloat16")[0], "cpu", False) is None
    assert decoder_for(load_model(path, dtype="bfloat16")[0], "meta") is None


@pytest.mark.parametrize("kind", ["moe_vl", "dense", "next"])
@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_decoder_matches_the_quantized_reference(checkpoint, kind, quantization):
    """A model quantized at load time, run by the decoder (int8/int4 kernels, every fused decode layer) equals the
    reference model on the same quantized weights (QuantLinear: dequantize, then F.linear) up to fp32 summation
    order, prefill and decode steps alike; decode steps stay batch invariant. Sizes that the int4 layout (64 columns)
    and the fused layers (no padded inputs) take whole."""
    path, _ = checkpoint(kind, linear_value_head_dim=32, intermediate_size=128, moe_intermediate_size=64,
                         shared_expert_intermediate_size=64)
    ref = load_model(path, dtype="float32", quantization=quantization)[0]
    dec = CpuDecoder(load_model(path, dtype="float32", quantization=quantization)[0])
    assert dec.fused and dec.layers[0][1].in_qkvz.format == quantization
    prompts = [torch.randint(0, 150, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (17, 5)]
    cuts = [list(range(3, 17)), list(range(1, 5))]
    for a, b in zip(run_pieces(ref, prompts, cuts), run_pieces(dec, prompts, cuts)):
        assert (a - b).abs().max() <= 1e-4 * a.abs().max(), (a - b).abs().max()
    g = torch.Generator().manual_seed(0)  # decode steps only (one token per sequence from the first)
    prompts = [torch.randint(0, 150, (n,), generator=g).tolist() for n in (6, 2, 4)]
    cuts = [list(range(1, len(p))) for p in prompts]
    together = run_pieces(dec, prompts, cuts)
    for p, c, logits in zip(prompts, cuts, together):
        assert torch.equal(run_pieces(dec, [p], [c])[0], logits), len(p)


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_prompts_run_on_int8_inputs(checkpoint, quantization):
    """Prompts of MANY_ROWS rows or more multiply the quantized weights against inputs rounded to int8 per 32
    columns (the kernels' own tests check that arithmetic exactly): the logits move off the fp32-input result, and
    stay within twice the distance a bf16 run of the same model keeps from it (8-bit inputs in blocks of 32 hold about
    half of bf16's 8-bit mantissa; measured 1.2-1.6x on these tiny models, which amplify any rounding)."""
    import copy

    from qwen35.backends.cpu import decoder as backend

    assert backend.MANY_ROWS <= 40
    path, _ = checkpoint("moe_vl", linear_value_head_dim=32, intermediate_size=128, moe_intermediate_size=64,
                         shared_expert_intermediate_size=64)
    ref = load_model(path, dtype="float32", quantization=quantization)[0]
    ref16 = copy.deepcopy(ref).to(torch.bfloat16)
    dec = CpuDecoder(load_model(path, dtype="float32", quantization=quantization)[0])
    prompts = [torch.randint(0, 150, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (40, 23)]
    for a, b, c in zip(*(run_pieces(m, prompts, [[], []]) for m in (ref, dec, ref16))):
        assert not torch.allclose(a, b, rtol=0, atol=1e-4 * a.abs().max())  # the int8-input path ran
        assert (b - a).abs().mean() <= 2 * (c.float() - a).abs().mean()
