"""The Qwen3.5 vision tower (the Qwen3-VL ViT without DeepStack): patch embedding, bilinearly resampled learned
position table, 2D rotary, pre-norm blocks attending within each image / each video frame pair, 2x2 patch merger.

Input is packed: `pixel_values` [N, C*T*P*P] rows of every item in merge-block order (the processor's order), and
one (t, h, w) grid per item, in patches. Output: one row per merged token, [N / merge^2, out_hidden_size], in
prompt placeholder order. Parameter names match the checkpoint's `model.visual.*`. See
shared/spec/vision-and-io.md §2.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from qwen35.config import VisionConfig

ACTS = {
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
    "gelu": F.gelu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "silu": F.silu,
}
Grid = tuple[int, int, int]


def merge_block_coords(h: int, w: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) of each patch of an h x w grid listed in merge-block order: block row, block col, then the
    m x m patches inside the block row by row."""
    rows = torch.arange(h).view(h // m, m, 1, 1).expand(h // m, m, w // m, m)
    cols = torch.arange(w).view(1, 1, w // m, m).expand(h // m, m, w // m, m)
    return rows.permute(0, 2, 1, 3).reshape(-1), cols.permute(0, 2, 1, 3).reshape(-1)


def bilinear_taps(index: torch.Tensor, size: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two taps and weights per target index resampling a `side`-long axis to `size` (align_corners=True)."""
    src = index.float() * (side - 1) / max(size - 1, 1)
    lo = src.floor()
    offsets = torch.tensor([0.0, 1.0])
    taps = (lo[:, None] + offsets).long().clamp(0, side - 1)
    return taps, 1 - (src[:, None] - lo[:, None] - offsets).abs()  # the hat kernel, as transformers writes it


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class PatchEmbed(nn.Module):
    """A Conv3d whose kernel equals its stride is a linear map of each flattened (c, t, y, x) patch."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.proj = nn.Module()
        P, T = cfg.patch_size, cfg.temporal_patch_size
        self.proj.weight = nn.Parameter(torch.empty(cfg.hidden_size, cfg.in_channels, T, P, P))
        self.proj.bias = nn.Parameter(torch.empty(cfg.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight
        return F.linear(x.to(w.dtype), w.reshape(w.shape[0], -1), self.proj.bias)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
        N = x.shape[0]
        q, k, v = self.qkv(x).view(N, 3, self.num_heads, self.head_dim).unbind(1)  # [N, heads, D] each
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(x.dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(x.dtype)
        # Non-causal attention inside each segment (one image, or one temporal patch of a video), never across.
        out = torch.empty_like(q)
        start = 0
        for n in seqlens:
            sl = slice(start, start + n)
            out[sl] = F.scaled_dot_product_attention(q[sl].transpose(0, 1), k[sl].transpose(0, 1),
                                                     v[sl].transpose(0, 1)).transpose(0, 1)
            start += n
        return self.proj(out.reshape(N, -1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.linear_fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.linear_fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = ACTS[cfg.hidden_act]

    def forward(self, x):
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)

    def forward(self, x, cos, sin, seqlens):
        x = x + self.attn(self.norm1(x), cos, sin, seqlens)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """LayerNorm per patch, then each run of merge^2 consecutive patches (one 2x2 block) becomes one token."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        width = cfg.hidden_size * cfg.spatial_merge_size**2
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.linear_fc1 = nn.Linear(width, width)
        self.linear_fc2 = nn.Linear(width, cfg.out_hidden_size)

    def forward(self, x):
        x = self.norm(x).view(-1, self.linear_fc1.in_features)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))  # exact GELU here, tanh GELU in the blocks


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)
        half = cfg.head_dim // 2  # frequencies for h and for w, each over half the head
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, half, 2, dtype=torch.float32, device="cpu") / half))
        self.register_buffer("inv_freq", inv, persistent=False)

    def layout(self, grids: list[Grid]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
        """Per patch row: position-table taps [N, 4] and weights [N, 4], rotary (row, col) [N, 2]; segment
        lengths (h*w, once per temporal patch of each item)."""
        m, side = self.cfg.spatial_merge_size, int(self.cfg.num_position_embeddings**0.5)
        taps, weights, coords, seqlens = [], [], [], []
        for t, h, w in grids:
            if h % m or w % m:
                raise ValueError(f"grid {h}x{w} patches is not a multiple of the {m}x{m} merge block")
            r, c = merge_block_coords(h, w, m)
            rt, rw = bilinear_taps(r, h, side)
            ct, cw = bilinear_taps(c, w, side)
            taps.append((rt[:, :, None] * side + ct[:, None, :]).reshape(-1, 4).repeat(t, 1))
            weights.append((rw[:, :, None] * cw[:, None, :]).reshape(-1, 4).repeat(t, 1))
            coords.append(torch.stack([r, c], -1).repeat(t, 1))
            seqlens += [h * w] * t
        return torch.cat(taps), torch.cat(weights), torch.cat(coords), seqlens

    def forward(self, pixel_values: torch.Tensor, grids: list[Grid]) -> torch.Tensor:
        dev = self.pos_embed.weight.device
        taps, weights, coords, seqlens = self.layout(grids)
        if pixel_values.shape[0] != sum(seqlens):
            raise ValueError(f"{pixel_values.shape[0]} patch rows for grids totalling {sum(seqlens)} patches")
        x = self.patch_embed(pixel_values.to(dev))
        pos = (self.pos_embed(taps.to(dev)) * weights.to(dev)[:, :, None]).sum(1)
        x = x + pos.to(x.dtype)
        angles = (coords.to(dev)[:, :, None].float() * self.inv_freq).flatten(1)  # [N, head_dim/2]: h then w
        emb = torch.cat((angles, angles), -1)[:, None, :]
        cos, sin = emb.cos(), emb.sin()
        for blk in self.blocks:
            x = blk(x, cos, sin, seqlens)
        return self.merger(x)
