"""Feed-forward blocks: the dense SwiGLU MLP and the sparse MoE block (routed experts + gated shared expert).
Parameter names match the checkpoint (`gate_proj`, `experts.gate_up_proj`, `shared_expert_gate`, ...)."""

import torch
import torch.nn.functional as F
from torch import nn

from qwen35.ops.moe import experts, route_logits


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

class Router(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size))

    def forward(self, x):
        """Router logits [N, E] (a module call, so training code can collect them with a forward hook)."""
        return F.linear(x, self.weight)


class Experts(nn.Module):
    """All routed experts as two 3D tensors: gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I]; or,
    with first_expert set (expert parallelism), experts first_expert.. only, the others' choices adding nothing."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, first_expert: int | None = None):
        super().__init__()
        self.first_expert = first_expert
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x, weights, ids):
        """sum over each token's chosen experts ids [N, k] of weights [N, k] * expert(x)."""
        return experts(x, weights, ids, self.gate_up_proj, self.down_proj, self.first_expert)


class SparseMoeBlock(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int, top_k: int, intermediate_size: int,
                 shared_intermediate_size: int, renormalize: bool = True):
        super().__init__()
        self.top_k = top_k
        self.renormalize = renormalize
        self.gate = Router(hidden_size, num_experts)
        self.experts = Experts(num_experts, hidden_size, intermediate_size)
        self.shared_expert = MLP(hidden_size, shared_intermediate_size)
        self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False)

    def forward(self, x):
        weights, ids = route_logits(self.gate(x), self.top_k, self.renormalize)
        shared_gate, shared = self.shared_expert_gate(x), self.shared_expert(x)
        routed = self.experts(x, weights, ids)
        return routed + torch.sigmoid(shared_gate) * shared
