"""The multi-token-prediction loss: the MTP head (models/mtp.py) at position i reads the trunk's hidden state h_i and
the next token x_{i+1}, and is scored on the token after next, x_{i+2}, as the released models' head predicts.

The trunk's hidden states are not detached by default: the head trains jointly with the trunk, as DeepSeek-V3
trains its MTP modules (the extra, denser signal also shapes the trunk's representations, and the shared embedding
and LM head learn from both losses). The caller weights it (DeepSeek-V3 uses 0.3, then 0.1) and adds it to the
main loss; `detach=True` trains the head alone on a frozen trunk's outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qwen35.models.batch import ForwardBatch

IGNORE_INDEX = -100


def mtp_targets(batch: ForwardBatch, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(next_ids, targets), both [N]: next_ids[i] = x_{i+1} (0 on a sequence's last row, where it is unknown) and
    targets[i] = labels[i+1] within the same sequence, else IGNORE_INDEX. The next token comes from the input ids,
    not from the labels: a masked label (a prompt token under assistant-only loss) still has a known next token,
    which the head needs as input for the rows after it."""
    N = batch.input_ids.shape[0]
    if labels.shape != (N,):
        raise ValueError(f"labels must have shape [{N}] (one per packed token), got {list(labels.shape)}")
    last = torch.zeros(N, dtype=torch.bool, device=labels.device)
    last[batch.cu_seqlens[1:] - 1] = True  # rows whose successor belongs to the next sequence (or none)
    next_ids = torch.where(last, 0, batch.input_ids.roll(-1))
    targets = torch.where(last, IGNORE_INDEX, labels.roll(-1))
    return next_ids, targets


def mtp_loss(model, hidden: torch.Tensor, batch: ForwardBatch, labels: torch.Tensor, detach: bool = False
             ) -> tuple[torch.Tensor, int, int]:
    """(mean cross-entropy over the rows with a target, top-1 hits, number of such rows) of `model.mtp` on one packed
    batch. hidden [N, H]: the trunk's output `model(batch.input_ids, batch)`; labels [N]: the main next-token targets
    (labels[i] = x_{i+1} of the same sequence, or IGNORE_INDEX)."""
    if model.mtp is None:
        raise ValueError("the model has no MTP head: load it with load_model(..., mtp=True) or attach one with "
                         "qwen35.models.mtp.add_mtp")
    next_ids, targets = mtp_targets(batch, labels)
    out = model.mtp(hidden.detach() if detach else hidden, next_ids, batch)
    rows = targets != IGNORE_INDEX
    if not bool(rows.any()):
        return out.sum() * 0.0, 0, 0  # keeps the graph, so a step with nothing to score still backpropagates
    logits = model.compute_logits(out[rows]).float()
    targets = targets[rows]
    loss = F.cross_entropy(logits, targets)
    return loss, int((logits.argmax(-1) == targets).sum()), int(targets.numel())
