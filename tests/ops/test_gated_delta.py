"""Gated delta rule: the chunked form and the dispatcher against the recurrence, and both against transformers."""

import inspect

import pytest
import torch
import torch.nn.functional as F

from qwen35.ops import gated_delta as gd
from qwen35.ops.gated_delta import gated_delta_rule, gated_delta_rule_chunked, gated_delta_rule_recurrent


PER_TOKEN = ("q", "k", "v", "g", "beta")


def make_inputs(lengths, Hk=2, ratio=2, K=16, V=32, with_state=True, seed=0):
    """Packed inputs in a real layer's ranges: g = −exp(A_log)·softplus(a + dt_bias), beta = sigmoid(b)."""
    gen = torch.Generator().manual_seed(seed)
    N, Hv = sum(lengths), Hk * ratio
    A = torch.logspace(-2, 1.2, Hv)  # spans the A_log init range [0.01, 16]: from slow to fast forgetting heads
    a = torch.randn(N, Hv, generator=gen)
    return dict(
        q=torch.randn(N, Hk, K, generator=gen),
        k=torch.randn(N, Hk, K, generator=gen),
        v=torch.randn(N, Hv, V, generator=gen),
        g=-A * F.softplus(a + 1.0),
        beta=torch.randn(N, Hv, generator=gen).sigmoid(),
        cu_seqlens=torch.tensor([0, *lengths]).cumsum(0),
        initial_state=torch.randn(len(lengths), Hv, K, V, generator=gen) if with_state else None,
    )


