"""Bookkeeping of the hybrid cache: which KV blocks and which recurrent-state slot each request owns. Plain
Python over integers; the tensors live in `HybridCache`.

Both hand out the lowest free index first. The cache tensors are allocated uninitialised, so a page becomes resident
only when first written: lowest-first keeps the resident part at the most ever in use at once, where a FIFO free
list would walk through the whole pool (4 GiB of KV by default on CPU) and grow RSS for as long as the server runs."""

from __future__ import annotations

import heapq


class BlockManager:
    """Fixed-size KV blocks from a free list. A request holds ceil(num_tokens / block_size) blocks."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free = list(range(num_blocks))  # a heap

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
        return [heapq.heappop(self._free) for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            heapq.heappush(self._free, b)


class SlotPool:
    """One recurrent-state slot (conv history + fp32 state of every Gated DeltaNet layer) per running request."""

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self._free = list(range(num_slots))  # a heap

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("no free recurrent-state slot")
        return heapq.heappop(self._free)

    def free(self, slot: int) -> None:
        heapq.heappush(self._free, slot)
