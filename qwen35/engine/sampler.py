"""From logits to tokens, vLLM's order: penalties on the raw logits, then greedy argmax, or temperature, min-p,
top-k, top-p and a draw from the request's own generator (so a seeded request samples the same tokens whatever
else shares its batch). Logprobs are those of the raw model distribution, as vLLM reports by default."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qwen35.sampling_params import SamplingParams


@dataclass
class SampleRow:
    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]
    generator: torch.Generator | None
    banned_ids: list[int]  # eos / stop tokens masked while output is shorter than min_tokens


def apply_penalties(logits: torch.Tensor, row: SampleRow) -> torch.Tensor:
    p = row.params
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(row.prompt_ids) | set(row.output_ids)), dtype=torch.long, device=logits.device)
        if seen.numel():
            vals = logits[seen]
            logits[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and row.output_ids:
        out = torch.tensor(row.output_ids, dtype=torch.long, device=logits.device)
        counts = torch.bincount(out, minlength=logits.shape[-1])[: logits.shape[-1]].to(logits.dtype)
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, then min-p, top-k and top-p masks (to -inf). logits: [V] float32."""
    logits = logits / p.temperature
    if p.min_p > 0:
        probs = torch.softmax(logits, -1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    if p.top_k > 0 and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, -1) >= p.top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def _argmax(x: torch.Tensor) -> int:
    """First index of the maximum (NaN counts as the maximum, as torch.argmax); on CPU through numpy, whose
    vectorised argmax is ~6x torch's over a 248k vocabulary."""
    return int(x.numpy().argmax()) if x.device.type == "cpu" else int(torch.argmax(x))


def sample(logits: torch.Tensor, rows: list[SampleRow]) -> list[int]:
    """logits: [B, V] (any float dtype, not modified). One token per row."""
    logits = logits.float()
    out = []
    for i, row in enumerate(rows):
        lg, p = logits[i], row.params
        if row.banned_ids or p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
            lg = apply_penalties(lg.clone(), row)
            if row.banned_ids:
                lg[row.banned_ids] = float("-inf")
        if p.is_greedy:
            out.append(_argmax(lg))
            continue
        probs = torch.softmax(filter_logits(lg, row.params), -1)
        out.append(int(torch.multinomial(probs, 1, generator=row.generator)))
    return out


def top_logprobs(logits: torch.Tensor, chosen: list[int], k: int):
    """Raw log-softmax, per row: (chosen logprob, chosen rank, top-k ids, top-k logprobs)."""
    logp = torch.log_softmax(logits.float(), -1)
    idx = torch.arange(len(chosen), device=logp.device)
    ch = torch.tensor(chosen, device=logp.device)
    chosen_lp = logp[idx, ch]
    ranks = (logp > chosen_lp[:, None]).sum(-1) + 1
    top = torch.topk(logp, k, dim=-1) if k > 0 else None
    rows = []
    for i in range(len(chosen)):
        ids = top.indices[i].tolist() if top is not None else []
        lps = top.values[i].tolist() if top is not None else []
        rows.append((float(chosen_lp[i]), int(ranks[i]), ids, lps))
    return rows
