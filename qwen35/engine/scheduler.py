"""FCFS scheduling under a per-step token budget, with chunked prefill and preemption by recompute.

Each step: running requests first (a decode token, or the next chunk of a prompt), oldest first; when KV blocks
run out the newest running request is preempted (its blocks and state slot freed, its progress reset: it will
recompute prompt + output so far); then waiting requests are admitted while budget, sequence slots and blocks
last. Plain Python over requests and the two managers: no tensors here.

Images and videos are encoded in pieces between steps: each step has an encoder budget in patches, granted to
requests in the same order; a prompt is prefilled only up to the first placeholder of an item whose encoding is not
fully granted (the runner does the granted work before the forward), and a request with nothing else to do this
step gets a chunk of 0 tokens that only encodes. So a large image costs running streams a bounded delay per step
instead of one long stall.

With a prefix cache, a request admitted (or re-admitted after preemption) first resumes past the part of its tokens
the cache holds (`PrefixCache.lookup`); a prefill chunk that stops short of the known tokens ends on a block
boundary; each chunk carries the state snapshots to take inside it. n > 1 completions wait for the first one's
prefill and are then forked from it (`fork`): one prefill for all of them."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from qwen35.cache.manager import BlockManager, SlotPool
from qwen35.cache.prefix import PrefixCache, Snapshot
from qwen35.engine.request import Request, Status


@dataclass
class ScheduledChunk:
    request: Request
    num_tokens: int  # new tokens computed this step, starting at request.num_computed_tokens (drafts included)
    restore: Snapshot | None = None  # copy this snapshot into the request's state slot first
    snapshots: list[tuple[int, int]] = field(default_factory=list)  # (after k of the new tokens, snapshot slot)
    drafts: list[int] = field(default_factory=list)  # speculative tokens verified after the known ones
    start: int = 0  # request.num_computed_tokens when scheduled (its first new token's position)
    num_accepted: int = 0  # drafts the verification kept (set by the engine)

    @property
    def num_known(self) -> int:
        return self.num_tokens - len(self.drafts)

    @property
    def completes_known_tokens(self) -> bool:
        """The chunk reaches the end of what is known, so its last known token's logits sample the next token."""
        return self.request.num_computed_tokens + self.num_known == self.request.num_tokens


