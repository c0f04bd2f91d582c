"""Causal attention for packed sequences, optionally over a paged K/V cache.

Each sequence's new queries attend to its own keys: the cached ones (read through its block table) plus the new
ones, causally. GQA: kv head j serves query heads j*G .. j*G+G-1. Softmax in fp32.
"""

import torch
import torch.nn.functional as F


def write_kv(k_cache, v_cache, slot_mapping, k, v):
    """Store new K/V ([N, Hkv, D]) at flat cache positions `slot_mapping` ([N]) of [num_blocks, block_size, Hkv, D]."""
    k_cache.view(-1, *k_cache.shape[2:])[slot_mapping] = k.to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slot_mapping] = v.to(v_cache.dtype)


def gather_kv(k_cache, v_cache, block_table, length: int):
    """The first `length` cached K/V of one sequence: [length, Hkv, D] each."""
    block_size = k_cache.shape[1]
    blocks = block_table[: (length + block_size - 1) // block_size]
    k = k_cache[blocks].flatten(0, 1)[:length]
    v = v_cache[blocks].flatten(0, 1)[:length]
    return k, v


def attention_reference(q, k, v, scale: float):
    """One sequence, eager: q [T, Hq, D], k/v [L, Hkv, D] with the T queries being the last T of the L positions."""
    T, Hq, D = q.shape
    L, Hkv, _ = k.shape
    G = Hq // Hkv
    k = k.repeat_interleave(G, dim=1)
    v = v.repeat_interleave(G, dim=1)
    scores = torch.einsum("thd,lhd->htl", q, k) * scale
    past = L - T
    mask = torch.arange(L, device=q.device)[None, :] > (past + torch.arange(T, device=q.device))[:, None]
    scores = scores.masked_fill(mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.einsum("htl,lhd->thd", probs, v)


def _sdpa(q, k, v, scale: float):
    """One sequence through torch's SDPA: same contract as attention_reference. Prompts repeat K/V per query
    head and pass [1, H, T, D]: that is the form for which CPU torch takes its flash kernel (skipping the masked
    half, ~3x its GQA path at 2048 tokens); a single query keeps the GQA call."""
    T, L = q.shape[0], k.shape[0]
    if T == 1:
        qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [H, T|L, D]
        return F.scaled_dot_product_attention(qh, kh, vh, scale=scale, enable_gqa=True).transpose(0, 1)
    G = q.shape[1] // k.shape[1]
    if G > 1:
        k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    qh, kh, vh = (x.transpose(0, 1)[None] for x in (q, k, v))  # [1, H, T|L, D]
    if T == L:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)
    else:
        mask = torch.arange(L, device=q.device)[None, :] <= (L - T + torch.arange(T, device=q.device))[:, None]
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
    return out[0].transpose(0, 1)


def varlen_attention(q, k, v, cu_seqlens, scale, *, k_cache=None, v_cache=None, block_tables=None,
                     context_lens=None, impl: str = "sdpa"):
    """q: [N, Hq, D], k/v: [N, Hkv, D] (new tokens). With a cache, the new K/V must already be written to it and
    each sequence attends to its first `context_lens[s]` cached positions; without one, to its new tokens only."""
    attend = attention_reference if impl == "reference" else _sdpa
    bounds = cu_seqlens.tolist()
    out = torch.empty_like(q)
    for s in range(len(bounds) - 1):
        a, b = bounds[s], bounds[s + 1]
        if k_cache is None:
            ks, vs = k[a:b], v[a:b]
        else:
            ks, vs = gather_kv(k_cache, v_cache, block_tables[s], int(context_lens[s]))
            ks, vs = ks.to(q.dtype), vs.to(q.dtype)  # the cache may be kept narrower than the activations
        out[a:b] = attend(q[a:b], ks, vs, scale)
    return out
