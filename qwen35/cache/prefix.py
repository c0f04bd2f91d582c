"""Prefix caching over the hybrid cache: content hashes of full KV blocks, the pool of Gated DeltaNet state
snapshots, and the policy joining them (where a new request resumes, which snapshots a prefill takes).

Attention K/V can be reused block by block. A Gated DeltaNet layer keeps one state per sequence that cannot be
trimmed back, so a request can only resume where a copy of that state was taken: a *snapshot*, keyed by the hash of
the block that ends at its position. A request resumes at the deepest snapshot whose blocks are all cached (at most
at its last token, which is always computed to get logits). Snapshots are copies in a pool of their own: restoring
copies one into the request's slot, so no request ever runs on a cached state in place.

Plain Python over token ids and integers; the runner moves the tensors."""

from __future__ import annotations

import hashlib
import heapq
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field

from qwen35.cache.manager import BlockManager

# A prompt's snapshots: at the last block boundary before its last token, and one boundary earlier when that is
# within TAIL tokens of the end (a chat template rewrites the generation prompt's last few tokens in the next turn's
# history, e.g. dropping `<think>`); plus every SNAPSHOT_INTERVAL tokens of a long prompt, at most MAX_PER_PROMPT.
TAIL = 8
SNAPSHOT_INTERVAL = 256
MAX_PER_PROMPT = 8


def block_hashes(token_ids: list[int], block_size: int, prev: bytes | None, start: int, extra=None) -> list[bytes]:
    """Chained hashes of the full blocks of token_ids[start:] (start is a block boundary; prev: the hash of the
    block before it). extra(a, b) -> bytes: what else decides the block's content (the visual items whose
    placeholders fall in positions a..b-1)."""
    out = []
    for a in range(start, len(token_ids) - block_size + 1, block_size):
        h = hashlib.blake2b(prev or b"", digest_size=16)
        h.update(array("q", token_ids[a:a + block_size]).tobytes())
        if extra is not None:
            h.update(extra(a, a + block_size))
        prev = h.digest()
        out.append(prev)
    return out


@dataclass(eq=False)
class Snapshot:
    slot: int
    num_tokens: int
    owner: str = ""  # the request that took it
    key: bytes = b""
    ancestors: list[Snapshot] = field(default_factory=list)  # shallower snapshots it covers
    num_covering: int = 0  # deeper snapshots of later requests whose path runs through this one
    pins: int = 0


class SnapshotPool:
    """Snapshot slots (cache state slots first_slot .. first_slot + num_slots - 1), found by key.

    Eviction is least recently used, where only a hit refreshes (the one snapshot used, not its whole path), and
    among those a snapshot that a later request's deeper one covers goes first: the conversation went on past it,
    and the deeper one serves every request the shallower would, except a branch between the two. A prompt's own
    snapshots do not cover each other: the one just before its end serves the next chat turn, whose history parts
    from the prompt a few tokens before the last snapshot."""

    def __init__(self, first_slot: int, num_slots: int):
        self.first_slot, self.num_slots = first_slot, num_slots
        self._free = list(range(first_slot, first_slot + num_slots))
        self._lru: OrderedDict[bytes, Snapshot] = OrderedDict()  # published, least recently used first
        self._reserved: dict[int, Snapshot] = {}  # being written this step

    @property
    def num_used(self) -> int:
        return self.num_slots - len(self._free)

    @property
    def num_pinned(self) -> int:
        return sum(s.pins > 0 for s in self._lru.values()) + len(self._reserved)

    def find(self, key: bytes) -> Snapshot | None:
        return self._lru.get(key)

    def use(self, snap: Snapshot) -> None:
        """A request resumes from `snap`: refresh it and pin it until its state has been copied out."""
        self._lru.move_to_end(snap.key)
        snap.pins += 1

    def unpin(self, snap: Snapshot) -> None:
        snap.pins -= 1

    def reserve(self, num_tokens: int, owner: str = "") -> Snapshot | None:
        """A slot to write a new snapshot into this step (evicting one if needed), or None if every slot is pinned."""
        if not self._free and not self._evict():
            return None
        snap = Snapshot(heapq.heappop(self._free), num_tokens, owner)
        self._reserved[snap.slot] = snap
        return snap

    def publish(self, snap: Snapshot, key: bytes, ancestors: list[Snapshot]) -> None:
        """The step that wrote `snap` is done: findable under `key`."""
        del self._reserved[snap.slot]
        if key in self._lru:  # taken twice in one step (two requests with one prefix): keep the first
            heapq.heappush(self._free, snap.slot)
            return
        snap.key, snap.ancestors = key, ancestors
        for a in ancestors:
            a.num_covering += 1
        self._lru[key] = snap

    def discard(self, snap: Snapshot) -> None:
        """A reserved snapshot whose step did not run."""
        del self._reserved[snap.slot]
        heapq.heappush(self._free, snap.slot)

    def drop(self, key: bytes) -> None:
        """The block that ends at this snapshot left the cache, so nothing can resume from it."""
        snap = self._lru.get(key)
        if snap is not None and not snap.pins:
            self._remove(snap)

    def _evict(self) -> bool:
        unpinned = [s for s in self._lru.values() if not s.pins]
        if not unpinned:
            return False
        self._remove(next((s for s in unpinned if s.num_covering), unpinned[0]))
        return True

    def _remove(self, snap: Snapshot) -> None:
        del self._lru[snap.key]
        for a in snap.ancestors:
            a.num_covering -= 1
        heapq.heappush(self._free, snap.slot)


