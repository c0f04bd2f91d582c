"""The Qwen3.5 vision tower (the Qwen3-VL ViT without DeepStack): patch embedding, bilinearly resampled learned
position table, 2D rotary, pre-norm blocks attending within each image / each video frame pair, 2x2 patch merger.

Input is packed: `pixel_values` [N, C*T*P*P] rows of every item in merge-block order (the processor's order), and
one (t, h, w) grid per item, in patches. Output: one row per merged token, [N / merge^2, out_hidden_size], in
prompt placeholder order. Parameter names match the checkpoint's `model.visual.*`; the maths is
transformers' Qwen3.5 vision model, which the tests compare against.
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
ROW_BLOCK = 1024  # rows per piece of tower work
SCORE_ELEMENTS = 1 << 25  # attention scores one query block may hold (128 MiB in fp32) should SDPA materialise them


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

    def qkv_rows(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """[n, hidden] -> rotated q, k and v as [3, heads, n, D]."""
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(x.dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(x.dtype)
        return torch.stack((q, k, v)).transpose(1, 2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Non-causal attention of q [heads, b, D] over one segment's k, v [heads, n, D] -> projected [b, hidden].
        4D inputs let SDPA pick its fused kernels (flash on CPU): the 3D form falls back to a full score matrix."""
        out = F.scaled_dot_product_attention(q[None], k[None], v[None])[0]
        return self.proj(out.transpose(0, 1).reshape(q.shape[1], -1))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
        """The eager reference: every query of a segment at once."""
        q, k, v = self.qkv_rows(x, cos, sin)
        out, start = [], 0
        for n in seqlens:
            sl = slice(start, start + n)
            out.append(self.attend(q[:, sl], k[:, sl], v[:, sl]))
            start += n
        return torch.cat(out)


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
        """Every item in one call: [N, patch_dim] -> [N / merge^2, out_hidden_size]."""
        total = sum(t * h * w for t, h, w in grids)
        if pixel_values.shape[0] != total:
            raise ValueError(f"{pixel_values.shape[0]} patch rows for grids totalling {total} patches")
        out = []
        for pv, grid in zip(pixel_values.split([t * h * w for t, h, w in grids]), grids):
            job = EncodeJob(self, pv, grid)
            job.run_to(1, 1)
            out.append(job.result)
        return torch.cat(out)


class EncodeJob:
    """One item's pass through the tower, cut into pieces of bounded work and memory so that the engine can spread
    it over several steps: embed rows, per block the q/k/v of rows and then the output of query blocks (attention
    of up to `query_block` rows over their segment, projection, MLP), and the merger. The pieces are fixed by the
    item alone, so running them in one go or over many steps computes the same numbers."""

    def __init__(self, tower: VisionTower, pixel_values: torch.Tensor, grid: Grid):
        cfg, dev = tower.cfg, tower.pos_embed.weight.device
        t, h, w = grid
        self.tower, self.pixel_values, self.n = tower, pixel_values, t * h * w
        if pixel_values.shape[0] != self.n:
            raise ValueError(f"{pixel_values.shape[0]} patch rows for a {t}x{h}x{w} grid")
        self.taps, self.weights, coords, _ = tower.layout([grid])
        angles = (coords.to(dev)[:, :, None].float() * tower.inv_freq).flatten(1)  # [N, head_dim/2]: h then w
        emb = torch.cat((angles, angles), -1)[:, None, :]
        self.cos, self.sin = emb.cos(), emb.sin()
        dtype = tower.patch_embed.proj.weight.dtype
        self.x = torch.empty(self.n, cfg.hidden_size, dtype=dtype, device=dev)
        self.x_next = torch.empty_like(self.x)
        self.qkv = torch.empty(3, cfg.num_heads, self.n, cfg.head_dim, dtype=dtype, device=dev)
        self.result = torch.empty(self.n // cfg.spatial_merge_size**2, cfg.out_hidden_size, dtype=dtype, device=dev)
        seg, m2 = h * w, cfg.spatial_merge_size**2
        hid, inter = cfg.hidden_size, cfg.intermediate_size
        # Query rows per piece: at most ROW_BLOCK, and few enough that a score matrix (if SDPA makes one) stays
        # within SCORE_ELEMENTS; a multiple of the merge block so merger pieces line up.
        rb = ROW_BLOCK // m2 * m2
        qb = min(rb, max(m2, SCORE_ELEMENTS // (cfg.num_heads * seg)) // m2 * m2)
        rows = [(a, min(a + rb, self.n)) for a in range(0, self.n, rb)]
        queries = [(s + a, s + min(a + qb, seg)) for s in range(0, self.n, seg) for a in range(0, seg, qb)]
        # (kind, block index, first row, end row, estimated FLOPs) in running order
        self.pieces = [("embed", -1, a, b, 2 * (b - a) * cfg.patch_dim * hid) for a, b in rows]
        for i in range(cfg.depth):
            self.pieces += [("qkv", i, a, b, 6 * (b - a) * hid * hid) for a, b in rows]
            self.pieces += [("out", i, a, b, (b - a) * (2 * hid * hid + 4 * hid * inter + 4 * seg * hid))
                            for a, b in queries]
        self.pieces += [("merge", -1, a, b, (b - a) * (8 * hid * hid + 2 * hid * cfg.out_hidden_size))
                        for a, b in rows]
        self.cost = [0]
        for piece in self.pieces:
            self.cost.append(self.cost[-1] + piece[4])
        self.done = 0  # pieces run so far
        self.segment = seg

    @property
    def finished(self) -> bool:
        return self.done == len(self.pieces)

    def run_to(self, num: int, den: int) -> None:
        """Run pieces until at least the share num/den of the estimated work is done (all of it when num >= den)."""
        target = self.cost[-1] if num >= den else self.cost[-1] * num // den
        while self.done < len(self.pieces) and self.cost[self.done + 1] <= target:
            self._run(*self.pieces[self.done][:4])
            self.done += 1

    def _run(self, kind: str, i: int, a: int, b: int) -> None:
        tower, dev = self.tower, self.x.device
        if kind == "embed":
            x = tower.patch_embed(self.pixel_values[a:b].to(dev))
            pos = (tower.pos_embed(self.taps[a:b].to(dev)) * self.weights[a:b].to(dev)[:, :, None]).sum(1)
            self.x[a:b] = x + pos.to(x.dtype)
            if b == self.n:
                self.pixel_values = None  # the caller may drop its reference too
        elif kind == "qkv":
            blk = tower.blocks[i]
            self.qkv[:, :, a:b] = blk.attn.qkv_rows(blk.norm1(self.x[a:b]), self.cos[a:b], self.sin[a:b])
        elif kind == "out":
            blk = tower.blocks[i]
            s = a - a % self.segment
            q, k, v = self.qkv[0, :, a:b], self.qkv[1, :, s:s + self.segment], self.qkv[2, :, s:s + self.segment]
            x = self.x[a:b] + blk.attn.attend(q, k, v)
            self.x_next[a:b] = x + blk.mlp(blk.norm2(x))
            if b == self.n:  # the block is done: its output is the next block's input
                self.x, self.x_next = self.x_next, self.x
        else:
            m2 = self.tower.cfg.spatial_merge_size**2
            self.result[a // m2:b // m2] = tower.merger(self.x[a:b])
            if b == self.n:
                self.x = self.x_next = self.qkv = self.cos = self.sin = None
