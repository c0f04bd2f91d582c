"""Which modules of a loaded model are quantized, and how a checkpoint's tensors become their weights.

The table (one place): the decoder's linears (attention q/k/v/o, Gated DeltaNet in_proj_qkv / in_proj_z /
out_proj, dense and shared-expert MLPs) and its routed experts are quantized; the LM head as asked
(`lm_head_quantization`); never the embedding, the router `mlp.gate`, `shared_expert_gate`, `in_proj_a` /
`in_proj_b`, conv1d, norms, A_log / dt_bias, the vision tower or the MTP head; nor anything the checkpoint's
`modules_to_not_convert` names (a full name, a prefix, or a glob). A quantized checkpoint may also store the MTP
layer's projections quantized: those are dequantized into the model dtype. Qwen3-Next's fused in_proj_qkvz is
split by rows after conversion, so its quantized parts stay exact.

Quantized checkpoint tensors come in companions: FP8 `X.weight` (e4m3) + `X.weight_scale_inv`; GPTQ `X.qweight`,
`X.qzeros`, `X.scales`, `X.g_idx`. Once all of a module's companions are read they become one `CheckpointWeight`,
which the loader either dequantizes (float modules, quantization="none") or converts to the module's format.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from qwen35.config import ModelConfig, QuantizationConfig
from qwen35.layers.quant import QuantExperts, QuantLinear
from qwen35.quant import QuantizedWeight, fp8_block_dequantize, from_fp8_block, from_gptq, quantize

QUANTIZED = re.compile(r"^model\.layers\.\d+\.(?:self_attn\.[qkvo]_proj|linear_attn\.(?:in_proj_qkv|in_proj_z|out_proj)"
                       r"|mlp\.(?:shared_expert\.)?(?:gate|up|down)_proj|mlp\.experts)$")
# What a quantized checkpoint may store quantized (canonical module names; per-expert names included).
CHECKPOINT_QUANTIZED = re.compile(
    r"^(?:model|mtp)\.layers\.\d+\.(?:self_attn\.[qkvo]_proj|linear_attn\.(?:in_proj_qkvz?|in_proj_z|out_proj)"
    r"|mlp\.(?:shared_expert\.)?(?:gate|up|down)_proj|mlp\.experts\.\d+\.(?:gate|up|down)_proj)$|^lm_head$")
EXPERT_MODULE = re.compile(r"^((?:model|mtp)\.layers\.\d+\.mlp\.experts)\.\d+\.(?:gate|up|down)_proj$")
COMPANIONS = {"fp8": ("weight", "weight_scale_inv"), "gptq": ("qweight", "qzeros", "scales", "g_idx")}
# Allowed safetensors dtypes of each companion, for the header check.
COMPANION_DTYPES = {"weight_scale_inv": ("F32", "BF16", "F16"), "qweight": ("I32",), "qzeros": ("I32",),
                    "g_idx": ("I32",), "scales": ("F16", "BF16", "F32")}
# int8 default: one scale per output channel. On the trained demo model groups of 32 were no better (mean KL to
# float32 0.0004 vs 0.0003, top-1 99.0% vs 99.1%) for 12.5% more bytes.
INT8_GROUP = None
INT4_GROUP = 32
QUANTIZATIONS = ("int8", "int4", "none")
LM_HEAD_QUANTIZATIONS = ("auto", "int8", "int4", "none")


@dataclass(frozen=True)
class QuantSpec:
    """How one module is held: bits, column group (per matrix: gate_up and down for experts), zero points."""

    bits: int
    groups: tuple[int, ...]
    has_zeros: bool = False


def split_companion(cname: str, quant: QuantizationConfig | None) -> tuple[str, str] | None:
    """(module, companion suffix) for a quantized checkpoint's companion tensor name, else None."""
    if quant is None:
        return None
    module, _, suffix = cname.rpartition(".")
    return (module, suffix) if suffix in COMPANIONS[quant.method] else None


def allowed_dtypes(cname: str, quant: QuantizationConfig | None, floats: tuple[str, ...]) -> tuple[str, ...]:
    """The safetensors dtypes a tensor may have: floats, or its companion's dtype where the checkpoint's format
    puts one (FP8 only on the weights of modules that releases quantize)."""
    split = split_companion(cname, quant)
    if split is None:
        return floats
    if not CHECKPOINT_QUANTIZED.match(split[0]):
        return floats if split[1] == "weight" else ()  # a scale or packed integers on a module never quantized
    if split[1] == "weight":
        return (*floats, "F8_E4M3")
    return COMPANION_DTYPES[split[1]]


def not_converted(name: str, patterns: tuple[str, ...]) -> bool:
    """Does `modules_to_not_convert` name this module (checkpoint or canonical name; full name, prefix or glob)?"""
    names = {name, name.replace("model.", "model.language_model.", 1), name.replace("visual.", "model.visual.", 1)}
    return any(n == p or n.startswith(p.rstrip(".*") + ".") or fnmatch.fnmatchcase(n, p)
               for p in patterns for n in names)


