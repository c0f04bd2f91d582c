"""The Triton paged attention kernel against ops.attention.varlen_attention(impl="reference"): decode batches,
prefills with and without cached past, both in one batch; head groups of 1, 3 and 8; head sizes 64, 80 and 256;
block sizes 16 and 4 with contexts off the block boundary; shuffled block tables with padding entries. Cache slots
past each sequence's context hold NaN, so a read beyond it shows. Runs in Triton's interpreter without CUDA.

Tolerances. fp32: 1e-5 of the output's largest magnitude (fp32 sums of <= a few hundred terms in another order).
bf16 (against the reference in fp32 on the same bf16 inputs): the kernel's scores are exact bf16 products summed in
fp32; what it rounds is each probability to bf16 before the P @ V product (relative 2^-8 each, so at most 2^-8 of
sum_j p_j |v_j|, the attention of |V|) and the output to bf16 (2^-8 of |out|). The bound is the sum of those two,
plus 1e-5 of the first for fp32 rounding; an off-by-one key or a wrong head is off by O(|v|), far beyond it.
Triton's interpreter (triton 3.9) casts fp32 to bf16 by truncation, not to nearest as the GPU does: one ulp,
2^-7, instead of half of one, so in the interpreter the bound uses 2^-7, and a bf16 cache value made from fp32
is expected truncated."""

import math
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton")

from qwen35.backends.gpu.attention import paged_attention  # noqa: E402
from qwen35.ops.attention import varlen_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# id -> (new tokens per sequence, context lengths, kv heads, group size G, head size D, block size)
CASES = {
    "decode-G1-D64-bs16": ([1, 1, 1, 1], [1, 17, 40, 70], 2, 1, 64, 16),
    "decode-G8-D80-bs4": ([1, 1, 1], [3, 22, 66], 2, 8, 80, 4),
    "chunked-G3-D80-bs4": ([5, 19, 3], [13, 50, 130], 1, 3, 80, 4),
    "prefill-G1-D64-bs16": ([7, 20], [7, 20], 2, 1, 64, 16),
    "prefill-G8-D64-bs16": ([7, 13], [7, 13], 1, 8, 64, 16),
    "mixed-G8-D64-bs16": ([1, 9, 1, 12], [33, 9, 5, 30], 1, 8, 64, 16),
    "mixed-G3-D64-bs4": ([2, 1, 6], [6, 19, 6], 2, 3, 64, 4),
    "D256-G2-bs16": ([1, 3], [6, 3], 1, 2, 256, 16),
}


def make_case(q_lens, ctx_lens, Hkv, G, D, block_size, dtype, cache_dtype=None, seed=0):
    """Packed queries, a cache whose blocks are handed out shuffled (a few left unused), NaN in every slot past a
    sequence's context, and block tables padded with block 0."""
    gen = torch.Generator().manual_seed(seed)
    S, N, Hq = len(q_lens), sum(q_lens), Hkv * G
    counts = [math.ceil(c / block_size) for c in ctx_lens]
    num_blocks = sum(counts) + 3
    ids = torch.randperm(num_blocks, generator=gen)
    k_cache = torch.full((num_blocks, block_size, Hkv, D), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))
    block_tables = torch.zeros(S, max(counts) + 2, dtype=torch.int64)
    used = 0
    for s, (n, c) in enumerate(zip(counts, ctx_lens)):
        block_tables[s, :n] = ids[used:used + n]
        used += n
        k_cache.view(-1, Hkv, D)[(block_tables[s, :n, None] * block_size + torch.arange(block_size)).flatten()[:c]] \
            = torch.randn(c, Hkv, D, generator=gen)
        v_cache.view(-1, Hkv, D)[(block_tables[s, :n, None] * block_size + torch.arange(block_size)).flatten()[:c]] \
            = torch.randn(c, Hkv, D, generator=gen)
    q = torch.randn(N, Hq, D, generator=gen)
    cu_seqlens = torch.tensor([0] + q_lens).cumsum(0)
    cache_dtype = cache_dtype or dtype
    to = dict(device=DEVICE)
    return (q.to(dtype=dtype, **to), k_cache.to(dtype=cache_dtype, **to), v_cache.to(dtype=cache_dtype, **to),
            cu_seqlens.to(**to), torch.tensor(ctx_lens).to(**to), block_tables.to(**to))