@dataclass
class PrefixCacheStats:
    queries: int = 0  # lookups (a request admitted, or re-admitted after preemption)
    hits: int = 0  # lookups that resumed past position 0
    queried_tokens: int = 0
    hit_tokens: int = 0


class PrefixCache:
    """Where a request resumes and which snapshots its prefill takes; registers what a step computed.

    Works on the engine's requests (duck-typed: token ids, block ids, `mm`, and the fields `block_hashes`,
    `num_registered_blocks`, `pending_snapshots`, `extra_snapshots`)."""

    def __init__(self, blocks: BlockManager, snapshots: SnapshotPool | None):
        """snapshots: None for a model without Gated DeltaNet layers (every block boundary is a resume point)."""
        self.blocks, self.snapshots, self.block_size = blocks, snapshots, blocks.block_size
        self.stats = PrefixCacheStats()
        if snapshots is not None:
            blocks.on_evict = snapshots.drop

    def hashes(self, req) -> list[bytes]:
        """The hashes of every full block of the request's known tokens (computed once, extended as it grows)."""
        hs, bs = req.block_hashes, self.block_size
        if (len(hs) + 1) * bs <= req.num_tokens:
            extra = req.mm.items_in if req.mm is not None else None
            hs += block_hashes(req.all_token_ids, bs, hs[-1] if hs else None, len(hs) * bs, extra)
        return hs

    def lookup(self, req) -> tuple[int, list[int], Snapshot | None]:
        """(tokens to resume past, the cached blocks holding them, the snapshot to restore). Blocks are acquired
        and the snapshot pinned; the caller undoes it with `release` if it does not admit the request. Where the
        cached blocks reach deeper than the snapshot, the request will pass that branch point: it snapshots there."""
        hs = self.hashes(req)
        hit = self.blocks.match(hs[:(req.num_tokens - 1) // self.block_size])
        snap, n = None, len(hit)
        if self.snapshots is not None:
            n = 0
            for j in range(len(hit), 0, -1):
                snap = self.snapshots.find(hs[j - 1])
                if snap is not None:
                    n = j
                    self.snapshots.use(snap)
                    break
            if len(hit) > n:
                req.extra_snapshots.add(len(hit) * self.block_size)
        self.blocks.acquire(hit[:n])
        return n * self.block_size, hit[:n], snap

    def release(self, blocks: list[int], snap: Snapshot | None) -> None:
        self.blocks.free(blocks)
        if snap is not None:
            self.snapshots.unpin(snap)

    def count(self, req) -> None:
        """A lookup that admitted the request (the metrics count tokens, as vLLM's do)."""
        s = self.stats
        s.queries, s.queried_tokens = s.queries + 1, s.queried_tokens + req.num_tokens
        if req.num_computed_tokens:
            s.hits, s.hit_tokens = s.hits + 1, s.hit_tokens + req.num_computed_tokens

    def add_in_flight(self, flight: dict, req) -> None:
        """Record in `flight`, by hash, what a prefill will add to the cache: the prompt blocks it computes (not
        cached yet) and the snapshots it will take (keyed ("snapshot", hash))."""
        if req.num_computed_tokens >= req.num_prompt_tokens:  # decoding: adds nothing another prompt could wait for
            return
        hs, bs = self.hashes(req), self.block_size
        for h in hs[req.num_registered_blocks:req.num_prompt_tokens // bs]:
            flight.setdefault(h, req)
        if self.snapshots is not None:
            for p in {*self._positions(req.num_prompt_tokens), *req.extra_snapshots}:
                if p > req.num_computed_tokens:
                    flight.setdefault(("snapshot", hs[p // bs - 1]), req)

    def wait_for(self, req, flight: dict) -> tuple[object, int | None] | None:
        """When another prefill will give this request a deeper start than the cache does now: (that request, the
        position where it must snapshot for that, or None if it will anyway). The caller lets this one wait, instead
        of computing the same prefix twice (requests with one system prompt arriving together)."""
        if self.snapshots is None:
            return None
        hs, bs, limit = self.hashes(req), self.block_size, (req.num_tokens - 1) // self.block_size
        h = len(self.blocks.match(hs[:limit]))
        for j in range(h, req.num_computed_tokens // bs, -1):  # a snapshot it takes on cached blocks of ours
            other = flight.get(("snapshot", hs[j - 1]))
            if other is not None and other is not req:
                return other, None
        other = flight.get(hs[h]) if h < limit else None
        if other is None or other is req:
            return None
        b = h
        while b < limit and flight.get(hs[b]) is other:
            b += 1
        return other, b * bs

    def plan_snapshots(self, req, start: int, n: int, positions=None) -> list[tuple[int, int]]:
        """Snapshots to take while computing tokens start .. start+n-1 (at `positions`, default the request's own):
        (tokens into the chunk, slot) pairs. The reserved slots are kept in req.pending_snapshots until `commit` (or
        `abandon`)."""
        if self.snapshots is None or start >= req.num_prompt_tokens - 1:  # decode steps take none
            return []
        hs, bs, out = self.hashes(req), self.block_size, []
        pending = {s.num_tokens for s in req.pending_snapshots}
        if positions is None:
            positions = sorted({*self._positions(req.num_prompt_tokens), *req.extra_snapshots})
        for p in positions:
            if start < p <= start + n and p not in pending and self.snapshots.find(hs[p // bs - 1]) is None:
                snap = self.snapshots.reserve(p, req.request_id)
                if snap is None:
                    break
                req.pending_snapshots.append(snap)
                out.append((p - start, snap.slot))
        return out

    def _positions(self, num_prompt_tokens: int) -> list[int]:
        bs = self.block_size
        last = (num_prompt_tokens - 1) // bs * bs
        tail = max(0, num_prompt_tokens - 1 - TAIL) // bs * bs
        stride = max(SNAPSHOT_INTERVAL, -(-num_prompt_tokens // MAX_PER_PROMPT)) // bs * bs
        return sorted({p for p in (*range(stride, tail, stride), tail, last) if p > 0})

    def commit(self, req, num_computed: int) -> None:
        """A step computed the request's tokens up to num_computed: register its full blocks and the snapshots
        that step took."""
        hs, bs = self.hashes(req), self.block_size
        for i in range(req.num_registered_blocks, num_computed // bs):
            self.blocks.register(req.block_ids[i], hs[i])
        req.num_registered_blocks = max(req.num_registered_blocks, num_computed // bs)
        for snap in req.pending_snapshots:
            j = snap.num_tokens // bs
            ancestors = [a for a in map(self.snapshots.find, hs[:j - 1]) if a is not None and a.owner != req.request_id]
            self.snapshots.publish(snap, hs[j - 1], ancestors)
        req.pending_snapshots = []

    def abandon(self, req) -> None:
        for snap in req.pending_snapshots:
            self.snapshots.discard(snap)
        req.pending_snapshots = []
