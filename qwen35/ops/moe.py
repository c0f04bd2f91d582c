"""Sparse mixture of experts: softmax router, top-k, renormalised weights, and a dispatch that groups the routed
tokens by expert so each used expert runs one matmul and unused experts cost nothing."""

import torch
import torch.nn.functional as F


def route(x, router_weight, top_k: int, renormalize: bool = True):
    """Returns (weights [N, k] in x's dtype, expert ids [N, k]): fp32 softmax over all experts, then top-k."""
    return route_logits(F.linear(x, router_weight), top_k, renormalize)


def route_logits(logits, top_k: int, renormalize: bool = True):
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), ids


def _expert(x, gate_up, down):
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)


def experts_reference(x, weights, ids, gate_up_proj, down_proj):
    """Token by token, expert by expert: the definition. gate_up_proj [E, 2I, H] (gate rows first), down [E, H, I]."""
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[n, j])
            out[n] += (_expert(x[n:n + 1], gate_up_proj[e], down_proj[e])[0] * weights[n, j]).to(x.dtype)
    return out


def experts_grouped(x, weights, ids, gate_up_proj, down_proj, first: int | None = None):
    """Sort (token, expert) pairs by expert; run each hit expert once over its contiguous slice. first: the weights
    hold experts first.. only (expert parallelism): pairs choosing other experts are left out."""
    N, k = ids.shape
    flat_ids = ids.reshape(-1)
    pairs = None
    if first is not None:
        flat_ids = flat_ids - first
        pairs = ((flat_ids >= 0) & (flat_ids < gate_up_proj.shape[0])).nonzero().squeeze(1)
        flat_ids = flat_ids[pairs]
    order = torch.argsort(flat_ids, stable=True)
    if pairs is not None:
        order = pairs[order]
    token_of_pair = order // k
    counts = torch.bincount(ids.reshape(-1)[order] - (first or 0), minlength=gate_up_proj.shape[0]).tolist()
    xs = x[token_of_pair]
    ws = weights.reshape(-1)[order]
    out = torch.zeros_like(x)
    start = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        sl = slice(start, start + c)
        y = _expert(xs[sl], gate_up_proj[e], down_proj[e]) * ws[sl, None]
        out.index_add_(0, token_of_pair[sl], y.to(x.dtype))
        start += c
    return out
