"""Python faces of the native decode blocks (csrc/decode_blocks.c, and the MoE block in csrc/linear_avx2.c).

A decode step (one new token per sequence) on a packed CPU model runs each block of a layer as one native call,
so a step costs a few calls per layer instead of dozens of framework ops (at batch 1 those ops, not the weights,
were most of the step). The PyTorch code in qwen35/models and qwen35/ops is the reference for each; the tests
compare the two on awkward shapes, and a packed model stepping through its cache against its own prefill.
Activations are contiguous float32 [S, ...]; every function returns a new tensor and mutates only the caches.
Call only when ops.linear.native_available().
"""

from __future__ import annotations

import torch

from qwen35.ops.linear import Packed, native


def _rows(x: torch.Tensor) -> int:
    """Row stride of a [S, n] fp32 activation whose rows are contiguous (a fused projection may be a column slice
    of its padded output)."""
    if x.dtype != torch.float32 or x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"expected float32 [S, n] rows, got {x.dtype} {tuple(x.shape)} stride {x.stride()}")
    return x.stride(0)


def add_rms_norm(h: torch.Tensor, y: torch.Tensor | None, w1: torch.Tensor, eps: float):
    """(h + y, rms_norm(h + y) * w1); y None means h itself. w1 is 1 + the zero-centred weight, fp32.
    Reference: ops.norms.rms_norm."""
    M, H = h.shape
    if y is not None and y.shape != h.shape:
        raise ValueError(f"residual {tuple(y.shape)} does not match {tuple(h.shape)}")
    h, y = h.contiguous(), y.contiguous() if y is not None else None
    h_out, a = torch.empty(M, H), torch.empty(M, H)
    native().qwen35_add_rmsnorm(h.data_ptr(), y.data_ptr() if y is not None else None, w1.data_ptr(),
                                h_out.data_ptr(), a.data_ptr(), M, H, eps)
    return h_out, a


def gdn_step(proj: torch.Tensor, conv_pool: torch.Tensor, conv_w: torch.Tensor, ssm_pool: torch.Tensor,
             slots: torch.Tensor, has_state: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor,
             norm_w: torch.Tensor, eps: float, Hk: int, Hv: int, K: int, V: int) -> torch.Tensor:
    """A Gated DeltaNet decode step from the fused in_proj output [S, qkv | z | b | a] to the gated-norm output
    [S, Hv*V], updating conv_pool and ssm_pool at `slots` in place. Reference: GatedDeltaNet.forward."""
    S, C, Kw = proj.shape[0], conv_w.shape[0], conv_w.shape[1]
    if (conv_pool.shape[1:] != (C, Kw - 1) or conv_pool.dtype not in (torch.bfloat16, torch.float32)
            or ssm_pool.dtype != torch.float32 or ssm_pool.shape[1:] != (Hv, K, V)
            or not conv_pool.is_contiguous() or not ssm_pool.is_contiguous()):
        raise ValueError("gdn_step: cache pools of unexpected shape or dtype")
    slots = slots.to(torch.int64).contiguous()
    has = has_state.to(torch.uint8).contiguous()
    out = torch.empty(S, Hv * V)
    native().qwen35_gdn_step(proj.data_ptr(), _rows(proj), conv_pool.data_ptr(), conv_pool.dtype == torch.bfloat16,
                             conv_w.data_ptr(), ssm_pool.data_ptr(), slots.data_ptr(), has.data_ptr(),
                             A_log.data_ptr(), dt_bias.data_ptr(), norm_w.data_ptr(), eps, out.data_ptr(), S, Hk,
                             Hv, K, V, Kw)
    return out


def attn_decode(qkv: torch.Tensor, qn1: torch.Tensor, kn1: torch.Tensor, eps: float, cos: torch.Tensor,
                sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch, Hq: int, Hkv: int, D: int,
                scale: float) -> torch.Tensor:
    """Gated attention of one new token per sequence from the fused q/k/v output; writes K/V to the paged cache.
    Returns [S, Hq*D] (gated, before o_proj). Reference: Attention.forward."""
    S = qkv.shape[0]
    if k_cache.dtype not in (torch.bfloat16, torch.float32) or not k_cache.is_contiguous() \
            or k_cache.shape[2:] != (Hkv, D) or k_cache.shape != v_cache.shape or v_cache.dtype != k_cache.dtype:
        raise ValueError("attn_decode: K/V cache of unexpected shape or dtype")
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    tables = batch.block_tables.contiguous()
    out = torch.empty(S, Hq * D)
    native().qwen35_attn_decode(qkv.data_ptr(), _rows(qkv), qn1.data_ptr(), kn1.data_ptr(), eps, cos.data_ptr(),
                                sin.data_ptr(), cos.shape[1], k_cache.data_ptr(), v_cache.data_ptr(),
                                k_cache.dtype == torch.bfloat16, batch.slot_mapping.data_ptr(), tables.data_ptr(),
                                tables.shape[1], batch.context_lens.data_ptr(), k_cache.shape[1], out.data_ptr(), S,
                                Hq, Hkv, D, scale)
    return out


def moe_block(x: torch.Tensor, proj: torch.Tensor, num_experts: int, top_k: int, renormalize: bool,
              gate_up: Packed, down: Packed, shared_down: Packed) -> torch.Tensor:
    """The sparse-MoE block from its fused input projection [S, router | shared gate | shared gate | shared up]:
    routing, the routed experts and the gated shared expert. Reference: SparseMoeBlock.forward."""
    S, H = x.shape
    inter, shared_inter = down.k, shared_down.k
    if gate_up.dtype != down.dtype or shared_down.dtype != down.dtype or not moe_block_shapes(gate_up, down,
                                                                                              shared_down):
        raise ValueError("moe_block: expert weights of unexpected shape or dtype")
    x = x.contiguous()
    out = torch.empty(S, H)
    fn = native().qwen35_moe_block_bf16 if down.dtype == torch.bfloat16 else native().qwen35_moe_block_f32
    fn(x.data_ptr(), proj.data_ptr(), _rows(proj), S, num_experts, top_k, renormalize, gate_up.data.data_ptr(),
       down.data.data_ptr(), shared_down.data.data_ptr(), out.data_ptr(), H, inter, shared_inter)
    return out


def moe_block_shapes(gate_up: Packed, down: Packed, shared_down: Packed) -> bool:
    """The native block needs unpadded packed shapes (rows % 4, columns % 8)."""
    return all(w.n % 4 == 0 and w.k % 8 == 0 for w in (gate_up, down, shared_down))
