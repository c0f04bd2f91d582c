"""Strict loading of Hugging Face safetensors checkpoints (single file or sharded with an index), memory-mapped
and cast tensor by tensor to the requested dtype and device.

Checkpoint names are canonicalised to the text model's (`model.language_model.` -> `model.`, `model.visual.` ->
`visual.`); the multi-token-prediction head `mtp.*` is loaded into `model.mtp` when asked (`mtp=True`) and set aside
otherwise, and so is `model.visual.*` when the model is loaded text-only (`vision=False`); per-expert 2D tensors are
packed into the fused 3D expert tensors; Qwen3-Next's fused projections are split. A missing, unexpected or wrongly
shaped tensor is a `CheckpointError` naming it; a truncated or corrupt file one naming the file. Before any module is
built, the safetensors headers are checked: every tensor's bytes lie within its file, its dtype is a float the model can
use, and the config's sizes (layer count, vision depth, vocabulary, hidden size, head size, experts) agree with the
tensors present, so a hostile config cannot make loading build or allocate more than the files hold. Nothing from a
checkpoint is executed: no pickle, no remote code.
"""

from __future__ import annotations

import json
import logging
import math
import re
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from qwen35.config import ModelConfig
from qwen35.distributed.parallel import Comm
from qwen35.distributed.shard import ShardPlan
from qwen35.models import quantized
from qwen35.models.mtp import MTP
from qwen35.models.qwen3_5 import Qwen3_5ForCausalLM
from qwen35.models.qwen3_next import fused_gdn_shape, split_fused_gdn
from qwen35.quant import QuantizedWeight

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Small parameters kept in fp32 whatever the model dtype: the checkpoint stores them so and they feed fp32 maths.
FP32_PARAMS = re.compile(r"\.(A_log|dt_bias)$")
EXPERT_2D = re.compile(r"^((?:model|mtp)\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")
FUSED_GDN = re.compile(r"^model\.layers\.\d+\.linear_attn\.in_proj_(qkvz|ba)\.weight$")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Checkpoint dtypes that can become the model's float weights. FP8 and integer tensors are accepted only where a
# quantized checkpoint's format puts them (models/quantized.py); elsewhere they are a corrupt or hostile header.
FLOAT_DTYPES = ("BF16", "F16", "F32", "F64")
LAYER_INDEX = re.compile(r"^model\.layers\.(\d+)\.")
BLOCK_INDEX = re.compile(r"^visual\.blocks\.(\d+)\.")
logger = logging.getLogger(__name__)


GIB = 1 << 30


class CheckpointError(ValueError):
    """A checkpoint qwen35 refuses to load; the message names the tensor or file."""


@dataclass
class LoadReport:
    num_tensors: int = 0
    num_bytes: int = 0
    set_aside: dict[str, int] = field(default_factory=dict)  # prefix -> number of tensors not loaded
    seconds: float = 0.0
    checkpoint_format: str = "float"  # e.g. "fp8 (e4m3, 128x128 blocks)", "int4 (GPTQ, group 128)"
    quantization: str = "none"  # what the model holds, e.g. "int4 (28 modules, groups of 32 columns) from float"


def resolve_dtype(dtype: str | torch.dtype, config: ModelConfig) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        dtype = config.dtype if config.dtype in DTYPES else "bfloat16"
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


def checkpoint_files(path: Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file holding it."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = {}
        for name, fname in weight_map.items():
            f = path / fname
            if not f.is_file():
                raise CheckpointError(f"{index}: shard {fname} (holding {name}) is missing")
            files[name] = f
        return files
    single = path / "model.safetensors"
    candidates = [single] if single.is_file() else sorted(path.glob("*.safetensors"))
    if not candidates:
        pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES] if path.is_dir() else []
        if pickles:
            raise CheckpointError(f"{path}: only pickle weights ({', '.join(pickles)}); qwen35 loads safetensors only "
                                  "and never unpickles a checkpoint")
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
    files = {}
    for f in candidates:
        with _open(f) as st:
            files.update({k: f for k in st.keys()})
    return files


def _open(f: Path):
    try:
        return safe_open(str(f), framework="pt")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{f}: not a readable safetensors file (truncated or corrupt?): {e}") from None


