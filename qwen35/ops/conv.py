"""Causal depthwise conv1d over packed sequences, with the conv history carried between calls.

Channel c of token t: `silu(sum_i w[c, i] * m[t - Kw + 1 + i, c])`; `w[:, Kw-1]` hits the current token. Tokens
before a sequence's first new token come from its history (`initial_state`, the last Kw-1 inputs), or are zero.
"""

import torch
import torch.nn.functional as F


def causal_conv1d_reference(x, weight, cu_seqlens, initial_state=None):
    """Per-sequence F.conv1d; the documentation of the maths. x: [N, C], weight: [C, Kw], state: [S, C, Kw-1]."""
    C, Kw = weight.shape
    S = cu_seqlens.numel() - 1
    ys, states = [], []
    for s in range(S):
        seq = x[cu_seqlens[s]:cu_seqlens[s + 1]].t()  # [C, T]
        hist = initial_state[s].to(x.dtype) if initial_state is not None else x.new_zeros(C, Kw - 1)
        full = torch.cat([hist, seq], dim=1)
        y = F.conv1d(full[None].to(weight.dtype), weight[:, None, :], groups=C)[0]
        ys.append(F.silu(y).to(x.dtype).t())
        states.append(full[:, -(Kw - 1):])
    return torch.cat(ys), torch.stack(states)


def causal_conv1d(x, weight, cu_seqlens, initial_state=None):
    """Vectorised over sequences: gather each token's Kw-wide window from `[history | new tokens]` per sequence.

    x: [N, C]; weight: [C, Kw]; cu_seqlens: [S+1]; initial_state: [S, C, Kw-1] or None.
    Returns y [N, C] (x's dtype) and the new history [S, C, Kw-1].
    """
    N, C = x.shape
    Kw = weight.shape[1]
    S = cu_seqlens.numel() - 1
    seq_lens = cu_seqlens[1:] - cu_seqlens[:-1]
    hist = initial_state.to(x.dtype).transpose(1, 2) if initial_state is not None else x.new_zeros(S, Kw - 1, C)
    # ext holds, per sequence, Kw-1 history rows followed by its tokens: sequence s starts at cu_seqlens[s] + s*(Kw-1).
    seq_of_token = torch.repeat_interleave(torch.arange(S, device=x.device), seq_lens)
    ext_pos_of_token = torch.arange(N, device=x.device) + (seq_of_token + 1) * (Kw - 1)
    ext = x.new_empty(N + S * (Kw - 1), C)
    ext[ext_pos_of_token] = x
    seq_ids, hist_cols = torch.arange(S, device=x.device), torch.arange(Kw - 1, device=x.device)
    hist_rows = (cu_seqlens[:-1] + seq_ids * (Kw - 1))[:, None] + hist_cols
    ext[hist_rows.reshape(-1)] = hist.reshape(-1, C)
    # One depthwise conv over the whole extended sequence (output j covers ext rows j..j+Kw-1), in fp32: CPUs without
    # bf16 arithmetic run it ~10x faster than bf16, and it is never less exact. Outputs at history rows are dropped.
    y_all = F.conv1d(ext.t()[None].float(), weight.float()[:, None, :], groups=C)[0]  # [C, N + S*(Kw-1) - Kw + 1]
    y = y_all[:, ext_pos_of_token - (Kw - 1)].t()
    last_rows = (cu_seqlens[1:] + seq_ids * (Kw - 1))[:, None] + hist_cols  # the last Kw-1 rows of each segment
    new_state = ext[last_rows].transpose(1, 2)  # [S, C, Kw-1]
    return F.silu(y).to(x.dtype), new_state
