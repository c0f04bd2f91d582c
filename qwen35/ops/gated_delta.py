"""The gated delta rule of Qwen3.5's Gated DeltaNet layers, over packed variable-length sequences.

Owns pure functions with one signature:
- `gated_delta_rule_recurrent`: the token-by-token recurrence, the documentation of the maths (and the decode step);
- `gated_delta_rule_step`: its one-token step for every sequence at once, with no host sync (a GPU's graphed decode);
- `gated_delta_rule_chunked`: the same result in chunks of C tokens, parallel inside a chunk (prefill);
- `gated_delta_rule_chunked_recompute`: the chunked form for training: the backward recomputes the chunk
  intermediates instead of keeping them from the forward;
- `gated_delta_rule`: picks between them per sequence (the recomputing form when a gradient is wanted).

Inputs are packed: N tokens of S sequences laid end to end, sequence s owning tokens cu_seqlens[s]:cu_seqlens[s+1].
Shapes: q, k [N, Hk, K]; v [N, Hv, V]; g (log decay, <= 0), beta [N, Hv]; states [S, Hv, K, V] (float32).
v-head h reads q/k head h // (Hv // Hk). All maths runs in float32; the output comes back in v's dtype.
The derivation of the chunked form is in README.md beside this file.
"""

import torch
from torch import Tensor

L2NORM_EPS = 1e-6
# Sequences up to this long take the token-by-token form in inference (decode; a speculative step's k + 1 tokens):
# the chunked form would pad each to a whole chunk.
RECURRENT_MAX_LEN = 16


