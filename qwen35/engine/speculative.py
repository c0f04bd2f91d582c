"""Speculative decoding with the checkpoint's MTP head, the engine's side: after each step the head runs over the
rows the trunk committed and drafts the next k tokens of each decoding request (`_propose`, through
`ModelRunner.propose`); the next step verifies them in one trunk pass and keeps them row by row while they match
what sampling draws there (`_verify`). Rolling back is exact and copy-free: the recurrent layers left the state after
each draft in the request's ring of slots, so the request swaps its slot with the one of its last accepted token;
the attention K/V past it (the trunk's and the head's) is overwritten later. A mixin of `LLMEngine`, whose sampling
steps it shares (grammar masks, sampling, logprobs, appending a token)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qwen35.engine.request import Request
from qwen35.engine.runner import MtpJob
from qwen35.engine.sampler import SampleRow, sample_row, verify_token

# Speculative decoding on CPU drafts only while at most this many requests run (unless disable_by_batch_size says
# otherwise): past it a step is compute-bound and verifying k + 1 rows per request costs more than it saves (bench-moe
# on 2 cores, k = 1, ~85% acceptance: 1.29x at batch 1, 1.25x at 4, 1.05x at 8; 0.96x with every draft right at 16).
CPU_SPEC_MAX_BATCH = 8


@dataclass
class SpecDecodeStats:
    """Speculative decoding since the engine started (vLLM's counters): verify steps with drafts, drafted and
    accepted tokens, and acceptances by draft position."""

    num_speculative_tokens: int = 0
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)

    def __post_init__(self):
        self.accepted_per_pos = [0] * self.num_speculative_tokens

    def record(self, num_draft_tokens: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted
        for i in range(num_accepted):
            self.accepted_per_pos[i] += 1

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens each verify step produced: the accepted drafts and the one sampled after them."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0


class SpeculativeDecoding:
    """LLMEngine's speculative steps (it sets speculative, num_spec, draft_ids, spec_stats, draft_hook, _forks)."""

    def _draft_ids(self, size: int | None) -> torch.Tensor | None:
        """The ids the MTP head drafts among: None for every drawable id, or the first `size` (BPE ranks: the tokens
        merged first are the most frequent) and the added tokens (eos, think and tool-call markers)."""
        if size is None or size >= self.vocab_limit:
            return None
        added = self.tokenizer.backend.get_added_tokens_decoder() if self.tokenizer is not None else {}
        ids = sorted(set(range(size)) | {i for i in added if i < self.vocab_limit} | set(self.eos_ids))
        return torch.tensor(ids, device=self.device)

    def _verify(self, c, lg: torch.Tensor) -> None:
        """A speculative chunk's rows, in order: each samples the token at its position (verify_token: the draft
        stands with the target's probability), appended as any sampled token; the first token that differs from its
        draft ends the chunk. The request then holds the state after its last accepted token: the verify pass left
        the state after each draft in its ring (and after all of them in its own slot), so this is a swap of slots."""
        r, drafts = c.request, c.drafts
        accepted = 0
        for j in range(len(drafts) + 1):
            if r.is_finished:
                break
            row = lg[j:j + 1].to(torch.float32, copy=True)  # masked in place: not the runner's inference tensor
            self._constrain(row, [r])
            if r.is_finished:
                break
            draft = drafts[j] if j < len(drafts) else None
            tok = self._guarded(r, self._sample_at, row[0, :self.vocab_limit], r, draft)
            if tok is None:
                break
            self._record_logprobs(row, [r], [tok])
            if not r.is_finished:
                self._guarded(r, self._append_token, r, tok)
            if tok != draft:
                break
            accepted += 1
        c.num_accepted = accepted
        self.spec_stats.record(len(drafts), accepted)
        if r.is_finished:
            return
        r.num_computed_tokens += accepted
        if accepted < len(drafts):
            r.state_slot, r.ring_slots[accepted] = r.ring_slots[accepted], r.state_slot

    def _sample_at(self, logits: torch.Tensor, r: Request, draft: int | None) -> int:
        row = SampleRow(r.params, r.prompt_token_ids, r.output_token_ids, r.generator, self._banned(r))
        return sample_row(logits, row) if draft is None else verify_token(logits, row, draft)

    def _propose(self, chunks) -> None:
        """The MTP head's step: its K/V at every position the trunk committed this step, and drafts for the next
        step of each request now decoding (none while more than disable_by_batch_size requests run)."""
        limit = self.speculative.disable_by_batch_size
        if limit is None and self.device.type == "cpu":
            limit = CPU_SPEC_MAX_BATCH
        drafting = limit is None or len(self.scheduler.running) <= limit
        jobs = []
        for c in chunks:
            r, start, n = c.request, c.start, c.num_known + c.num_accepted  # the rows now in the cache
            if n == 0:
                continue
            ids = r.all_token_ids[start + 1:start + n + 1]
            if len(ids) < n:  # the request stopped on, or failed at, its last row: that row has no successor
                ids, n = ids[:n - 1], n - 1
                if not n:
                    continue
            k = 0
            if drafting and not r.is_finished and r.num_computed_tokens + 1 == r.num_tokens:
                k = min(self.num_spec, r.max_total_tokens - r.num_tokens - 1)
            jobs.append(MtpJob(r, c, start, ids, max(k, 0)))
        for job, drafts in zip(jobs, self.runner.propose(jobs, self.vocab_limit, self.draft_ids)):
            if self.draft_hook is not None and job.num_drafts:
                drafts = list(self.draft_hook(job.request, drafts))[:job.num_drafts]
            job.request.spec_token_ids = drafts if not job.request.is_finished else []
        for leader, sib in self._forks:  # their copies of the leader's last block now get its MTP K/V too
            self.runner.fork(leader, sib, mtp_only=True)
        self._forks = []
