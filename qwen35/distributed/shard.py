"""The parallel plan: how each layer's heads, conv channels, gates, FFN widths, experts and vocabulary split over
the ranks of a tensor-parallel group, which checkpoint slice each rank reads, and where the sums happen.

Every split is contiguous and near-even (`split`: rank r gets n // p, plus one while r < n % p), so head counts
that do not divide by the group size still shard; the shapes a rank holds are those of a *local* TextConfig, so the
reference modules run unchanged on their slice. Per layer:

- Gated DeltaNet: whole k-head groups per rank, with their v heads (the v:k ratio is kept, so a rank's v heads read
  its own k heads). `in_proj_qkv` and the conv weight by segment [q | k | v], `in_proj_z`, `in_proj_b/a`, `A_log`
  and `dt_bias` by v head; the gated norm is per head (replicated); `out_proj` row-parallel, then an all-reduce.
  Each rank's state slots hold its heads only.
- Attention: with at least as many KV heads as ranks, KV heads split and each rank takes the q heads of its KV
  groups; with fewer (the released models have 2), each rank keeps the one KV head its q heads read (replicated
  size / num_kv_heads times) and the group's q heads split over the ranks sharing it. `q_proj` rows are per head
  [query | gate], so the gate follows its head. `o_proj` row-parallel (its bias on rank 0 only), then an all-reduce.
- FFN: dense MLP and shared expert split by intermediate size; routed experts by intermediate size (TP) or by
  expert (EP: whole experts per rank, `Experts(first_expert=...)`, every token routed on every rank, other ranks'
  experts skipped); the router and
  the shared expert's gate replicated (router logits as at one rank). One all-reduce after the block.
- Quantized weights are cut after conversion, so every rank holds exactly its slice of the single-process integers
  and scales (columns at group edges, or under one per-row scale).
- Embedding and LM head: vocabulary rows split; the embedding masks ids outside its rows and all-reduces, the head
  (a plain or quantized linear of the rank's rows) all-gathers the logits. Norms replicated.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qwen35.config import TextConfig
from qwen35.distributed.parallel import Comm
from qwen35.layers.mlp import Experts
from qwen35.quant import QuantizedWeight


class ShardError(ValueError):
    """A model that cannot be split over this many ranks; the message says which count and why."""


def split(n: int, parts: int, rank: int) -> tuple[int, int]:
    """Rank's contiguous range [lo, hi) of n items over `parts` ranks, the first n % parts ranks one larger."""
    base, extra = divmod(n, parts)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


