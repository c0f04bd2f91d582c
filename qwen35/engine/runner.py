"""Turns a schedule into tensors: one packed forward over every scheduled chunk, logits only for the rows that
sample a token or report prompt logprobs."""

from __future__ import annotations

import torch

from qwen35.cache.hybrid import HybridCache
from qwen35.engine.scheduler import ScheduledChunk
from qwen35.models.batch import ForwardBatch, SeqChunk


class ModelRunner:
    def __init__(self, model, cache: HybridCache, device):
        self.model, self.cache, self.device = model, cache, device

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk]) -> list[torch.Tensor | None]:
        """Per chunk: its logits rows ([rows, V]) or None. A chunk wants every row when it still covers prompt
        positions whose logprobs were asked for, else only its last row when it samples."""
        seqs, wants = [], []
        for c in chunks:
            r = c.request
            want = "last" if c.completes_known_tokens else "none"
            if r.prompt_logprobs is not None and len(r.prompt_logprobs) < r.num_prompt_tokens:
                want = "all"
            start = r.num_computed_tokens
            seqs.append(SeqChunk(r.all_token_ids[start:start + c.num_tokens], num_past=start,
                                 state_slot=r.state_slot, block_ids=r.block_ids, want_logits=want))
            wants.append(want)
        batch = ForwardBatch.build(seqs, self.cache.block_size, self.device)
        hidden = self.model(batch.input_ids, batch, self.cache)
        logits = self.model.compute_logits(hidden[batch.logits_indices]) if batch.logits_indices.numel() else None
        out, at = [], 0
        for c, want in zip(chunks, wants):
            n = {"none": 0, "last": 1, "all": c.num_tokens}[want]
            out.append(logits[at:at + n] if n else None)
            at += n
        return out
