"""Bookkeeping of the hybrid cache: which KV blocks and which recurrent-state slot each request owns, and (with
prefix caching) which full blocks hold reusable content. Plain Python over integers; the tensors live in
`HybridCache`.

Both hand out the lowest free index first. The cache tensors are allocated uninitialised, so a page becomes resident
only when first written: lowest-first keeps the resident part at the most ever in use at once, where a FIFO free
list would walk through the whole pool (4 GiB of KV by default on CPU) and grow RSS for as long as the server runs.
Cached blocks are the exception: they are kept, as a cache is, until a block is needed and no empty one is left."""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Callable


class BlockManager:
    """Fixed-size KV blocks. A request holds ceil(num_tokens / block_size) blocks.

    With prefix caching a full, computed block is registered under the hash of its content (`register`); other
    requests then share it copy-free (`match` + `acquire`), counted by references. A block nobody holds keeps its
    content and stays findable until it is evicted: least recently freed first, and a request frees its blocks
    from the tail, so a prefix's later blocks go before the earlier ones that every longer match needs."""

    def __init__(self, num_blocks: int, block_size: int, on_evict: Callable[[bytes], None] | None = None):
        self.num_blocks, self.block_size = num_blocks, block_size
        self._empty = list(range(num_blocks))  # a heap of free blocks without reusable content
        self._cached: OrderedDict[int, None] = OrderedDict()  # free blocks with content, least recently freed first
        self._refs = [0] * num_blocks
        self._hash: dict[int, bytes] = {}
        self._by_hash: dict[bytes, int] = {}
        self.on_evict = on_evict  # told the hash of every block whose content is dropped

    @property
    def num_free(self) -> int:
        """Blocks nobody holds, cached ones included (they are evicted when needed)."""
        return len(self._empty) + len(self._cached)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def blocks_needed(self, num_tokens: int, num_held: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - num_held)

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise RuntimeError(f"asked for {n} KV blocks with {self.num_free} free")
        out = []
        for _ in range(n):
            if self._empty:
                b = heapq.heappop(self._empty)
            else:
                b, _ = self._cached.popitem(last=False)
                self._forget(b)
            self._refs[b] = 1
            out.append(b)
        return out

    def free(self, blocks: list[int]) -> None:
        for b in reversed(blocks):
            self._refs[b] -= 1
            if self._refs[b] == 0:
                if b in self._hash:
                    self._cached[b] = None
                else:
                    heapq.heappush(self._empty, b)

    def register(self, block: int, h: bytes) -> None:
        """`block` is full and computed: findable under `h` (unless another block already holds that content)."""
        if h not in self._by_hash and block not in self._hash:
            self._by_hash[h], self._hash[block] = block, h

    def match(self, hashes: list[bytes]) -> list[int]:
        """The cached blocks of the longest prefix of `hashes` (not yet acquired)."""
        out = []
        for h in hashes:
            b = self._by_hash.get(h)
            if b is None:
                break
            out.append(b)
        return out

    def acquire(self, blocks: list[int]) -> None:
        """Take a reference on matched blocks."""
        for b in blocks:
            if self._refs[b] == 0:
                del self._cached[b]
            self._refs[b] += 1

    def _forget(self, b: int) -> None:
        h = self._hash.pop(b)
        del self._by_hash[h]
        if self.on_evict is not None:
            self.on_evict(h)


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
