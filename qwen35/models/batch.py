"""Per-step metadata of one packed forward pass: which tokens belong to which sequence, where each sequence's
K/V blocks and recurrent-state slot are, which rows need logits, and where a copy of a sequence's recurrent state
is wanted after some of its new tokens (a prefix cache's snapshot). Built by whoever drives the model (the
engine's runner, or a test), passed explicitly down to every layer."""

from __future__ import annotations

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
    state_copies: list[tuple[int, int, int]] | None = None  # (sequence, after k of its new tokens, to slot)
    query_lens: list[int] | None = None  # host copy of the new-token counts (cu_seqlens' steps): no device sync

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def max_query_len(self) -> int:
        return max(self.lengths())

    def lengths(self) -> list[int]:
        """Each sequence's new-token count, from the host copy where the batch was built here (no device sync)."""
        return self.query_lens if self.query_lens is not None else self.cu_seqlens.diff().tolist()

    @staticmethod
    def build(chunks: list[SeqChunk], block_size: int = 16, device: str | torch.device = "cpu") -> "ForwardBatch":
        ids, pos, cu, ctx, slots, tables, slot_map, logit_rows, copies = [], [], [0], [], [], [], [], [], []
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
                for k, to in c.snapshots or []:
                    if not 1 <= k <= T:
                        raise ValueError(f"a state copy after {k} of {T} new tokens")
                    copies.append((len(slots) - 1, k, to))
                slot_map.extend(c.block_ids[i // block_size] * block_size + i % block_size for i in p.tolist())
            elif c.num_past:
                raise ValueError("a sequence with past tokens needs a cache")
            if c.want_logits == "last":
                logit_rows.append(start + T - 1)
            elif c.want_logits == "all":
                logit_rows.extend(range(start, start + T))
        host = dict(input_ids=torch.tensor(ids, dtype=torch.int64), positions=torch.cat(pos, dim=-1),
                    cu_seqlens=torch.tensor(cu, dtype=torch.int64), context_lens=torch.tensor(ctx, dtype=torch.int64),
                    has_initial_state=torch.tensor([c.num_past > 0 for c in chunks]),
                    logits_indices=torch.tensor(logit_rows, dtype=torch.int64))
        if use_cache:
            width = max(len(b) for b in tables)
            host.update(state_slots=torch.tensor(slots, dtype=torch.int64),
                        block_tables=torch.tensor([b + [0] * (width - len(b)) for b in tables], dtype=torch.int64),
                        slot_mapping=torch.tensor(slot_map, dtype=torch.int64))
        batch = ForwardBatch(**_upload(host, torch.device(device)), query_lens=[len(c.token_ids) for c in chunks])
        batch.state_copies = (copies or None) if use_cache else None
        return batch


def _upload(host: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The step's tensors on `device`. To a GPU: packed into one pinned int64 buffer and copied without blocking
    (one transfer per step, no sync), each field a view of the copy."""
    if device.type != "cuda":
        return {k: v.to(device) for k, v in host.items()}
    return _unpack(_pack(host).pin_memory().to(device, non_blocking=True), host)


def _pack(host: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.reshape(-1).long() for v in host.values()])


def _unpack(flat: torch.Tensor, host: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, at = {}, 0
    for k, v in host.items():
        out[k] = flat[at:at + v.numel()].view(v.shape).to(v.dtype)  # the bool field: one small cast on the device
        at += v.numel()
    return out
