"""Device tensors of the hybrid cache: paged K/V for full-attention layers and per-slot conv history + fp32
recurrent state for Gated DeltaNet layers. Pure storage; which request owns which block or slot is the block and
slot managers' business. The block size never depends on the recurrent state's size. The prefix cache's state
snapshots are slots too (past the running requests' ones), so taking and restoring one is a copy between slots.

Allocated uninitialised (untouched pages cost no memory): attention reads only positions already written, and a
slot's state is read only when `has_initial_state` says this sequence wrote it.

With `scratch`, one more block and one more slot exist past those the managers hand out: the rows that pad a
CUDA-graph decode step to its captured size write there, and nothing reads them."""

from __future__ import annotations

import torch

from qwen35.cache.spec import AttentionCacheSpec, LinearCacheSpec


class HybridCache:
    def __init__(self, spec: dict, num_blocks: int, block_size: int, num_slots: int,
                 dtype: torch.dtype, device="cpu", state_dtype: torch.dtype = torch.float32, scratch: bool = False):
        self.block_size, self.num_blocks, self.num_slots = block_size, num_blocks, num_slots
        self.device = torch.device(device)
        self.scratch_block, self.scratch_slot = (num_blocks, num_slots) if scratch else (None, None)
        num_blocks, num_slots = num_blocks + scratch, num_slots + scratch
        self.k, self.v, self.conv, self.ssm = {}, {}, {}, {}
        for i, s in spec.items():
            if isinstance(s, AttentionCacheSpec):
                shape = (num_blocks, block_size, s.num_kv_heads, s.head_dim)
                self.k[i] = torch.empty(shape, dtype=dtype, device=device)
                self.v[i] = torch.empty(shape, dtype=dtype, device=device)
            elif isinstance(s, LinearCacheSpec):
                self.conv[i] = torch.empty(num_slots, s.conv_dim, s.conv_history, dtype=dtype, device=device)
                self.ssm[i] = torch.empty(num_slots, s.num_v_heads, s.k_head_dim, s.v_head_dim,
                                          dtype=state_dtype, device=device)

    def copy_state(self, src: int, dst: int) -> None:
        """Copy one slot's conv history and recurrent state, in every Gated DeltaNet layer, to another slot."""
        for pool in (*self.conv.values(), *self.ssm.values()):
            pool[dst].copy_(pool[src])

    def copy_block(self, src: int, dst: int, layers: list[int] | None = None) -> None:
        """Copy one K/V block, in every attention layer (or those of `layers`), to another."""
        for i in self.k if layers is None else layers:
            self.k[i][dst].copy_(self.k[i][src])
            self.v[i][dst].copy_(self.v[i][src])

    @staticmethod
    def bytes_per_token(spec: dict, dtype: torch.dtype) -> int:
        size = torch.empty(0, dtype=dtype).element_size()
        return sum(2 * s.num_kv_heads * s.head_dim * size for s in spec.values() if isinstance(s, AttentionCacheSpec))

    @staticmethod
    def bytes_per_slot(spec: dict, dtype: torch.dtype, state_dtype: torch.dtype = torch.float32) -> int:
        size = torch.empty(0, dtype=dtype).element_size()
        ssize = torch.empty(0, dtype=state_dtype).element_size()
        return sum(s.conv_dim * s.conv_history * size + s.num_v_heads * s.k_head_dim * s.v_head_dim * ssize
                   for s in spec.values() if isinstance(s, LinearCacheSpec))
