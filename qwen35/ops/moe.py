"""Sparse mixture of experts: softmax router, top-k, renormalised weights, and a dispatch that groups the routed
tokens by expert so each used expert runs one matmul and unused experts cost nothing: a loop over the hit experts
(`experts_grouped`), or one grouped matmul per projection for all of them (`experts_grouped_mm`, on GPUs);
`experts_reference` is the definition both are tested against."""

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


def _pairs_by_expert(weights, ids, num_experts: int, first: int | None):
    """The (token, expert) pairs sorted by expert, stable: (each pair's index n * k + j into ids [N, k], its weight,
    tokens per expert [num_experts]). first: the weights hold experts first.. only (expert parallelism): other
    pairs are left out."""
    order = ids.reshape(-1)
    if first is not None:
        local = order - first
        order = ((local >= 0) & (local < num_experts)).nonzero().squeeze(1)
        order = order[torch.argsort(local[order], stable=True)]
    else:
        order = torch.argsort(order, stable=True)
    chosen = ids.reshape(-1)[order] - (first or 0)
    # counted by a scatter, not bincount, whose output size would need the ids' maximum on the host (a GPU sync)
    counts = torch.zeros(num_experts, dtype=torch.long, device=ids.device)
    counts.index_add_(0, chosen, torch.ones_like(chosen))
    return order, weights.reshape(-1)[order], counts


def experts_grouped(x, weights, ids, gate_up_proj, down_proj, first: int | None = None):
    """Sort (token, expert) pairs by expert; run each hit expert once over its contiguous slice. first: see
    `_pairs_by_expert`."""
    pairs, ws, counts = _pairs_by_expert(weights, ids, gate_up_proj.shape[0], first)
    token_of_pair = pairs // ids.shape[1]
    xs = x[token_of_pair]
    out = torch.zeros_like(x)
    start = 0
    for e, c in enumerate(counts.tolist()):
        if c == 0:
            continue
        sl = slice(start, start + c)
        y = _expert(xs[sl], gate_up_proj[e], down_proj[e]) * ws[sl, None]
        out.index_add_(0, token_of_pair[sl], y.to(x.dtype))
        start += c
    return out


def experts_grouped_mm(x, weights, ids, gate_up_proj, down_proj, first: int | None = None):
    """As experts_grouped, but every expert's rows in one grouped matmul per projection (`torch._grouped_mm`: one
    kernel for all experts on a GPU, and no host sync for the counts). A token's k results are put back in its row
    and summed in fp32 in one fixed order: index_add_ on a GPU would add them by atomics in any order, rounding
    each partial sum to bf16 (tokens would differ from run to run)."""
    pairs, ws, counts = _pairs_by_expert(weights, ids, gate_up_proj.shape[0], first)
    offs = counts.cumsum(0).to(torch.int32)
    xs = x[pairs // ids.shape[1]]
    gate, up = torch._grouped_mm(xs, gate_up_proj.transpose(1, 2), offs=offs).chunk(2, dim=-1)
    y = torch._grouped_mm(F.silu(gate) * up, down_proj.transpose(1, 2), offs=offs) * ws[:, None]
    per_choice = y.new_zeros(ids.numel(), y.shape[1]).index_put_((pairs,), y)  # [N * k, H]; each index once
    return per_choice.view(*ids.shape, -1).sum(1, dtype=torch.float32).to(x.dtype)


def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch has a grouped matmul for this device and dtype: bf16 on a Hopper or newer GPU."""
    return (device.type == "cuda" and dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
            and torch.cuda.get_device_capability(device) >= (9, 0))


def experts(x, weights, ids, gate_up_proj, down_proj, first: int | None = None):
    """The routed experts' sum: one grouped matmul per projection where torch has it for the case (bf16 on a Hopper
    or newer GPU, rows of 16-byte multiples), the per-expert loop elsewhere (the CPU backend has its own kernel;
    this loop is the reference model's). Neither path has run on a GPU here yet."""
    if grouped_mm_supported(x.device, x.dtype) and gate_up_proj.shape[-1] % 8 == 0 and down_proj.shape[-1] % 8 == 0:
        return experts_grouped_mm(x, weights, ids, gate_up_proj, down_proj, first)
    return experts_grouped(x, weights, ids, gate_up_proj, down_proj, first)
