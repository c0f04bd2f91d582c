"""From logits to tokens, vLLM's order: allowed token ids and logit biases, then penalties, then greedy argmax, or
temperature, min-p, top-k, top-p and a draw from the request's own generator (so a seeded request samples the same
tokens whatever else shares its batch). Logprobs are those of the model distribution before these (after a
structured-output mask, which the engine applies first), as vLLM reports by default.

Any finite parameter gives a valid distribution: factors past float32's range are clamped to it (so no inf * 0 =
NaN), top-p always keeps the most likely token, and a row left with nothing to draw raises (for its request
alone: the engine samples row by row)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qwen35.sampling_params import SamplingParams

FP32_MAX = torch.finfo(torch.float32).max


@dataclass
class SampleRow:
    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]
    generator: torch.Generator | None
    banned_ids: list[int]  # eos / stop tokens masked while output is shorter than min_tokens


def apply_penalties(logits: torch.Tensor, row: SampleRow) -> torch.Tensor:
    p, V = row.params, logits.shape[-1]
    if p.repetition_penalty != 1.0:
        # prompt ids past the drawable vocabulary (ids without a token) have no logit here
        seen = [t for t in sorted(set(row.prompt_ids) | set(row.output_ids)) if t < V]
        if seen:
            seen = torch.tensor(seen, dtype=torch.long, device=logits.device)
            vals, rp = logits[seen], min(p.repetition_penalty, FP32_MAX)
            logits[seen] = torch.where(vals > 0, vals / rp, vals * rp)
    if (p.presence_penalty or p.frequency_penalty) and row.output_ids:
        out = torch.tensor(row.output_ids, dtype=torch.long, device=logits.device)
        counts = torch.bincount(out, minlength=V)[:V].to(logits.dtype)
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def apply_token_filters(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """allowed_token_ids (everything else to -inf), then logit_bias added, in place. logits: [V] float32."""
    V = logits.shape[-1]
    if p.allowed_token_ids is not None:
        keep = torch.zeros(V, dtype=torch.bool, device=logits.device)
        keep[[t for t in p.allowed_token_ids if t < V]] = True
        logits.masked_fill_(~keep, float("-inf"))
    if p.logit_bias:
        ids = [t for t in p.logit_bias if t < V]
        if ids:
            logits[ids] += torch.tensor([float(p.logit_bias[t]) for t in ids], device=logits.device)
    return logits


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, then min-p, top-k and top-p masks (to -inf). logits: [V] float32."""
    logits = logits / min(p.temperature, FP32_MAX)  # a huge temperature flattens the logits; -inf stays -inf
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
        drop[0] = False  # and never less than the top token (a top_p below float32's resolution rounds to 0)
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def _argmax(x: torch.Tensor) -> int:
    """First index of the maximum (NaN counts as the maximum, as torch.argmax); on CPU through numpy, whose
    vectorised argmax is ~6x torch's over a 248k vocabulary."""
    return int(x.numpy().argmax()) if x.device.type == "cpu" else int(torch.argmax(x))


def sample_row(logits: torch.Tensor, row: SampleRow) -> int:
    """logits: [V] float32 over the ids that may be drawn (not modified). One token; raises if none can be drawn."""
    logits = _processed(logits, row)
    if row.params.is_greedy:
        return _greedy(logits)
    return int(torch.multinomial(_probs(logits, row.params), 1, generator=row.generator))  # raises on NaN rows


def verify_token(logits: torch.Tensor, row: SampleRow, draft: int) -> int:
    """The token at a position a speculative step verifies, given the token the MTP head drafted there. Greedy: the
    argmax, as sample_row (the draft stands when it is that token). Sampled: the draft is kept with probability
    p(draft), else a token is drawn from p without the draft, renormalised; p is the distribution sample_row draws
    from. The head drafts its argmax (a one-hot draft distribution), so this is the standard rejection rule, and
    every token comes out with exactly its probability under p."""
    logits = _processed(logits, row)
    if row.params.is_greedy:
        return _greedy(logits)
    probs = _probs(logits, row.params)
    gen = row.generator
    if float(torch.rand((), generator=gen, device=gen.device if gen is not None else None)) < float(probs[draft]):
        return draft
    probs[draft] = 0.0  # p(draft) < 1 here, so something else has mass
    return int(torch.multinomial(probs, 1, generator=row.generator))


