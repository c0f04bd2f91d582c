"""Python faces of the native decode layers (csrc/decode_blocks.c; the MoE block and the matmuls they call are in
csrc/linear_avx2.c).

A decode step (one new token per sequence) on a packed CPU model runs each half of a layer (residual add + norm +
mixer, residual add + norm + FFN) as one native call, so a step costs two calls per layer instead of dozens of
framework ops: at batch 1 those ops, not the weights, were most of the step. The PyTorch layers in qwen35/models
and qwen35/layers are the reference for each; tests/ops/test_native_blocks.py compares the two on awkward shapes,
and tests/ops/test_native_decode.py a packed model stepping through its cache against its own prefill.
Hidden states are contiguous float32 [S, H]: each `*_layer(h, y_prev, norm, ...)` adds y_prev into h in place,
updates the caches in place and returns the half's output [S, H]. Call only when ops.linear.native_available().
"""

from __future__ import annotations

import torch

from qwen35.ops.linear import Packed, native


def add_rms_norm(h: torch.Tensor, y: torch.Tensor | None, w1: torch.Tensor, eps: float):
    """(h + y, rms_norm(h + y) * w1); y None means h itself. w1 is 1 + the zero-centred weight, fp32.
    Reference: ops.norms.rms_norm."""
    M, H = h.shape
    if h.dtype != torch.float32 or (y is not None and (y.shape != h.shape or y.dtype != torch.float32)):
        raise ValueError("add_rms_norm takes float32 [S, H] hidden states and residuals of the same shape")
    h, y = h.contiguous(), y.contiguous() if y is not None else None
    h_out, a = torch.empty(M, H), torch.empty(M, H)
    native().qwen35_add_rmsnorm(h.data_ptr(), y.data_ptr() if y is not None else None, w1.data_ptr(),
                                h_out.data_ptr(), a.data_ptr(), M, H, eps)
    return h_out, a


def _layer_in(h: torch.Tensor, y_prev: torch.Tensor | None, norm, in_w: Packed) -> list:
    """The arguments every fused layer half starts with (csrc/decode_blocks.c): h is updated in place."""
    if h.dtype != torch.float32 or not h.is_contiguous() or (y_prev is not None and y_prev.shape != h.shape):
        raise ValueError("decode layers take contiguous float32 hidden states [S, H]")
    return [h.data_ptr(), None if y_prev is None else y_prev.data_ptr(), norm.w1.data_ptr(), norm.eps, h.shape[1],
            in_w.data.data_ptr(), in_w.data.shape[-4] * 4]


def gdn_layer(h, y_prev, norm, mixer, batch, cache) -> torch.Tensor:
    """h += y_prev; the Gated DeltaNet mixer (qwen35.models.qwen3_5.GatedDeltaNet) on rms_norm(h), from the fused
    input projection through the gated-delta step (conv and recurrent state updated in place at the batch's slots)
    to out_proj. Returns the mixer's output [S, H]."""
    conv, ssm = cache.conv[mixer.layer_idx], cache.ssm[mixer.layer_idx]
    if conv.dtype not in (torch.bfloat16, torch.float32) or ssm.dtype != torch.float32 \
            or not conv.is_contiguous() or not ssm.is_contiguous():
        raise ValueError("gdn_layer: cache pools of unexpected dtype or layout")
    n, w = mixer._native, mixer.in_proj.weight
    y = torch.empty_like(h)
    native().qwen35_gdn_layer(*_layer_in(h, y_prev, norm, w), mixer.out_proj.weight.data.data_ptr(),
                              w.dtype == torch.bfloat16, y.data_ptr(), conv.data_ptr(), conv.dtype == torch.bfloat16,
                              n["conv_w"].data_ptr(), ssm.data_ptr(), batch.state_slots.data_ptr(),
                              batch.has_initial_state.data_ptr(), n["A_log"].data_ptr(), n["dt_bias"].data_ptr(),
                              n["norm_w"].data_ptr(), mixer.norm.eps, h.shape[0], mixer.num_k_heads,
                              mixer.num_v_heads, mixer.k_head_dim, mixer.v_head_dim, n["conv_w"].shape[1])
    return y


