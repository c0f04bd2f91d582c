"""Model configuration: frozen dataclasses parsed from a checkpoint's config.json.

`ModelConfig.from_hf(dict)` accepts the multimodal wrappers (`qwen3_5`, `qwen3_5_moe`: a `text_config` plus a
`vision_config`) and the text-only types (`qwen3_5_text`, `qwen3_5_moe_text`, `qwen3_next`). Unknown keys are
ignored; derived values (layer pattern, rotary dims, GDN head ratio) are computed once here. A broken config is a
`ConfigError` naming the field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

TEXT_MODEL_TYPES = ("qwen3_5_text", "qwen3_5_moe_text", "qwen3_next")
WRAPPER_MODEL_TYPES = {"qwen3_5": "qwen3_5_text", "qwen3_5_moe": "qwen3_5_moe_text"}
LAYER_TYPES = ("linear_attention", "full_attention")
SUPPORTED_ROPE_TYPES = ("default", "mrope", "yarn")
# Far above any real model; a larger count is a typo or a hostile file, and would cost seconds per field to parse.
# The loader then checks the real count against the tensors present.
MAX_LAYERS = 65_536


class ConfigError(ValueError):
    """A config.json that qwen35 cannot run; the message names the field."""


def _get(d: dict, key: str, kind: type | tuple, default: Any = ..., where: str = "") -> Any:
    if key not in d or d[key] is None:
        if default is ...:
            raise ConfigError(f"config{where}: required field '{key}' is missing")
        return default
    value = d[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"config{where}: field '{key}' must be {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def _positive(value: int, name: str, where: str) -> int:
    if value <= 0:
        raise ConfigError(f"config{where}: field '{name}' must be positive, got {value}")
    return value


@dataclass(frozen=True)
class YarnScaling:
    """YaRN rope scaling (`rope_type: "yarn"`): positions stretched `factor` times past the pretraining length.
    Optional fields keep transformers' defaults (beta_fast 32, beta_slow 1, truncate true, attention factor
    from `factor` and mscale / mscale_all_dim)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    @staticmethod
    def from_hf(rope: dict, original_default: int, where: str) -> "YarnScaling":
        g = lambda key, kind, default=None: _get(rope, key, kind, default, where)  # noqa: E731
        factor = g("factor", float, ...)
        if factor <= 0:
            raise ConfigError(f"config{where}: field 'factor' must be positive, got {factor}")
        original = _positive(g("original_max_position_embeddings", int, original_default),
                             "original_max_position_embeddings", where)
        return YarnScaling(float(factor), original, g("beta_fast", float), g("beta_slow", float),
                           g("mscale", float), g("mscale_all_dim", float),
                           g("attention_factor", float), g("truncate", bool, True))

    @property
    def max_position_embeddings(self) -> int:
        """The context YaRN extends to (as vLLM derives it): the pretraining length times `factor`."""
        return int(self.original_max_position_embeddings * self.factor)


