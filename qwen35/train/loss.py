"""The training loss of a causal LM over packed samples: batches without a cache, per-sample shifted labels, the
cross-entropy and the MoE router's load-balancing loss, each computed as transformers 5.23 does.

Samples are packed end to end (positions restart at 0 in each), and each position's target comes from its own
sample, so a sample never learns to predict the next one's first token. Router logits are collected with forward
hooks on the routers: the model knows nothing about training.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from qwen35.layers.mlp import Router
from qwen35.models.batch import ForwardBatch, SeqChunk
from qwen35.train.mtp import mtp_loss

IGNORE_INDEX = -100


@dataclass
class LossOutput:
    loss: Tensor  # what to differentiate: lm_loss + coef * aux_loss
    lm_loss: Tensor  # mean cross-entropy over the positions with a target
    aux_loss: Tensor | None  # router load-balancing loss (MoE, when asked for), before the coefficient
    num_tokens: int  # positions with a target
    mtp_loss: Tensor | None = None  # the MTP head's cross-entropy on the token after next (when asked for)
    mtp_correct: int = 0  # its top-1 hits
    mtp_tokens: int = 0  # positions it was scored on


def training_batch(samples: list[list[int]], device: str | torch.device = "cpu") -> ForwardBatch:
    """Samples packed end to end, each its own sequence (positions from 0, no cache), with logits for every row."""
    if not samples:
        raise ValueError("training_batch: no samples")
    for i, s in enumerate(samples):
        if len(s) == 0:
            raise ValueError(f"training_batch: sample {i} is empty")
    return ForwardBatch.build([SeqChunk(list(s), want_logits="all") for s in samples], device=device)


def _kept(attention_mask: Tensor | None, shape: tuple[int, int]) -> Tensor:
    """[B, T] bool of the real tokens, checking each row is one run of them (right or left padding)."""
    if attention_mask is None:
        return torch.ones(shape, dtype=torch.bool)
    if tuple(attention_mask.shape) != shape:
        raise ValueError(f"attention_mask has shape {list(attention_mask.shape)}, input_ids {list(shape)}")
    kept = attention_mask.to("cpu") != 0
    for b, row in enumerate(kept):
        idx = row.nonzero().squeeze(1)
        if idx.numel() == 0:
            raise ValueError(f"attention_mask row {b} has no tokens")
        if idx[-1] - idx[0] + 1 != idx.numel():
            raise ValueError(f"attention_mask row {b} has padding between tokens (only left or right padding)")
    return kept


def padded_to_batch(input_ids: Tensor, attention_mask: Tensor | None = None) -> ForwardBatch:
    """A right- or left-padded [B, T] batch as packed rows, padding dropped.

    Positions are as transformers' text-only CausalLM computes them when given no position_ids: a token's column
    index, so a left-padded row starts after its padding (HF's multimodal wrapper instead counts real tokens from 0,
    as training_batch does). RoPE scores depend only on position differences, so both give the same loss up to
    rounding; the column index matches the text model exactly.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {list(input_ids.shape)}")
    kept = _kept(attention_mask, tuple(input_ids.shape))
    ids = input_ids.to("cpu")
    batch = ForwardBatch.build([SeqChunk(ids[b][kept[b]].tolist(), want_logits="all") for b in range(len(ids))],
                               device=input_ids.device)
    columns = torch.arange(ids.shape[1]).expand_as(ids)
    batch.positions = columns[kept].to(input_ids.device)
    return batch