def reference(q, k_cache, v_cache, cu_seqlens, context_lens, block_tables, scale):
    """varlen_attention in fp32 on the same (rounded) inputs, on CPU."""
    args = [x.cpu() for x in (cu_seqlens, context_lens, block_tables)]
    q, k_cache, v_cache = (x.float().cpu() for x in (q, k_cache, v_cache))
    return varlen_attention(q, None, None, args[0], scale, k_cache=k_cache, v_cache=v_cache, block_tables=args[2],
                            context_lens=args[1], impl="reference")


def assert_matches(got, q, k_cache, v_cache, cu_seqlens, context_lens, block_tables, scale):
    ref = reference(q, k_cache, v_cache, cu_seqlens, context_lens, block_tables, scale)
    err = (got.float().cpu() - ref).abs()
    assert got.shape == q.shape and got.dtype == q.dtype and not got.isnan().any()
    if q.dtype == torch.float32:
        bound = 1e-5 * ref.abs().max()
    else:  # see the module docstring
        attn_abs_v = reference(q, k_cache, v_cache.abs(), cu_seqlens, context_lens, block_tables, scale)
        u = (2.0 ** -7 if INTERPRETED else 2.0 ** -8) if q.dtype == torch.bfloat16 else 2.0 ** -11
        bound = (u + 1e-5) * attn_abs_v + u * ref.abs()
    assert bool((err <= bound).all()), f"max error {err.max():.3g}, worst error/bound {(err / bound).max():.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(case, dtype):
    q_lens, ctx_lens, Hkv, G, D, block_size = CASES[case]
    args = make_case(q_lens, ctx_lens, Hkv, G, D, block_size, dtype)
    got = paged_attention(*args, scale=D ** -0.5, max_query_len=max(q_lens))
    assert_matches(got, *args, scale=D ** -0.5)


def as_kernel_reads(x, dtype):
    """x converted to dtype as the kernel converts it (see the module docstring for the interpreter's bf16)."""
    if INTERPRETED and x.dtype == torch.float32 and dtype == torch.bfloat16:
        return (x.view(torch.int32) & -65536).view(torch.float32).to(dtype)  # drop the low 16 bits: exact in bf16
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("splits", [2, 3])
@pytest.mark.parametrize("case", ["decode-G1-D64-bs16", "chunked-G3-D80-bs4", "mixed-G8-D64-bs16", "D256-G2-bs16"])
def test_split_keys(case, splits, dtype):
    """Keys shared among programs and merged by log-sum-exp: splits that cover a tile or more, splits past the
    context (empty), splits in which some query of a prefill sees no key at all."""
    q_lens, ctx_lens, Hkv, G, D, block_size = CASES[case]
    args = make_case(q_lens, ctx_lens, Hkv, G, D, block_size, dtype)
    got = paged_attention(*args, scale=D ** -0.5, max_query_len=max(q_lens), num_kv_splits=splits)
    assert_matches(got, *args, scale=D ** -0.5)


@pytest.mark.parametrize("dtype,cache_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                               (torch.float16, torch.float16)],
                         ids=["fp32-q-bf16-cache", "bf16-q-fp32-cache", "fp16"])
def test_cache_dtype_and_fp16(dtype, cache_dtype):
    """The cache is read as q's dtype, as the reference converts it."""
    args = list(make_case([1, 6], [20, 9], 1, 3, 64, 4, dtype, cache_dtype=cache_dtype))
    got = paged_attention(*args, scale=0.125, max_query_len=6)
    args[1], args[2] = as_kernel_reads(args[1], dtype), as_kernel_reads(args[2], dtype)  # what the reference sees
    assert_matches(got, *args, scale=0.125)