def attn_layer(h, y_prev, norm, mixer, cos, sin, batch, cache) -> torch.Tensor:
    """h += y_prev; gated attention (qwen35.models.qwen3_5.Attention) on rms_norm(h): q/k norms, rotary, K/V written
    to the paged cache, attention over each sequence's cached positions, the gate and o_proj. Returns [S, H]."""
    k_cache, v_cache = cache.k[mixer.layer_idx], cache.v[mixer.layer_idx]
    if k_cache.dtype not in (torch.bfloat16, torch.float32) or v_cache.dtype != k_cache.dtype \
            or not k_cache.is_contiguous() or not v_cache.is_contiguous():
        raise ValueError("attn_layer: K/V cache of unexpected dtype or layout")
    w = mixer.qkv_proj.weight
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    y = torch.empty_like(h)
    native().qwen35_attn_layer(*_layer_in(h, y_prev, norm, w), mixer.o_proj.weight.data.data_ptr(),
                               w.dtype == torch.bfloat16, y.data_ptr(), mixer._native["qn1"].data_ptr(),
                               mixer._native["kn1"].data_ptr(), mixer.q_norm.eps, cos.data_ptr(), sin.data_ptr(),
                               cos.shape[1], k_cache.data_ptr(), v_cache.data_ptr(), k_cache.dtype == torch.bfloat16,
                               batch.slot_mapping.data_ptr(), batch.block_tables.data_ptr(),
                               batch.block_tables.shape[1], batch.context_lens.data_ptr(), k_cache.shape[1],
                               h.shape[0], mixer.num_heads, mixer.num_kv_heads, mixer.head_dim, mixer.scale)
    return y


def moe_layer(h, y_prev, norm, block) -> torch.Tensor:
    """h += y_prev; the sparse-MoE block (qwen35.layers.mlp.SparseMoeBlock) on rms_norm(h): routing from the fused
    input projection, the routed experts and the gated shared expert. Returns [S, H]."""
    w, experts = block.in_proj.weight, block.experts
    y = torch.empty_like(h)
    native().qwen35_moe_layer(*_layer_in(h, y_prev, norm, w), w.dtype == torch.bfloat16, y.data_ptr(),
                              experts.gate_up_proj.shape[0], block.top_k, block.renormalize,
                              experts.gate_up_proj.data.data_ptr(), experts.down_proj.data.data_ptr(),
                              block.shared_expert.down_proj.weight.data.data_ptr(), experts.down_proj.k,
                              block.shared_expert.down_proj.weight.k, h.shape[0])
    return y


def mlp_layer(h, y_prev, norm, mlp) -> torch.Tensor:
    """h += y_prev; the dense SwiGLU MLP (qwen35.layers.mlp.MLP) on rms_norm(h). Returns [S, H]."""
    w = mlp.gate_up.weight
    y = torch.empty_like(h)
    native().qwen35_mlp_layer(*_layer_in(h, y_prev, norm, w), mlp.down_proj.weight.data.data_ptr(),
                              w.dtype == torch.bfloat16, y.data_ptr(), mlp.down_proj.weight.k, h.shape[0])
    return y


def fits(w, n: int | None = None, k: int | None = None) -> bool:
    """A packed weight the fused layers can use: no padding of its input dimension (and of its output when it
    writes the hidden state directly), and the expected shape."""
    from qwen35.ops.linear import PackedLinear

    if isinstance(w, PackedLinear):
        if w.bias is not None:
            return False
        w = w.weight
    return (isinstance(w, Packed) and w.k % 8 == 0 and (n is None or (w.n == n and n % 4 == 0))
            and (k is None or w.k == k))
