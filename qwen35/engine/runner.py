"""Turns a schedule into tensors: one packed forward over every scheduled chunk, logits only for the rows that
sample a token or report prompt logprobs. Requests with images or videos first get the vision-tower work the
scheduler granted them this step (items in order, a large one spread over several steps); the embeddings are kept
until the request ends, so a recompute after preemption needs no second pass, and are written over the placeholder
rows, with the 3D positions. A chunk of 0 tokens only encodes.

With a prefix cache it also moves state: a request resuming from a snapshot gets a copy of it in its own slot before
the forward; snapshots taken inside a chunk are written by the recurrent layers (`SeqChunk.snapshots`); an n > 1
sibling forked after the first one's prefill gets copies of its state and of its last, partial KV block."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from qwen35.backends import gpu
from qwen35.backends.cpu import decoder_for
from qwen35.cache.hybrid import HybridCache
from qwen35.engine.executor import Remote, WorkerGroup
from qwen35.engine.scheduler import ScheduledChunk
from qwen35.models.batch import ForwardBatch, SeqChunk
from qwen35.models.vision import EncodeJob


@dataclass
class MtpJob:
    """The MTP head's work for one chunk of the last step: its rows from `start` on, each with the token after it
    (next_ids; as many rows as the step committed), then num_drafts tokens drafted past the last one."""

    request: object
    chunk: ScheduledChunk
    start: int
    next_ids: list[int]
    num_drafts: int = 0


class ModelRunner:
    def __init__(self, model, cache: HybridCache, device, native_kernels: bool | None = None, mtp: bool = False,
                 workers: WorkerGroup | None = None, *, gpu_backend: bool | None = None, graphs: bool = True,
                 max_num_seqs: int = 1, max_blocks: int = 1):
        """native_kernels: run the text decoder on the CPU backend (backends.cpu.decoder_for decides by default;
        its weights then move out of the model). gpu_backend, graphs, max_num_seqs, max_blocks: the GPU backend
        (backends.gpu.decoder_for: on CUDA devices by default; decode steps from CUDA graphs up to max_num_seqs
        sequences of max_blocks KV blocks). mtp: keep each step's hidden states for the MTP head (`propose`).
        workers: the other ranks of a tensor-parallel model (`model` is rank 0's shard): every call on the model
        and the cache reaches them too (distributed/executor.py); the reference model runs, not a backend."""
        self.model, self.cache, self.device = model, cache, device
        if workers is not None:
            self.decoder, self.cache = Remote(workers, "model", model), Remote(workers, "cache", cache)
            self.native = self.on_gpu = False
        else:
            on_gpu = gpu.decoder_for(model, device, cache, gpu_backend=gpu_backend, graphs=graphs,
                                     max_num_seqs=max_num_seqs, max_blocks=max_blocks)
            native = None if on_gpu is not None else decoder_for(model, device, native_kernels)
            self.decoder = on_gpu or native or model
            self.native = native is not None  # the CPU backend (its own mtp signature)
            self.on_gpu = on_gpu is not None
        self.mtp = mtp
        self._hidden, self._rows = None, {}  # the last step's hidden states; per chunk (first row, block ids)

    def describe(self) -> str:
        """Which decoder runs the text model, for the serve summary."""
        if self.on_gpu:
            graphs = "decode steps from CUDA graphs" if self.decoder.graphs is not None else "decode steps eager"
            return f"GPU ({self.decoder.kernels.describe()}; {graphs})"
        if self.native:
            return "native CPU kernels"
        return "reference model (PyTorch ops)" + (" on every rank" if isinstance(self.decoder, Remote) else "")

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk]) -> list[torch.Tensor | None]:
        """Per chunk: its logits rows ([rows, V]) or None. A chunk wants every row when it still covers prompt
        positions whose logprobs were asked for, else only its last row when it samples."""
        self._encode_visual(chunks)
        for c in chunks:
            if c.restore is not None:
                self.cache.copy_state(c.restore.slot, c.request.state_slot)
        everything = chunks
        chunks = [c for c in chunks if c.num_tokens]
        seqs, wants = [], []
        for c in chunks:
            r = c.request
            want = "last" if c.completes_known_tokens else "none"
            if (r.prompt_logprobs is not None and len(r.prompt_logprobs) < r.num_prompt_tokens) or c.drafts:
                want = "all"
            start = r.num_computed_tokens
            positions = r.mm.positions_for(start, start + c.num_tokens) if r.mm is not None else None
            # a verify chunk keeps the state after each of its first k tokens in the request's ring
            ring = [(j, r.ring_slots[j - 1]) for j in range(1, len(c.drafts) + 1)]
            seqs.append(SeqChunk(r.all_token_ids[start:start + c.num_known] + c.drafts, num_past=start,
                                 state_slot=r.state_slot, block_ids=r.block_ids, positions=positions,
                                 want_logits=want, snapshots=c.snapshots + ring))
            wants.append(want)
        if not chunks:
            return [None] * len(everything)
        batch = ForwardBatch.build(seqs, self.cache.block_size, self.device)
        hidden = self.decoder(batch.input_ids, batch, self.cache, inputs_embeds=self._embeds(chunks, batch))
        logits = self.decoder.compute_logits(hidden[batch.logits_indices]) if batch.logits_indices.numel() else None
        if self.mtp:
            self._hidden = hidden
            starts = itertools.accumulate(batch.query_lens, initial=0)  # host lengths: no device read
            self._rows = {id(c): (at, list(c.request.block_ids)) for c, at in zip(chunks, starts)}
        out, at = {}, 0
        for c, want in zip(chunks, wants):
            n = {"none": 0, "last": 1, "all": c.num_tokens}[want]
            out[id(c)] = logits[at:at + n] if n else None
            at += n
        return [out.get(id(c)) for c in everything]

    @torch.inference_mode()
    def propose(self, jobs: list[MtpJob], vocab_limit: int, draft_ids: torch.Tensor | None = None
                ) -> list[list[int]]:
        """Run the MTP head over the rows the last step committed (its K/V at those positions, in the blocks the
        step used), then draft: per job, num_drafts tokens, each the head's argmax over the drawable ids (those below
        vocab_limit) or over `draft_ids` (a draft vocabulary), the
        first from the last committed row, the others from the head's own output fed back one position further
        on."""
        if not jobs:
            return []
        seqs, rows = [], []
        for j in jobs:
            at, blocks = self._rows[id(j.chunk)]
            seqs.append(self._mtp_seq(j, j.start, j.next_ids, blocks, "last" if j.num_drafts else "none"))
            rows.append(torch.arange(at, at + len(j.next_ids)))
        batch = ForwardBatch.build(seqs, self.cache.block_size, self.device)
        u = self._mtp(self._hidden[torch.cat(rows).to(self._hidden.device)], batch)
        drafts = [[] for _ in jobs]
        active = [i for i, j in enumerate(jobs) if j.num_drafts]
        h = u[batch.logits_indices] if active else None
        for step in range(max((jobs[i].num_drafts for i in active), default=0)):
            h = h.to(self._hidden.dtype)
            if draft_ids is None:
                tokens = self.decoder.compute_logits(h)[:, :vocab_limit].argmax(-1).tolist()
            else:
                tokens = draft_ids[self.decoder.compute_logits(h, draft_ids).argmax(-1)].tolist()
            for i, t in zip(active, tokens):
                drafts[i].append(t)
            keep = [n for n, i in enumerate(active) if jobs[i].num_drafts > step + 1]
            if not keep:
                break
            active = [active[n] for n in keep]
            seqs = [self._mtp_seq(jobs[i], jobs[i].start + len(jobs[i].next_ids) + step, [drafts[i][-1]],
                                  self._rows[id(jobs[i].chunk)][1], "last") for i in active]
            h = self._mtp(h[keep], ForwardBatch.build(seqs, self.cache.block_size, self.device))
        return drafts

    def _mtp_seq(self, job: MtpJob, start: int, ids: list[int], blocks: list[int], want: str) -> SeqChunk:
        r = job.request
        positions = r.mm.positions_for(start, start + len(ids)) if r.mm is not None else None
        return SeqChunk(ids, num_past=start, state_slot=0, block_ids=blocks, positions=positions, want_logits=want)

    def _mtp(self, hidden: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        embeds = self.decoder.embed(batch.input_ids)
        if self.native:  # the CPU backend
            return self.decoder.mtp(hidden, batch, self.cache, embeds)
        return self.decoder.mtp(hidden, batch.input_ids, batch, self.cache, next_embeds=embeds)

    def fork(self, leader, req, mtp_only: bool = False) -> None:
        """Copy the leader's state and its partial last block (the full ones are shared) into a forked sibling
        (mtp_only: only the MTP head's K/V of that block, written after the fork)."""
        if not mtp_only:
            self.cache.copy_state(leader.state_slot, req.state_slot)
        bs = self.cache.block_size
        if leader.num_computed_tokens % bs and leader.block_ids and req.block_ids:
            i = leader.num_computed_tokens // bs
            layers = [self.model.cfg.num_hidden_layers] if mtp_only else None
            self.cache.copy_block(leader.block_ids[i], req.block_ids[i], layers)

    def _encode_visual(self, chunks: list[ScheduledChunk]) -> None:
        """Do the tower work granted to each request of the step (n > 1 siblings share one MultimodalPrompt)."""
        for mm in {id(c.request.mm): c.request.mm for c in chunks if c.request.mm is not None}.values():
            done = sum(mm.item_patches[:mm.encoded_items])
            while mm.encoded_items < len(mm.grids) and mm.granted > done:
                k = mm.encoded_items
                patches = mm.item_patches[k]
                if mm.job is None:
                    mm.job = EncodeJob(self.model.visual, mm.items[k].pixel_values, mm.grids[k])
                    mm.items[k] = None  # the job holds the pixels until they are embedded
                mm.job.run_to(mm.granted - done, patches)
                if not mm.job.finished:
                    break
                self._store(mm, k, mm.job.result)
                mm.job, mm.encoded_items, done = None, k + 1, done + patches

    def _store(self, mm, k: int, feats: torch.Tensor) -> None:
        """Write item k's merged-token embeddings into the request's rows."""
        m2 = self.model.visual.cfg.spatial_merge_size ** 2
        if mm.embeds is None:
            mm.embeds = torch.empty(mm.num_patches // m2, feats.shape[1], device=feats.device, dtype=feats.dtype)
        at = sum(mm.item_patches[:k]) // m2
        mm.embeds[at:at + feats.shape[0]] = feats

    def _embeds(self, chunks: list[ScheduledChunk], batch: ForwardBatch) -> torch.Tensor | None:
        if all(c.request.mm is None or c.request.num_computed_tokens >= c.request.mm.num_prompt_tokens
               for c in chunks):  # no placeholder rows in this step (decoding requests with images: ids only)
            return None
        embeds = self.decoder.embed(batch.input_ids)
        at = 0
        for c in chunks:
            mm, start = c.request.mm, c.request.num_computed_tokens
            if mm is not None and start < mm.num_prompt_tokens:
                rows = mm.feature_rows[start:start + c.num_tokens].to(embeds.device)
                sel = (rows >= 0).nonzero().squeeze(1)
                if sel.numel():
                    embeds[at + sel] = mm.embeds[rows[sel]].to(embeds.dtype)
            at += c.num_tokens
        return embeds