def plan(model: nn.Module, config: ModelConfig, ckpt_names: set[str], quantization: str | None,
         lm_head_quantization: str, group_size: int | None, log) -> dict[str, QuantSpec]:
    """module name -> QuantSpec for every module to quantize. quantization None: the checkpoint's own quantized
    modules (FP8 as int8, GPTQ as int4); "int8" / "int4": every module of the table; "none": nothing."""
    if quantization not in (None, *QUANTIZATIONS):
        raise ValueError(f"quantization must be one of int8, int4, none (or None); got {quantization!r}")
    if lm_head_quantization not in LM_HEAD_QUANTIZATIONS:
        raise ValueError(f"lm_head_quantization must be one of {', '.join(LM_HEAD_QUANTIZATIONS)}; "
                         f"got {lm_head_quantization!r}")
    quant = config.quantization
    float_model = quantization == "none" or (quantization is None and quant is None)
    head = ("none" if float_model else "int8") if lm_head_quantization == "auto" else lm_head_quantization
    skip = quant.modules_to_not_convert if quant else ()
    stored = {split[0] for n in ckpt_names if (split := split_companion(n, quant)) and split[1] != "weight"}
    stored |= {m[1] for n in stored if (m := EXPERT_MODULE.match(n))}
    stored |= {n.removesuffix("qkvz") + part for n in stored if n.endswith("in_proj_qkvz") for part in ("qkv", "z")}
    out = {}
    for name, module in model.named_modules():
        if name == "lm_head":
            if head == "none":
                continue
            kind = head
        elif QUANTIZED.match(name) and not float_model and not not_converted(name, skip):
            if quantization is None and name not in stored:
                continue
            kind = quantization or quant.method
        else:
            continue
        ks = (module.in_features,) if isinstance(module, nn.Linear) else \
            (module.gate_up_proj.shape[-1], module.down_proj.shape[-1])
        spec = _spec(kind, ks, group_size if kind == quantization else None, quant)
        if isinstance(spec, int):
            log(f"{name}: {ks[0] if len(ks) == 1 else ks} input columns are not a multiple of the group ({spec}); "
                "kept in the model dtype")
            continue
        out[name] = spec
    return out


def _spec(kind: str, ks: tuple[int, ...], group_size: int | None, quant: QuantizationConfig | None):
    """The QuantSpec of a module whose matrices have ks input columns, or the group size that does not fit."""
    if kind == "fp8":
        return QuantSpec(8, tuple(math.gcd(k, quant.block[1]) for k in ks))
    if kind == "gptq":
        return QuantSpec(4, tuple(math.gcd(k, quant.group_size) for k in ks), not quant.sym)
    bits = 8 if kind == "int8" else 4
    group = group_size or (INT8_GROUP if bits == 8 else INT4_GROUP)
    if group is not None and any(k % group for k in ks):
        return group
    return QuantSpec(bits, tuple(group or k for k in ks), bits == 4)


def describe(specs: dict[str, QuantSpec], source: str) -> str:
    """One line for LoadReport: which formats the model holds, e.g. "int4 (28 modules, groups of 32 columns, zero
    points) + int8 (1 module, groups of 64 columns) from float"."""
    if not specs:
        return "none"
    out = []
    for bits in (4, 8):
        names = [n for n, s in specs.items() if s.bits == bits]
        if names:
            groups = "/".join(map(str, sorted({g for n in names for g in specs[n].groups})))
            zeros = ", zero points" if any(specs[n].has_zeros for n in names) else ""
            out.append(f"int{bits} ({len(names)} module{'s' * (len(names) > 1)}, groups of {groups} columns{zeros})")
    return " + ".join(out) + f" from {source}"


def split_rows(qw: QuantizedWeight, split) -> dict[str, QuantizedWeight]:
    """A row permutation `split` (tensor [N, X] -> {name: rows}) applied to a quantized weight: integers, scales
    and zero points move with their rows, so the parts dequantize exactly to the split of the whole."""
    q, s = split(qw.q), split(qw.scales)
    z = split(qw.zeros) if qw.zeros is not None else dict.fromkeys(q)
    return {name: QuantizedWeight(qw.bits, qw.group, q[name], s[name], z[name]) for name in q}


