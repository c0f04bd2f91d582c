"""Gated DeltaNet's causal depthwise conv on the GPU: Triton kernels for packed prefill (with carried history) and the
one-token decode step, plus the decode step in plain torch (the fallback without triton).

Same contract as `qwen35.ops.conv.causal_conv1d` (its reference is the definition): y = silu(conv) in x's dtype, the
new history = the last Kw-1 inputs of [history | new tokens] per sequence, in x's dtype; maths in fp32. The wrappers
never read device tensors on the host (grids come from shapes and the caller's `max_query_len`), so they can be
captured in CUDA graphs.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # qwen35 imports without triton; the Triton functions say so when called
    triton = tl = None

BLOCK_T, BLOCK_C = 64, 128  # prefill tile: 64 tokens x 128 channels (channels contiguous: coalesced loads)
DECODE_BLOCK_C = 256


def _require_triton():
    if triton is None:
        raise RuntimeError("qwen35.backends.gpu.conv needs triton (pip install triton); "
                           "causal_conv1d_update_torch is the plain-torch decode step")


def _check(x, weight, state, S, state_name):
    if x.dim() != 2:
        raise ValueError(f"causal conv: x must be [tokens, channels], got shape {tuple(x.shape)}")
    C = x.shape[1]
    if weight.dim() != 2 or weight.shape[0] != C or not 2 <= weight.shape[1] <= 8:
        raise ValueError(f"causal conv: weight must be [{C}, Kw] with 2 <= Kw <= 8, got shape {tuple(weight.shape)}")
    Kw = weight.shape[1]
    if state is not None and tuple(state.shape) != (S, C, Kw - 1):
        raise ValueError(f"causal conv: {state_name} must be [{S}, {C}, {Kw - 1}] (sequences, channels, Kw-1), "
                         f"got shape {tuple(state.shape)}")
    return C, Kw


if triton is not None:
    @triton.jit
    def _round_to(v, ptr):
        """fp32 -> ptr's element type, to nearest even. bf16 by hand: the same bits on the GPU and in Triton's
        interpreter, whose bf16 cast truncates."""
        if ptr.dtype.element_ty == tl.bfloat16:  # a compile-time branch
            u = v.to(tl.uint32, bitcast=True)
            u = u + 0x7FFF + ((u >> 16) & 1)
            out = (u >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            out = v.to(ptr.dtype.element_ty)
        return out

    @triton.jit
    def _conv_varlen_kernel(x_ptr, w_ptr, cu_ptr, h_ptr, y_ptr, ns_ptr, C,
                            sx_n, sx_c, sw_c, sw_k, sh_s, sh_c, sh_k, sy_n, sns_s, sns_c,
                            KW: tl.constexpr, HAS_STATE: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
        """One program: BT tokens x BC channels of sequence `s`; the t-tile 0 also writes that sequence's new history.
        Token position p of the sequence reads x when p >= 0, else history column KW-1+p (zero without history)."""
        s, pid_t, pid_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        start = tl.load(cu_ptr + s).to(tl.int64)
        L = tl.load(cu_ptr + s + 1).to(tl.int64) - start
        c = pid_c * BC + tl.arange(0, BC)
        c_ok = c < C

        if pid_t == 0:  # new history column j = position L-(KW-1)+j: from x, or from the old history when L is short
            for j in tl.static_range(KW - 1):
                p = L - (KW - 1) + j + tl.zeros((BC,), dtype=tl.int64)  # per lane: the interpreter wants vector masks
                from_x = tl.load(x_ptr + (start + p) * sx_n + c * sx_c, mask=c_ok & (p >= 0), other=0.0)
                if HAS_STATE:
                    hk = tl.maximum(KW - 1 + p, 0)
                    from_h = tl.load(h_ptr + s * sh_s + c * sh_c + hk * sh_k, mask=c_ok & (p < 0), other=0.0)
                    from_x = tl.where(p >= 0, from_x, _round_to(from_h.to(tl.float32), y_ptr))
                tl.store(ns_ptr + s * sns_s + c * sns_c + j, from_x, mask=c_ok)

        t0 = pid_t * BT
        if t0 < L:
            t = t0 + tl.arange(0, BT)
            t_ok = t < L
            acc = tl.zeros((BT, BC), dtype=tl.float32)
            for i in tl.static_range(KW):
                p = t - (KW - 1) + i  # [BT] input positions of tap i
                w = tl.load(w_ptr + c * sw_c + i * sw_k, mask=c_ok, other=0.0).to(tl.float32)
                m = (t_ok & (p >= 0))[:, None] & c_ok[None, :]
                v = tl.load(x_ptr + (start + p)[:, None] * sx_n + c[None, :] * sx_c, mask=m, other=0.0)
                v = v.to(tl.float32)
                if HAS_STATE:
                    hk = tl.maximum(KW - 1 + p, 0)
                    mh = (t_ok & (p < 0))[:, None] & c_ok[None, :]
                    h = tl.load(h_ptr + s * sh_s + c[None, :] * sh_c + hk[:, None] * sh_k, mask=mh, other=0.0)
                    v = tl.where((p >= 0)[:, None], v, _round_to(h.to(tl.float32), y_ptr).to(tl.float32))
                acc += v * w[None, :]
            y = acc * tl.sigmoid(acc)
            tl.store(y_ptr + (start + t)[:, None] * sy_n + c[None, :], _round_to(y, y_ptr),
                     mask=t_ok[:, None] & c_ok[None, :])

    @triton.jit
    def _conv_update_kernel(x_ptr, w_ptr, h_ptr, y_ptr, ns_ptr, C,
                            sx_s, sx_c, sw_c, sw_k, sh_s, sh_c, sh_k, sy_s, sns_s, sns_c,
                            KW: tl.constexpr, BC: tl.constexpr):
        """One program: BC channels of sequence `s`, one new token: window = [history (KW-1) | x]."""
        s, pid_c = tl.program_id(0), tl.program_id(1)
        c = pid_c * BC + tl.arange(0, BC)
        c_ok = c < C
        xv = tl.load(x_ptr + s * sx_s + c * sx_c, mask=c_ok, other=0.0)
        acc = xv.to(tl.float32) * tl.load(w_ptr + c * sw_c + (KW - 1) * sw_k, mask=c_ok, other=0.0).to(tl.float32)
        for i in tl.static_range(KW - 1):
            h = tl.load(h_ptr + s * sh_s + c * sh_c + i * sh_k, mask=c_ok, other=0.0)
            h = _round_to(h.to(tl.float32), y_ptr)
            acc += h.to(tl.float32) * tl.load(w_ptr + c * sw_c + i * sw_k, mask=c_ok, other=0.0).to(tl.float32)
            if i > 0:
                tl.store(ns_ptr + s * sns_s + c * sns_c + (i - 1), h, mask=c_ok)
        tl.store(ns_ptr + s * sns_s + c * sns_c + (KW - 2), xv, mask=c_ok)
        tl.store(y_ptr + s * sy_s + c, _round_to(acc * tl.sigmoid(acc), y_ptr), mask=c_ok)


def causal_conv1d(x: Tensor, weight: Tensor, cu_seqlens: Tensor, initial_state: Tensor | None = None, *,
                  max_query_len: int) -> tuple[Tensor, Tensor]:
    """x [N, C] (any strides), weight [C, Kw], cu_seqlens [S+1] (device ints), initial_state [S, C, Kw-1] or None;
    max_query_len: a host int >= every sequence's new-token count (sizes the grid without reading cu_seqlens).
    Returns y [N, C] and the new history [S, C, Kw-1], both in x's dtype."""
    _require_triton()
    S = cu_seqlens.numel() - 1
    C, Kw = _check(x, weight, initial_state, S, "initial_state")
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    new_state = torch.empty(S, C, Kw - 1, dtype=x.dtype, device=x.device)
    if S <= 0 or C == 0:
        return y, new_state
    h = initial_state if initial_state is not None else x  # a dummy pointer when HAS_STATE is off
    sh = initial_state.stride() if initial_state is not None else (0, 0, 0)
    grid = (S, max(1, triton.cdiv(max_query_len, BLOCK_T)), triton.cdiv(C, BLOCK_C))
    _conv_varlen_kernel[grid](x, weight, cu_seqlens, h, y, new_state, C,
                              x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), *sh,
                              y.stride(0), new_state.stride(0), new_state.stride(1),
                              KW=Kw, HAS_STATE=initial_state is not None, BT=BLOCK_T, BC=BLOCK_C)
    return y, new_state


