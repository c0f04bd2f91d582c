"""LoRA: low-rank adapters on the decoder's nn.Linear projections, y = W x + (alpha / r) B A dropout(x).

A is initialised as PEFT does (Kaiming-uniform, a = sqrt(5)) and B at zero, so training starts from the base
model. Only the language model's layers (`model.layers.*`) are adapted: the vision tower and an MTP head stay
frozen, and so do the MoE's routed experts, which are 3D tensors (`experts.gate_up_proj`, `experts.down_proj`)
rather than nn.Linear modules — as in PEFT, whose name targets also only match Linear modules; the shared expert's
projections are Linear and adapted like any dense MLP's. `merged_state_dict` folds the adapters into the weights
for saving a plain checkpoint.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkv", "in_proj_z", "out_proj", "gate_proj",
                   "up_proj", "down_proj")
DECODER_LAYER = re.compile(r"^model\.layers\.\d+\.")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, x):
        return self.base(x) + (self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        w = self.base.weight
        return (w.float() + self.scaling * (self.lora_B.float() @ self.lora_A.float())).to(w.dtype)


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
               targets: tuple[str, ...] | list[str] = DEFAULT_TARGETS) -> list[str]:
    """Freeze every parameter, wrap each decoder nn.Linear whose name ends in one of `targets` with LoRALinear
    (whose A and B are the only trainable parameters); returns the wrapped module names."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    targets = tuple(targets)
    for p in model.parameters():
        p.requires_grad_(False)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and DECODER_LAYER.match(n)
             and n.rsplit(".", 1)[-1] in targets]
    if not names:
        raise ValueError(f"no Linear module of the decoder matches the LoRA targets {', '.join(targets)}")
    for name in names:
        parent, _, leaf = name.rpartition(".")
        module = model.get_submodule(parent)
        setattr(module, leaf, LoRALinear(getattr(module, leaf), rank, alpha, dropout))
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters under their plain names (`...q_proj.weight`), LoRA folded into the weights. A tied
    head appears once, as the embedding."""
    out = {}
    wrapped = lora_modules(model)
    for name, p in model.named_parameters():
        module, _, leaf = name.rpartition(".")
        if module.endswith(".base") and module[:-5] in wrapped:
            out[module[:-5] + "." + leaf] = wrapped[module[:-5]].merged_weight().detach()
        elif module in wrapped:  # lora_A / lora_B
            continue
        else:
            out[name] = p.detach()
    return out
