"""The gated delta rule on a GPU: flash-linear-attention's Triton kernels (the optional `fla-core` package, imported
on first use) behind the contract of `ops.gated_delta.gated_delta_rule`.

Layouts: ours and fla's agree. q, k [N, Hk, K] and v [N, Hv, V] packed become fla's [1, N, H, ·] with `cu_seqlens`
(varlen), or [S, 1, H, ·] for a decode step (one token per sequence, no cu_seqlens: nothing depends on values on the
host, so it can be captured in a CUDA graph). fla applies grouped values itself (v-head h reads q/k head
h // (Hv / Hk), as ours), the q/k l2-norm inside the kernel (`use_qk_l2norm_in_kernel`, eps 1e-6 as ours) and the
K^-1/2 query scale by default. The state is [S, Hv, K, V] float32 in both (fla's default `state_v_first=False`), so
the slot pool's states pass as they are. fla takes bf16 / fp16 q, k, v only; fp32 models keep the reference.

fla returns final states only; a prefix-cache snapshot or a speculative step's ring wants the state after the
first t tokens of a sequence (`capture`). Those sequences are cut at their capture points and run in rounds: round r
runs every sequence's r-th piece from the state round r - 1 left (the same maths, other chunk boundaries)."""

from __future__ import annotations

import functools
import itertools

import torch
from torch import Tensor



@functools.cache
def fla_functions():
    """(chunk_gated_delta_rule, fused_recurrent_gated_delta_rule) from fla-core, or None where it does not import."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
    except Exception:  # not installed, or no Triton for this platform
        return None
    return chunk_gated_delta_rule, fused_recurrent_gated_delta_rule


def delta_rule_fla(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, cu_seqlens: Tensor,
                   initial_state: Tensor | None = None, *, lengths: list[int], capture=None, fla=None):
    """gated_delta_rule's contract on fla's kernels. lengths: each sequence's new tokens, on the host (the caller
    built the batch; no sync). fla: the two functions (tests pass stand-ins), default fla_functions()."""
    chunk, recurrent = fla or fla_functions()
    S, Hv = len(lengths), v.shape[1]
    state = initial_state if initial_state is not None else \
        v.new_zeros(S, Hv, q.shape[2], v.shape[2], dtype=torch.float32)
    g, beta = g.float(), beta.to(v.dtype)
    if not capture:
        return _run(chunk, recurrent, q, k, v, g, beta, cu_seqlens, lengths, state)
    cuts = {s: sorted({t for s2, t in capture if s2 == s}) for s, _ in capture}
    pieces = [[0, *cuts.get(s, []), n] for s, n in enumerate(lengths)]  # each sequence's piece boundaries
    starts = list(itertools.accumulate(lengths, initial=0))
    o = torch.empty_like(v)
    state = state.clone()
    after = {}  # (sequence, t) -> the state after its first t tokens
    for r in range(max(len(p) for p in pieces) - 1):
        seqs = [s for s, p in enumerate(pieces) if len(p) > r + 1]
        spans = [(starts[s] + pieces[s][r], starts[s] + pieces[s][r + 1]) for s in seqs]
        rows = torch.cat([torch.arange(a, b) for a, b in spans]).to(v.device)
        at = torch.tensor(seqs, device=v.device)
        o[rows], state[at] = _run(chunk, recurrent, q[rows], k[rows], v[rows], g[rows], beta[rows], None,
                                  [b - a for a, b in spans], state[at])
        for s in seqs:
            if pieces[s][r + 1] < lengths[s]:
                after[s, pieces[s][r + 1]] = state[s].clone()
    return o, state, torch.stack([after[c] for c in capture])


def _run(chunk, recurrent, q, k, v, g, beta, cu_seqlens, lengths, state):
    """One fla call over packed sequences of these host lengths (cu_seqlens: their device copy, made here if
    None)."""
    kw = dict(initial_state=state, output_final_state=True, use_qk_l2norm_in_kernel=True)
    if len(lengths) == q.shape[0]:  # a decode step: the batch form [S, 1, H, ·]
        o, final = recurrent(q[:, None], k[:, None], v[:, None], g=g[:, None], beta=beta[:, None], **kw)
        return o[:, 0], final
    cu_cpu = torch.tensor(list(itertools.accumulate(lengths, initial=0)))
    if cu_seqlens is None:
        cu_seqlens = cu_cpu.to(v.device)
    o, final = chunk(q[None], k[None], v[None], g=g[None], beta=beta[None], cu_seqlens=cu_seqlens,
                     cu_seqlens_cpu=cu_cpu, **kw)
    return o[0], final
