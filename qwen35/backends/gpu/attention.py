"""Paged attention for packed variable-length queries in one Triton kernel: decode steps (one query per sequence),
prefills with or without cached past, and batches that mix them. Matches ops.attention.varlen_attention with a cache.

Each program takes one sequence, one KV head and BLOCK_M rows, a row being a (query token t, query head g of that
KV head's group) pair: a decode step fills the rows with the G heads sharing the KV head, so tl.dot has >= 16 rows
even for one token, and each K/V tile is read once for the whole group. Keys are gathered through the block table
per position, so any block size works; the softmax is online, in fp32. When that grid is too small to fill the
GPU (a decode step of a few sequences), several programs share a sequence's keys and a second kernel merges their
results by their log-sum-exp. No host sync: CUDA-graph capturable.
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # qwen35 imports on machines without triton; paged_attention says so when called
    triton = None

if triton is not None:

    @triton.jit
    def _paged_attention_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, part_ptr, lse_ptr, cu_ptr, ctx_ptr, bt_ptr, scale_log2, N,
        stride_qn, stride_qh, stride_qd,
        stride_kb, stride_kt, stride_kh, stride_kd,
        stride_vb, stride_vt, stride_vh, stride_vd,
        stride_on, stride_oh, stride_od,
        stride_bs, stride_bw,
        D, G: tl.constexpr, BLOCK_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    ):
        s = tl.program_id(0)
        h = tl.program_id(1)
        split = tl.program_id(2) % NUM_SPLITS
        first_row = tl.program_id(2) // NUM_SPLITS * BLOCK_M
        q_start = tl.load(cu_ptr + s).to(tl.int64)
        q_len = tl.load(cu_ptr + s + 1).to(tl.int64) - q_start
        if first_row >= q_len * G:  # the grid covers the longest sequence's rows
            return
        past = tl.load(ctx_ptr + s).to(tl.int64) - q_len

        rows = first_row + tl.arange(0, BLOCK_M)
        t = rows // G
        head = h * G + rows % G
        row_ok = rows < q_len * G
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        q = tl.load(q_ptr + (q_start + t)[:, None] * stride_qn + head[:, None] * stride_qh + d[None, :] * stride_qd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        dtype = q.dtype  # K, V and the probabilities are rounded to q's dtype, then multiplied in DOT
        q = q.to(DOT)

        # causal: query t sees keys j <= past + t; the program's last real row bounds the loop
        last_t = (tl.minimum(first_row + BLOCK_M, q_len * G) - 1) // G
        kv_end = past + last_t + 1
        chunk = tl.cdiv(tl.cdiv(kv_end, NUM_SPLITS), BLOCK_N) * BLOCK_N  # this split's keys: whole tiles
        lo = split * chunk
        m_i = tl.full([BLOCK_M], -1e30, tl.float32)  # finite: a row masked in a whole tile gives exp(-inf) = 0
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        bt_row = bt_ptr + s * stride_bs
        for start in range(lo, tl.minimum(lo + chunk, kv_end), BLOCK_N):
            j = start + tl.arange(0, BLOCK_N)
            j_ok = j < kv_end
            block = tl.load(bt_row + (j // BLOCK_SIZE) * stride_bw, mask=j_ok, other=0).to(tl.int64)
            offset = j % BLOCK_SIZE
            kv_mask = j_ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + block[:, None] * stride_kb + offset[:, None] * stride_kt + h * stride_kh
                        + d[None, :] * stride_kd, mask=kv_mask, other=0.0).to(dtype).to(DOT)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # log2 units: exp2 below
            visible = (j[None, :] <= past + t[:, None]) & j_ok[None, :]
            scores = tl.where(visible, scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_ptr + block[:, None] * stride_vb + offset[:, None] * stride_vt + h * stride_vh
                        + d[None, :] * stride_vd, mask=kv_mask, other=0.0).to(dtype).to(DOT)
            acc = acc * alpha[:, None] + tl.dot(p.to(dtype).to(DOT), v, input_precision=PRECISION)
            m_i = m_new
        l_safe = tl.where(l_i > 0, l_i, 1.0)  # 0: a split in which a row sees no key
        out = acc / l_safe[:, None]
        if NUM_SPLITS == 1:
            tl.store(out_ptr + (q_start + t)[:, None] * stride_on + head[:, None] * stride_oh
                     + d[None, :] * stride_od, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        else:  # this split's softmax-weighted mean and log2-sum-exp (-inf: no visible key) for _combine_splits
            row = (split.to(tl.int64) * N + q_start + t) * (tl.num_programs(1) * G) + head
            tl.store(part_ptr + row[:, None] * D + d[None, :], out, mask=row_ok[:, None] & d_ok[None, :])
            tl.store(lse_ptr + row, tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf")), mask=row_ok)

    @triton.jit
    def _combine_splits(part_ptr, lse_ptr, out_ptr, num_rows, Hq, stride_on, stride_oh, stride_od, D,
                        NUM_SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr, BLOCK_D: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # token * Hq + head
        sp = tl.arange(0, SPLITS_P2)
        sp_ok = sp < NUM_SPLITS
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        rows = sp.to(tl.int64) * num_rows + row
        lse = tl.load(lse_ptr + rows, mask=sp_ok, other=float("-inf"))
        w = tl.exp2(lse - tl.max(lse, axis=0))  # split 0 holds key 0, visible to every query: the max is finite
        part = tl.load(part_ptr + rows[:, None] * D + d[None, :], mask=sp_ok[:, None] & d_ok[None, :], other=0.0)
        out = tl.sum(w[:, None] * part, axis=0) / tl.sum(w, axis=0)
        tl.store(out_ptr + row // Hq * stride_on + row % Hq * stride_oh + d * stride_od,
                 out.to(out_ptr.dtype.element_ty), mask=d_ok)

    # Triton's interpreter multiplies bf16 operands of tl.dot as their raw 16 bits (triton 3.9): there the kernel
    # multiplies in fp32 instead, the same numbers (a product of two bf16 values is exact in fp32).
    _INTERPRETED = not isinstance(_paged_attention_kernel, triton.runtime.JITFunction)
    _TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

MAX_SPLITS = 32  # programs sharing one sequence's keys, at most


def _check(q, k_cache, v_cache, cu_seqlens, context_lens, block_tables, out):
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"paged_attention: q must be [N, Hq, D] and k/v_cache [num_blocks, block_size, Hkv, D] "
                         f"alike; got q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, "
                         f"v_cache {tuple(v_cache.shape)}")
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"paged_attention: q must be bf16, fp16 or fp32; got {q.dtype}")
    (_, Hq, D), (_, _, Hkv, Dk) = q.shape, k_cache.shape
    if Dk != D or Hq % Hkv:
        raise ValueError(f"paged_attention: q has {Hq} heads of {D}, the cache {Hkv} heads of {Dk}: the head sizes "
                         f"must match and the query heads be a multiple of the KV heads")
    S = context_lens.shape[0]
    if cu_seqlens.shape != (S + 1,) or block_tables.dim() != 2 or block_tables.shape[0] != S:
        raise ValueError(f"paged_attention: {S} sequences need cu_seqlens [{S + 1}] and block_tables [{S}, W]; got "
                         f"cu_seqlens {tuple(cu_seqlens.shape)}, block_tables {tuple(block_tables.shape)}")
    for name, x in (("cu_seqlens", cu_seqlens), ("context_lens", context_lens), ("block_tables", block_tables)):
        if x.dtype.is_floating_point or x.dtype.is_complex or x.device != q.device:
            raise ValueError(f"paged_attention: {name} must be an integer tensor on {q.device}; "
                             f"got {x.dtype} on {x.device}")
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not x.dtype.is_floating_point or x.device != q.device:
            raise ValueError(f"paged_attention: {name} must be a float tensor on {q.device}; "
                             f"got {x.dtype} on {x.device}")
    if out is not None and (out.shape != q.shape or out.device != q.device):
        raise ValueError(f"paged_attention: out must be {tuple(q.shape)} on {q.device}; "
                         f"got {tuple(out.shape)} on {out.device}")


def _num_splits(device, num_programs: int) -> int:
    """Split the keys when the grid would leave SMs idle (a decode step of few sequences over long contexts)."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(MAX_SPLITS, sms // num_programs))


