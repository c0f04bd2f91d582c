"""The GPU backend's causal conv (qwen35.backends.gpu.conv) against ops.conv.causal_conv1d_reference: the Triton
prefill kernel on packed batches mixing sequences shorter than Kw-1 with ones spanning several token tiles, channel
counts off the tile, Kw 2..5, with and without history, x a column slice of a wider projection; the decode step
(Triton and plain torch); no host syncs in any wrapper; the module imports without triton.

Tolerances. fp32: the reference sums the same Kw fp32 products in another order, and silu's exp may differ by an ulp:
|error| <= 1e-6 (1 + |y|) (a wrong tap, history column or sequence boundary is off by O(0.1)). bf16: the kernels
compute in fp32 and round once to bf16, so against the fp32 reference run on the same (bf16) inputs the error is half
a bf16 ulp, <= 2^-8 |y| (+1e-6 for the fp32 part); the new history is a copy, so bit-exact in every dtype.
Triton runs in its interpreter here (tests/backends/conftest.py), on the GPU where CUDA is present.
"""

import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from qwen35.backends.gpu import conv
from qwen35.ops.conv import causal_conv1d_reference

needs_triton = pytest.mark.skipif(conv.triton is None, reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LENS = [1, 2, 3, 17, 70]  # 1..3: shorter than Kw-1 for Kw 4/5; 70 spans two 64-token tiles


def rand(*shape, seed, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


def batch(C, Kw, lens, dtype, with_state, seed=0, sliced=False):
    """x [N, C] (a column slice of an [N, C+5] tensor when sliced), weight, cu_seqlens, initial_state or None."""
    N = sum(lens)
    x = rand(N, C + 5, seed=seed, dtype=dtype)[:, :C] if sliced else rand(N, C, seed=seed, dtype=dtype)
    weight = rand(C, Kw, seed=seed + 1, dtype=dtype)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int64, device=DEVICE)
    state = rand(len(lens), C, Kw - 1, seed=seed + 2, dtype=dtype) if with_state else None
    return x, weight, cu, state


def reference_fp32(x, weight, cu, state):
    """The reference on the same values in fp32 (also fast: CPU bf16 convs are slow)."""
    return causal_conv1d_reference(x.float(), weight.float(), cu, None if state is None else state.float())


def assert_conv_close(got, want_fp32):
    bound = 1e-6 * (1 + want_fp32.abs()) if got.dtype == torch.float32 else 2.0 ** -8 * want_fp32.abs() + 1e-6
    err = (got.float() - want_fp32).abs()
    assert got.shape == want_fp32.shape and bool((err <= bound).all()), (err / bound).max()


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("with_state", [True, False], ids=["state", "zeros"])
@pytest.mark.parametrize("C,Kw", [(37, 4), (130, 4), (37, 2), (37, 3), (37, 5)], ids=lambda v: str(v))
def test_prefill_matches_reference(C, Kw, with_state, dtype):
    x, weight, cu, state = batch(C, Kw, LENS, dtype, with_state, seed=C + Kw)
    y, new_state = conv.causal_conv1d(x, weight, cu, state, max_query_len=max(LENS))
    want_y, want_state = reference_fp32(x, weight, cu, state)
    assert y.dtype == dtype and new_state.dtype == dtype
    assert_conv_close(y, want_y)
    assert torch.equal(new_state, want_state.to(dtype))  # a copy of (bf16-exact) inputs


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_prefill_reads_a_column_slice(dtype):
    """x = columns [0, C) of a wider [N, C+5] projection output (row stride C+5): no copy, same result."""
    x, weight, cu, state = batch(37, 4, [3, 17, 2], dtype, True, seed=5, sliced=True)
    assert not x.is_contiguous()
    y, new_state = conv.causal_conv1d(x, weight, cu, state, max_query_len=17)
    want_y, want_state = reference_fp32(x, weight, cu, state)
    assert_conv_close(y, want_y)
    assert torch.equal(new_state.float(), want_state)


@needs_triton
def test_prefill_mixed_dtypes_and_loose_max_query_len():
    """fp32 history with bf16 tokens (history rounded to x's dtype first, as the reference does); a max_query_len
    larger than needed only adds idle tiles; empty sequences keep their history."""
    x, weight, cu, _ = batch(37, 4, [0, 3, 1], torch.bfloat16, False, seed=7)
    state = rand(3, 37, 3, seed=8)
    y, new_state = conv.causal_conv1d(x, weight, cu, state, max_query_len=200)
    # the reference takes no empty sequence: check it on the others
    want_y, want_state = reference_fp32(x, weight, cu[1:], state[1:].bfloat16())
    assert_conv_close(y, want_y)
    assert torch.equal(new_state[1:], want_state.bfloat16())
    assert torch.equal(new_state[0], state[0].bfloat16())


def decode_case(C, Kw, dtype, S=3, seed=0, sliced=False):
    x, weight, cu, state = batch(C, Kw, [1] * S, dtype, True, seed=seed, sliced=sliced)
    return x, weight, cu, state


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("C,Kw", [(37, 4), (130, 2), (37, 3), (300, 5)], ids=lambda v: str(v))
def test_decode_step_matches_reference(impl, C, Kw, dtype):
    if impl == "triton" and conv.triton is None:
        pytest.skip("triton is not installed")
    update = conv.causal_conv1d_update if impl == "triton" else conv.causal_conv1d_update_torch
    x, weight, cu, state = decode_case(C, Kw, dtype, seed=C + Kw, sliced=C == 37)
    y, new_state = update(x, weight, state)
    want_y, want_state = reference_fp32(x, weight, cu, state)
    assert y.dtype == dtype and new_state.dtype == dtype and new_state.shape == state.shape
    assert_conv_close(y, want_y)
    assert torch.equal(new_state.float(), want_state)


def test_decode_step_rejects_bad_state():
    x, weight, _, state = decode_case(37, 4, torch.float32)
    with pytest.raises(ValueError, match=r"state must be \[3, 37, 3\].*got shape \(3, 37, 4\)"):
        conv.causal_conv1d_update_torch(x, weight, torch.cat([state, state[..., :1]], -1))
    with pytest.raises(ValueError, match=r"weight must be \[37, Kw\] with 2 <= Kw <= 8"):
        conv.causal_conv1d_update_torch(x, weight[:, :1], state[..., :0])


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


SYNCS = {"aten._local_scalar_dense", "aten.nonzero", "aten.item", "aten.bincount", "aten.unique"}


@pytest.mark.parametrize("wrapper", ["causal_conv1d", "causal_conv1d_update", "causal_conv1d_update_torch"])
def test_wrappers_never_sync_with_the_host(wrapper):
    if wrapper != "causal_conv1d_update_torch" and conv.triton is None:
        pytest.skip("triton is not installed")
    x, weight, cu, state = batch(37, 4, [1, 1] if "update" in wrapper else [2, 5], torch.float32, True, seed=3)
    with RecordOps() as rec:
        if wrapper == "causal_conv1d":
            out = conv.causal_conv1d(x, weight, cu, state, max_query_len=5)
        else:
            out = getattr(conv, wrapper)(x, weight, state)
    assert rec.ops and not rec.ops & SYNCS, rec.ops
    assert_conv_close(out[0], reference_fp32(x, weight, cu, state)[0])


def test_imports_without_triton():
    """qwen35 must import where triton is absent: the module loads, the torch decode step works, the Triton
    functions name triton in their error."""
    code = """
import sys
sys.modules["triton"] = None
import torch
from qwen35.backends.gpu import conv
x, w, s = torch.randn(2, 5), torch.randn(5, 4), torch.randn(2, 5, 3)
y, ns = conv.causal_conv1d_update_torch(x, w, s)
assert y.shape == (2, 5) and ns.shape == (2, 5, 3)
for call in (lambda: conv.causal_conv1d_update(x, w, s),
             lambda: conv.causal_conv1d(x, w, torch.tensor([0, 2]), max_query_len=2)):
    try:
        call()
    except RuntimeError as e:
        assert "triton" in str(e), e
    else:
        raise AssertionError("no error without triton")
print("ok")
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