def gated_delta_rule_recurrent(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    cu_seqlens: Tensor,
    initial_state: Tensor | None = None,
    *,
    use_qk_l2norm: bool = True,
    capture: list[tuple[int, int]] | None = None,
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """Per token and v-head: S = exp(g)·S; u = beta·(v − Sᵀk); S = S + k uᵀ; o = Sᵀq.

    Step t advances token t of every sequence that has one, so a decode batch (all lengths 1) is a single step.
    Returns (o [N, Hv, V] in v's dtype, final_state [S, Hv, K, V] float32), and with `capture` = [(sequence, t)]
    also the states after each sequence's first t tokens, [len(capture), Hv, K, V] float32.
    """
    lengths = _sequence_lengths(q, v, cu_seqlens)
    out_dtype, state_shape = v.dtype, (len(lengths), v.shape[1], q.shape[2], v.shape[2])
    q, k, v, g, beta = _prepare(q, k, v, g, beta, use_qk_l2norm)
    first_token = cu_seqlens[:-1].to(device=v.device, dtype=torch.long)
    order, first_token, num_active = _plan_scan(lengths, first_token)  # now longest sequence first
    state = _initial_state(initial_state, order, state_shape, v)  # [S, Hv, K, V], in the same order

    rank = {seq: r for r, seq in enumerate(order.tolist())} if order is not None else None
    at_step: dict[int, list[tuple[int, int]]] = {}  # step -> (rank, capture index)
    for m, (seq, t) in enumerate(capture or []):
        if not 1 <= t <= lengths[seq]:
            raise ValueError(f"capture: sequence {seq} has {lengths[seq]} tokens, no state after {t}")
        at_step.setdefault(t - 1, []).append((seq if rank is None else rank[seq], m))
    captured = v.new_empty(len(capture or []), *state_shape[1:], dtype=torch.float32)

    o = torch.empty_like(v)  # [N, Hv, V]
    finished = []  # no state is written in place, so autograd can differentiate the scan
    for t, n in enumerate(num_active):
        state = _retire(state, n, finished)
        i = first_token[:n] + t  # token t of each of the n sequences still running
        o[i], state = _step(state, q[i], k[i], v[i], g[i], beta[i])
        for r, m in at_step.get(t, []):
            captured[m] = state[r]
    final = _restore_order(torch.cat([state, *finished[::-1]]), order)
    return (o.to(out_dtype), final) if capture is None else (o.to(out_dtype), final, captured)


def gated_delta_rule_step(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor, *,
                          use_qk_l2norm: bool = True) -> tuple[Tensor, Tensor]:
    """One token per sequence (q, k [S, Hk, K]; v [S, Hv, V]; g, beta [S, Hv]; state [S, Hv, K, V] float32): the
    recurrence's step with no host sync, so a CUDA graph can capture a decode step. Returns (o [S, Hv, V] in v's
    dtype, the new state)."""
    q, k, v32, g, beta = _prepare(q, k, v, g, beta, use_qk_l2norm)
    o, state = _step(state, q, k, v32, g, beta)
    return o.to(v.dtype), state


def _step(state: Tensor, q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    """One token of the recurrence on prepared inputs [n, Hv, ·]: (o, the new state)."""
    s = state * g.exp()[..., None, None]  # decay first
    u = beta[..., None] * (v - torch.einsum("nhk,nhkv->nhv", k, s))  # target minus what s predicts
    state = s + k[..., :, None] * u[..., None, :]  # rank-1 write
    return torch.einsum("nhk,nhkv->nhv", q, state), state  # read after the write


def gated_delta_rule_chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    cu_seqlens: Tensor,
    initial_state: Tensor | None = None,
    *,
    use_qk_l2norm: bool = True,
    chunk_size: int = 64,
    capture: list[tuple[int, int]] | None = None,
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """The recurrence computed C = chunk_size tokens at a time (UT/WY form; see README.md).

    Everything inside a chunk is computed for all chunks of all sequences at once; only the state hand-off from chunk
    to chunk is a loop, over chunk index i, advancing the i-th chunk of every sequence that has one.
    Returns (o [N, Hv, V] in v's dtype, final_state [S, Hv, K, V] float32), and with `capture` = [(sequence, t)]
    also the states after each sequence's first t tokens, [len(capture), Hv, K, V] float32 (read off inside the
    chunk that holds token t: S_t = exp(gamma_t)·S_in + Σ_{s<=t} exp(gamma_t − gamma_s)·k_s u_sᵀ).
    """
    lengths = _sequence_lengths(q, v, cu_seqlens)
    N, Hv, V = v.shape
    Hk, K = q.shape[1], q.shape[2]
    G = Hv // Hk
    out_dtype, state_shape = v.dtype, (len(lengths), Hv, K, V)
    C = chunk_size
    q, k, v, g, beta = _prepare(q, k, v, g, beta, use_qk_l2norm, repeat_heads=False)  # q, k stay per k-head

    # Chunks are laid out chunk-index-major: with sequences ranked by decreasing chunk count, chunk i of the
    # sequence ranked r sits at offset[i] + r, so the chunks the scan advances at step i are one contiguous slice.
    # A sequence's tokens fill its chunks from the start; the tail of a last chunk stays zero, and a zero step
    # (g = 0, beta = 0, k = 0) leaves the state as it is, so padding never reaches the next chunk or sequence.
    device = v.device
    num_chunks = [-(-length // C) for length in lengths]
    order, _, num_active = _plan_scan(num_chunks, torch.zeros(len(lengths), dtype=torch.long, device=device))
    rank = [0] * len(lengths)
    for r, seq in enumerate(order.tolist() if order is not None else range(len(lengths))):
        rank[seq] = r
    offsets = [0]
    for n in num_active:
        offsets.append(offsets[-1] + n)
    total_chunks = offsets[-1]
    first_token = cu_seqlens[:-1].to(device=device, dtype=torch.long)
    seq_of_token = torch.repeat_interleave(torch.tensor(lengths, device=device), output_size=N)  # [N]
    local = torch.arange(N, device=device) - first_token[seq_of_token]
    offsets_t = torch.tensor(offsets[:-1], device=device)
    slot = (offsets_t[local // C] + torch.tensor(rank, device=device)[seq_of_token]) * C + local % C

    def to_chunks(x: Tensor) -> Tensor:  # [N, H, ...] -> [total_chunks, H, C, ...]
        padded = x.new_zeros(total_chunks * C, *x.shape[1:])
        padded[slot] = x
        return padded.view(total_chunks, C, *x.shape[1:]).transpose(1, 2).contiguous()

    # q, k [.., Hk, C, K]; v [.., Hv, C, V]; g, beta [.., Hv, C]
    q, k, v, g, beta = (to_chunks(x) for x in (q, k, v, g, beta))

    def per_v_head(x: Tensor) -> Tensor:  # [.., Hv, ...] viewed as [.., Hk, G, ...]
        return x.view(total_chunks, Hk, G, *x.shape[2:])

    # Intra-chunk quantities, all chunks at once. gamma[r] is the log decay from the chunk start through token r, and
    # decay[r, s] = exp(gamma[r] - gamma[s]) for r >= s is what token s's write has decayed by when token r reads.
    # Entries r < s are set to -inf before exp: they are masked anyway, and exp of a positive sum could overflow.
    # Products of q and k are formed once per k-head and broadcast over the G v-heads that share it.
    gamma = g.cumsum(-1)  # [.., Hv, C]
    causal = torch.ones(C, C, dtype=torch.bool, device=device).tril()
    decay = (gamma[..., :, None] - gamma[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # [.., Hv, C, C]
    kk, qk = (k @ k.mT)[:, :, None], (q @ k.mT)[:, :, None]  # [.., Hk, 1, C, C]

    # The writes u of a chunk solve (I + A) u = beta·v − beta·exp(gamma)·k S_in with A = strictly_lower(diag(beta)
    # K Kᵀ ⊙ decay). Split by linearity: u = u0 − w S_in, where u0 and w do not depend on the incoming state.
    # Both come from one triangular solve with the two right-hand sides side by side (solve_triangular reads only
    # A's strict lower part and takes the diagonal as ones, i.e. solves with I + A; forming (I + A)⁻¹ instead and
    # multiplying loses ~1e-4 when decays are steep).
    A = (per_v_head(beta)[..., :, None] * kk * per_v_head(decay)).view(total_chunks, Hv, C, C)
    bk = (per_v_head(beta * gamma.exp())[..., None] * k[:, :, None]).view(total_chunks, Hv, C, K)
    u0, w = _solve_unit_lower(A, torch.cat([beta[..., None] * v, bk], dim=-1)).split([V, K], dim=-1)

    attn = (qk * per_v_head(decay)).view(total_chunks, Hv, C, C)  # causal scores, diagonal included: o_r reads S_r
    q_decayed = (q[:, :, None] * per_v_head(gamma.exp())[..., None]).view(total_chunks, Hv, C, K)  # reads S_in
    k_decayed = (k[:, :, None] * per_v_head((gamma[..., -1:] - gamma).exp())[..., None]).view(total_chunks, Hv, C, K)
    chunk_decay = gamma[..., -1].exp()[..., None, None]  # [.., 1, 1]

    at_chunk: dict[int, list[tuple[int, int, int]]] = {}  # chunk index -> (rank, token in chunk, capture index)
    for m, (seq, t) in enumerate(capture or []):
        if not 1 <= t <= lengths[seq]:
            raise ValueError(f"capture: sequence {seq} has {lengths[seq]} tokens, no state after {t}")
        at_chunk.setdefault((t - 1) // C, []).append((rank[seq], (t - 1) % C, m))
    captured = v.new_empty(len(capture or []), Hv, K, V)

    state = _initial_state(initial_state, order, state_shape, v)  # [S, Hv, K, V], in rank order
    outs, finished = [], []  # no state is written in place, so autograd can differentiate the scan
    for i, n in enumerate(num_active):
        state = _retire(state, n, finished)
        c = slice(offsets[i], offsets[i] + n)  # chunk i of the n sequences that have one
        u = u0[c] - w[c] @ state  # the actual writes: remove what the incoming state already predicts
        outs.append(q_decayed[c] @ state + attn[c] @ u)
        for j, r, m in at_chunk.get(i, []):
            cj, gr = offsets[i] + j, gamma[offsets[i] + j, :, r]  # [Hv]
            kj = k[cj].repeat_interleave(G, dim=0)[:, :r + 1]  # [Hv, r+1, K]
            kj = kj * (gr[:, None] - gamma[cj, :, :r + 1]).exp()[..., None]
            captured[m] = gr.exp()[:, None, None] * state[j] + kj.mT @ u[j, :, :r + 1]
        state = chunk_decay[c] * state + k_decayed[c].mT @ u

    o = torch.cat(outs).transpose(1, 2).reshape(total_chunks * C, Hv, V)[slot]  # outs: [total_chunks, Hv, C, V]
    final = _restore_order(torch.cat([state, *finished[::-1]]), order)
    return (o.to(out_dtype), final) if capture is None else (o.to(out_dtype), final, captured)


class _ChunkedRecompute(torch.autograd.Function):
    """Forward: the chunked form without a graph, keeping only the inputs. Backward: the same forward again with
    grad enabled, then torch.autograd.grad through it. Trades one extra forward for not holding the per-chunk
    intermediates ([chunks, Hv, C, C] decays, scores and solves) from a layer's forward until its backward."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, cu_seqlens, initial_state, use_qk_l2norm, chunk_size):
        ctx.save_for_backward(q, k, v, g, beta, cu_seqlens, initial_state)
        ctx.options = dict(use_qk_l2norm=use_qk_l2norm, chunk_size=chunk_size)
        with torch.no_grad():
            return gated_delta_rule_chunked(q, k, v, g, beta, cu_seqlens, initial_state, **ctx.options)

    @staticmethod
    def backward(ctx, grad_o, grad_state):
        q, k, v, g, beta, cu_seqlens, initial_state = ctx.saved_tensors
        inputs = [q, k, v, g, beta, initial_state]
        wanted = [i for i, x in enumerate(inputs) if x is not None and ctx.needs_input_grad[i if i < 5 else 6]]
        with torch.enable_grad():
            inputs = [x.detach().requires_grad_(i in wanted) if x is not None else None for i, x in enumerate(inputs)]
            o, state = gated_delta_rule_chunked(*inputs[:5], cu_seqlens, inputs[5], **ctx.options)
            grads = torch.autograd.grad((o, state), [inputs[i] for i in wanted], (grad_o, grad_state),
                                        allow_unused=True)
        out = [None] * 9
        for i, grad in zip(wanted, grads):
            out[i if i < 5 else 6] = grad
        return tuple(out)


def gated_delta_rule_chunked_recompute(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    cu_seqlens: Tensor,
    initial_state: Tensor | None = None,
    *,
    use_qk_l2norm: bool = True,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor]:
    """gated_delta_rule_chunked with the same result and gradients, holding only its inputs for the backward (which
    recomputes the chunked forward). For training; with no gradient wanted it is the chunked form itself."""
    return _ChunkedRecompute.apply(q, k, v, g, beta, cu_seqlens, initial_state, use_qk_l2norm, chunk_size)


def _wants_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    cu_seqlens: Tensor,
    initial_state: Tensor | None = None,
    *,
    use_qk_l2norm: bool = True,
    capture: list[tuple[int, int]] | None = None,
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """Short sequences (decode, and the k + 1 tokens a speculative step verifies: at most RECURRENT_MAX_LEN) take
    the recurrent form, longer ones (prefill) the chunked form; with a gradient wanted only length-1 ones recur.

    A chunked run would pad every short sequence to a whole chunk, so in a mixed batch the two groups are run
    apart and their outputs and states put back in place. When a gradient is wanted the chunked part recomputes its
    intermediates in the backward (gated_delta_rule_chunked_recompute); inference runs the plain chunked form.
    capture = [(sequence, t)]: also return the states after those sequences' first t tokens (t < their length;
    inference only), as gated_delta_rule_chunked does.
    """
    lengths = _sequence_lengths(q, v, cu_seqlens)
    kwargs = dict(use_qk_l2norm=use_qk_l2norm)
    grad = _wants_grad(q, k, v, g, beta, initial_state)
    chunked = gated_delta_rule_chunked_recompute if grad else gated_delta_rule_chunked
    if capture:
        if grad:
            raise ValueError("capture is for inference only")
        if any(not 1 <= t < lengths[seq] for seq, t in capture):
            raise ValueError("capture: a state after t tokens needs 1 <= t < the sequence's length")
    short = 1 if grad else RECURRENT_MAX_LEN
    is_short = [length <= short for length in lengths]
    if all(is_short):
        return gated_delta_rule_recurrent(q, k, v, g, beta, cu_seqlens, initial_state, **kwargs, capture=capture)
    if not any(is_short):
        more = {"capture": capture} if capture else {}
        return chunked(q, k, v, g, beta, cu_seqlens, initial_state, **kwargs, **more)

    device = v.device
    lengths_t = torch.tensor(lengths, device=device)
    is_short_t = torch.tensor(is_short, device=device)
    groups = []  # (form, its sequences, their tokens, its cu_seqlens, rank within it, its captures)
    for form, mask in ((gated_delta_rule_recurrent, is_short_t), (chunked, ~is_short_t)):
        seqs = mask.nonzero().squeeze(1)
        tokens = mask.repeat_interleave(lengths_t, output_size=v.shape[0]).nonzero().squeeze(1)
        rank = {s: i for i, s in enumerate(seqs.tolist())}
        more = [(rank[s], t) for s, t in capture or [] if s in rank]
        groups.append((form, seqs, tokens, torch.nn.functional.pad(lengths_t[seqs].cumsum(0), (1, 0)), rank, more))

    o = torch.empty_like(v)
    state = v.new_empty(len(lengths), v.shape[1], q.shape[2], v.shape[2], dtype=torch.float32)
    captured = v.new_empty(len(capture or []), *state.shape[1:], dtype=torch.float32)
    for form, seqs, tokens, seq_cu_seqlens, rank, more in groups:
        init = None if initial_state is None else initial_state[seqs]
        o[tokens], state[seqs], *got = form(q[tokens], k[tokens], v[tokens], g[tokens], beta[tokens], seq_cu_seqlens,
                                             init, **kwargs, **({"capture": more} if more else {}))
        if more:  # back to the caller's capture order
            captured[[m for m, (s, _) in enumerate(capture) if s in rank]] = got[0]
    return (o, state) if capture is None else (o, state, captured)


def _sequence_lengths(q: Tensor, v: Tensor, cu_seqlens: Tensor) -> list[int]:
    """Host-side sequence lengths, checking the packing (one device sync per call)."""
    cu = cu_seqlens.tolist()
    lengths = [end - start for start, end in zip(cu[:-1], cu[1:])]
    if len(cu) < 2 or cu[0] != 0 or cu[-1] != v.shape[0] or min(lengths) < 1:
        raise ValueError(f"cu_seqlens must rise strictly from 0 to N={v.shape[0]}, got {cu}")
    if v.shape[1] % q.shape[1]:
        raise ValueError(f"number of v-heads {v.shape[1]} is not a multiple of q/k heads {q.shape[1]}")
    return lengths


def _l2norm(x: Tensor) -> Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + L2NORM_EPS)


def _prepare(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, use_qk_l2norm: bool,
             repeat_heads: bool = True) -> tuple[Tensor, ...]:
    """float32 inputs with q, k normalised, q scaled by K^-1/2, and (repeat_heads) q, k repeated to one head per
    v-head."""
    q, k, v, g, beta = (x.float() for x in (q, k, v, g, beta))
    if use_qk_l2norm:
        q, k = _l2norm(q), _l2norm(k)
    q = q * q.shape[-1] ** -0.5
    if not repeat_heads:
        return q, k, v, g, beta
    group = v.shape[1] // q.shape[1]  # consecutive v-heads share a q/k head
    return q.repeat_interleave(group, dim=1), k.repeat_interleave(group, dim=1), v, g, beta


def _plan_scan(num_steps: list[int], first_step: Tensor) -> tuple[Tensor | None, Tensor, list[int]]:
    """Order sequences by decreasing number of scan steps (tokens or chunks).

    Then the sequences still running at step i are the first num_active[i], so the scan updates the view state[:n]
    instead of gathering and scattering states. Returns (order, None when no reordering is needed, as in a decode
    batch; first_step in that order; num_active for each step).
    """
    order = sorted(range(len(num_steps)), key=lambda s: -num_steps[s])  # stable: keeps equal ones in place
    sorted_steps = [num_steps[s] for s in order]
    num_active = [sum(steps > i for steps in sorted_steps) for i in range(sorted_steps[0])]
    if order == sorted(order):
        return None, first_step, num_active
    order_t = torch.tensor(order, device=first_step.device)
    return order_t, first_step[order_t], num_active


def _initial_state(initial_state: Tensor | None, order: Tensor | None, shape: tuple[int, ...], v: Tensor) -> Tensor:
    """A fresh float32 state of `shape` [S, Hv, K, V] in scan order; the caller's tensor is never written."""
    if initial_state is None:
        return v.new_zeros(shape, dtype=torch.float32)
    if tuple(initial_state.shape) != shape:
        raise ValueError(f"initial_state must have shape {shape}, got {tuple(initial_state.shape)}")
    if order is None:
        return initial_state.to(device=v.device, dtype=torch.float32, copy=True)
    return initial_state.to(device=v.device, dtype=torch.float32)[order]


def _retire(state: Tensor, n: int, finished: list[Tensor]) -> Tensor:
    """Keep the first n states running; the rest (sequences in decreasing-length order whose scan is over) are final
    and go to `finished`, last-ranked first."""
    if n < state.shape[0]:
        finished.append(state[n:])
        return state[:n]
    return state


def _restore_order(state: Tensor, order: Tensor | None) -> Tensor:
    if order is None:
        return state
    restored = torch.empty_like(state)
    restored[order] = state
    return restored


def _solve_unit_lower(A: Tensor, rhs: Tensor) -> Tensor:
    """X with (I + strictly_lower(A)) X = rhs, batched over the leading dims."""
    return torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)