def paged_attention(q, k_cache, v_cache, cu_seqlens, context_lens, block_tables, scale: float, max_query_len: int,
                    out=None, num_kv_splits: int | None = None) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its first context_lens[s] cached positions (the new
    K/V already written to the cache; the q_len = cu_seqlens[s+1] - cu_seqlens[s] queries are the last q_len of
    them, so context_lens[s] >= q_len).

    q [N, Hq, D] (any strides); k_cache, v_cache [num_blocks, block_size, Hkv, D] (any float dtype: read as q's);
    cu_seqlens [S+1], context_lens [S], block_tables [S, W] integer tensors on q's device (table entries past a
    sequence's blocks must be valid block ids, e.g. 0); max_query_len: a host int >= every q_len (sizes the grid
    without a sync). Returns [N, Hq, D] in q's dtype, written to `out` when given; rows of tokens outside every
    sequence (cu_seqlens[-1] < N, e.g. padding) are left undefined.

    num_kv_splits: how many programs share one sequence's keys (their partial results merged by a second kernel);
    by default as many as fill the GPU's SMs when the grid alone would not (at most MAX_SPLITS), 1 on CPU.
    """
    if triton is None:
        raise RuntimeError("paged_attention needs triton (pip install triton; it comes with CUDA builds of torch)")
    _check(q, k_cache, v_cache, cu_seqlens, context_lens, block_tables, out)
    if num_kv_splits is not None and num_kv_splits < 1:
        raise ValueError(f"paged_attention: num_kv_splits must be >= 1; got {num_kv_splits}")
    N, Hq, D = q.shape
    _, block_size, Hkv, _ = k_cache.shape
    G = Hq // Hkv
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    S = context_lens.shape[0]
    if N == 0 or S == 0 or max_query_len <= 0:
        return out
    BLOCK_D = triton.next_power_of_2(D)
    # rows are (token, head) pairs: a decode step has G of them; 16 is tl.dot's minimum
    BLOCK_M = max(16, min(64, triton.next_power_of_2(max_query_len * G)))
    BLOCK_N = 64 if BLOCK_D <= 128 else 32
    dot = tl.float32 if q.dtype == torch.float32 or _INTERPRETED else _TL_DTYPES[q.dtype]
    m_blocks = triton.cdiv(max_query_len * G, BLOCK_M)
    splits = num_kv_splits if num_kv_splits is not None else _num_splits(q.device, S * Hkv * m_blocks)
    if splits > 1:
        part = torch.empty(splits, N, Hq, D, dtype=torch.float32, device=q.device)
        lse = torch.empty(splits, N, Hq, dtype=torch.float32, device=q.device)
    else:
        part = lse = out  # not written
    _paged_attention_kernel[(S, Hkv, m_blocks * splits)](
        q, k_cache, v_cache, out, part, lse, cu_seqlens, context_lens, block_tables, scale * 1.4426950408889634, N,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(), *block_tables.stride(),
        D, G=G, BLOCK_SIZE=block_size, NUM_SPLITS=splits, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, DOT=dot,
        # fp32 stays fp32 on tensor cores (tf32 would cost ~1e-3); half types are exact products anyway
        PRECISION="ieee" if dot == tl.float32 else "tf32",
        num_warps=4 if BLOCK_D <= 128 else 8,
    )
    if splits > 1:
        _combine_splits[(N * Hq,)](part, lse, out, N * Hq, Hq, *out.stride(), D, NUM_SPLITS=splits,
                                   SPLITS_P2=triton.next_power_of_2(splits), BLOCK_D=BLOCK_D)
    return out
