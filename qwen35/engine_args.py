"""Every setting of `LLM(...)`, declared once: `EngineArgs`' fields, each with its help text and command-line type.
`LLM(**kwargs)` checks its keyword arguments against these fields, and `add_cli_args` turns them into the flags of
`qwen35 generate / chat / serve` (vLLM's names where the meaning is the same, with the defaults shown in --help)."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

import torch

from qwen35.cli_types import _checked, json_object, non_negative_int, positive_float, positive_int
from qwen35.config import EngineConfig, SpeculativeConfig
from qwen35.multimodal.config import MediaLimits


def media_limits(limit_mm_per_prompt: dict[str, int] | None) -> MediaLimits:
    limits = MediaLimits()
    if not isinstance(limit_mm_per_prompt, (dict, type(None))):
        raise ValueError(f"limit_mm_per_prompt takes {{'image': n, 'video': m}}, got {limit_mm_per_prompt!r}")
    for key, value in (limit_mm_per_prompt or {}).items():
        if key not in ("image", "video") or not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"limit_mm_per_prompt takes {{'image': n, 'video': m}} with n, m >= 0; "
                             f"got {key}={value!r}")
        limits = dataclasses.replace(limits, **{f"max_{key}s_per_prompt": value})
    return limits


def check_device(device: str | torch.device) -> torch.device:
    """The device if this torch build and machine can run on it; else a ValueError saying why, before any loading."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r} (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"device {device!r}: {why}")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif dev.type != "cpu":
        raise ValueError(f"device {device!r} is not supported (use cpu, cuda or cuda:N)")
    return dev


def device(value: str) -> str:
    return _checked(check_device, value)


def spec_config(value: str) -> dict:
    return _checked(SpeculativeConfig.of, json_object(value))


def mm_limits(value: str) -> dict:
    return _checked(media_limits, json_object(value))


def _arg(default, help: str, type=None, choices=None, flags=(), metavar=None, group="engine", cli=True):
    return field(default=default, metadata=dict(help=help, type=type, choices=choices, flags=flags, metavar=metavar,
                                                group=group, cli=cli))


def _fraction(value: str) -> float:
    x = float(value)
    if not 0 < x <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return x