@dataclass(frozen=True)
class Piece:
    """A rank's part of one checkpoint tensor: `ranges` along `dim`, concatenated. first_rank_only: a bias added
    after the all-reduce's sum, kept on rank 0 and zero elsewhere."""

    dim: int
    ranges: tuple[tuple[int, int], ...]
    first_rank_only: bool = False

    def take(self, t: torch.Tensor | QuantizedWeight, rank: int = 0) -> torch.Tensor | QuantizedWeight:
        if isinstance(t, QuantizedWeight):
            return self._take_quantized(t)
        if self.first_rank_only:
            return t if rank == 0 else torch.zeros_like(t)
        return torch.cat([t.narrow(self.dim, lo, hi - lo) for lo, hi in self.ranges], dim=self.dim)

    def _take_quantized(self, qw: QuantizedWeight) -> QuantizedWeight:
        """Rows (or experts) take their integers, scales and zero points along; columns must cut at group edges,
        unless one scale covers a whole row, which then covers the slice."""
        *_, k = qw.shape
        if self.dim != len(qw.shape) - 1:
            def rows(t):
                return None if t is None else self.take(t)

            return QuantizedWeight(qw.bits, qw.group, rows(qw.q), rows(qw.scales), rows(qw.zeros))
        if not self.fits_groups(qw.shape, qw.group, qw.bits):
            raise ValueError(f"columns {list(self.ranges)} of a {qw.bits}-bit weight in groups of {qw.group} do not "
                             "cut at group edges (or split a byte of packed 4-bit integers)")
        width, per_row, pack = sum(hi - lo for lo, hi in self.ranges), qw.group == k, 2 if qw.bits == 4 else 1
        cut = Piece(self.dim, tuple((lo // pack, hi // pack) for lo, hi in self.ranges)).take(qw.q)
        if per_row:
            return QuantizedWeight(qw.bits, width, cut, qw.scales, qw.zeros)
        groups = Piece(self.dim, tuple((lo // qw.group, hi // qw.group) for lo, hi in self.ranges))
        return QuantizedWeight(qw.bits, qw.group, cut, groups.take(qw.scales),
                               None if qw.zeros is None else groups.take(qw.zeros))

    def fits_groups(self, shape: tuple[int, ...], group: int, bits: int) -> bool:
        """Can a weight of `shape` quantized in groups of `group` columns be cut here (see _take_quantized)?"""
        if self.first_rank_only or self.dim != len(shape) - 1:
            return True
        k = shape[-1]
        edges = [x for r in self.ranges for x in r]
        return (group == k or all(x % group == 0 for x in edges)) and (bits != 4 or all(x % 2 == 0 for x in edges))

    def shape(self, full: list[int]) -> list[int]:
        if self.first_rank_only:
            return list(full)
        return [sum(hi - lo for lo, hi in self.ranges) if d == self.dim else n for d, n in enumerate(full)]


# a per-expert checkpoint tensor: the weight, or a quantized checkpoint's companion (scales, packed integers)
EXPERT_TENSOR = re.compile(r"^((?:model|mtp)\.layers\.\d+\.mlp\.experts)\.(\d+)\.((?:gate|up|down)_proj\.\w+)$")


@dataclass(frozen=True)
class ShardPlan:
    """Rank `rank` of `size`; expert_parallel: routed experts split by expert instead of by intermediate size."""

    cfg: TextConfig
    rank: int
    size: int
    expert_parallel: bool = False

    def __post_init__(self):
        c, n = self.cfg, self.size

        def need(ok: bool, msg: str):
            if not ok:
                raise ShardError(f"cannot split this {c.model_type} model over {n} ranks: {msg}")

        if any(t == "linear_attention" for t in c.layer_types):
            need(c.linear_num_key_heads >= n, f"it has {c.linear_num_key_heads} Gated DeltaNet key heads, fewer "
                 "than the ranks (each rank needs at least one)")
        if c.num_key_value_heads < n:
            need(n % c.num_key_value_heads == 0, f"its {c.num_key_value_heads} key/value heads are fewer than the "
                 "ranks and the ranks are not a multiple of them (each rank keeps one, replicated)")
            need(c.num_attention_heads // c.num_key_value_heads >= n // c.num_key_value_heads,
                 f"each of its {c.num_key_value_heads} key/value heads serves "
                 f"{c.num_attention_heads // c.num_key_value_heads} query heads, fewer than the "
                 f"{n // c.num_key_value_heads} ranks that would share it")
        if c.num_experts and self.expert_parallel:
            need(c.num_experts >= n, f"it has {c.num_experts} experts, fewer than the ranks")
        for name in ("intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size"):
            width = getattr(c, name)
            need(width == 0 or width >= n, f"its {name} ({width}) is smaller than the ranks")

    # Each rank's ranges.
    @property
    def k_heads(self) -> tuple[int, int]:
        return split(self.cfg.linear_num_key_heads, self.size, self.rank)

    @property
    def v_heads(self) -> tuple[int, int]:
        ratio = self.cfg.linear_num_value_heads // self.cfg.linear_num_key_heads
        lo, hi = self.k_heads
        return lo * ratio, hi * ratio

    @property
    def kv_heads(self) -> tuple[int, int]:
        c = self.cfg
        if c.num_key_value_heads >= self.size:
            return split(c.num_key_value_heads, self.size, self.rank)
        kv = self.rank // (self.size // c.num_key_value_heads)
        return kv, kv + 1

    @property
    def q_heads(self) -> tuple[int, int]:
        c = self.cfg
        group = c.num_attention_heads // c.num_key_value_heads
        if c.num_key_value_heads >= self.size:
            lo, hi = self.kv_heads
            return lo * group, hi * group
        sharing = self.size // c.num_key_value_heads
        lo, hi = split(group, sharing, self.rank % sharing)
        base = self.kv_heads[0] * group
        return base + lo, base + hi

    def width(self, n: int) -> tuple[int, int]:
        return split(n, self.size, self.rank)

    @property
    def experts(self) -> tuple[int, int]:
        return split(self.cfg.num_experts, self.size, self.rank) if self.expert_parallel else (0, self.cfg.num_experts)

    @property
    def vocab(self) -> tuple[int, int]:
        return split(self.cfg.vocab_size, self.size, self.rank)

    def local_config(self) -> TextConfig:
        """The config whose modules have this rank's shapes (the router and vocabulary keep their global sizes:
        the embedding, the head and EP's experts are replaced by their parallel modules in `prepare`)."""
        c = self.cfg

        def n(r):
            return r[1] - r[0]

        return dataclasses.replace(
            c, linear_num_key_heads=n(self.k_heads), linear_num_value_heads=n(self.v_heads),
            num_attention_heads=n(self.q_heads), num_key_value_heads=n(self.kv_heads),
            intermediate_size=n(self.width(c.intermediate_size)),
            moe_intermediate_size=c.moe_intermediate_size if self.expert_parallel else
            n(self.width(c.moe_intermediate_size)),
            shared_expert_intermediate_size=n(self.width(c.shared_expert_intermediate_size)))

    def piece(self, name: str) -> Piece | None:
        """This rank's part of checkpoint tensor `name` (our canonical name), or None when it is replicated. A
        per-expert tensor of EP is renamed first (`local_name`)."""
        c = self.cfg
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            return Piece(0, (self.vocab,))
        rest = _in_layer(name)
        if rest is None:
            return None
        D, dk, dv = c.head_dim, c.linear_key_head_dim, c.linear_value_head_dim
        (k0, k1), (v0, v1) = self.k_heads, self.v_heads
        if rest in ("linear_attn.in_proj_qkv.weight", "linear_attn.conv1d.weight"):
            kd = c.key_dim
            return Piece(0, ((k0 * dk, k1 * dk), (kd + k0 * dk, kd + k1 * dk), (2 * kd + v0 * dv, 2 * kd + v1 * dv)))
        if rest == "linear_attn.in_proj_z.weight":
            return Piece(0, ((v0 * dv, v1 * dv),))
        if rest in ("linear_attn.in_proj_b.weight", "linear_attn.in_proj_a.weight", "linear_attn.A_log",
                    "linear_attn.dt_bias"):
            return Piece(0, ((v0, v1),))
        if rest == "linear_attn.out_proj.weight":
            return Piece(1, ((v0 * dv, v1 * dv),))
        (q0, q1), (g0, g1) = self.q_heads, self.kv_heads
        if rest in ("self_attn.q_proj.weight", "self_attn.q_proj.bias"):
            return Piece(0, ((2 * q0 * D, 2 * q1 * D),))
        if rest in ("self_attn.k_proj.weight", "self_attn.k_proj.bias", "self_attn.v_proj.weight",
                    "self_attn.v_proj.bias"):
            return Piece(0, ((g0 * D, g1 * D),))
        if rest == "self_attn.o_proj.weight":
            return Piece(1, ((q0 * D, q1 * D),))
        if rest == "self_attn.o_proj.bias":
            return Piece(0, (), first_rank_only=True)
        if m := re.fullmatch(r"mlp\.(shared_expert\.)?(gate|up|down)_proj\.weight", rest):
            w = self.width(c.shared_expert_intermediate_size if m[1] else c.intermediate_size)
            return Piece(1 if m[2] == "down" else 0, (w,))
        if rest in ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"):
            if self.expert_parallel:
                return Piece(0, (self.experts,))
            i0, i1 = self.width(c.moe_intermediate_size)
            inter = c.moe_intermediate_size
            return Piece(1, ((i0, i1), (inter + i0, inter + i1))) if rest.endswith("gate_up_proj") else \
                Piece(2, ((i0, i1),))
        if m := re.fullmatch(r"mlp\.experts\.\d+\.(gate|up|down)_proj\.weight", rest):
            if self.expert_parallel:
                return None
            return Piece(1 if m[1] == "down" else 0, (self.width(c.moe_intermediate_size),))
        return None  # norms, the router, the shared expert's gate, the MTP head's fc and norms

    def local_name(self, name: str) -> str | None:
        """A per-expert checkpoint name (weight or quantized companion) with the rank's own expert index, or None for
        another rank's expert (EP); any other name unchanged."""
        m = EXPERT_TENSOR.match(name)
        if not (m and self.expert_parallel):
            return name
        lo, hi = self.experts
        e = int(m[2])
        return f"{m[1]}.{e - lo}.{m[3]}" if lo <= e < hi else None

    def prepare(self, model: nn.Module, comm: Comm) -> None:
        """Swap in this rank's modules where the local config cannot give them (on the meta device, before loading
        and before quantized stand-ins replace any matmul): the vocabulary rows of the embedding and the LM head,
        EP's own experts. `connect` then adds the collectives."""
        c = self.cfg
        text = model.model
        v0, v1 = self.vocab
        text.embed_tokens = VocabParallelEmbedding(c.hidden_size, v0, v1, comm)
        model.lm_head = nn.Linear(c.hidden_size, v1 - v0, bias=False)
        if c.tie_word_embeddings:
            model.lm_head.weight = text.embed_tokens.weight
        if self.expert_parallel:
            e0, e1 = self.experts
            for layer in _layers(model):
                if hasattr(layer.mlp, "experts"):
                    layer.mlp.experts = Experts(e1 - e0, c.hidden_size, c.moe_intermediate_size, first_expert=e0)

    def connect(self, model: nn.Module, comm: Comm) -> None:
        """The sums and the gather, as forward hooks: after each mixer and FFN block, whose last matmuls are
        row-parallel (a quantized stand-in may have replaced those matmuls: the blocks stay), and on the LM head."""
        for layer in _layers(model):
            mixer = layer.linear_attn if hasattr(layer, "linear_attn") else layer.self_attn
            for module in (mixer, layer.mlp):
                module.register_forward_hook(comm.all_reduce_hook)
        sizes = [hi - lo for lo, hi in (split(self.cfg.vocab_size, self.size, r) for r in range(self.size))]
        model.lm_head.register_forward_hook(lambda module, args, out: comm.all_gather_cols(out, sizes))


def _layers(model: nn.Module) -> list[nn.Module]:
    return list(model.model.layers) + (list(model.mtp.layers) if model.mtp is not None else [])


def _in_layer(name: str) -> str | None:
    """A decoder (or MTP) layer's tensor name within its layer, e.g. "mlp.gate_proj.weight"; None elsewhere."""
    m = re.match(r"^(?:model|mtp)\.layers\.\d+\.(.*)$", name)
    return m[1] if m else None


class VocabParallelEmbedding(nn.Embedding):
    """Rows [lo, hi) of the embedding: ids outside them look up zeros, and the ranks' rows are summed."""

    def __init__(self, hidden_size: int, lo: int, hi: int, comm: Comm):
        super().__init__(hi - lo, hidden_size)
        self.lo, self.hi, self.comm = lo, hi, comm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        inside = (ids >= self.lo) & (ids < self.hi)
        rows = F.embedding(torch.where(inside, ids - self.lo, 0), self.weight)
        return self.comm.all_reduce(torch.where(inside[..., None], rows, 0))
