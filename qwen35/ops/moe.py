"""Sparse mixture of experts: softmax router, top-k, renormalised weights, and a dispatch that groups the routed
tokens by expert so each used expert runs one matmul and unused experts cost nothing."""

import torch
import torch.nn.functional as F

from qwen35.ops.linear import Packed, linear, native


def route(x, router_weight, top_k: int, renormalize: bool = True):
    """Returns (weights [N, k] in x's dtype, expert ids [N, k]): fp32 softmax over all experts, then top-k."""
    return route_logits(linear(x, router_weight), top_k, renormalize)


def route_logits(logits, top_k: int, renormalize: bool = True):
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), ids


def _expert(x, gate_up, down):
    gate, up = linear(x, gate_up).chunk(2, dim=-1)
    return linear(F.silu(gate) * up, down)


def experts_reference(x, weights, ids, gate_up_proj, down_proj):
    """Token by token, expert by expert: the definition. gate_up_proj [E, 2I, H] (gate rows first), down [E, H, I]
    (tensors, or `ops.linear.Packed` weights of those shapes)."""
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[n, j])
            out[n] += (_expert(x[n:n + 1], gate_up_proj[e], down_proj[e])[0] * weights[n, j]).to(x.dtype)
    return out


def experts_grouped(x, weights, ids, gate_up_proj, down_proj):
    """Sort (token, expert) pairs by expert; run each hit expert once over its contiguous slice."""
    if isinstance(gate_up_proj, Packed) and native_shapes(gate_up_proj, down_proj):
        return experts_native(x, weights, ids, gate_up_proj, down_proj)
    N, k = ids.shape
    flat_ids = ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    token_of_pair = order // k
    counts = torch.bincount(flat_ids, minlength=gate_up_proj.shape[0]).tolist()
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


def native_shapes(gate_up: Packed, down: Packed) -> bool:
    """The native expert kernels need unpadded packed experts (rows % 4, columns % 8)."""
    return gate_up.n % 4 == 0 and gate_up.k % 8 == 0 and down.n % 4 == 0 and down.k % 8 == 0


def experts_native(x, weights, ids, gate_up: Packed, down: Packed):
    """experts_grouped in one native call over packed weights: every hit expert streams its weights once for all
    its tokens (csrc/linear_avx2.c, qwen35_moe_*)."""
    N, k = ids.shape
    xf = x if x.dtype == torch.float32 and x.is_contiguous() else x.to(torch.float32).contiguous()
    ids = ids.to(torch.int64).contiguous()
    w = weights.to(torch.float32).contiguous()
    out = torch.zeros(N, x.shape[1])
    fn = native().qwen35_moe_bf16 if gate_up.dtype == torch.bfloat16 else native().qwen35_moe_f32
    fn(xf.data_ptr(), ids.data_ptr(), w.data_ptr(), N, k, gate_up.shape[0], gate_up.data.data_ptr(),
       down.data.data_ptr(), out.data_ptr(), x.shape[1], down.k)
    return out.to(x.dtype)