@dataclass(frozen=True)
class TextConfig:
    """The text decoder: Gated DeltaNet + gated attention layers, dense or MoE FFNs."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    layer_types: tuple[str, ...]
    intermediate_size: int = 0  # dense FFN width; 0 when every layer is MoE
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    attention_bias: bool = False
    rope_theta: float = 10_000.0
    partial_rotary_factor: float = 0.25
    mrope_section: tuple[int, ...] = (11, 11, 10)
    rope_scaling: YarnScaling | None = None  # None: plain RoPE, usable up to max_position_embeddings
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    num_experts: int = 0  # 0 = dense model
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = True  # Qwen3.5 always renormalises; Qwen3-Next makes it a switch
    output_router_logits: bool = False  # training: add the router load-balancing loss (as HF)
    router_aux_loss_coef: float = 0.001  # its weight in the training loss
    moe_layers: tuple[bool, ...] = ()  # per layer: MoE FFN (True) or dense SwiGLU (False)
    fused_gdn_projections: bool = False  # Qwen3-Next stores in_proj_qkvz / in_proj_ba, group-interleaved
    tie_word_embeddings: bool = False
    mtp_num_hidden_layers: int = 0  # multi-token-prediction layers in the checkpoint (`mtp.*`); released models: 1
    mtp_use_dedicated_embeddings: bool = False  # released models share the trunk's embedding
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None

    # Derived sizes.
    @property
    def key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def conv_dim(self) -> int:
        return 2 * self.key_dim + self.value_dim

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def max_context_len(self) -> int:
        """The longest sequence the checkpoint's positions cover: native, or extended by YaRN."""
        return self.rope_scaling.max_position_embeddings if self.rope_scaling else self.max_position_embeddings

    @property
    def is_moe(self) -> bool:
        return any(self.moe_layers)

    @property
    def num_full_attention_layers(self) -> int:
        return sum(t == "full_attention" for t in self.layer_types)

    @property
    def num_linear_attention_layers(self) -> int:
        return sum(t == "linear_attention" for t in self.layer_types)

    @staticmethod
    def from_hf(d: dict, model_type: str | None = None, where: str = "") -> "TextConfig":
        model_type = model_type or d.get("model_type")
        if model_type not in TEXT_MODEL_TYPES:
            raise ConfigError(
                f"config{where}: unknown model_type {model_type!r}; qwen35 runs "
                f"{', '.join(TEXT_MODEL_TYPES + tuple(WRAPPER_MODEL_TYPES))}"
            )
        is_next = model_type == "qwen3_next"
        is_moe = model_type in ("qwen3_5_moe_text", "qwen3_next")
        g = lambda key, kind, default=...: _get(d, key, kind, default, where)  # noqa: E731

        num_layers = _positive(g("num_hidden_layers", int), "num_hidden_layers", where)
        if num_layers > MAX_LAYERS:
            raise ConfigError(f"config{where}: field 'num_hidden_layers' is {num_layers}, more than {MAX_LAYERS}")
        layer_types = g("layer_types", list, None)
        if layer_types is None:
            interval = _positive(g("full_attention_interval", int, 4), "full_attention_interval", where)
            layer_types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention"
                           for i in range(num_layers)]
        if len(layer_types) != num_layers:
            raise ConfigError(
                f"config{where}: field 'layer_types' has {len(layer_types)} entries but num_hidden_layers is "
                f"{num_layers}"
            )
        for i, t in enumerate(layer_types):
            if t not in LAYER_TYPES:
                raise ConfigError(f"config{where}: field 'layer_types[{i}]' is {t!r}; expected one of {LAYER_TYPES}")

        # RoPE: `rope_parameters` (or legacy `rope_scaling`), then top-level legacy keys, then HF's defaults. A
        # `rope_scaling` next to `rope_parameters` (as Qwen's model cards add YaRN) overrides its keys.
        params, scaling = g("rope_parameters", dict, None), g("rope_scaling", dict, None)
        rope = {**(params or {}), **(scaling or {})}
        rope_key = "rope_scaling" if scaling else "rope_parameters"
        typed = scaling or params or {}
        rope_type = typed.get("rope_type", typed.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(f"config{where}: field '{rope_key}.rope_type' {rope_type!r} is not supported; qwen35 "
                              f"runs {', '.join(SUPPORTED_ROPE_TYPES)}")
        max_pos = g("max_position_embeddings", int, 32768)
        yarn = None
        if rope_type == "yarn":  # a top-level original_max_position_embeddings wins, as in transformers
            top = g("original_max_position_embeddings", int, None)
            rope = rope if top is None else {**rope, "original_max_position_embeddings": top}
            yarn = YarnScaling.from_hf(rope, max_pos, f"{where}.{rope_key}")
        rope_theta = _get(rope, "rope_theta", float, g("rope_theta", float, 10_000.0), f"{where}.rope_parameters")
        partial = _get(rope, "partial_rotary_factor", float, g("partial_rotary_factor", float, 0.25),
                       f"{where}.rope_parameters")
        mrope_section = tuple(rope.get("mrope_section") or (11, 11, 10))

        num_experts = g("num_experts", int, 0) if is_moe else 0
        if is_moe and num_experts <= 0:
            raise ConfigError(f"config{where}: required field 'num_experts' is missing or not positive")
        if is_next:
            step = g("decoder_sparse_step", int, 1)
            mlp_only = set(g("mlp_only_layers", list, []))
            moe_layers = tuple(
                i not in mlp_only and num_experts > 0 and (i + 1) % max(step, 1) == 0 for i in range(num_layers)
            )
        else:
            moe_layers = (is_moe,) * num_layers

        eos = g("eos_token_id", (int, list), None)
        cfg = TextConfig(
            model_type=model_type,
            vocab_size=_positive(g("vocab_size", int), "vocab_size", where),
            hidden_size=_positive(g("hidden_size", int), "hidden_size", where),
            num_hidden_layers=num_layers,
            num_attention_heads=_positive(g("num_attention_heads", int), "num_attention_heads", where),
            num_key_value_heads=_positive(g("num_key_value_heads", int), "num_key_value_heads", where),
            head_dim=_positive(g("head_dim", int, 256), "head_dim", where),
            layer_types=tuple(layer_types),
            intermediate_size=g("intermediate_size", int, 0) if not all(moe_layers) else 0,
            hidden_act=g("hidden_act", str, "silu"),
            rms_norm_eps=g("rms_norm_eps", float, 1e-6),
            max_position_embeddings=max_pos,
            attention_bias=g("attention_bias", bool, False),
            rope_theta=rope_theta,
            partial_rotary_factor=partial,
            mrope_section=mrope_section,
            rope_scaling=yarn,
            linear_conv_kernel_dim=_positive(g("linear_conv_kernel_dim", int, 4), "linear_conv_kernel_dim", where),
            linear_key_head_dim=_positive(g("linear_key_head_dim", int, 128), "linear_key_head_dim", where),
            linear_value_head_dim=_positive(g("linear_value_head_dim", int, 128), "linear_value_head_dim", where),
            linear_num_key_heads=_positive(g("linear_num_key_heads", int, 16), "linear_num_key_heads", where),
            linear_num_value_heads=_positive(g("linear_num_value_heads", int, 32), "linear_num_value_heads", where),
            num_experts=num_experts,
            num_experts_per_tok=g("num_experts_per_tok", int, 0) if is_moe else 0,
            moe_intermediate_size=g("moe_intermediate_size", int, 0) if is_moe else 0,
            shared_expert_intermediate_size=g("shared_expert_intermediate_size", int, 0) if is_moe else 0,
            norm_topk_prob=g("norm_topk_prob", bool, True) if is_next else True,
            output_router_logits=g("output_router_logits", bool, False),
            router_aux_loss_coef=g("router_aux_loss_coef", float, 0.001),
            moe_layers=moe_layers,
            fused_gdn_projections=is_next,
            tie_word_embeddings=g("tie_word_embeddings", bool, False),
            # Qwen3-Next names the MTP layer count `num_nextn_predict_layers`
            mtp_num_hidden_layers=g("mtp_num_hidden_layers", int, g("num_nextn_predict_layers", int, 0)),
            mtp_use_dedicated_embeddings=g("mtp_use_dedicated_embeddings", bool, False),
            bos_token_id=g("bos_token_id", int, None),
            eos_token_id=tuple([eos] if isinstance(eos, int) else eos or []),
            pad_token_id=g("pad_token_id", int, None),
        )
        cfg._validate(where)
        return cfg

    def _validate(self, where: str) -> None:
        def fail(msg: str) -> None:
            raise ConfigError(f"config{where}: {msg}")

        if self.num_attention_heads % self.num_key_value_heads:
            fail(f"field 'num_attention_heads' ({self.num_attention_heads}) is not a multiple of "
                 f"'num_key_value_heads' ({self.num_key_value_heads})")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            fail(f"field 'linear_num_value_heads' ({self.linear_num_value_heads}) is not a multiple of "
                 f"'linear_num_key_heads' ({self.linear_num_key_heads})")
        if not 0 <= self.mtp_num_hidden_layers <= MAX_LAYERS:
            fail(f"field 'mtp_num_hidden_layers' must be between 0 and {MAX_LAYERS}, got {self.mtp_num_hidden_layers}")
        if self.hidden_act != "silu":
            fail(f"field 'hidden_act' {self.hidden_act!r} is not supported (Qwen3.5 uses 'silu')")
        if not 0 < self.partial_rotary_factor <= 1 or self.rotary_dim % 2:
            fail(f"field 'partial_rotary_factor' ({self.partial_rotary_factor}) must give an even rotary dim "
                 f"within head_dim {self.head_dim}")
        if any(self.moe_layers):
            for name in ("num_experts_per_tok", "moe_intermediate_size"):
                if getattr(self, name) <= 0:
                    fail(f"required field '{name}' is missing or not positive")
            if self.num_experts_per_tok > self.num_experts:
                fail(f"field 'num_experts_per_tok' ({self.num_experts_per_tok}) exceeds 'num_experts' "
                     f"({self.num_experts})")
        if not all(self.moe_layers) and self.intermediate_size <= 0:
            fail("required field 'intermediate_size' is missing or not positive")


@dataclass(frozen=True)
class VisionConfig:
    """The vision tower's geometry (config.json's vision_config)."""

    depth: int = 27
    hidden_size: int = 1152
    hidden_act: str = "gelu_pytorch_tanh"
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    out_hidden_size: int = 3584
    num_position_embeddings: int = 2304
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @staticmethod
    def from_hf(d: dict, where: str = ".vision_config") -> "VisionConfig":
        known = {f.name for f in fields(VisionConfig)}
        kw = {k: v for k, v in d.items() if k in known and v is not None}
        rope = d.get("rope_parameters") or {}
        if isinstance(rope, dict) and rope.get("rope_theta") is not None:
            kw["rope_theta"] = rope["rope_theta"]
        if d.get("deepstack_visual_indexes"):
            raise ConfigError(f"config{where}: field 'deepstack_visual_indexes' is {d['deepstack_visual_indexes']}; "
                              "DeepStack (Qwen3-VL) is not part of Qwen3.5 and is not supported")
        v = VisionConfig(**kw)
        for name in ("depth", "hidden_size", "intermediate_size", "num_heads", "in_channels", "patch_size",
                     "spatial_merge_size", "temporal_patch_size", "out_hidden_size", "num_position_embeddings"):
            if not isinstance(getattr(v, name), int) or getattr(v, name) < 1:
                raise ConfigError(f"config{where}: field '{name}' must be a positive integer, got {getattr(v, name)!r}")
        if v.hidden_size % v.num_heads or v.head_dim % 4:
            raise ConfigError(f"config{where}: hidden_size {v.hidden_size} / num_heads {v.num_heads} must give a "
                              "head_dim divisible by 4 (2D rotary over h and w)")
        side = math.isqrt(v.num_position_embeddings)
        if side * side != v.num_position_embeddings:
            raise ConfigError(f"config{where}: field 'num_position_embeddings' ({v.num_position_embeddings}) must be "
                              "a square (a G x G grid of learned positions)")
        if v.hidden_act not in VISION_ACTS:
            raise ConfigError(f"config{where}: field 'hidden_act' {v.hidden_act!r} is not one of "
                              f"{', '.join(VISION_ACTS)}")
        return v


VISION_ACTS = ("gelu_pytorch_tanh", "gelu", "quick_gelu", "silu")


@dataclass(frozen=True)
class QuantizationConfig:
    """A quantized checkpoint's `quantization_config`: FP8 with block scales, or GPTQ int4 (without act-order)."""

    method: str  # "fp8" | "gptq"
    bits: int = 8
    block: tuple[int, int] = (128, 128)  # fp8: weight_block_size
    group_size: int = 128  # gptq
    sym: bool = True  # gptq
    zero_offset: int = 1  # gptq: 1 for checkpoint_format "gptq" (stored zero - 1), 0 for "gptq_v2"
    modules_to_not_convert: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.method == "fp8":
            return f"fp8 (e4m3, {self.block[0]}x{self.block[1]} blocks)"
        return f"int{self.bits} (GPTQ, group {self.group_size}{'' if self.sym else ', zero points'})"

    @staticmethod
    def from_hf(d: dict) -> "QuantizationConfig":
        w = ".quantization_config"
        method = _get(d, "quant_method", str, where=w)
        skip = tuple(_get(d, "modules_to_not_convert", list, [], where=w))
        if method == "fp8":
            if _get(d, "fmt", str, "e4m3", where=w) != "e4m3":
                raise ConfigError(f"config{w}: field 'fmt' is {d['fmt']!r}; only e4m3 FP8 checkpoints are supported")
            block = _get(d, "weight_block_size", list, where=w)
            if len(block) != 2 or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block):
                raise ConfigError(f"config{w}: field 'weight_block_size' must be two positive ints, got {block!r}")
            return QuantizationConfig("fp8", 8, tuple(block), modules_to_not_convert=skip)
        if method == "gptq":
            bits = _get(d, "bits", int, where=w)
            if bits != 4:
                raise ConfigError(f"config{w}: field 'bits' is {bits}; GPTQ checkpoints of 4 bits are supported")
            if _get(d, "desc_act", bool, False, where=w):
                raise ConfigError(f"config{w}: field 'desc_act' is true; act-order GPTQ checkpoints are not "
                                  "supported")
            fmt = _get(d, "checkpoint_format", str, "gptq", where=w)
            if fmt not in ("gptq", "gptq_v2"):
                raise ConfigError(f"config{w}: field 'checkpoint_format' is {fmt!r}; expected gptq or gptq_v2")
            group = _get(d, "group_size", int, 128, where=w)
            if group <= 0:
                raise ConfigError(f"config{w}: field 'group_size' is {group}; expected a positive group size")
            return QuantizationConfig("gptq", 4, group_size=group, sym=_get(d, "sym", bool, True, where=w),
                                      zero_offset=1 if fmt == "gptq" else 0, modules_to_not_convert=skip)
        raise ConfigError(f"config{w}: quant_method {method!r} is not supported (fp8 or gptq)")


