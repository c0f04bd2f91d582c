"""flash-linear-attention's own kernels behind our adapter (backends/gpu/gdn.py) against our reference delta rule.

fla-core is in the test extra; tests/conftest.py keeps transformers (our numerical reference) from routing its own
maths through fla's kernels, which it would otherwise do wherever fla imports.

Without CUDA, fla's recurrent kernel runs in Triton's interpreter (its autotuner, which would time candidate configs
on a GPU, takes the first one); its chunked kernel uses what the interpreter lacks, so it runs on a GPU only
(`-m gpu`)."""

import pytest
import torch

pytest.importorskip("fla")

from qwen35.backends.gpu.gdn import delta_rule_fla  # noqa: E402
from qwen35.ops.gated_delta import gated_delta_rule_chunked, gated_delta_rule_recurrent  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


@pytest.fixture(scope="module")
def fla():
    if not CUDA:  # no GPU to time autotuning candidates on: take the first config
        import triton.runtime.autotuner as autotuner

        autotuner.Autotuner._bench = lambda self, *args, config, **kw: [1.0, 1.0, 1.0]
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule

    return chunk_gated_delta_rule, fused_recurrent_gated_delta_rule


def inputs(lengths, Hk=2, Hv=4, K=16, V=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    N, S = sum(lengths), len(lengths)
    q, k = torch.randn(N, Hk, K, generator=g), torch.randn(N, Hk, K, generator=g)
    v = torch.randn(N, Hv, V, generator=g)
    gate, beta = -torch.rand(N, Hv, generator=g) * 2, torch.rand(N, Hv, generator=g)
    state = torch.randn(S, Hv, K, V, generator=g)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    q, k, v, beta = (x.to(dtype) for x in (q, k, v, beta))
    return [x.to(DEVICE) for x in (q, k, v, gate, beta, cu, state)]


def check(got, ref, dtype):
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16 inputs: fla keeps them bf16 in its products
    for x, r in zip(got, ref):
        assert (x.float() - r.float()).abs().max() <= tol * r.float().abs().max(), (x.float() - r.float()).abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recurrent_decode_step_equals_the_reference(fla, dtype):
    """A decode step (batch layout [S, 1, H, ·], states from the slot pool) with grouped values: our maths."""
    q, k, v, gate, beta, cu, state = inputs([1, 1, 1], dtype=dtype)
    ref = gated_delta_rule_recurrent(q.float(), k.float(), v.float(), gate, beta.float(), cu, state)
    got = delta_rule_fla(q, k, v, gate, beta, cu, state, lengths=[1, 1, 1], fla=fla)
    check(got, ref, dtype)


def test_varlen_sequences_and_captures_equal_the_reference(fla):
    """Packed sequences of several lengths through fla's varlen path (its recurrent kernel standing in for the
    chunked one, which needs a GPU), with states taken after some tokens (the rounds)."""
    lengths = [6, 2, 5]
    q, k, v, gate, beta, cu, state = inputs(lengths)
    capture = [(0, 2), (2, 4), (0, 5)]
    ref = gated_delta_rule_chunked(q, k, v, gate, beta, cu, state, capture=capture)
    recurrent = fla[1]
    got = delta_rule_fla(q, k, v, gate, beta, cu, state, lengths=lengths, capture=capture, fla=(recurrent, recurrent))
    check(got, ref, torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="fla's chunked kernel needs a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunked_prefill_equals_the_reference(fla, dtype):
    lengths = [130, 1, 64, 77]
    q, k, v, gate, beta, cu, state = inputs(lengths, Hk=2, Hv=4, K=128, V=128, dtype=dtype)
    capture = [(0, 100), (3, 13)]
    ref = gated_delta_rule_chunked(q.float(), k.float(), v.float(), gate, beta.float(), cu, state, capture=capture)
    got = delta_rule_fla(q, k, v, gate, beta, cu, state, lengths=lengths, capture=capture, fla=fla)
    check(got, ref, dtype)
