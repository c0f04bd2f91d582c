"""Training's backward pass: our loss and every parameter's gradient against transformers, on packed and padded
batches; packed samples never reach each other; gradient checkpointing changes nothing.

Gradients are compared per parameter tensor as max |ours - HF| <= tol * max |HF| (the tensor's gradient scale: an
absolute tolerance alone would be meaningless for tensors whose gradients are 1e-3 and others 1). On these tiny
fp32 models the worst tensor differs by ~1e-5 of its scale (the two implementations sum in different orders)."""

import pytest
import torch

from qwen35.models.loader import canonical_name, load_model
from qwen35.models.qwen3_next import split_fused_gdn
from qwen35.train.loss import (
    LossOutput, lm_loss, load_balancing_loss, padded_labels, padded_to_batch, shift_labels, training_batch,
)

GRAD_TOL = 5e-5
LENGTHS = [23, 9, 66, 1]  # one sample longer than a chunk, one of a single token


@pytest.fixture(scope="module")
def models(checkpoint):
    """models(kind) -> (hf_model, our float32 model with every parameter trainable)."""
    made = {}

    def get(kind):
        if kind not in made:
            d, hf = checkpoint(kind)
            ours, _, _ = load_model(d, dtype=torch.float32)
            made[kind] = hf, ours.requires_grad_(True)
        return made[kind]

    return get


def make_samples(cfg, lengths=LENGTHS, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in lengths]


