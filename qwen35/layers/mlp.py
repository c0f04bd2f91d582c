"""Feed-forward blocks: the dense SwiGLU MLP and the sparse MoE block (routed experts + gated shared expert).
Parameter names match the checkpoint (`gate_proj`, `experts.gate_up_proj`, `shared_expert_gate`, ...)."""

import torch
import torch.nn.functional as F
from torch import nn

from qwen35.ops.linear import linear
from qwen35.ops.moe import experts_grouped, route_logits


class MLP(nn.Module):
    fusions = {"gate_up": ("gate_proj", "up_proj")}  # for ops.linear.pack_model

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.gate_up = None

    def forward(self, x):
        gate, up = self.gate_up(x) if self.gate_up is not None else (self.gate_proj(x), self.up_proj(x))
        return self.down_proj(F.silu(gate) * up)

    def prepare_native(self) -> bool:
        from qwen35.ops.native_decode import fits

        H = self.down_proj.out_features
        return self.gate_up is not None and fits(self.gate_up.weight) and fits(self.down_proj, n=H)

    def decode_layer(self, h, y_prev, norm):
        """h += y_prev, then norm + forward as one native call (ops/native_decode.mlp_layer)."""
        from qwen35.ops.native_decode import mlp_layer

        return mlp_layer(h, y_prev, norm, self)


class Router(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size))

    def forward(self, x):
        """Router logits [N, E] (a module call, so training code can collect them with a forward hook)."""
        return linear(x, self.weight)


class Experts(nn.Module):
    """All routed experts as two 3D tensors: gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I]."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x, weights, ids):
        """sum over each token's chosen experts ids [N, k] of weights [N, k] * expert(x)."""
        return experts_grouped(x, weights, ids, self.gate_up_proj, self.down_proj)


class SparseMoeBlock(nn.Module):
    # for ops.linear.pack_model: everything that reads the block's input, as one matmul
    fusions = {"in_proj": ("gate", "shared_expert_gate", "shared_expert.gate_proj", "shared_expert.up_proj")}

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, intermediate_size: int,
                 shared_intermediate_size: int, renormalize: bool = True):
        super().__init__()
        self.top_k = top_k
        self.renormalize = renormalize
        self.gate = Router(hidden_size, num_experts)
        self.experts = Experts(num_experts, hidden_size, intermediate_size)
        self.shared_expert = MLP(hidden_size, shared_intermediate_size)
        self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False)
        self.in_proj = None

    def forward(self, x):
        if self.in_proj is not None:
            logits, shared_gate, gate, up = self.in_proj(x)
            weights, ids = route_logits(logits, self.top_k, self.renormalize)
            shared = self.shared_expert.down_proj(F.silu(gate) * up)
        else:
            weights, ids = route_logits(self.gate(x), self.top_k, self.renormalize)
            shared_gate, shared = self.shared_expert_gate(x), self.shared_expert(x)
        routed = self.experts(x, weights, ids)
        return routed + torch.sigmoid(shared_gate) * shared

    def prepare_native(self) -> bool:
        from qwen35.ops.linear import Packed
        from qwen35.ops.moe import native_shapes
        from qwen35.ops.native_decode import fits

        gate_up, down, shared_down = self.experts.gate_up_proj, self.experts.down_proj, self.shared_expert.down_proj
        return (self.in_proj is not None and fits(self.in_proj.weight) and isinstance(gate_up, Packed)
                and isinstance(down, Packed) and gate_up.dtype == down.dtype == self.in_proj.weight.dtype
                and native_shapes(gate_up, down)
                and fits(shared_down, n=down.n))

    def decode_layer(self, h, y_prev, norm):
        """h += y_prev, then norm + forward as one native call (ops/native_decode.moe_layer)."""
        from qwen35.ops.native_decode import moe_layer

        return moe_layer(h, y_prev, norm, self)