def _processed(logits: torch.Tensor, row: SampleRow) -> torch.Tensor:
    """The logits after allowed ids, logit biases, penalties and banned ids (a copy when any applies)."""
    p = row.params
    filters = p.allowed_token_ids is not None or bool(p.logit_bias)
    penalties = bool(row.banned_ids) or p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty
    if filters or penalties:
        logits = logits.clone()  # one copy: the caller's row stays as it was
    if filters:
        logits = apply_token_filters(logits, p)
    if penalties:
        logits = apply_penalties(logits, row)
        banned = [t for t in row.banned_ids if t < logits.shape[-1]]
        if banned:
            logits[banned] = float("-inf")
    return logits


def _greedy(logits: torch.Tensor) -> int:
    tok = _argmax(logits)
    if not logits[tok] > float("-inf"):  # NaN or all -inf: argmax would name an arbitrary id
        raise ValueError("no token can be sampled: every logit is -inf or NaN")
    return tok


def is_plain_greedy(row: SampleRow) -> bool:
    """Greedy with nothing to apply first: its token is the row's argmax."""
    p = row.params
    return (p.is_greedy and p.allowed_token_ids is None and not p.logit_bias and not row.banned_ids
            and p.repetition_penalty == 1.0 and not p.presence_penalty and not p.frequency_penalty)


def sample_many(logits: torch.Tensor, rows: list[SampleRow]) -> list[int | Exception]:
    """sample_row for every row of logits [R, V], with the host reads deferred to one device-to-host transfer for
    the step (a GPU syncs once, not once or twice per row): the plain greedy rows' argmaxes in one op, every other
    row's token drawn on the device. A row with nothing to draw gets sample_row's ValueError instead of a token
    (its draw, from a stand-in distribution, is discarded), as does a row whose processing raises; the other rows
    draw exactly what sample_row would, from the same generators."""
    if not rows:
        return []
    toks, oks, errors = [None] * len(rows), [None] * len(rows), {}
    plain = [i for i, row in enumerate(rows) if is_plain_greedy(row)]
    if plain:
        some = logits[plain]
        best = torch.argmax(some, dim=-1)
        good = some.gather(-1, best[:, None])[:, 0] > float("-inf")  # NaN compares False, as in _greedy
        for j, i in enumerate(plain):
            toks[i], oks[i] = best[j], good[j]
    for i, row in enumerate(rows):
        if toks[i] is not None:
            continue
        try:
            lg = _processed(logits[i], row)
            ok = _drawable(lg)
            if row.params.is_greedy:
                toks[i] = torch.argmax(lg)
                oks[i] = ok & (lg[toks[i]] > float("-inf"))
            else:
                stand_in = torch.where(ok, lg, 0.0)  # never NaN: a GPU's multinomial asserts on it
                probs = torch.softmax(filter_logits(stand_in, row.params), -1)
                toks[i], oks[i] = torch.multinomial(probs, 1, generator=row.generator)[0], ok
        except Exception as e:  # noqa: BLE001 - this row's request fails alone
            errors[i] = e
            toks[i], oks[i] = logits.new_zeros((), dtype=torch.long), logits.new_zeros((), dtype=torch.bool)
    tok_list, ok_list = torch.stack([torch.stack(toks).long(), torch.stack(oks).long()]).tolist()
    return [errors.get(i) or (t if good else ValueError(NOTHING_TO_DRAW))
            for i, (t, good) in enumerate(zip(tok_list, ok_list))]


NOTHING_TO_DRAW = "no token can be sampled: every logit is -inf, or one is NaN"


def _drawable(logits: torch.Tensor) -> torch.Tensor:
    """Whether a row can be drawn from (a bool on the row's device): some logit above -inf, none NaN. A NaN makes
    every probability NaN, which torch.multinomial on a GPU meets with a device-side assert that ends the process,
    not an exception: so it is checked before any draw."""
    return (logits > float("-inf")).any() & ~logits.isnan().any()


def _probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    if not bool(_drawable(logits)):
        raise ValueError(NOTHING_TO_DRAW)
    return torch.softmax(filter_logits(logits, p), -1)


def sample(logits: torch.Tensor, rows: list[SampleRow]) -> list[int]:
    """logits: [B, V] (any float dtype, not modified). One token per row."""
    logits = logits.float()
    return [sample_row(logits[i], row) for i, row in enumerate(rows)]


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