def pad(samples, left=False):
    """HF inputs for the samples as one padded batch: (input_ids, attention_mask, labels)."""
    T = max(len(s) for s in samples)
    ids = torch.zeros(len(samples), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for b, s in enumerate(samples):
        cols = slice(T - len(s), T) if left else slice(0, len(s))
        ids[b, cols], mask[b, cols], labels[b, cols] = torch.tensor(s), 1, torch.tensor(s)
        labels[b, cols.start] = -100  # no position of the sample predicts its first token (see padded_labels)
    return ids, mask, labels


def hf_loss_and_grads(hf, ids, mask, labels):
    kwargs = dict(output_router_logits=True) if hasattr(hf.config, "router_aux_loss_coef") else {}
    out = hf(input_ids=ids, attention_mask=mask, labels=labels, **kwargs)
    names, params = zip(*hf.named_parameters())
    return out, dict(zip(names, torch.autograd.grad(out.loss, params)))


def as_ours(cfg, hf_grads):
    """HF parameter names -> ours, through the loader's mapping (Qwen3-Next's fused projections split by rows)."""
    out = {}
    for name, grad in hf_grads.items():
        ours, _ = canonical_name(name)
        if cfg.fused_gdn_projections and ("in_proj_qkvz" in ours or "in_proj_ba" in ours):
            out.update(split_fused_gdn(cfg, ours, grad))
        else:
            out[ours] = grad
    return out


def our_loss_and_grads(model, batch, labels, **kwargs) -> tuple[LossOutput, dict]:
    res = lm_loss(model, batch, labels, **kwargs)
    names, params = zip(*model.named_parameters())
    return res, dict(zip(names, torch.autograd.grad(res.loss, params)))


def assert_grads_close(ours: dict, reference: dict, tol: float):
    assert ours.keys() == reference.keys()
    for name, grad in ours.items():
        ref = reference[name]
        err, scale = (grad - ref).abs().max().item(), ref.abs().max().item()
        assert scale > 0, f"{name}: zero reference gradient"
        assert err <= tol * scale, f"{name}: max error {err:.3g} vs gradient scale {scale:.3g}"


@pytest.mark.parametrize("kind", ["dense", "moe", "next"])
def test_loss_and_every_gradient_match_transformers(models, kind):
    """Packed samples (training_batch + shift_labels) against HF on the same samples right-padded, MoE router
    load-balancing loss included with HF's coefficient; tied embeddings (dense) get both their gradients."""
    hf, ours = models(kind)
    cfg = ours.cfg
    samples = make_samples(cfg)
    ids, mask, labels = pad(samples)
    out, hf_grads = hf_loss_and_grads(hf, ids, mask, labels)

    batch, targets = training_batch(samples), shift_labels(samples)
    padded, padded_targets = padded_to_batch(ids, mask), padded_labels(labels, mask)
    for field in ("input_ids", "positions", "cu_seqlens"):  # right padding packs to exactly the same batch
        assert torch.equal(getattr(padded, field), getattr(batch, field))
    assert torch.equal(padded_targets, targets)

    coef = hf.config.router_aux_loss_coef if cfg.is_moe else None
    res, grads = our_loss_and_grads(ours, batch, targets, router_aux_loss_coef=coef)
    assert res.num_tokens == sum(len(s) - 1 for s in samples)
    assert res.loss.item() == pytest.approx(out.loss.item(), rel=1e-6)
    if cfg.is_moe:
        assert res.aux_loss.item() == pytest.approx(out.aux_loss.item(), rel=1e-6)
        assert res.loss.item() == pytest.approx(res.lm_loss.item() + coef * res.aux_loss.item(), rel=1e-7)
    else:
        assert res.aux_loss is None
    if cfg.tie_word_embeddings:
        assert "lm_head.weight" not in grads  # one tensor, one gradient holding both uses
    assert_grads_close(grads, as_ours(cfg, hf_grads), GRAD_TOL)


def test_left_padded_batch_matches_transformers(models):
    """Left padding: positions are column indices, as HF's text model computes them without position_ids.
    Tolerance 2e-4: HF's own gradients for the same samples left- and right-padded differ by up to 9e-5 of their
    scale on this model (we measured 6.5e-5 here, and ours against HF right-padded 1e-5)."""
    hf, ours = models("dense")
    samples = make_samples(ours.cfg)
    ids, mask, labels = pad(samples, left=True)
    out, hf_grads = hf_loss_and_grads(hf, ids, mask, labels)
    batch = padded_to_batch(ids, mask)
    T = ids.shape[1]
    assert batch.positions[:len(samples[0])].tolist() == list(range(T - len(samples[0]), T))
    res, grads = our_loss_and_grads(ours, batch, padded_labels(labels, mask))
    assert res.loss.item() == pytest.approx(out.loss.item(), rel=1e-6)
    assert_grads_close(grads, as_ours(ours.cfg, hf_grads), 2e-4)


def test_loss_masks_and_bad_inputs():
    assert shift_labels([[5, 6, 7], [8, 9]], [[True, False, True], [False, True]]).tolist() == [-100, 7, -100, 9,
                                                                                                 -100]
    with pytest.raises(ValueError, match="sample 1 is empty"):
        training_batch([[1], []])
    with pytest.raises(ValueError, match="sample 0 has 2 tokens but its loss mask 3"):
        shift_labels([[1, 2]], [[True, True, True]])
    with pytest.raises(ValueError, match="row 0 has padding between tokens"):
        padded_to_batch(torch.ones(1, 4, dtype=torch.long), torch.tensor([[1, 0, 1, 0]]))
    with pytest.raises(ValueError, match="row 1 has no tokens"):
        padded_to_batch(torch.ones(2, 2, dtype=torch.long), torch.tensor([[1, 1], [0, 0]]))


def test_load_balancing_loss_matches_transformers():
    """The aux loss alone, on random logits over several layers, against HF's function with and without an
    attention mask (our packed rows are the mask's real tokens)."""
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import load_balancing_loss_func

    g = torch.Generator().manual_seed(0)
    B, T, E, k = 3, 7, 8, 3
    layers = [torch.randn(B * T, E, generator=g, requires_grad=True) for _ in range(3)]
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 5:], mask[2, :2] = 0, 0
    ref = load_balancing_loss_func(tuple(layers), E, k, mask)
    kept = mask.reshape(-1).bool()
    ours = load_balancing_loss([x[kept] for x in layers], E, k)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    for a, b in zip(torch.autograd.grad(ours, layers), torch.autograd.grad(ref, layers)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    ref = load_balancing_loss_func(tuple(layers), E, k)
    assert load_balancing_loss(layers, E, k).item() == pytest.approx(ref.item(), rel=1e-6)


def test_packed_samples_never_reach_each_other(models):
    """The loss on one sample's tokens has exactly zero gradient w.r.t. every other sample's input embeddings,
    through attention, the conv, the recurrent state (chunk boundaries inside and across samples) and the MoE
    dispatch (Qwen3-Next's tiny model has every layer kind: both mixers, dense and MoE FFNs)."""
    _, ours = models("next")
    lengths = [63, 64, 65, 130, 1]
    samples = make_samples(ours.cfg, lengths, seed=2)
    batch, targets = training_batch(samples), shift_labels(samples)
    embeds = ours.model.embed_tokens(batch.input_ids).detach().requires_grad_(True)
    bounds = batch.cu_seqlens.tolist()
    for s in range(len(samples)):
        if lengths[s] < 2:
            continue
        own = torch.zeros_like(targets, dtype=torch.bool)
        own[bounds[s]:bounds[s + 1]] = True
        res = lm_loss(ours, batch, targets.masked_fill(~own, -100), inputs_embeds=embeds)
        (grad,) = torch.autograd.grad(res.loss, embeds)
        assert torch.count_nonzero(grad[~own]) == 0, f"sample {s}'s loss reaches other samples"
        # every token but the last (which predicts nothing and is read by nothing) moves the loss
        assert bool(grad[bounds[s]:bounds[s + 1] - 1].abs().sum(-1).gt(0).all())


def test_gradient_checkpointing_gives_the_same_gradients(models):
    _, ours = models("moe")
    samples = make_samples(ours.cfg)
    batch, targets = training_batch(samples), shift_labels(samples)

    def run():  # (loss, grads, bytes autograd keeps from the forward for the backward)
        saved = []

        def pack(t):
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            res = lm_loss(ours, batch, targets, router_aux_loss_coef=0.01)
        names, params = zip(*ours.named_parameters())
        return res, dict(zip(names, torch.autograd.grad(res.loss, params))), sum(saved)

    plain, plain_grads, plain_bytes = run()
    ours.train()
    ours.model.gradient_checkpointing = True
    try:
        ckpt, ckpt_grads, ckpt_bytes = run()
    finally:
        ours.model.gradient_checkpointing = False
        ours.eval()
    assert ckpt_bytes < plain_bytes / 4  # the layers' activations were not kept
    assert ckpt.loss.item() == plain.loss.item() and ckpt.aux_loss.item() == plain.aux_loss.item()
    assert_grads_close(ckpt_grads, plain_grads, 1e-6)


def test_aux_loss_defaults_come_from_the_config(models):
    """As HF: without an explicit coefficient the aux loss is added only when the config sets output_router_logits,
    weighted by its router_aux_loss_coef (HF's defaults: off, 0.001)."""
    import dataclasses

    hf, ours = models("moe")
    assert (ours.cfg.output_router_logits, ours.cfg.router_aux_loss_coef) == (False, 0.001)
    samples = make_samples(ours.cfg, [20, 33])
    batch, targets = training_batch(samples), shift_labels(samples)
    with torch.no_grad():
        off = lm_loss(ours, batch, targets)
        assert off.aux_loss is None and off.loss is off.lm_loss
        cfg = ours.cfg
        ours.cfg = dataclasses.replace(cfg, output_router_logits=True, router_aux_loss_coef=0.25)
        try:
            on = lm_loss(ours, batch, targets)
        finally:
            ours.cfg = cfg
        explicit = lm_loss(ours, batch, targets, router_aux_loss_coef=0.25)
    assert on.aux_loss is not None and on.loss.item() == pytest.approx(off.loss.item() + 0.25 * on.aux_loss.item())
    assert explicit.loss.item() == on.loss.item()


def _grads(fn, *inputs):
    """fn's output and the gradient of a fixed random projection of it w.r.t. each input."""
    leaves = [x.detach().clone().requires_grad_(True) if x.is_floating_point() else x for x in inputs]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(3)
    loss = sum((o * torch.randn(o.shape, generator=gen)).sum() for o in outs if o.is_floating_point())
    return torch.autograd.grad(loss, [x for x in leaves if x.requires_grad])


def test_op_gradients_match_their_references():
    """The fast forms the model trains through (vectorised conv, packed SDPA attention, grouped experts with their
    index_add_) give their references' gradients, including through the conv history and the routing weights."""
    from qwen35.ops.attention import varlen_attention
    from qwen35.ops.conv import causal_conv1d, causal_conv1d_reference
    from qwen35.ops.moe import experts_grouped, experts_reference

    g = torch.Generator().manual_seed(0)
    cu = torch.tensor([0, 1, 6, 29, 30])
    N, C, Kw = 30, 12, 4
    args = torch.randn(N, C, generator=g), torch.randn(C, Kw, generator=g), cu, torch.randn(4, C, Kw - 1, generator=g)
    for a, b in zip(_grads(causal_conv1d, *args), _grads(causal_conv1d_reference, *args)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    q, k, v = (torch.randn(N, h, 8, generator=g) for h in (4, 2, 2))
    attn = [lambda q, k, v, impl=impl: varlen_attention(q, k, v, cu, 0.35, impl=impl) for impl in ("sdpa", "reference")]
    for a, b in zip(_grads(attn[0], q, k, v), _grads(attn[1], q, k, v)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    E, H, inter, top_k = 5, 8, 6, 2
    x, weights = torch.randn(N, H, generator=g), torch.rand(N, top_k, generator=g)
    ids = torch.stack([torch.randperm(E - 1, generator=g)[:top_k] for _ in range(N)])  # expert E-1 unused
    experts = torch.randn(E, 2 * inter, H, generator=g) / 3, torch.randn(E, H, inter, generator=g) / 3
    grouped, reference = _grads(experts_grouped, x, weights, ids, *experts), _grads(experts_reference, x, weights,
                                                                                     ids, *experts)
    for a, b in zip(grouped, reference):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert grouped[2][E - 1].abs().sum() == 0 and grouped[3][E - 1].abs().sum() == 0