class Scheduler:
    def __init__(self, blocks: BlockManager, slots: SlotPool, max_num_seqs: int, max_num_batched_tokens: int,
                 encoder_budget: int | None = None, prefix: PrefixCache | None = None, num_spec: int = 0):
        """encoder_budget: vision-tower patches encoded per step; default max_num_batched_tokens (a patch of tower
        work costs far less than a token of decoder work for the released models, so an encoding step costs no
        more than a prefill chunk). num_spec: speculative tokens per step (each running request then holds that
        many more state slots, its ring, and blocks for the MTP head's drafts past its last token)."""
        self.blocks, self.slots, self.num_spec = blocks, slots, num_spec
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.encoder_budget = encoder_budget or max_num_batched_tokens
        self.prefix = prefix
        self._step: list[ScheduledChunk] = []
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledChunk]:
        if self._step:  # with a prefix cache: pins and reserved snapshots are still out
            raise RuntimeError("schedule() again before step_done() of the previous step")
        budget = self.max_num_batched_tokens
        self._encoder_left = self.encoder_budget
        out: list[ScheduledChunk] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n, grant = self._media_cut(req, self._aligned(req, budget))
            if n == 0 and grant == 0:  # waits for its images to be encoded; the encoder budget is spent
                i += 1
                continue
            drafts = req.spec_token_ids[:budget - n] if req.num_computed_tokens + n == req.num_tokens else []
            if not self._grow(req, self._blocks_for(req, n + len(drafts))):
                # Not enough blocks: preempt the newest running request (possibly this one) and retry.
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
                continue
            self._grant(req, grant)
            out.append(self._chunk(req, n, drafts=drafts))
            budget -= n + len(drafts)
            i += 1
        # After a preemption, admitting anyone would only take back the blocks just freed (thrashing).
        waiting = [r for r in self.waiting if r.fork_of is None or r.fork_of.is_finished]  # others wait for theirs
        flight = {}  # prompt blocks that running prefills will compute, by hash
        if self.prefix is not None and waiting:
            for r in self.running:
                self.prefix.add_in_flight(flight, r)
        for req in waiting:
            if preempted or budget <= 0 or len(self.running) >= self.max_num_seqs \
                    or self.slots.num_free < 1 + self.num_spec:
                break
            snap = self._resume(req)
            if self._waits_for_shared_prefix(req, flight, out):
                self._unresume(req, snap)
                continue
            n, grant = self._media_cut(req, self._aligned(req, budget))
            if (n == 0 and grant == 0) or not self._grow(req, self._blocks_for(req, n)):
                self._unresume(req, snap)
                break
            self.waiting.remove(req)
            req.fork_of = None
            if req.num_cached_tokens is None:
                req.num_cached_tokens = req.num_computed_tokens
            self._take_slots(req)
            req.status = Status.RUNNING
            self.running.append(req)
            self._grant(req, grant)
            out.append(self._chunk(req, n, snap))
            budget -= n
            if self.prefix is not None:
                self.prefix.count(req)
                self.prefix.add_in_flight(flight, req)
        if self.prefix is not None:
            self._step = out
        return out

    def _resume(self, req: Request):
        """Skip what the prefix cache holds of a request being admitted; the snapshot to restore, if any. Not for
        a request that wants its prompt's logprobs: they need every position's logits."""
        if self.prefix is None or req.prompt_logprobs is not None:
            return None
        num_cached, blocks, snap = self.prefix.lookup(req)
        req.block_ids, req.num_computed_tokens, req.num_registered_blocks = blocks, num_cached, len(blocks)
        return snap

    def _waits_for_shared_prefix(self, req: Request, flight: dict, out: list[ScheduledChunk]) -> bool:
        """Another prefill will snapshot deeper on this request's prefix than the cache holds now (or computes the
        blocks it would resume into: it then snapshots where their prompts part, in this step's chunk if that reaches
        there): this one waits to resume from that snapshot."""
        if self.prefix is None or req.prompt_logprobs is not None:
            return False
        found = self.prefix.wait_for(req, flight)
        if found is None:
            return False
        other, point = found
        if point is not None and point not in other.extra_snapshots:
            other.extra_snapshots.add(point)
            self.prefix.add_in_flight(flight, other)
            c = next((c for c in out if c.request is other), None)
            if c is not None and c.num_tokens:
                c.snapshots += self.prefix.plan_snapshots(other, other.num_computed_tokens, c.num_tokens, [point])
        return True

    def _unresume(self, req: Request, snap) -> None:
        if self.prefix is not None:
            self.prefix.release(req.block_ids, snap)
            req.block_ids, req.num_computed_tokens, req.num_registered_blocks = [], 0, 0

    def _aligned(self, req: Request, budget: int) -> int:
        """Tokens to compute this step: all that are known, within budget; with a prefix cache a chunk that stops
        short ends on a block boundary (so its blocks are complete and cacheable) when that leaves any."""
        start, n = req.num_computed_tokens, min(req.num_tokens - req.num_computed_tokens, budget)
        boundary = (start + n) // self.blocks.block_size * self.blocks.block_size
        if self.prefix is not None and start + n < req.num_tokens and boundary > start:
            n = boundary - start
        return n

    def _chunk(self, req: Request, n: int, snap=None, drafts=()) -> ScheduledChunk:
        c = ScheduledChunk(req, n + len(drafts), restore=snap, drafts=list(drafts), start=req.num_computed_tokens)
        if self.prefix is not None and n:
            c.snapshots = self.prefix.plan_snapshots(req, req.num_computed_tokens, n)
        return c

    def _blocks_for(self, req: Request, n: int) -> int:
        """Tokens the request's blocks must cover to compute n more: with speculation, also the positions where the
        MTP head writes its K/V while drafting after this step (up to num_spec - 1 past its last token)."""
        end = req.num_computed_tokens + n
        if self.num_spec:
            end = max(end, min(end + self.num_spec - 1, req.max_total_tokens))
        return end

    def _take_slots(self, req: Request) -> None:
        req.state_slot = self.slots.allocate()
        req.ring_slots = [self.slots.allocate() for _ in range(self.num_spec)]

    def step_done(self, ok: bool = True) -> None:
        """The step's forward ran (ok) or failed: register what it computed, or drop what it would have; release
        the restored snapshots. Call it after the forward and before num_computed_tokens moves on."""
        chunks, self._step = self._step, []
        if self.prefix is None:
            return
        for c in chunks:
            if c.restore is not None:
                self.prefix.snapshots.unpin(c.restore)
            if ok and not c.request.is_finished:  # drafts are committed in later steps, once verified
                self.prefix.commit(c.request, c.request.num_computed_tokens + c.num_known)
            else:
                self.prefix.abandon(c.request)

    def fork(self, leader: Request, req: Request) -> bool:
        """Give a waiting sibling the leader's prompt: its full blocks shared, its last partial block and its state
        slot to be copied by the runner (`ModelRunner.fork`). False when no slot or block is free; the sibling then
        waits as any request would (and resumes from the cache)."""
        bs = self.blocks.block_size
        n_full = leader.num_computed_tokens // bs
        partial = leader.num_computed_tokens % bs != 0
        if self.slots.num_free < 1 + self.num_spec or len(self.running) >= self.max_num_seqs \
                or not self.blocks.can_allocate(int(partial)):
            return False
        self.waiting.remove(req)
        self.blocks.acquire(leader.block_ids[:n_full])
        req.block_ids = leader.block_ids[:n_full] + self.blocks.allocate(int(partial))
        req.num_computed_tokens = leader.num_computed_tokens
        req.num_registered_blocks = leader.num_registered_blocks
        req.num_cached_tokens = leader.num_cached_tokens
        self._take_slots(req)
        req.fork_of = None
        req.status = Status.RUNNING
        self.running.append(req)
        return True

    def _media_cut(self, req: Request, n: int) -> tuple[int, int]:
        """(tokens of the next n that can be prefilled this step, patches of encoder work to grant for them)."""
        mm = req.mm
        if mm is None or mm.granted >= mm.num_patches:
            return n, 0
        start = req.num_computed_tokens
        grant = max(0, min(mm.patches_before(start + n) - mm.granted, self._encoder_left))
        return min(n, max(0, mm.ready_end(mm.granted + grant) - start)), grant

    def _grant(self, req: Request, grant: int) -> None:
        if grant:
            req.mm.granted += grant
            self._encoder_left -= grant

    def _grow(self, req: Request, num_tokens: int) -> bool:
        need = self.blocks.blocks_needed(num_tokens, len(req.block_ids))
        if not self.blocks.can_allocate(need):
            return False
        req.block_ids += self.blocks.allocate(need)
        return True

    def _release(self, req: Request) -> None:
        self.blocks.free(req.block_ids)
        req.block_ids, req.num_registered_blocks = [], 0
        if req.state_slot is not None:
            for slot in [req.state_slot, *req.ring_slots]:
                self.slots.free(slot)
            req.state_slot, req.ring_slots = None, []
        req.spec_token_ids = []

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._release(req)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        req.status = Status.WAITING
        self.waiting.appendleft(req)

    def finish(self, req: Request) -> None:
        """Free a finished or aborted request's blocks and slot, wherever it is."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self._release(req)
        req.status = Status.FINISHED
