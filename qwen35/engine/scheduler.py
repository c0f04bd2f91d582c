"""FCFS scheduling under a per-step token budget, with chunked prefill and preemption by recompute.

Each step: running requests first (a decode token, or the next chunk of a prompt), oldest first; when KV blocks
run out the newest running request is preempted (its blocks and state slot freed, its progress reset: it will
recompute prompt + output so far); then waiting requests are admitted while budget, sequence slots and blocks
last. Plain Python over requests and the two managers: no tensors here.

Images and videos are encoded in pieces between steps: each step has an encoder budget in patches, granted to
requests in the same order; a prompt is prefilled only up to the first placeholder of an item whose encoding is not
fully granted (the runner does the granted work before the forward), and a request with nothing else to do this
step gets a chunk of 0 tokens that only encodes. So a large image costs running streams a bounded delay per step
instead of one long stall."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from qwen35.cache.manager import BlockManager, SlotPool
from qwen35.engine.request import Request, Status


@dataclass
class ScheduledChunk:
    request: Request
    num_tokens: int  # new tokens computed this step, starting at request.num_computed_tokens

    @property
    def completes_known_tokens(self) -> bool:
        """The chunk reaches the end of what is known, so its last logits sample the next token."""
        return self.request.num_computed_tokens + self.num_tokens == self.request.num_tokens


class Scheduler:
    def __init__(self, blocks: BlockManager, slots: SlotPool, max_num_seqs: int, max_num_batched_tokens: int,
                 encoder_budget: int | None = None):
        """encoder_budget: vision-tower patches encoded per step; default max_num_batched_tokens (a patch of tower
        work costs far less than a token of decoder work for the released models, so an encoding step costs no
        more than a prefill chunk)."""
        self.blocks, self.slots = blocks, slots
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.encoder_budget = encoder_budget or max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledChunk]:
        budget = self.max_num_batched_tokens
        self._encoder_left = self.encoder_budget
        out: list[ScheduledChunk] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n, grant = self._media_cut(req, min(req.num_tokens - req.num_computed_tokens, budget))
            if n == 0 and grant == 0:  # waits for its images to be encoded; the encoder budget is spent
                i += 1
                continue
            if not self._grow(req, req.num_computed_tokens + n):
                # Not enough blocks: preempt the newest running request (possibly this one) and retry.
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
                continue
            self._grant(req, grant)
            out.append(ScheduledChunk(req, n))
            budget -= n
            i += 1
        # After a preemption, admitting anyone would only take back the blocks just freed (thrashing).
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs \
                and self.slots.num_free:
            req = self.waiting[0]
            n, grant = self._media_cut(req, min(req.num_tokens - req.num_computed_tokens, budget))
            if (n == 0 and grant == 0) or not self._grow(req, req.num_computed_tokens + n):
                break
            self.waiting.popleft()
            req.state_slot = self.slots.allocate()
            req.status = Status.RUNNING
            self.running.append(req)
            self._grant(req, grant)
            out.append(ScheduledChunk(req, n))
            budget -= n
        return out

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
        req.block_ids = []
        if req.state_slot is not None:
            self.slots.free(req.state_slot)
            req.state_slot = None

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