@dataclass
class EngineArgs:
    # loading
    revision: str | None = _arg(None, "with a Hugging Face repo id: the branch, tag or commit (default: main)",
                                group="model", cli=False)
    dtype: str = _arg("auto", "weights' dtype (auto: the checkpoint's; float16 runs as bfloat16 on CPU)",
                      choices=["auto", "float32", "bfloat16", "float16"], group="model")
    device: str = _arg("cpu", "cpu, cuda or cuda:N", type=device, group="model")
    seed: int = _arg(0, "seed of the engine's generator (requests without their own seed)", type=int, group="model",
                     cli=False)
    tokenizer: str | None = _arg(None, "tokenizer folder (default: the checkpoint's)", metavar="DIR", group="model")
    skip_tokenizer_init: bool = _arg(False, "load no tokenizer (token-id prompts only)", group="model", cli=False)
    chat_template: str | None = _arg(None, "a chat template to use instead of the checkpoint's: a file, or the "
                                     "template itself", metavar="FILE_OR_TEMPLATE", group="model")
    generation_config: str = _arg("auto", "sampling defaults: auto (the checkpoint's generation_config.json), vllm "
                                  "(none: SamplingParams' own), or a folder with a generation_config.json",
                                  metavar="auto|vllm|DIR", group="model")
    language_model_only: bool = _arg(False, "load a multimodal checkpoint without its vision tower (text only)",
                                     group="model")
    quantization: str | None = _arg(None, "int8 / int4: quantize a float checkpoint's decoder weights while "
                                    "loading; none: dequantize a quantized (FP8, GPTQ) checkpoint; default: the "
                                    "checkpoint's own format (FP8 runs as int8, GPTQ as int4)",
                                    choices=["int8", "int4", "none"], flags=("-q",), group="model")
    lm_head_quantization: str = _arg("auto", "the LM head's format (auto: int8 when the model is quantized)",
                                     choices=["auto", "int8", "int4", "none"], group="model")
    quantization_group_size: int | None = _arg(None, "columns per scale when quantizing (a multiple of 32; "
                                               "default: int8 one scale per output row, int4 32)",
                                               type=positive_int, metavar="N", group="model")
    tensor_parallel_size: int = _arg(1, "ranks one model instance is split over (heads, FFN widths, experts and "
                                     "vocabulary; local worker processes, or torchrun's ranks)", type=positive_int,
                                     flags=("-tp",), metavar="N", group="model")
    enable_expert_parallel: bool = _arg(False, "with tensor_parallel_size > 1: split the routed experts by expert "
                                        "instead of by width", flags=("-ep",), group="model")
    native_kernels: bool | None = _arg(None, "run the decoder on the native CPU kernels (default: for 16-bit and "
                                       "quantized weights on CPU)", group="model", cli=False)
    gpu_backend: bool | None = _arg(None, "run the decoder on the GPU backend (default: on CUDA devices; True runs "
                                    "it on any device, with its plain-torch fallbacks off CUDA)", group="model",
                                    cli=False)
    enforce_eager: bool = _arg(False, "on a GPU: run decode steps eagerly instead of replaying CUDA graphs")
    # engine
    max_model_len: int | None = _arg(None, "context length (default: the model's)", type=positive_int)
    max_num_seqs: int = _arg(32, "requests running at once (each holds a recurrent-state slot)", type=positive_int)
    max_num_batched_tokens: int = _arg(2048, "tokens per forward step (prefill chunks and decodes)",
                                       type=positive_int)
    block_size: int = _arg(16, "tokens per KV-cache block", type=positive_int)
    kv_cache_bytes: int | None = _arg(None, "KV-cache budget in bytes (default: a fraction of free memory, at most "
                                      "4 GiB on CPU unless one request needs more)", type=positive_int)
    kv_cache_memory_fraction: float = _arg(0.5, "share of free memory the KV cache may take",
                                           type=_fraction, flags=("--gpu-memory-utilization",))
    enable_prefix_caching: bool = _arg(True, "reuse the KV blocks and Gated DeltaNet state snapshots of earlier "
                                       "prompts")
    state_snapshot_bytes: int | None = _arg(None, "memory for the prefix cache's state snapshots (default: 8 per "
                                            "sequence slot, at most 1 GiB on CPU; 0: none)",
                                            type=non_negative_int, metavar="N")
    speculative_config: dict | None = _arg(None, 'speculative decoding with the checkpoint\'s MTP head, vLLM\'s '
                                           'spelling: \'{"method": "mtp", "num_speculative_tokens": 1}\' (optional '
                                           '"disable_by_batch_size": N); default off', type=spec_config,
                                           metavar="JSON")
    # media
    limit_mm_per_prompt: dict | None = _arg(None, 'most images / videos per request, e.g. \'{"image": 4, "video": '
                                            '1}\' (default 16 / 4)', type=mm_limits, metavar="JSON", group="media")
    allowed_local_media_path: str | None = _arg(None, "let image_url / video_url name local files (paths or file:// "
                                                "URLs) inside DIR", metavar="DIR", group="media")
    allow_remote_media: bool = _arg(False, "fetch http(s) image_url / video_url from public addresses (off: data: "
                                    "URLs only)", group="media")
    allowed_media_domains: list | None = _arg(None, "with --allow-remote-media: fetch from these hosts only, "
                                              "private addresses included", metavar="HOST", group="media")
    media_fetch_timeout: float = _arg(10.0, "total time one remote media fetch may take, redirects included",
                                      type=positive_float, metavar="SECONDS", group="media")

    @classmethod
    def from_kwargs(cls, where: str = "LLM()", **kwargs) -> EngineArgs:
        """The arguments, or a TypeError naming an unknown one (with the closest known names)."""
        known = [f.name for f in fields(cls)]
        for name in kwargs:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise TypeError(f"{where} got an unexpected keyword argument {name!r}{hint}")
        return cls(**kwargs)

    @classmethod
    def cli_kwargs(cls, args: argparse.Namespace) -> dict:
        """The LLM(...) keyword arguments a command line gave (flags the command does not have are left out)."""
        return {f.name: getattr(args, f.name) for f in fields(cls) if f.metadata["cli"] and hasattr(args, f.name)}

    def kwargs(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def engine_config(self, **extra) -> EngineConfig:
        names = {f.name for f in fields(EngineConfig)}
        return EngineConfig(**{k: v for k, v in vars(self).items() if k in names}, **extra)


def add_cli_args(parser: argparse.ArgumentParser, groups=("model", "engine", "media"), only=None) -> None:
    """The flags of EngineArgs' fields in these groups (or only these names), as `--field-name`; booleans that
    default to True get a `--no-` form."""
    sections = {}
    for f in fields(EngineArgs):
        m = f.metadata
        if not m["cli"] or (only is not None and f.name not in only) or (only is None and m["group"] not in groups):
            continue
        if m["group"] not in sections:
            sections[m["group"]] = parser.add_argument_group(f"{m['group']} options")
        group = sections[m["group"]]
        names = ["--" + f.name.replace("_", "-"), *m["flags"]]
        default = f.default if f.default is not MISSING else None
        shown = "" if default in (None, False) else f" (default: {default})"
        kw: dict[str, Any] = dict(default=default, help=m["help"] + shown, dest=f.name)
        if isinstance(default, bool) or f.type in ("bool", "bool | None"):
            kw["action"] = argparse.BooleanOptionalAction if default is True else "store_true"
            kw["default"] = default
        else:
            if m["type"] is not None:
                kw["type"] = m["type"]
            if m["choices"] is not None:
                kw["choices"] = m["choices"]
            if m["metavar"] is not None:
                kw["metavar"] = m["metavar"]
            if f.name == "allowed_media_domains":
                kw["nargs"] = "+"
        group.add_argument(*names, **kw)