def test_strided_q_and_out_and_a_loose_max_query_len():
    """q and out as views with non-unit strides everywhere; max_query_len above the longest sequence (the extra
    programs return); rows of out the kernel must not touch stay as they were."""
    q_lens, ctx_lens = [3, 1], [10, 21]
    q, k_cache, v_cache, *meta = make_case(q_lens, ctx_lens, 2, 3, 64, 16, torch.float32)
    q_strided = torch.zeros(q.shape[1], q.shape[0], 2 * q.shape[2], device=DEVICE).transpose(0, 1)[:, :, 1::2]
    q_strided.copy_(q)
    big = torch.full((q.shape[0] + 1, q.shape[1], 2 * q.shape[2]), 7.0, device=DEVICE)
    out = big[:-1, :, ::2]
    k_strided = torch.zeros(*k_cache.shape[:3], 2 * k_cache.shape[3], device=DEVICE)[..., ::2]
    k_strided.copy_(k_cache)
    got = paged_attention(q_strided, k_strided, v_cache, *meta, scale=0.125, max_query_len=9, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert_matches(out, q, k_cache, v_cache, *meta, scale=0.125)
    assert bool((big[:-1, :, 1::2] == 7).all()) and bool((big[-1] == 7).all())


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_no_host_sync():
    """The wrapper reads nothing back from the device (CUDA-graph capturable): no torch op that copies a value to
    the host. (The kernel launch itself is no torch op; this watches the wrapper's own torch calls.)"""
    args = make_case([1, 4], [9, 4], 1, 3, 64, 16, torch.float32)
    with RecordOps() as rec:
        got = paged_attention(*args, scale=0.125, max_query_len=4, num_kv_splits=2)
    assert rec.ops, "the mode saw no op at all: it would not see a sync either"
    syncs = [op for op in rec.ops if any(s in op for s in ("_local_scalar_dense", "nonzero", "aten.item"))]
    assert not syncs, syncs
    assert_matches(got, *args, scale=0.125)


def test_bad_input_is_named():
    q, k_cache, v_cache, cu_seqlens, context_lens, block_tables = make_case([2], [5], 2, 3, 64, 16, torch.float32)
    with pytest.raises(ValueError, match="multiple of the KV heads"):
        paged_attention(q[:, :5], k_cache, v_cache, cu_seqlens, context_lens, block_tables, 0.125, 2)
    with pytest.raises(ValueError, match="cu_seqlens"):
        paged_attention(q, k_cache, v_cache, cu_seqlens[:1], context_lens, block_tables, 0.125, 2)
    with pytest.raises(ValueError, match="block_tables must be an integer tensor"):
        paged_attention(q, k_cache, v_cache, cu_seqlens, context_lens, block_tables.float(), 0.125, 2)
    with pytest.raises(ValueError, match="num_kv_splits"):
        paged_attention(q, k_cache, v_cache, cu_seqlens, context_lens, block_tables, 0.125, 2, num_kv_splits=0)


def test_imports_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch\n"
            "from qwen35.backends.gpu.attention import paged_attention\n"
            "try:\n"
            "    paged_attention(*[torch.zeros(1)] * 6, scale=1.0, max_query_len=1)\n"
            "except RuntimeError as e:\n"
            "    assert 'needs triton' in str(e), e\n"
            "else:\n"
            "    raise AssertionError('no error without triton')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replay():
    """Captured once (keys split among programs, as few sequences leave SMs idle), replayed on new queries and
    context lengths written into the same buffers."""
    q, k_cache, v_cache, cu_seqlens, context_lens, block_tables = make_case(
        [1, 1, 1, 1], [5, 40, 70, 200], 2, 8, 128, 16, torch.bfloat16)
    out = torch.empty_like(q)

    def call():
        paged_attention(q, k_cache, v_cache, cu_seqlens, context_lens, block_tables, 128 ** -0.5, 1, out=out)

    call()  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    q.copy_(torch.randn_like(q))
    context_lens.copy_(torch.tensor([2, 33, 70, 129]))
    graph.replay()
    torch.cuda.synchronize()
    assert_matches(out, q, k_cache, v_cache, cu_seqlens, context_lens, block_tables, 128 ** -0.5)