def padded_labels(labels: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """HF-style [B, T] labels (unshifted, -100 = ignored) as the packed targets [N] of padded_to_batch's rows.

    Position t of a row predicts labels[t + 1] of that row, as HF shifts them. HF also scores padding positions;
    those are dropped here, so the two agree when a padding position's target is -100 (labels -100 on padding, and
    with left padding on each row's first token, which no real token predicts)."""
    kept = _kept(attention_mask, tuple(labels.shape))
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    return shifted[kept.to(labels.device)]


def shift_labels(samples: list[list[int]], loss_masks: list[list[bool]] | None = None,
                 device: str | torch.device = "cpu") -> Tensor:
    """The target of every packed position [N]: the next token of the same sample, -100 at a sample's last token.

    loss_masks[i][t] False means token t of sample i is not trained on (e.g. prompt tokens): no position predicts
    it. Same as HF's labels = input_ids with -100 where the mask is False, shifted inside each sample."""
    if loss_masks is not None and len(loss_masks) != len(samples):
        raise ValueError(f"shift_labels: {len(loss_masks)} loss masks for {len(samples)} samples")
    out = []
    for i, s in enumerate(samples):
        mask = loss_masks[i] if loss_masks is not None else [True] * len(s)
        if len(mask) != len(s):
            raise ValueError(f"shift_labels: sample {i} has {len(s)} tokens but its loss mask {len(mask)}")
        out.extend(t if m else IGNORE_INDEX for t, m in zip(s[1:], mask[1:]))
        out.append(IGNORE_INDEX)
    return torch.tensor(out, dtype=torch.int64, device=device)


def load_balancing_loss(router_logits: list[Tensor], num_experts: int, top_k: int) -> Tensor:
    """Switch-Transformer load balancing over all MoE layers together, as transformers' load_balancing_loss_func:
    E * sum_e f_e * P_e, with f_e the top-k assignments to expert e per token and P_e its mean router probability,
    both over every (layer, token) row. Only P carries a gradient."""
    counts = torch.zeros(num_experts, dtype=torch.float32, device=router_logits[0].device)
    prob_sum = torch.zeros_like(counts)
    rows = 0
    for logits in router_logits:
        probs = torch.softmax(logits, dim=-1)
        selected = torch.topk(probs, top_k, dim=-1).indices
        counts = counts + torch.bincount(selected.reshape(-1), minlength=num_experts).float()
        prob_sum = prob_sum + probs.float().sum(dim=0)
        rows += logits.shape[0]
    return num_experts * torch.sum((counts / rows) * (prob_sum / rows))


@contextmanager
def collect_router_logits(model: torch.nn.Module):
    """Yields a list that fills with each router's logits [N, E], in layer order, during forwards in the block."""
    logits: list[Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _inputs, out: logits.append(out))
             for m in model.modules() if isinstance(m, Router)]
    try:
        yield logits
    finally:
        for h in hooks:
            h.remove()


def lm_loss(model, batch: ForwardBatch, labels: Tensor, *, router_aux_loss_coef: float | None = None,
            mtp_loss_weight: float = 0.0, inputs_embeds: Tensor | None = None) -> LossOutput:
    """Cross-entropy of `model` on a cache-free batch against labels [N] (shift_labels / padded_labels), the mean over
    positions whose label is not -100, exactly as HF's ForCausalLMLoss.

    MoE models add the router load-balancing loss times its coefficient, as HF with output_router_logits: by default
    when the checkpoint's config sets output_router_logits, with its router_aux_loss_coef; a number given here turns
    it on with that coefficient (0 reports aux_loss without adding it). With an MTP head (`model.mtp`) and a non-zero
    mtp_loss_weight, the head's loss on the token after next is added with that weight (train/mtp.py)."""
    n = batch.input_ids.shape[0]
    if tuple(labels.shape) != (n,):
        raise ValueError(f"labels must have shape [{n}] (one target per packed position), got {list(labels.shape)}")
    cfg = model.cfg
    coef = router_aux_loss_coef
    if coef is None and cfg.output_router_logits:
        coef = cfg.router_aux_loss_coef
    use_aux = coef is not None and cfg.is_moe
    if use_aux:
        with collect_router_logits(model) as router_logits:
            hidden = model(batch.input_ids, batch, inputs_embeds=inputs_embeds)
    else:
        hidden = model(batch.input_ids, batch, inputs_embeds=inputs_embeds)
    labels = labels.to(hidden.device)
    scored = labels != IGNORE_INDEX
    # Logits only for the positions with a target: the vocabulary-wide projection is the largest tensor of a step.
    logits = model.compute_logits(hidden[scored]).float()
    ce = F.cross_entropy(logits, labels[scored])  # nan when no position has a target, as HF
    aux = None
    loss = ce
    if use_aux:
        if len(router_logits) != sum(cfg.moe_layers):
            raise RuntimeError(f"collected {len(router_logits)} router outputs for {sum(cfg.moe_layers)} MoE layers")
        aux = load_balancing_loss(router_logits, cfg.num_experts, cfg.num_experts_per_tok)
        loss = ce + coef * aux
    out = LossOutput(loss=loss, lm_loss=ce, aux_loss=aux, num_tokens=int(scored.sum()))
    if mtp_loss_weight and getattr(model, "mtp", None) is not None:
        out.mtp_loss, out.mtp_correct, out.mtp_tokens = mtp_loss(model, hidden, batch, labels)
        out.loss = out.loss + mtp_loss_weight * out.mtp_loss
    return out