@dataclass(frozen=True)
class ModelConfig:
    """A whole checkpoint: text decoder, optional vision tower, multimodal token ids."""

    model_type: str
    text: TextConfig
    vision: VisionConfig | None = None
    architectures: tuple[str, ...] = ()
    image_token_id: int = 248056
    video_token_id: int = 248057
    vision_start_token_id: int = 248053
    vision_end_token_id: int = 248054
    dtype: str = "bfloat16"
    quantization: QuantizationConfig | None = None
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_multimodal(self) -> bool:
        return self.model_type in WRAPPER_MODEL_TYPES

    @property
    def tie_word_embeddings(self) -> bool:
        return self.text.tie_word_embeddings

    @staticmethod
    def from_hf(d: dict) -> "ModelConfig":
        if not isinstance(d, dict):
            raise ConfigError("config: expected a JSON object")
        model_type = d.get("model_type")
        if model_type is None:
            raise ConfigError("config: required field 'model_type' is missing")
        quant_d = _get(d, "quantization_config", dict, {})
        quant = QuantizationConfig.from_hf(quant_d) if quant_d else None
        dtype = d.get("dtype") or d.get("torch_dtype") or "bfloat16"
        archs = tuple(d.get("architectures") or ())
        if model_type in WRAPPER_MODEL_TYPES:
            text_d = _get(d, "text_config", dict, {})
            text_d = dict(text_d)
            # The wrapper's tie_word_embeddings is what the multimodal model uses; fall back to text_config's.
            if d.get("tie_word_embeddings") is not None:
                text_d["tie_word_embeddings"] = d["tie_word_embeddings"]
            text = TextConfig.from_hf(text_d, WRAPPER_MODEL_TYPES[model_type], where=".text_config")
            vision_d = _get(d, "vision_config", dict, {})  # absent: the language model alone is usable
            vision = VisionConfig.from_hf(vision_d) if vision_d else None
            if vision is not None and vision.out_hidden_size != text.hidden_size:
                raise ConfigError(f"config: vision_config.out_hidden_size ({vision.out_hidden_size}) must equal the "
                                  f"text hidden_size ({text.hidden_size}): merged patches are fed as embeddings")
            g = lambda key, default: _get(d, key, int, default)  # noqa: E731
            return ModelConfig(
                model_type=model_type, text=text, vision=vision, architectures=archs, dtype=str(dtype),
                image_token_id=g("image_token_id", 248056), video_token_id=g("video_token_id", 248057),
                vision_start_token_id=g("vision_start_token_id", 248053),
                vision_end_token_id=g("vision_end_token_id", 248054), quantization=quant,
            )
        text = TextConfig.from_hf(d, model_type)
        return ModelConfig(model_type=model_type, text=text, architectures=archs, dtype=str(dtype), quantization=quant)

    @staticmethod
    def from_dir(path: str | Path) -> "ModelConfig":
        path = Path(path)
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise ConfigError(f"{cfg_path}: not found (is {path} a Hugging Face checkpoint directory?)")
        try:
            d = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{cfg_path}: not valid JSON ({e})") from None
        try:
            return ModelConfig.from_hf(d)
        except ConfigError as e:
            raise ConfigError(f"{cfg_path}: {e}") from None


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding with the checkpoint's MTP head (vLLM's `speculative_config`, method "mtp"): each step
    verifies `num_speculative_tokens` drafted tokens per request in one trunk pass. `disable_by_batch_size`: no
    drafts while more requests than this are running (verifying k + 1 tokens per request costs more than it saves
    once a step is no longer memory-bound; default on CPU 8, the measured crossover, elsewhere none).
    `draft_vocab_size` (qwen35's; EAGLE-3's draft vocabulary, SGLang's token map): the head drafts only among the
    first N token ids (the BPE tokens merged first, the most frequent) and the added tokens, so its LM head reads N
    rows instead of the whole vocabulary; verification is unchanged."""

    METHODS = ("mtp", "qwen3_next_mtp", "qwen3_5_mtp")
    MAX_TOKENS = 8

    method: str = "mtp"
    num_speculative_tokens: int = 1
    disable_by_batch_size: int | None = None
    draft_vocab_size: int | None = None

    @classmethod
    def of(cls, value) -> "SpeculativeConfig | None":
        """From vLLM's dict (or a JSON string of one, or None); a ConfigError names what is wrong."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ConfigError(f"speculative_config: invalid JSON ({e})") from None
        if not isinstance(value, dict):
            raise ConfigError(f"speculative_config takes a dict such as {{\"method\": \"mtp\", "
                              f"\"num_speculative_tokens\": 1}}, got {value!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ConfigError(f"speculative_config: unknown key {unknown[0]!r} (supported: {', '.join(sorted(known))})")
        method = value.get("method", "mtp")
        if method not in cls.METHODS:
            raise ConfigError(f"speculative_config: method {method!r} is not supported; qwen35 drafts with the "
                              f"checkpoint's MTP head: {', '.join(cls.METHODS)}")
        k = value.get("num_speculative_tokens", 1)
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= cls.MAX_TOKENS:
            raise ConfigError(f"speculative_config: num_speculative_tokens must be an integer in 1..{cls.MAX_TOKENS}, "
                              f"got {k!r}")
        d = value.get("disable_by_batch_size")
        if d is not None and (not isinstance(d, int) or isinstance(d, bool) or d < 1):
            raise ConfigError(f"speculative_config: disable_by_batch_size must be a positive integer, got {d!r}")
        n = value.get("draft_vocab_size")
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise ConfigError(f"speculative_config: draft_vocab_size must be a positive integer, got {n!r}")
        return cls("mtp", k, d, n)


@dataclass(frozen=True)
class EngineConfig:
    """Runtime knobs of the engine (not of the model)."""

    max_model_len: int | None = None  # default: the model's max_position_embeddings
    max_num_seqs: int = 32  # running requests at once = recurrent-state slots
    max_num_batched_tokens: int = 2048  # tokens per forward (prefill chunks + decodes)
    block_size: int = 16  # tokens per KV block; independent of the recurrent state's size
    kv_cache_bytes: int | None = None  # KV budget in bytes; default: a fraction of free memory
    kv_cache_memory_fraction: float = 0.5
    seed: int = 0
    native_kernels: bool | None = None  # the CPU backend (default: for 16-bit and quantized weights on CPU)
    gpu_backend: bool | None = None  # the GPU backend (default: on CUDA devices; True: anywhere, for tests)
    enforce_eager: bool = False  # GPU backend: decode steps without CUDA graphs
    enable_prefix_caching: bool = True  # reuse cached KV blocks and state snapshots of earlier prompts
    state_snapshot_bytes: int | None = None  # the snapshot pool's budget; default: see LLMEngine._num_snapshots
    default_max_tokens: int | None = None  # cap on the room left for max_tokens=None (a generation config's)
    speculative_config: SpeculativeConfig | dict | str | None = None  # MTP drafting (SpeculativeConfig.of)

    def __post_init__(self):
        object.__setattr__(self, "speculative_config", SpeculativeConfig.of(self.speculative_config))
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"engine: {name} must be at least 1, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"engine: max_model_len must be at least 2, got {self.max_model_len}")
        if self.state_snapshot_bytes is not None and self.state_snapshot_bytes < 0:
            raise ConfigError(f"engine: state_snapshot_bytes must be at least 0, got {self.state_snapshot_bytes}")
        if not 0 < self.kv_cache_memory_fraction <= 1:
            raise ConfigError("engine: kv_cache_memory_fraction must be in (0, 1]")
