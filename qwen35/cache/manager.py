"""Bookkeeping of the hybrid cache: which KV blocks and which recurrent-state slot each request owns. Plain
Python over integers; the tensors live in `HybridCache`."""

from __future__ import annotations

from collections import deque


class BlockManager:
    """Fixed-size KV blocks from a free list. A request holds ceil(num_tokens / block_size) blocks."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_needed(self, num_tokens: int, num_held: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - num_held)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV blocks with {len(self._free)} free")
        return [self._free.popleft() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(blocks)


class SlotPool:
    """One recurrent-state slot (conv history + fp32 state of every Gated DeltaNet layer) per running request."""

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self._free: deque[int] = deque(range(num_slots))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("no free recurrent-state slot")
        return self._free.popleft()

    def free(self, slot: int) -> None:
        self._free.append(slot)
