"""Per-step metadata of one packed forward pass: which tokens belong to which sequence, where each sequence's
K/V blocks and recurrent-state slot are, which rows need logits, and where a copy of a sequence's recurrent state
is wanted part-way through its new tokens (a prefix cache's snapshot). Built by whoever drives the model (the
engine's runner, or a test), passed explicitly down to every layer."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch


@dataclass
class SeqChunk:
    """One sequence's share of a step: its new tokens and where its cache lives."""

    token_ids: list[int]
    num_past: int = 0  # tokens of this sequence already in the cache
    state_slot: int | None = None  # recurrent-state slot (Gated DeltaNet layers)
    block_ids: list[int] | None = None  # KV blocks covering num_past + len(token_ids) positions
    positions: torch.Tensor | None = None  # [3, T] M-RoPE positions; default text positions num_past..
    want_logits: str = "last"  # "last", "all" or "none"
    snapshots: list[tuple[int, int]] | None = None  # (k, slot): copy the state after the first k new tokens to slot


@dataclass
class StateSegment:
    """One round of the recurrent layers' work when states are copied part-way: for each sequence it advances,
    the next piece of its new tokens; at the end of a piece its state is copied to a slot (or not: -1)."""

    rows: torch.Tensor  # [n] packed rows of the pieces
    seqs: torch.Tensor  # [m] the sequences advanced (indices into the batch)
    cu_seqlens: torch.Tensor  # [m+1] over `rows`
    copy_to: torch.Tensor  # [m] slot for the state at the end of each piece, -1 for none


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [N] int64
    positions: torch.Tensor  # [N] or [3, N] int64
    cu_seqlens: torch.Tensor  # [S+1] int64: new tokens of sequence s are rows cu_seqlens[s]:cu_seqlens[s+1]
    context_lens: torch.Tensor  # [S] int64: past + new tokens of each sequence
    has_initial_state: torch.Tensor  # [S] bool: sequence has earlier tokens whose state is in its slot
    state_slots: torch.Tensor | None = None  # [S] int64
    block_tables: torch.Tensor | None = None  # [S, max_blocks] int64
    slot_mapping: torch.Tensor | None = None  # [N] int64 flat KV position (block * block_size + offset)
    logits_indices: torch.Tensor | None = None  # [M] rows whose logits are wanted
    segments: list[StateSegment] | None = None  # set when a state copy falls inside a sequence's new tokens

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens.numel() - 1

    @staticmethod
    def build(chunks: list[SeqChunk], block_size: int = 16, device: str | torch.device = "cpu") -> "ForwardBatch":
        ids, pos, cu, ctx, slots, tables, slot_map, logit_rows, cuts = [], [], [0], [], [], [], [], [], []
        use_cache = chunks[0].state_slot is not None or chunks[0].block_ids is not None
        mrope = any(c.positions is not None for c in chunks)
        for c in chunks:
            T = len(c.token_ids)
            if T == 0:
                raise ValueError("a sequence chunk must have at least one token")
            start = cu[-1]
            ids.extend(c.token_ids)
            p = torch.arange(c.num_past, c.num_past + T)
            pos.append(c.positions if c.positions is not None else (p.expand(3, T) if mrope else p))
            cu.append(start + T)
            ctx.append(c.num_past + T)
            if use_cache:
                if c.state_slot is None or c.block_ids is None:
                    raise ValueError("with a cache every sequence needs a state slot and KV blocks")
                if len(c.block_ids) * block_size < c.num_past + T:
                    raise ValueError(f"{len(c.block_ids)} blocks cannot hold {c.num_past + T} tokens")
                slots.append(c.state_slot)
                tables.append(c.block_ids)
                cuts.append(sorted(c.snapshots or []))
                slot_map.extend(c.block_ids[i // block_size] * block_size + i % block_size for i in p.tolist())
            elif c.num_past:
                raise ValueError("a sequence with past tokens needs a cache")
            if c.want_logits == "last":
                logit_rows.append(start + T - 1)
            elif c.want_logits == "all":
                logit_rows.extend(range(start, start + T))
        t = lambda x: torch.tensor(x, dtype=torch.int64, device=device)  # noqa: E731
        batch = ForwardBatch(
            input_ids=t(ids), positions=torch.cat(pos, dim=-1).to(device), cu_seqlens=t(cu), context_lens=t(ctx),
            has_initial_state=torch.tensor([c.num_past > 0 for c in chunks], device=device),
            logits_indices=t(logit_rows),
        )
        if use_cache:
            width = max(len(b) for b in tables)
            batch.state_slots = t(slots)
            batch.block_tables = t([b + [0] * (width - len(b)) for b in tables])
            batch.slot_mapping = t(slot_map)
            if any(cuts):
                batch.segments = _segments(cu, cuts, device)
        return batch


def _segments(cu: list[int], cuts: list[list[tuple[int, int]]], device) -> list[StateSegment]:
    """Round r advances every sequence by its r-th piece: sequence s's new tokens cut after each k of its cuts."""
    pieces = []  # per sequence: [(start row, end row, copy_to)]
    for s, c in enumerate(cuts):
        bounds = [k for k, _ in c if 0 < k < cu[s + 1] - cu[s]]
        edges = [0, *bounds, cu[s + 1] - cu[s]]
        slot_at = dict(c)
        pieces.append([(cu[s] + a, cu[s] + b, slot_at.get(b, -1)) for a, b in zip(edges, edges[1:])])
    out = []
    for r in range(max(len(p) for p in pieces)):
        now = [(s, p[r]) for s, p in enumerate(pieces) if r < len(p)]
        rows = [i for _, (a, b, _) in now for i in range(a, b)]
        lens = [b - a for _, (a, b, _) in now]
        t = lambda x: torch.tensor(x, dtype=torch.int64, device=device)  # noqa: E731
        out.append(StateSegment(t(rows), t([s for s, _ in now]), t([0, *itertools.accumulate(lens)]),
                                t([slot for _, (_, _, slot) in now])))
    return out
