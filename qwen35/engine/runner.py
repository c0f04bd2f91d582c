"""Turns a schedule into tensors: one packed forward over every scheduled chunk, logits only for the rows that
sample a token or report prompt logprobs. Requests with images or videos get their vision-tower embeddings (one
tower pass for every such request new in the step, kept until the request ends so a recompute after preemption
needs no second pass) written over their placeholder rows, and their 3D positions."""

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
        self._encode_visual(chunks)
        seqs, wants = [], []
        for c in chunks:
            r = c.request
            want = "last" if c.completes_known_tokens else "none"
            if r.prompt_logprobs is not None and len(r.prompt_logprobs) < r.num_prompt_tokens:
                want = "all"
            start = r.num_computed_tokens
            positions = r.mm.positions_for(start, start + c.num_tokens) if r.mm is not None else None
            seqs.append(SeqChunk(r.all_token_ids[start:start + c.num_tokens], num_past=start,
                                 state_slot=r.state_slot, block_ids=r.block_ids, positions=positions,
                                 want_logits=want))
            wants.append(want)
        batch = ForwardBatch.build(seqs, self.cache.block_size, self.device)
        hidden = self.model(batch.input_ids, batch, self.cache, inputs_embeds=self._embeds(chunks, batch))
        logits = self.model.compute_logits(hidden[batch.logits_indices]) if batch.logits_indices.numel() else None
        out, at = [], 0
        for c, want in zip(chunks, wants):
            n = {"none": 0, "last": 1, "all": c.num_tokens}[want]
            out.append(logits[at:at + n] if n else None)
            at += n
        return out

    def _encode_visual(self, chunks: list[ScheduledChunk]) -> None:
        todo = list({id(c.request.mm): c.request.mm for c in chunks
                     if c.request.mm is not None and c.request.mm.embeds is None}.values())
        if not todo:
            return
        items = [item for mm in todo for item in mm.items]
        feats = self.model.encode_visual([it.pixel_values for it in items], [tuple(it.grid_thw) for it in items])
        at = 0
        for mm in todo:
            n = len(mm.items)
            mm.embeds = torch.cat(feats[at:at + n]) if n else None
            mm.items = []  # the pixels are no longer needed
            at += n

    def _embeds(self, chunks: list[ScheduledChunk], batch: ForwardBatch) -> torch.Tensor | None:
        if all(c.request.mm is None for c in chunks):
            return None
        embeds = self.model.model.embed_tokens(batch.input_ids)
        at = 0
        for c in chunks:
            mm, start = c.request.mm, c.request.num_computed_tokens
            if mm is not None and start < mm.num_prompt_tokens:
                rows = mm.feature_rows[start:start + c.num_tokens].to(embeds.device)
                sel = (rows >= 0).nonzero().squeeze(1)
                if sel.numel():
                    embeds[at + sel] = mm.embeds[rows[sel]]
            at += c.num_tokens
        return embeds
