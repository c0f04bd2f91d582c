"""ctypes faces of the native decode layers (csrc/layers.c): one `ctypes.Structure` per kind of layer half,
mirroring its C struct field for field, and the calls that run them.

A decode step (one new token per sequence, or the few a speculative step verifies) runs each half of a layer
(residual add + norm + mixer, residual add + norm + FFN) as one native call. The C side reads a layer's weights (any
`QW` format) and its cache tensors through the struct built once per layer (`decoder.py`); what changes every step
is the `Step`. Hidden states are contiguous float32 [rows, H]: `run(fn, layer, step, h, y_prev)` adds y_prev into h
in place, updates the caches in place and returns the half's output [rows, H]. The references are the PyTorch
modules in qwen35/models and qwen35/layers.
"""

from __future__ import annotations

import ctypes

import torch

from qwen35.backends.cpu import library
from qwen35.backends.cpu.weights import QW

c_i64, c_f32, c_ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
# Most new tokens per sequence the fused layers take (a speculative step's k + 1; prompts take the chunked path).
MAX_ROWS_PER_SEQ = 9


class Step(ctypes.Structure):
    _fields_ = [("S", c_i64), ("slots", c_ptr), ("has_state", c_ptr), ("slot_mapping", c_ptr),
                ("block_tables", c_ptr), ("context_lens", c_ptr), ("max_blocks", c_i64), ("block_size", c_i64),
                ("cos", c_ptr), ("sin", c_ptr), ("rd", c_i64), ("nseq", c_i64), ("cu", c_ptr), ("ring", c_ptr)]


class GdnLayer(ctypes.Structure):
    _fields_ = [("norm_w1", c_ptr), ("norm_eps", c_f32), ("in_qkvz", QW), ("in_ba", QW), ("out", QW),
                ("conv_w", c_ptr), ("A_log", c_ptr), ("dt_bias", c_ptr), ("gnorm_w", c_ptr), ("gnorm_eps", c_f32),
                ("Hk", c_i64), ("Hv", c_i64), ("K", c_i64), ("V", c_i64), ("Kw", c_i64), ("conv_pool", c_ptr),
                ("conv_bf16", c_i64), ("ssm_pool", c_ptr)]


class AttnLayer(ctypes.Structure):
    _fields_ = [("norm_w1", c_ptr), ("norm_eps", c_f32), ("qkv", QW), ("out", QW), ("qn1", c_ptr), ("kn1", c_ptr),
                ("qk_eps", c_f32), ("Hq", c_i64), ("Hkv", c_i64), ("D", c_i64), ("scale", c_f32),
                ("k_cache", c_ptr), ("v_cache", c_ptr), ("cache_bf16", c_i64)]


class MoeLayer(ctypes.Structure):
    _fields_ = [("norm_w1", c_ptr), ("norm_eps", c_f32), ("router", QW), ("shared_gate_up", QW), ("shared_down", QW),
                ("gate_up", QW), ("down", QW), ("E", c_i64), ("top_k", c_i64), ("renorm", c_i64)]


class MlpLayer(ctypes.Structure):
    _fields_ = [("norm_w1", c_ptr), ("norm_eps", c_f32), ("gate_up", QW), ("down", QW)]


def _fn(name: str, struct):
    return library.function(name, [ctypes.POINTER(struct), ctypes.POINTER(Step), c_ptr, c_ptr, c_ptr])


def gdn_layer():
    return _fn("qwen35_gdn_layer", GdnLayer)


def attn_layer():
    return _fn("qwen35_attn_layer", AttnLayer)


def moe_layer():
    return _fn("qwen35_moe_layer", MoeLayer)


def mlp_layer():
    return _fn("qwen35_mlp_layer", MlpLayer)


def fits_step(batch) -> bool:
    """Whether the fused layers can run this batch: at most MAX_ROWS_PER_SEQ new tokens per sequence, and state
    copies (models.batch.ForwardBatch.state_copies) only after a sequence's non-last rows, one per row."""
    if batch.input_ids.shape[0] == batch.num_seqs and not batch.state_copies:  # a decode step
        return True
    lengths = batch.cu_seqlens.diff().tolist()
    if max(lengths) > MAX_ROWS_PER_SEQ:
        return False
    rows = [(s, k) for s, k, _ in batch.state_copies or []]
    return all(k < lengths[s] for s, k in rows) and len(set(rows)) == len(rows)