def assert_close(actual, expected, rtol=2e-5):
    """Max abs error within rtol of the expected tensor's magnitude (fp32 chunked vs recurrent: up to ~1e-5 seen)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    err, scale = (actual.float() - expected.float()).abs().max().item(), expected.float().abs().max().item()
    assert err <= rtol * max(scale, 1e-6), f"max error {err:.3g} vs magnitude {scale:.3g}"


def select(inputs, s):
    """The inputs of sequence s alone."""
    start, end = inputs["cu_seqlens"][s].item(), inputs["cu_seqlens"][s + 1].item()
    one = {name: inputs[name][start:end] for name in PER_TOKEN}
    one["cu_seqlens"] = torch.tensor([0, end - start])
    one["initial_state"] = None if inputs["initial_state"] is None else inputs["initial_state"][s : s + 1]
    return one


def split(inputs, at):
    """A single sequence cut in two at token `at`: (first part, second part without its initial state)."""
    head = {name: inputs[name][:at] for name in PER_TOKEN}
    tail = {name: inputs[name][at:] for name in PER_TOKEN}
    n = inputs["cu_seqlens"][-1].item()
    head.update(cu_seqlens=torch.tensor([0, at]), initial_state=inputs["initial_state"])
    tail.update(cu_seqlens=torch.tensor([0, n - at]))
    return head, tail


# Every head ratio with an initial state; the zero state once per length.
SINGLE_SEQUENCE_CASES = [
    pytest.param(T, ratio, with_state, id=f"T{T}-ratio{ratio}-{'state' if with_state else 'no_state'}")
    for T in [1, 63, 64, 65, 200]
    for ratio, with_state in [(1, True), (2, True), (3, True), (4, True), (2, False)]
]


@pytest.mark.parametrize("T,ratio,with_state", SINGLE_SEQUENCE_CASES)
def test_chunked_matches_recurrent_single_sequence(T, ratio, with_state):
    inputs = make_inputs([T], ratio=ratio, with_state=with_state)
    o_ref, state_ref = gated_delta_rule_recurrent(**inputs)
    o, state = gated_delta_rule_chunked(**inputs)
    assert_close(o, o_ref)
    assert_close(state, state_ref)


@pytest.mark.parametrize("K,V", [(16, 32), (32, 8)], ids=["K16-V32", "K32-V8"])
@pytest.mark.parametrize("with_state", [True, False], ids=["state", "no_state"])
@pytest.mark.parametrize("lengths", [[1, 65, 7, 130], [64, 1, 1, 200, 63]], ids=lambda ls: "-".join(map(str, ls)))
def test_chunked_matches_recurrent_packed(lengths, with_state, K, V):
    inputs = make_inputs(lengths, ratio=3, K=K, V=V, with_state=with_state)
    o_ref, state_ref = gated_delta_rule_recurrent(**inputs)
    o, state = gated_delta_rule_chunked(**inputs)
    assert_close(o, o_ref)
    assert_close(state, state_ref)


@pytest.mark.parametrize("chunk_size", [1, 16, 64], ids=lambda c: f"C{c}")
def test_chunk_size_does_not_change_the_result(chunk_size):
    inputs = make_inputs([33, 5, 70])
    o_ref, state_ref = gated_delta_rule_recurrent(**inputs)
    o, state = gated_delta_rule_chunked(**inputs, chunk_size=chunk_size)
    assert_close(o, o_ref)
    assert_close(state, state_ref)


@pytest.mark.parametrize(
    "form", [gated_delta_rule_recurrent, gated_delta_rule_chunked, gated_delta_rule], ids=lambda f: f.__name__
)
def test_packed_batch_equals_each_sequence_alone(form):
    lengths = [1, 65, 7, 130, 1]
    inputs = make_inputs(lengths)
    o, state = form(**inputs)
    for s, (start, end) in enumerate(zip(inputs["cu_seqlens"][:-1].tolist(), inputs["cu_seqlens"][1:].tolist())):
        o_alone, state_alone = form(**select(inputs, s))
        assert_close(o[start:end], o_alone)
        assert_close(state[s : s + 1], state_alone)


TRANSFORMERS_CASES = [
    pytest.param(T, ratio, l2norm, form, id=f"{form}-T{T}-ratio{ratio}-{'l2norm' if l2norm else 'no_l2norm'}")
    for form in ["recurrent", "chunked"]
    for T, ratio, l2norm in [(1, 1, True), (65, 1, True), (130, 1, True), (1, 2, True), (130, 2, True), (65, 2, False)]
]


@pytest.mark.parametrize("T,ratio,use_qk_l2norm,form", TRANSFORMERS_CASES)
def test_matches_transformers(T, ratio, use_qk_l2norm, form):
    hf = pytest.importorskip("transformers.models.qwen3_5_moe.modeling_qwen3_5_moe")
    inputs = make_inputs([T], ratio=ratio)
    if not use_qk_l2norm:  # without the kernel's normalisation the caller must pass unit keys, or the rule diverges
        inputs["q"], inputs["k"] = F.normalize(inputs["q"], dim=-1), F.normalize(inputs["k"], dim=-1)
    ours = {"recurrent": gated_delta_rule_recurrent, "chunked": gated_delta_rule_chunked}[form]
    theirs = {"recurrent": hf.torch_recurrent_gated_delta_rule, "chunked": hf.torch_chunk_gated_delta_rule}[form]
    theirs = inspect.unwrap(theirs)  # the PyTorch reference itself, even where flash-linear-attention is installed

    o, state = ours(**inputs, use_qk_l2norm=use_qk_l2norm)
    batched = [inputs[name][None] for name in PER_TOKEN]  # transformers' [B, T, H, D] layout
    o_ref, state_ref = theirs(
        *batched,
        initial_state=inputs["initial_state"],
        output_final_state=True,
        use_qk_l2norm_in_kernel=use_qk_l2norm,
    )
    assert_close(o, o_ref[0])
    assert_close(state, state_ref)


@pytest.mark.parametrize(
    "form", [gated_delta_rule_recurrent, gated_delta_rule_chunked, gated_delta_rule], ids=lambda f: f.__name__
)
@pytest.mark.parametrize("at", [1, 64, 100, 149], ids=lambda a: f"split_at_{a}")
def test_state_continuation(at, form):
    inputs = make_inputs([150])
    o_whole, state_whole = form(**inputs)
    head, tail = split(inputs, at)
    o_head, state_head = form(**head)
    o_tail, state_tail = form(**tail, initial_state=state_head)
    assert_close(torch.cat([o_head, o_tail]), o_whole)
    assert_close(state_tail, state_whole)


def test_prefill_then_decode_steps_equals_whole_sequence():
    inputs = make_inputs([75])
    o_whole, state_whole = gated_delta_rule_chunked(**inputs)
    head, tail = split(inputs, 70)
    o, state = gated_delta_rule(**head)
    outputs = [o]
    for t in range(5):
        step = {name: tail[name][t : t + 1] for name in PER_TOKEN}
        o, state = gated_delta_rule(**step, cu_seqlens=torch.tensor([0, 1]), initial_state=state)
        outputs.append(o)
    assert_close(torch.cat(outputs), o_whole)
    assert_close(state, state_whole)


@pytest.mark.parametrize("form", [gated_delta_rule_recurrent, gated_delta_rule_chunked], ids=lambda f: f.__name__)
def test_bfloat16_inputs(form):
    inputs = make_inputs([1, 70, 9], ratio=2)
    low = {name: x.bfloat16() if name != "cu_seqlens" and x.is_floating_point() else x for name, x in inputs.items()}
    low["g"] = inputs["g"]  # the layer computes g in fp32
    o, state = form(**low)
    assert o.dtype == torch.bfloat16 and state.dtype == torch.float32
    # The fp32 run on the same (rounded) values differs only by the final cast of the output.
    same_values = {name: x.float() if name != "cu_seqlens" else x for name, x in low.items()}
    o_ref, state_ref = form(**same_values)
    assert_close(o.float(), o_ref, rtol=1e-2)
    assert_close(state, state_ref)
    # And stays close to the run on unrounded inputs.
    o_full, _ = form(**inputs)
    assert_close(o.float(), o_full, rtol=5e-2)


def test_dispatcher_routes_decode_and_prefill(monkeypatch):
    inputs = make_inputs([1, 65, 1, 7, 1])
    o_ref, state_ref = gated_delta_rule_recurrent(**inputs)
    chunked_calls = []

    def spy(*args, **kwargs):
        chunked_calls.append(args[5].tolist())  # cu_seqlens
        return gated_delta_rule_chunked(*args, **kwargs)

    monkeypatch.setattr(gd, "gated_delta_rule_chunked", spy)
    o, state = gated_delta_rule(**inputs)
    assert chunked_calls == [[0, 65]], "only the sequences longer than RECURRENT_MAX_LEN should be chunked"
    assert_close(o, o_ref)
    assert_close(state, state_ref)

    decode = make_inputs([1, 1, 1])
    o, state = gated_delta_rule(**decode)
    assert len(chunked_calls) == 1, "a pure decode batch must not pad to chunks"
    o_ref, state_ref = gated_delta_rule_recurrent(**decode)
    assert_close(o, o_ref)
    assert_close(state, state_ref)


@pytest.mark.parametrize(
    "form", [gated_delta_rule_recurrent, gated_delta_rule_chunked, gated_delta_rule], ids=lambda f: f.__name__
)
def test_inputs_are_not_modified(form):
    inputs = make_inputs([1, 40, 3])
    before = {name: x.clone() for name, x in inputs.items()}
    form(**inputs)
    for name, x in inputs.items():
        assert torch.equal(x, before[name]), name


def test_rejects_bad_packing():
    inputs = make_inputs([3, 4])
    with pytest.raises(ValueError, match="cu_seqlens"):
        gated_delta_rule(**{**inputs, "cu_seqlens": torch.tensor([0, 3, 3, 7])})
    with pytest.raises(ValueError, match="initial_state"):
        gated_delta_rule(**{**inputs, "initial_state": inputs["initial_state"][:1]})


# --- gradients -------------------------------------------------------------------------------------------------

GRAD_INPUTS = (*PER_TOKEN, "initial_state")


def loss_and_grads(form, inputs, **kwargs):
    """A scalar touching every output and final-state entry (fixed random weights), and its gradient w.r.t. every
    input, initial state included."""
    leaves = {name: x.detach().clone().requires_grad_(True) if name in GRAD_INPUTS and x is not None else x
              for name, x in inputs.items()}
    o, state = form(**leaves, **kwargs)
    gen = torch.Generator().manual_seed(7)
    loss = (o * torch.randn(o.shape, generator=gen)).sum() + (state * torch.randn(state.shape, generator=gen)).sum()
    wanted = [name for name in GRAD_INPUTS if leaves[name] is not None]
    return loss, dict(zip(wanted, torch.autograd.grad(loss, [leaves[name] for name in wanted])))


GRAD_CASES = [  # (lengths, head ratio, K, V, with initial state)
    ([65], 1, 16, 32, True),
    ([63, 130, 2], 2, 16, 32, True),
    ([64, 200, 7, 64], 4, 32, 8, False),
]


@pytest.mark.parametrize("lengths,ratio,K,V,with_state", GRAD_CASES, ids=lambda c: "-".join(map(str, c))
                         if isinstance(c, list) else None)
def test_recompute_gradients_equal_plain_autograd(lengths, ratio, K, V, with_state):
    """The recomputing Function against autograd through the chunked form itself: same maths, same result."""
    inputs = make_inputs(lengths, ratio=ratio, K=K, V=V, with_state=with_state)
    loss, grads = loss_and_grads(gd.gated_delta_rule_chunked_recompute, inputs)
    ref_loss, ref_grads = loss_and_grads(gated_delta_rule_chunked, inputs)
    assert loss.item() == ref_loss.item()
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert_close(grads[name], ref_grads[name], rtol=1e-6)


@pytest.mark.parametrize("use_qk_l2norm", [True, False], ids=["l2norm", "no_l2norm"])
def test_dispatcher_gradients_match_the_recurrence(use_qk_l2norm):
    """Training through the dispatcher (length-1 sequences on the recurrence, the rest on the recomputing chunked
    form) against autograd through the token-by-token reference."""
    inputs = make_inputs([1, 65, 1, 100, 7], ratio=2)
    if not use_qk_l2norm:  # unnormalised keys must stay small for the recurrence to be stable
        inputs["q"], inputs["k"] = F.normalize(inputs["q"], dim=-1), F.normalize(inputs["k"], dim=-1)
    loss, grads = loss_and_grads(gated_delta_rule, inputs, use_qk_l2norm=use_qk_l2norm)
    ref_loss, ref_grads = loss_and_grads(gated_delta_rule_recurrent, inputs, use_qk_l2norm=use_qk_l2norm)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    for name in grads:
        assert_close(grads[name], ref_grads[name], rtol=5e-5)


def test_recompute_keeps_only_its_inputs_for_the_backward():
    """Between forward and backward the recomputing form holds its inputs, not the [chunks, Hv, C, C] intermediates
    that plain autograd through the chunked form keeps."""
    inputs = make_inputs([200, 130], ratio=2)

    leaves = {name: x.requires_grad_(True) if name in GRAD_INPUTS else x for name, x in inputs.items()}

    def saved_bytes(form):  # what the forward leaves for the backward
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            o, state = form(**leaves)
        (o.sum() + state.sum()).backward()  # the recompute runs here, outside the hooks
        return sum(saved)

    input_bytes = sum(leaves[name].numel() * 4 for name in GRAD_INPUTS) + leaves["cu_seqlens"].numel() * 8
    assert saved_bytes(gd.gated_delta_rule_chunked_recompute) <= input_bytes
    assert saved_bytes(gated_delta_rule_chunked) > 5 * input_bytes


def test_inference_takes_the_plain_chunked_form(monkeypatch):
    """Without a gradient wanted (no_grad, or no input requiring one) the dispatcher never builds the Function."""
    def fail(*args, **kwargs):
        raise AssertionError("recomputing form used for inference")

    monkeypatch.setattr(gd, "gated_delta_rule_chunked_recompute", fail)
    inputs = make_inputs([1, 65])
    gated_delta_rule(**inputs)
    with torch.no_grad():
        gated_delta_rule(**{**inputs, "v": inputs["v"].clone().requires_grad_(True)})


@pytest.mark.parametrize("lengths", [[200], [70, 1, 130, 5], [1, 64, 1]], ids=lambda x: "-".join(map(str, x)))
def test_captured_states_equal_a_prefill_that_stopped_there(lengths):
    """capture=[(s, t)] returns the state after sequence s's first t tokens, read off inside its chunk: at chunk
    boundaries and inside chunks, first and last tokens, in batches mixing decode and prefill; outputs and final
    states are those of the run without captures."""
    inputs = make_inputs(lengths, ratio=2)
    capture = [(s, t) for s, n in enumerate(lengths) if n > 1 for t in sorted({1, 2, 16, 63, 64, 65, 128, n - 1})
               if t < n]
    o, state, captured = gated_delta_rule(**inputs, capture=capture)
    ref_o, ref_state = gated_delta_rule(**inputs)
    assert torch.equal(o, ref_o) and torch.equal(state, ref_state)
    assert captured.shape == (len(capture), *state.shape[1:])
    for got, (s, t) in zip(captured, capture):
        head, _ = split(select(inputs, s), t)
        assert_close(got, gated_delta_rule_recurrent(**head)[1][0])
    with pytest.raises(ValueError, match="capture"):
        gated_delta_rule(**inputs, capture=[(0, lengths[0])])


@pytest.mark.parametrize("lengths", [[3, 1, 4], [1, 70, 5, 2]], ids=["all-short", "mixed"])
def test_capture_states_after_t_tokens(lengths):
    """The states after t tokens (a speculative step's ring, a prefix snapshot) equal the final state of a run on
    those first t tokens, whichever form (recurrent for short sequences, chunked for long) computes them."""
    inputs = make_inputs(lengths)
    cu = inputs["cu_seqlens"].tolist()
    capture = [(s, t) for s, n in enumerate(lengths) for t in (1, n - 1, n // 2) if 1 <= t < n]
    capture = list(dict.fromkeys(capture))
    o_ref, state_ref = gated_delta_rule_recurrent(**inputs)
    o, state, captured = gated_delta_rule(**inputs, capture=capture)
    assert_close(o, o_ref)
    assert_close(state, state_ref)
    for m, (s, t) in enumerate(capture):
        rows = slice(cu[s], cu[s] + t)
        one = {name: x[rows] for name, x in inputs.items() if name not in ("cu_seqlens", "initial_state")}
        init = inputs["initial_state"][s:s + 1] if inputs.get("initial_state") is not None else None
        _, expect = gated_delta_rule_recurrent(**one, cu_seqlens=torch.tensor([0, t]), initial_state=init)
        assert_close(captured[m], expect[0])