def causal_conv1d_update(x: Tensor, weight: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """The decode step (one new token per sequence): x [S, C], state [S, C, Kw-1] -> y [S, C] and the new history,
    both in x's dtype."""
    _require_triton()
    S = x.shape[0] if x.dim() == 2 else -1
    C, Kw = _check(x, weight, state, S, "state")
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    new_state = torch.empty(S, C, Kw - 1, dtype=x.dtype, device=x.device)
    if S == 0 or C == 0:
        return y, new_state
    grid = (S, triton.cdiv(C, DECODE_BLOCK_C))
    _conv_update_kernel[grid](x, weight, state, y, new_state, C,
                              x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), *state.stride(),
                              y.stride(0), new_state.stride(0), new_state.stride(1), KW=Kw, BC=DECODE_BLOCK_C)
    return y, new_state


def causal_conv1d_update_torch(x: Tensor, weight: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """causal_conv1d_update in plain torch (no triton): the same maths in fp32, no host sync."""
    S = x.shape[0] if x.dim() == 2 else -1
    _check(x, weight, state, S, "state")
    window = torch.cat([state.to(x.dtype), x[:, :, None]], dim=2)  # [S, C, Kw]
    y = (window.float() * weight.float()).sum(-1)
    return F.silu(y).to(x.dtype), window[:, :, 1:]