def local_specs(whole: nn.Module, local: nn.Module, specs: dict[str, QuantSpec], shard, warn
                ) -> dict[str, QuantSpec]:
    """A tensor-parallel rank's formats (`shard`: its distributed.shard.ShardPlan; `local`: its model): the whole
    model's `specs`, with a per-row group narrowed to the rank's columns; a module whose columns the rank cannot cut
    at group edges stays in the model dtype."""
    out = {}
    for name, spec in specs.items():
        if isinstance(whole.get_submodule(name), nn.Linear):
            mats = [(f"{name}.weight", whole.get_submodule(name).weight, local.get_submodule(name).weight)]
        else:
            w, lo = whole.get_submodule(name), local.get_submodule(name)
            mats = [(f"{name}.gate_up_proj", w.gate_up_proj, lo.gate_up_proj),
                    (f"{name}.down_proj", w.down_proj, lo.down_proj)]
        fits = all((p := shard.piece(n)) is None or p.fits_groups(tuple(full.shape), g, spec.bits)
                   for (n, full, _), g in zip(mats, spec.groups))
        if not fits:
            warn(f"{name}: rank {shard.rank}'s columns do not cut at the edges of its {spec.bits}-bit groups "
                 f"({spec.groups}); kept in the model dtype on that rank")
            continue
        groups = tuple(part.shape[-1] if g == full.shape[-1] else g for (_, full, part), g in zip(mats, spec.groups))
        out[name] = dataclasses.replace(spec, groups=groups)
    return out


def apply(model: nn.Module, specs: dict[str, QuantSpec]) -> None:
    """Replace each planned module (on the meta device) by its quantized stand-in."""
    for name, spec in specs.items():
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, leaf)
        with torch.device("meta"):
            if isinstance(old, nn.Linear):
                new = QuantLinear(old.in_features, old.out_features, spec.bits, spec.groups[0], spec.has_zeros)
            else:
                E, two_i, H = old.gate_up_proj.shape
                new = QuantExperts(E, H, two_i // 2, spec.bits, spec.groups, spec.has_zeros, old.first_expert)
        parent._modules[leaf] = new


@dataclass
class CheckpointWeight:
    """All companions of one quantized checkpoint weight, by suffix."""

    name: str  # the checkpoint's module name, for messages
    quant: QuantizationConfig
    parts: dict[str, torch.Tensor]

    def missing(self, present: set[str]) -> list[str]:
        need = ("weight", "weight_scale_inv") if self.quant.method == "fp8" else ("qweight", "qzeros", "scales")
        return [f"{self.name}.{s}" for s in need if s not in present]

    @property
    def shape(self) -> tuple[int, int]:
        if self.quant.method == "fp8":
            return tuple(self.parts["weight"].shape)
        qweight = self.parts["qweight"]  # [K/8, N]; another rank is refused by the caller's shape check
        return (qweight.shape[1], 8 * qweight.shape[0]) if qweight.dim() == 2 else tuple(qweight.shape)

    def fits(self, bits: int, group: int, has_zeros: bool) -> bool:
        """Can this weight become `bits` bits in groups of `group` columns without requantizing from floats?"""
        q, k = self.quant, self.shape[1]
        if q.method == "fp8":
            return bits == 8 and math.gcd(k, q.block[1]) % group == 0
        return bits == 4 and math.gcd(k, q.group_size) % group == 0 and (has_zeros or q.sym)

    def dequantize(self) -> torch.Tensor:
        """float32, exactly the checkpoint format's own dequantization."""
        if self.quant.method == "fp8":
            if self.parts["weight"].dtype != torch.float8_e4m3fn:  # a float weight beside a stray scale
                raise ValueError("weight_scale_inv beside a weight that is not FP8")
            return fp8_block_dequantize(self.parts["weight"], self.parts["weight_scale_inv"], self.quant.block)
        return self.quantized(None).dequantize()

    def quantized(self, group: int | None) -> QuantizedWeight:
        q, p = self.quant, self.parts
        if q.method == "fp8":
            if p["weight"].dtype != torch.float8_e4m3fn:
                raise ValueError("weight_scale_inv beside a weight that is not FP8")
            return from_fp8_block(p["weight"], p["weight_scale_inv"], q.block, 8, group)
        return from_gptq(p["qweight"], p["qzeros"], p["scales"], p.get("g_idx"), 4, q.group_size, q.sym,
                         q.zero_offset, group)


def convert(value, spec: QuantSpec | None, group: int | None = None):
    """A float tensor, CheckpointWeight or QuantizedWeight as its target wants it: a float tensor (spec None) or a
    QuantizedWeight of spec's bits in groups of `group` columns (a quantized format is kept or converted directly
    where it fits, so it stays exact)."""
    if spec is None:
        return value if isinstance(value, torch.Tensor) else value.dequantize()
    if isinstance(value, CheckpointWeight):
        if value.fits(spec.bits, group, spec.has_zeros):
            return value.quantized(group)
        value = value.dequantize()
    if isinstance(value, QuantizedWeight):
        if (value.bits, value.group) == (spec.bits, group) and (value.zeros is None or spec.has_zeros):
            return value
        value = value.dequantize()
    return quantize(value, spec.bits, group, symmetric=None if spec.bits == 8 else not spec.has_zeros)