def step(batch, block_size: int, cos=None, sin=None) -> tuple[Step, list]:
    """The Step of a batch `fits_step` accepts (models.batch.ForwardBatch) over a cache of `block_size`-token K/V
    blocks, and the tensors it points into (keep them alive). Each row attends as a sequence of its own, to its
    sequence's blocks up to its own position; the Gated DeltaNet layers run a sequence's rows in order."""
    N, S = batch.input_ids.shape[0], batch.num_seqs
    cu = ring = None
    tables, lens = batch.block_tables, batch.context_lens
    if N != S:
        lengths = batch.cu_seqlens.diff()
        seq = torch.repeat_interleave(torch.arange(S), lengths)
        cu = batch.cu_seqlens.to(torch.int64).contiguous()
        lens = (batch.context_lens[seq] - (cu[1:][seq] - 1 - torch.arange(N))).contiguous()
        tables = batch.block_tables[seq].contiguous() if tables is not None else None
        if batch.state_copies:
            ring = torch.full((N,), -1, dtype=torch.int64)
            for s, k, to in batch.state_copies:
                ring[int(cu[s]) + k - 1] = to
    keep = [batch.state_slots, batch.has_initial_state, batch.slot_mapping, tables, lens, cu, ring]
    for t in keep:
        if t is not None and (t.device.type != "cpu" or not t.is_contiguous()):
            raise ValueError("decode steps take contiguous CPU batch tensors")
    st = Step(S=N, block_size=block_size, max_blocks=tables.shape[1] if tables is not None else 0, nseq=S)
    for name, t in zip(("slots", "has_state", "slot_mapping", "block_tables", "context_lens", "cu", "ring"), keep):
        setattr(st, name, t.data_ptr() if t is not None and t.numel() else None)
    if cos is not None:
        cos, sin = cos.float().contiguous(), sin.float().contiguous()
        st.cos, st.sin, st.rd = cos.data_ptr(), sin.data_ptr(), cos.shape[1]
        keep += [cos, sin]
    return st, keep


def run(fn, layer, st: Step, h: torch.Tensor, y_prev: torch.Tensor | None) -> torch.Tensor:
    """h += y_prev; the layer half on rms_norm(h); returns its output [S, H]."""
    if h.dtype != torch.float32 or not h.is_contiguous() or (y_prev is not None and y_prev.shape != h.shape):
        raise ValueError("decode layers take contiguous float32 hidden states [S, H]")
    y = torch.empty_like(h)
    fn(ctypes.byref(layer), ctypes.byref(st), h.data_ptr(), None if y_prev is None else y_prev.data_ptr(),
       y.data_ptr())
    return y


def add_rms_norm(h: torch.Tensor, y: torch.Tensor | None, w1: torch.Tensor, eps: float):
    """(h + y, rms_norm(h + y) * w1); y None means h itself. w1 is 1 + the zero-centred weight, fp32.
    Reference: ops.norms.rms_norm."""
    M, H = h.shape
    if h.dtype != torch.float32 or (y is not None and (y.shape != h.shape or y.dtype != torch.float32)):
        raise ValueError("add_rms_norm takes float32 [S, H] hidden states and residuals of the same shape")
    h, y = h.contiguous(), y.contiguous() if y is not None else None
    h_out, a = torch.empty(M, H), torch.empty(M, H)
    fn = library.function("qwen35_add_rmsnorm", [c_ptr] * 5 + [c_i64] * 2 + [c_f32])
    fn(h.data_ptr(), y.data_ptr() if y is not None else None, w1.data_ptr(), h_out.data_ptr(), a.data_ptr(), M, H, eps)
    return h_out, a


def causal_conv1d(x, weight, cu_seqlens, initial_state=None):
    """ops.conv.causal_conv1d in one native call (qwen35_causal_conv): same contract, for CPU tensors; computes in
    fp32."""
    N, C = x.shape
    Kw = weight.shape[1]
    S = cu_seqlens.numel() - 1
    cu = cu_seqlens.to(torch.int64).contiguous()
    if S < 1 or int(cu[0]) != 0 or int(cu[-1]) != N:
        raise ValueError(f"cu_seqlens must run from 0 to N={N}")
    if initial_state is not None and tuple(initial_state.shape) != (S, C, Kw - 1):
        raise ValueError(f"initial_state must have shape {(S, C, Kw - 1)}, got {tuple(initial_state.shape)}")
    xf, w = x.float().contiguous(), weight.float().contiguous()
    hist = initial_state.float().contiguous() if initial_state is not None else None
    y, new_state = torch.empty(N, C), torch.empty(S, C, Kw - 1)
    fn = library.function("qwen35_causal_conv", [c_ptr] * 6 + [c_i64] * 3)
    fn(xf.data_ptr(), w.data_ptr(), cu.data_ptr(), hist.data_ptr() if hist is not None else None, y.data_ptr(),
       new_state.data_ptr(), S, C, Kw)
    return y.to(x.dtype), new_state.to(x.dtype)
