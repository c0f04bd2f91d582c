"""The text decoder against transformers 5.23 on tiny random checkpoints: float32 logits within 1e-4, greedy
continuations identical, request by request."""

import copy

import pytest
import torch

from qwen35.models.batch import ForwardBatch, SeqChunk
from qwen35.models.loader import load_model
from tests.tiny_models import greedy, run_pieces

KINDS = ["dense", "moe", "moe_vl", "next"]
TOL = 1e-4


def prompts_of(lengths, seed=0, vocab=150):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]


def our_logits(model, prompts):
    batch = ForwardBatch.build([SeqChunk(p, want_logits="all") for p in prompts])
    with torch.no_grad():
        logits = model.compute_logits(model(batch.input_ids, batch)[batch.logits_indices])
    return list(logits.split([len(p) for p in prompts]))


@pytest.fixture(scope="module")
def loaded(checkpoint):
    cache = {}

    def get(kind, **kw):
        key = (kind, repr(sorted(kw.items())))
        if key not in cache:
            path, hf = checkpoint(kind, **kw)
            cache[key] = (load_model(path, dtype="float32")[0], hf)
        return cache[key]

    return get


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("length", [1, 63, 64, 65, 257])
def test_logits_match(loaded, kind, length):
    model, hf = loaded(kind)
    (ids,) = prompts_of([length], seed=length)
    ours = our_logits(model, [ids])[0]
    ref = hf_logits(hf, ids)
    assert ref.abs().max() > 1.0  # the comparison means something only if logits are not all ~0
    torch.testing.assert_close(ours, ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_packed_batch_of_unequal_lengths_matches_each_request(loaded, kind):
    model, hf = loaded(kind)
    prompts = prompts_of([1, 63, 200, 64, 65, 7], seed=3)
    for ids, ours in zip(prompts, our_logits(model, prompts)):
        torch.testing.assert_close(ours, hf_logits(hf, ids), atol=TOL, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_continuation_matches(loaded, kind):
    model, hf = loaded(kind)
    prompts = prompts_of([5, 70, 33], seed=4)
    ours = greedy(model, prompts, 32)
    for ids, out in zip(prompts, ours):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, min_new_tokens=32)
        assert out == ref[0, len(ids):].tolist()


@pytest.mark.parametrize("kind", ["dense", "moe", "next"])
def test_prompt_fed_in_pieces_equals_one_forward(loaded, kind):
    model, _ = loaded(kind)
    prompts = prompts_of([130, 5, 257, 64], seed=5)
    whole = run_pieces(model, prompts, [[]] * 4)
    pieces = run_pieces(model, prompts, [[1, 2, 63, 64, 100], [1, 4], [3, 67, 128, 256], [63]], poison=True)
    for w, p in zip(whole, pieces):
        torch.testing.assert_close(p, w, atol=TOL, rtol=0)
    # a cache-less forward agrees too
    for w, plain in zip(whole, our_logits(model, prompts)):
        torch.testing.assert_close(plain, w, atol=TOL, rtol=0)


def test_sharded_checkpoint(checkpoint):
    path, hf = checkpoint("moe", seed=7, max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").is_file()
    assert len(list(path.glob("*.safetensors"))) > 3
    model = load_model(path, dtype="float32")[0]
    ids = prompts_of([90], seed=7)[0]
    torch.testing.assert_close(our_logits(model, [ids])[0], hf_logits(hf, ids), atol=TOL, rtol=0)


UNSEEN = {
    "value heads 3 per key head, K != V": dict(linear_num_key_heads=2, linear_num_value_heads=6,
                                               linear_key_head_dim=8, linear_value_head_dim=16),
    "no GQA, half rotary, odd vocab": dict(num_key_value_heads=4, vocab_size=157,
                                           rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                            "partial_rotary_factor": 0.5}),
    "custom layer pattern": dict(num_hidden_layers=5, layer_types=["full_attention", "linear_attention",
                                                                  "full_attention", "full_attention",
                                                                  "linear_attention"]),
    "attention every 2nd layer": dict(num_hidden_layers=4, full_attention_interval=2),
    "5 experts top-1, conv width 3": dict(num_experts=5, num_experts_per_tok=1, linear_conv_kernel_dim=3),
}


@pytest.mark.parametrize("name", list(UNSEEN))
@pytest.mark.parametrize("kind", ["moe", "next"])
def test_unseen_configs(checkpoint, kind, name):
    overrides = dict(UNSEEN[name])
    if kind == "next" and "rope_parameters" in overrides:
        overrides["rope_parameters"] = {k: v for k, v in overrides["rope_parameters"].items()}
    path, hf = checkpoint(kind, seed=11, **overrides)
    model = load_model(path, dtype="float32")[0]
    prompts = prompts_of([1, 65, 130], seed=11)
    for ids, ours in zip(prompts, our_logits(model, prompts)):
        torch.testing.assert_close(ours, hf_logits(hf, ids), atol=TOL, rtol=0)
    assert greedy(model, prompts[:1], 8)[0] == hf.generate(torch.tensor([prompts[0]]), max_new_tokens=8,
                                                           do_sample=False, min_new_tokens=8)[0, 1:].tolist()


@pytest.mark.parametrize("kind", ["dense", "moe", "next"])
def test_bfloat16_is_as_accurate_as_transformers_bfloat16(checkpoint, kind):
    """bf16 rounding through random tiny models moves logits by ~10% of their scale in transformers too; what we
    require is that our bf16 run strays from the fp32 reference no more than transformers' bf16 run does. Both
    ways of running a bf16 checkpoint: plain (bf16 activations, PyTorch matmuls) and packed for the native CPU
    kernels (the default on CPU: bf16 weights and caches, fp32 activations)."""
    path, hf = checkpoint(kind)
    m32 = load_model(path, dtype="float32")[0]
    hf16 = copy.deepcopy(hf).to(torch.bfloat16)
    prompts = prompts_of([70, 3, 130], seed=12)
    ref_err = sum((hf_logits(hf16, ids).float() - a).abs().mean().item()
                  for ids, a in zip(prompts, our_logits(m32, prompts)))
    from qwen35.backends.cpu import CpuDecoder, library

    for pack in (False, True) if library.available() else (False,):
        m16 = load_model(path, dtype="bfloat16")[0]
        assert m16.lm_head.weight.dtype == torch.bfloat16
        assert m16.model.layers[0].linear_attn.A_log.dtype == torch.float32
        if pack:
            m16 = CpuDecoder(m16)
        ours_err = 0.0
        for a, b in zip(our_logits(m32, prompts), our_logits(m16, prompts)):
            assert b.dtype == (torch.float32 if pack else torch.bfloat16) and torch.isfinite(b).all()
            ours_err += (b.float() - a).abs().mean().item()
        assert ours_err <= 1.25 * ref_err, (pack, ours_err, ref_err)
        whole = run_pieces(m16, prompts, [[], [], []])
        pieces = run_pieces(m16, prompts, [[35], [1], [64, 65]])
        for p, w in zip(pieces, whole):
            assert (p.float() - w.float()).abs().mean() <= ref_err