def canonical_name(name: str, vision: bool = False, mtp: bool = False) -> tuple[str | None, str | None]:
    """(our parameter name, None) or (None, the prefix it is set aside under) or (None, None) when unknown."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):], None
    if name.startswith("model.visual."):
        return ("visual." + name[len("model.visual."):], None) if vision else (None, "model.visual.")
    if name.startswith("mtp."):
        return (name, None) if mtp else (None, "mtp.")
    if name.startswith("model.") or name == "lm_head.weight":
        return name, None
    return None, None


def load_model(path: str | Path, dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu",
               progress: bool | None = None, vision: bool = True, mtp: bool = False,
               quantization: str | None = None, lm_head_quantization: str = "auto", group_size: int | None = None,
               shard: ShardPlan | None = None, comm: Comm | None = None
               ) -> tuple[Qwen3_5ForCausalLM, ModelConfig, LoadReport]:
    """vision=False loads only the language model of a multimodal checkpoint (its tower is set aside).
    mtp=True also loads the checkpoint's MTP head (`mtp.*`, strictly) as `model.mtp`; a checkpoint without one
    leaves `model.mtp` None (models/mtp.add_mtp attaches a fresh head). The model is the reference (quantized
    layers dequantize on every call); the engine's runner may move its text weights into a backend
    (qwen35.backends.cpu), which runs the quantized formats natively.
    quantization: None loads the checkpoint as it is (float stays float, FP8 becomes int8, GPTQ int4); "int8" /
    "int4" quantize the decoder's linears and experts while loading (round to nearest; int8 one scale per output
    channel, int4 groups of 32 with zero points; `group_size` overrides); "none" dequantizes a quantized
    checkpoint into `dtype`. lm_head_quantization: "auto" (int8 when the model is quantized), "int8", "int4",
    "none". Which modules are quantized: the table in models/quantized.py.
    shard (with its group's `comm`): load one tensor-parallel rank's slice of every tensor (distributed/shard.py),
    reading only that slice from the file where it is a plain float tensor, and skipping other ranks' experts."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    config = ModelConfig.from_dir(path)
    cfg = config.text
    torch_dtype = resolve_dtype(dtype, config)
    vision = vision and config.vision is not None
    start = time.time()
    files = checkpoint_files(path)
    mtp = mtp and any(n.startswith("mtp.") for n in files)
    if mtp:
        _check_mtp_config(path, config)
    check_headers(path, config, files, vision, mtp)
    local = shard.local_config() if shard is not None else cfg
    with torch.device("meta"):
        model = Qwen3_5ForCausalLM(local, config.vision if vision else None)
        if mtp:
            model.mtp = MTP(local, model.model)
        if shard is not None:
            shard.prepare(model, comm)
    params = dict(model.named_parameters(remove_duplicate=False))
    report = LoadReport()
    quant = config.quantization
    canonical = {c: n for n in files if (c := canonical_name(n, vision, mtp)[0]) is not None}
    warn = lambda msg: logger.warning("%s: %s", path, msg)  # noqa: E731
    if shard is None:
        specs = whole_specs = quantized.plan(model, config, set(canonical), quantization, lm_head_quantization,
                                             group_size, warn)
    else:  # formats chosen on the whole model, as one process would quantize it; each rank holds its cut
        with torch.device("meta"):
            whole = Qwen3_5ForCausalLM(cfg)
            if mtp:
                whole.mtp = MTP(cfg, whole.model)
        whole_specs = quantized.plan(whole, config, set(canonical), quantization, lm_head_quantization, group_size,
                                     warn)
        specs = quantized.local_specs(whole, model, whole_specs, shard, warn)
    quantized.apply(model, specs)
    if shard is not None:
        shard.connect(model, comm)
    # a quantized checkpoint's module -> its companion suffixes present (FP8 weight + scale, GPTQ's four)
    companions: dict[str, set] = {}
    for c in canonical:
        if (split := quantized.split_companion(c, quant)) is not None:
            companions.setdefault(split[0], set()).add(split[1])
    companions = {m: parts for m, parts in companions.items() if parts != {"weight"}}
    for m, parts in companions.items():
        if missing := quantized.CheckpointWeight(m, quant, {}).missing(parts):
            raise CheckpointError(f"{path}: missing tensor {missing[0]} (its companions are present)")
    pending: dict[str, dict] = {}
    total = _total_bytes(files)
    if progress is None:  # a bar only where someone watches a long load
        progress = sys.stderr.isatty() and total > PROGRESS_MIN_BYTES
    bar = _ProgressBar(total) if progress and total else None
    prefix_of = {}  # canonical name -> checkpoint name, for messages
    loaded: set[str] = set()
    experts_seen: dict[str, set] = {}

    def cut(cname: str, tensor, sliced: bool):
        """The rank's slice of a whole tensor. A module quantized here is converted first, in the whole model's
        format, then cut (a cut along rows of a float tensor comes first: rows quantize alone); a float module
        takes its slice of the float (a quantized checkpoint's weight dequantized)."""
        if shard is None or sliced or (piece := shard.piece(cname)) is None:
            return tensor
        module, which = _module_of(cname)
        spec = whole_specs.get(module) if module in specs else None
        if spec is None:
            return piece.take(quantized.convert(tensor, None), shard.rank)
        if isinstance(tensor, torch.Tensor) and piece.dim < tensor.dim() - 1:
            return piece.take(tensor)
        return piece.take(quantized.convert(tensor, spec, spec.groups[which == "down"]))

    def assign(cname: str, tensor, ckpt_name: str, sliced: bool = False):
        """tensor: a float tensor or a quantized checkpoint's CheckpointWeight; sliced: already the rank's part."""
        tensor = cut(cname, tensor, sliced)
        if cname not in params:
            raise CheckpointError(f"{path}: unexpected tensor {ckpt_name} (this {config.model_type} model has no "
                                  f"parameter {cname})")
        p = params[cname]
        if tuple(tensor.shape) != tuple(p.shape):
            raise CheckpointError(
                f"{path}: tensor {ckpt_name} has shape {list(tensor.shape)}, expected {list(p.shape)}")
        if cname in loaded:
            raise CheckpointError(f"{path}: tensor {ckpt_name} appears twice")
        module_name, _, attr = cname.rpartition(".")
        spec = specs.get(module_name)
        try:
            if spec is None:
                target = torch.float32 if FP32_PARAMS.search(cname) else torch_dtype
                _set_param(model, cname, quantized.convert(tensor, None).to(device=device, dtype=target))
            elif attr == "weight":
                model.get_submodule(module_name).fill(_to(quantized.convert(tensor, spec, spec.groups[0]), device))
            else:  # a fused 3D expert tensor
                which = attr.removesuffix("_proj")
                qw = quantized.convert(tensor, spec, spec.groups[which == "down"])
                model.get_submodule(module_name).fill(which, _to(qw, device))
        except ValueError as e:
            raise CheckpointError(f"{path}: tensor {ckpt_name}: {e}") from None
        loaded.add(cname)

    def place(cname: str, tensor, name: str, sliced: bool = False):
        if m := EXPERT_2D.match(cname):
            _assign_expert(model, params, m, cut(cname, tensor, sliced), name, torch_dtype, device, experts_seen,
                           path, loaded, specs.get(m[1]))
        elif cfg.fused_gdn_projections and FUSED_GDN.match(cname):
            want = fused_gdn_shape(cfg, cname)
            if tuple(tensor.shape) != want:
                raise CheckpointError(
                    f"{path}: tensor {name} has shape {list(tensor.shape)}, expected {list(want)}")
            first = next(iter(split_fused_gdn(cfg, cname, torch.empty(want, device="meta"))))
            spec = specs.get(first.rpartition(".")[0])
            try:  # a quantized fused projection is converted first, then split by rows (the split is exact)
                tensor = quantized.convert(tensor, spec, spec.groups[0] if spec else None)
            except ValueError as e:
                raise CheckpointError(f"{path}: tensor {name}: {e}") from None
            split = lambda t: split_fused_gdn(cfg, cname, t)  # noqa: E731
            parts = split(tensor) if isinstance(tensor, torch.Tensor) else quantized.split_rows(tensor, split)
            for part_name, part in parts.items():
                assign(part_name, part, name)
        else:
            assign(cname, tensor, name, sliced)

    by_file: dict[Path, list[str]] = {}
    for name, f in files.items():
        by_file.setdefault(f, []).append(name)
    for f, names in by_file.items():
        with _open(f) as st, _TensorReader(f) as reader:
            available = set(st.keys())
            for name in names:
                if name not in available:
                    raise CheckpointError(f"{f}: tensor {name} listed in the index is not in the file")
                cname, aside = canonical_name(name, vision, mtp)
                if aside is not None:
                    report.set_aside[aside] = report.set_aside.get(aside, 0) + 1
                    continue
                if cname is None:
                    raise CheckpointError(f"{path}: unexpected tensor {name}")
                if cname == "lm_head.weight" and cfg.tie_word_embeddings:
                    report.set_aside["lm_head (tied)"] = 1  # some exports write the tied head anyway
                    continue
                piece = None
                if shard is not None:
                    if (cname := shard.local_name(cname)) is None:
                        report.set_aside["other ranks' experts"] = report.set_aside.get("other ranks' experts", 0) + 1
                        continue
                    plain = quantized.split_companion(cname, quant) is None and not (
                        cfg.fused_gdn_projections and FUSED_GDN.match(cname)) and _module_of(cname)[0] not in specs
                    piece = shard.piece(cname) if plain else None
                    piece = None if piece is not None and piece.first_rank_only else piece
                tensor = reader.read(name, piece)
                report.num_tensors += 1
                report.num_bytes += tensor.numel() * tensor.element_size()
                prefix_of[cname] = name
                split = quantized.split_companion(cname, quant)
                if split is not None and split[0] in companions:
                    module, suffix = split
                    parts = pending.setdefault(module, {})
                    parts[suffix] = tensor
                    if set(parts) == companions[module]:  # all companions read: convert the weight now
                        del pending[module]
                        ckpt_module = name.rpartition(".")[0]
                        place(module + ".weight", quantized.CheckpointWeight(ckpt_module, quant, parts), ckpt_module)
                else:
                    place(cname, tensor, name, sliced=piece is not None)
                if bar is not None:
                    bar.advance(tensor.numel() * tensor.element_size())
    if bar is not None:
        bar.close()

    if cfg.tie_word_embeddings and "model.embed_tokens.weight" in loaded:
        if "lm_head" in specs:  # untied: the head holds its own quantized copy, the embedding keeps its floats
            spec = specs["lm_head"]
            weight = model.model.embed_tokens.weight
            model.lm_head.fill(_to(quantized.convert(weight.float(), spec, spec.groups[0]), device))
        else:
            model.lm_head.weight = model.model.embed_tokens.weight
        loaded.add("lm_head.weight")
    missing = [n for n in params if n not in loaded and not (n.endswith("_proj") and ".experts." in n
                                                                and n.rsplit(".", 1)[0] in experts_seen)]
    missing += _missing_experts(experts_seen, params)
    if missing:
        uses_lm_prefix = any(v.startswith("model.language_model.") for v in prefix_of.values())
        shown = [m.replace("model.", "model.language_model.", 1) if uses_lm_prefix and m.startswith("model.") else
                 "model." + m if m.startswith("visual.") else m for m in missing]
        more = f" (and {len(shown) - 5} more)" if len(shown) > 5 else ""
        raise CheckpointError(f"{path}: missing tensor{'s' if len(shown) > 1 else ''} {', '.join(shown[:5])}{more}")
    model.model.inv_freq = model.model.inv_freq.to(device)
    if model.mtp is not None:
        model.mtp.inv_freq = model.mtp.inv_freq.to(device)
    if model.visual is not None:
        model.visual.inv_freq = model.visual.inv_freq.to(device)
    model.eval()
    report.checkpoint_format = quant.describe() if quant else "float"
    report.quantization = quantized.describe(specs, report.checkpoint_format)
    report.seconds = time.time() - start
    return model, config, report


def _module_of(cname: str) -> tuple[str, str]:
    """(the module a tensor belongs to for quantization, which matrix: "down" or another name)."""
    if m := EXPERT_2D.match(cname):
        return m[1], m[3]
    module, _, attr = cname.rpartition(".")
    return module, attr.removesuffix("_proj")


def check_headers(path: Path, config: ModelConfig, files: dict[str, Path], vision: bool, mtp: bool = False) -> None:
    """Check every header entry that will be loaded (bytes, dtype) and the config's sizes against the shapes."""
    cfg, shapes, by_file, dtypes, quant = config.text, {}, {}, {}, config.quantization
    for name, f in files.items():
        by_file.setdefault(f, []).append(name)
    for f, names in by_file.items():
        with _TensorReader(f) as reader:
            for name in names:
                cname, aside = canonical_name(name, vision, mtp)
                tied_head = cname == "lm_head.weight" and cfg.tie_word_embeddings
                if aside is None and cname is not None and not tied_head and name in reader.header:
                    shapes[cname] = reader.check_entry(name, quantized.allowed_dtypes(cname, quant, FLOAT_DTYPES))
                    dtypes[cname] = reader.header[name]["dtype"]
    for cname, dtype in dtypes.items():
        module, _, suffix = cname.rpartition(".")
        if dtype == "F8_E4M3" and f"{module}.weight_scale_inv" not in shapes:
            raise CheckpointError(f"{path}: tensor {cname} is FP8 but its {module}.weight_scale_inv is missing")
        if suffix == "qweight" and len(shapes[cname]) == 2:  # the logical [N, K], for the size checks below
            shapes[f"{module}.weight"] = [shapes[cname][1], 8 * shapes[cname][0]]

    def fail(field: str, value, found: str):
        raise CheckpointError(f"{path}: config field '{field}' is {value} but {found}")

    def count(pattern: re.Pattern) -> int:
        return 1 + max((int(m[1]) for n in shapes if (m := pattern.match(n))), default=-1)

    num_experts: dict[str, int] = {}  # per-expert 2D tensors: "model.layers.i.mlp.experts" -> highest index + 1
    for n in shapes:
        if m := EXPERT_2D.match(n):
            num_experts[m[1]] = max(num_experts.get(m[1], 0), int(m[2]) + 1)
    if (n := count(LAYER_INDEX)) != cfg.num_hidden_layers:
        fail("num_hidden_layers", cfg.num_hidden_layers, f"the checkpoint holds {n} layers (model.layers.N)")
    if vision and (n := count(BLOCK_INDEX)) != config.vision.depth:
        fail("vision_config.depth", config.vision.depth, f"the checkpoint holds {n} blocks (model.visual.blocks.N)")
    if vision and (patch := shapes.get("visual.patch_embed.proj.weight")) and patch[0] != config.vision.hidden_size:
        fail("vision_config.hidden_size", config.vision.hidden_size, f"model.visual.patch_embed.proj.weight has "
             f"shape {patch}")
    if (embed := shapes.get("model.embed_tokens.weight")) and embed != [cfg.vocab_size, cfg.hidden_size]:
        fail("vocab_size" if embed[:1] != [cfg.vocab_size] else "hidden_size",
             cfg.vocab_size if embed[:1] != [cfg.vocab_size] else cfg.hidden_size,
             f"embed_tokens.weight has shape {embed}")
    full = cfg.layer_types.index("full_attention") if "full_attention" in cfg.layer_types else None
    k_proj = shapes.get(f"model.layers.{full}.self_attn.k_proj.weight")
    if k_proj and k_proj[0] != cfg.num_key_value_heads * cfg.head_dim:
        fail("head_dim", cfg.head_dim, f"layer {full}'s k_proj.weight has shape {k_proj} for "
             f"{cfg.num_key_value_heads} key/value heads")
    for i, is_moe in enumerate(cfg.moe_layers):
        gate = shapes.get(f"model.layers.{i}.mlp.gate.weight") if is_moe else None
        if gate and gate[0] != cfg.num_experts:
            fail("num_experts", cfg.num_experts, f"model.layers.{i}.mlp.gate.weight has shape {gate}")
        n = num_experts.get(f"model.layers.{i}.mlp.experts", 0) if is_moe else 0
        if n and n != cfg.num_experts:
            fail("num_experts", cfg.num_experts, f"the checkpoint holds {n} experts in layer {i}")


def _check_mtp_config(path: Path, config: ModelConfig) -> None:
    """The config must describe the `mtp.*` tensors being loaded, in the one layout qwen35 builds."""
    cfg = config.text
    if cfg.mtp_num_hidden_layers != 1:
        raise CheckpointError(f"{path}: the checkpoint holds mtp.* tensors but config field 'mtp_num_hidden_layers' is "
                              f"{cfg.mtp_num_hidden_layers}; qwen35 loads MTP heads of exactly 1 layer")
    if cfg.mtp_use_dedicated_embeddings:
        raise CheckpointError(f"{path}: config field 'mtp_use_dedicated_embeddings' is true; qwen35 loads only MTP "
                              "heads that share the trunk's embedding")


class _TensorReader:
    """Reads tensors of one safetensors file with plain reads into fresh buffers. A memory map would do too, but
    every page it touches counts toward the process's resident set until the file is closed, so loading would
    peak at twice the weights; this way the page cache holds the file and the process only its tensors."""

    DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}

    def __init__(self, path: Path):
        self.path = path
        try:
            self.fh = open(path, "rb", buffering=0)
            (n,) = struct.unpack("<Q", self.fh.read(8))
            self.header = json.loads(self.fh.read(n))
        except (OSError, struct.error, ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None
        self.base, self.size = 8 + n, path.stat().st_size

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()

    def check_entry(self, name: str, allowed: tuple[str, ...] = FLOAT_DTYPES) -> list[int]:
        """The tensor's shape, once its header entry is known to have an allowed dtype and bytes in the file."""
        info = self.header.get(name)
        try:
            dtype, shape, (start, end) = info["dtype"], list(info["shape"]), info["data_offsets"]
            if not all(isinstance(x, int) and x >= 0 for x in (*shape, start, end)):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{self.path}: tensor {name} has an unreadable header entry {info!r}") from None
        if dtype not in allowed or dtype not in self.DTYPES:
            kind = "FP8 and integer tensors belong only to the quantized modules of a quantized checkpoint" \
                if str(dtype).startswith("F8") or allowed != FLOAT_DTYPES else "the model's weights are floating point"
            expected = f"expected one of {', '.join(allowed)}" if allowed else "its module is never quantized"
            raise CheckpointError(f"{self.path}: tensor {name} has dtype {dtype}, which qwen35 cannot load here "
                                  f"({kind}; {expected})")
        numel = math.prod(shape)
        if end - start != numel * self.DTYPES[dtype].itemsize or self.base + end > self.size:
            raise CheckpointError(f"{self.path}: cannot read tensor {name} (truncated or corrupt file?): its "
                                  f"{end - start} bytes at offset {self.base + start} do not hold {shape} "
                                  f"{dtype} within the file's {self.size} bytes")
        return shape

    def read(self, name: str, piece=None) -> torch.Tensor:
        """The tensor as stored (its dtype was checked against its role by check_headers), or only a tensor-parallel
        rank's `piece` of it (distributed.shard.Piece): its contiguous runs are read where they are few; where they
        are many small ones (a column slice of a tall matrix) the whole tensor is read and cut."""
        shape = self.check_entry(name, tuple(self.DTYPES))
        info = self.header[name]
        dtype, (start, end) = self.DTYPES[info["dtype"]], info["data_offsets"]
        if piece is not None and math.prod(shape[:piece.dim]) * len(piece.ranges) > 4096:
            return piece.take(self.read(name))
        if piece is None:
            runs = [(start, end - start)]
        else:
            inner = math.prod(shape[piece.dim + 1:]) * dtype.itemsize
            runs = [(start + (o * shape[piece.dim] + lo) * inner, (hi - lo) * inner)
                    for o in range(math.prod(shape[:piece.dim])) for lo, hi in piece.ranges]
            shape = piece.shape(shape)
        buf = torch.empty(sum(n for _, n in runs), dtype=torch.uint8)
        view, done = memoryview(buf.numpy()), 0
        for offset, n in runs:
            self.fh.seek(self.base + offset)
            stop = done + n
            while done < stop:
                got = self.fh.readinto(view[done:stop])
                if not got:
                    raise CheckpointError(f"{self.path}: cannot read tensor {name}: the file ends early")
                done += got
        return buf.view(dtype).reshape(shape)


def _total_bytes(files: dict[str, Path]) -> int:
    return sum(f.stat().st_size for f in set(files.values()))


PROGRESS_MIN_BYTES = GIB  # checkpoints smaller than 1 GiB load too fast to need a bar


class _ProgressBar:
    """A one-line text bar on stderr: bytes read of the checkpoint, elapsed time and the time left."""

    def __init__(self, total: int, width: int = 30):
        self.total, self.width, self.done = total, width, 0
        self.start = self.shown = time.monotonic()

    def advance(self, nbytes: int) -> None:
        self.done = min(self.done + nbytes, self.total)
        now = time.monotonic()
        if now - self.shown >= 0.1 or self.done == self.total:  # redraw ten times a second at most
            self.shown = now
            self.draw(now)

    def draw(self, now: float) -> None:
        frac, spent = self.done / self.total, now - self.start
        left = f", {spent * (1 - frac) / frac:.0f}s left" if 0 < frac < 1 else ""
        filled = int(frac * self.width)
        print(f"\rLoading weights [{'#' * filled}{'.' * (self.width - filled)}] {100 * frac:5.1f}% "
              f"{self.done / GIB:.2f}/{self.total / GIB:.2f} GiB {spent:.0f}s{left}  ", end="", file=sys.stderr,
              flush=True)

    def close(self) -> None:
        self.done = self.total  # what was set aside or is file headers counts as read too
        self.draw(time.monotonic())
        print(file=sys.stderr)


def _set_param(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, pname = name.rpartition(".")
    module = model.get_submodule(module_name)
    setattr(module, pname, nn.Parameter(tensor, requires_grad=False))


def _assign_expert(model, params, m, tensor, ckpt_name, dtype, device, seen, path, loaded, spec=None):
    """Copy one per-expert 2D tensor (float, or a quantized checkpoint's CheckpointWeight) into the fused 3D expert
    tensors (allocated on first use), or into a QuantExperts module (`spec`: its format).
    `seen` maps each experts prefix to the set of (expert, projection) pairs copied so far."""
    base, e, which = m.group(1), int(m.group(2)), m.group(3)
    gate_up_name, down_name = f"{base}.gate_up_proj", f"{base}.down_proj"
    if gate_up_name not in params:
        raise CheckpointError(f"{path}: unexpected tensor {ckpt_name} (layer has no routed experts)")
    E, two_i, H = params[gate_up_name].shape
    inter = two_i // 2
    want = {"gate": (inter, H), "up": (inter, H), "down": (H, inter)}[which]
    if e >= E:
        raise CheckpointError(f"{path}: unexpected tensor {ckpt_name} (expert {e} of {E})")
    if tuple(tensor.shape) != want:
        raise CheckpointError(f"{path}: tensor {ckpt_name} has shape {list(tensor.shape)}, expected {list(want)}")
    done = seen.setdefault(base, set())
    if (e, which) in done or gate_up_name in loaded:
        raise CheckpointError(f"{path}: tensor {ckpt_name} appears twice (per-expert and fused, or repeated)")
    rows = slice(0, inter) if which == "gate" else slice(inter, 2 * inter)
    try:
        if spec is not None:
            target = "down" if which == "down" else "gate_up"
            qw = _to(quantized.convert(tensor, spec, spec.groups[which == "down"]), device)
            model.get_submodule(base).fill(target, qw, e if which == "down" else (e, rows))
        else:
            tensor = quantized.convert(tensor, None)
            if not done:
                for name in (gate_up_name, down_name):
                    _set_param(model, name, torch.empty(params[name].shape, dtype=dtype, device=device))
                    params[name] = model.get_parameter(name)
            if which == "down":
                params[down_name].data[e] = tensor.to(dtype)
            else:
                params[gate_up_name].data[e, rows] = tensor.to(dtype)
    except ValueError as err:
        raise CheckpointError(f"{path}: tensor {ckpt_name}: {err}") from None
    done.add((e, which))
    if len(done) == 3 * E:
        loaded.update({gate_up_name, down_name})


def _to(qw: QuantizedWeight, device) -> QuantizedWeight:
    return QuantizedWeight(qw.bits, qw.group, qw.q.to(device), qw.scales.to(device),
                           None if qw.zeros is None else qw.zeros.to(device))


def _missing_experts(seen: dict, params: dict) -> list[str]:
    """Per-expert names still missing in layers whose experts came as 2D tensors."""
    out = []
    for base, done in seen.items():
        E = params[f"{base}.gate_up_proj"].shape[0]
        out += [f"{base}.{e}.{w}_proj.weight" for e in range(E) for w in ("gate", "up", "down") if (e, w) not in done]
    return out
