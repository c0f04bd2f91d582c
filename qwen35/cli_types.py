"""argparse types shared by the `qwen35` subcommands. Each checks its flag's value while the command line is parsed,
before any model loads, so a bad value is a one-line usage error naming the flag (argparse prefixes
"argument --flag:") and exit status 2."""

from __future__ import annotations

import argparse
import json
from argparse import ArgumentTypeError


def positive_int(value: str) -> int:
    n = int(value)  # a ValueError reads "invalid positive_int value: 'x'"
    if n < 1:
        raise ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def non_negative_int(value: str) -> int:
    n = int(value)
    if n < 0:
        raise ArgumentTypeError(f"must be at least 0, got {n}")
    return n


def positive_float(value: str) -> float:
    x = float(value)
    if not 0 < x < float("inf"):  # NaN fails too
        raise ArgumentTypeError(f"must be a positive number of seconds, got {value}")
    return x


def port(value: str) -> int:
    n = int(value)
    if not 0 <= n <= 65535:
        raise ArgumentTypeError(f"must be in 0..65535 (0 picks a free port), got {n}")
    return n


def int_list(value: str) -> list[int]:
    try:
        return [int(t) for t in value.split(",")]
    except ValueError:
        raise ArgumentTypeError(f"invalid int list {value!r} (comma-separated integers, e.g. 13,198)") from None


def json_object(value: str) -> dict:
    try:
        obj = json.loads(value)
    except json.JSONDecodeError as e:
        raise ArgumentTypeError(f"invalid JSON {value!r}: {e}") from None
    if not isinstance(obj, dict):
        raise ArgumentTypeError(f"must be a JSON object ({{...}}), got {value!r}")
    return obj


def _checked(check, value):
    """`value` after `check(value)`, its ValueError turned into argparse's usage error."""
    try:
        check(value)
    except ValueError as e:
        raise ArgumentTypeError(str(e)) from None
    return value


def mm_limits(value: str) -> dict:
    from qwen35.llm import media_limits

    return _checked(media_limits, json_object(value))


def device(value: str) -> str:
    from qwen35.llm import check_device

    return _checked(check_device, value)


def api_key(value: str) -> str:
    from qwen35.serve.middleware import check_api_key

    return _checked(check_api_key, value)


def add_quantization_flags(p) -> None:
    """The weight-format flags every command that loads a model takes (LLM(quantization=...) and friends)."""
    p.add_argument("--quantization", "-q", choices=["int8", "int4", "none"], default=None,
                   help="int8 / int4: quantize a float checkpoint's decoder weights while loading; none: dequantize a "
                        "quantized (FP8, GPTQ) checkpoint; default: the checkpoint's own format (FP8 runs as int8, "
                        "GPTQ as int4)")
    p.add_argument("--lm-head-quantization", choices=["auto", "int8", "int4", "none"], default="auto",
                   help="the LM head's format (auto: int8 when the model is quantized)")
    p.add_argument("--quantization-group-size", type=positive_int, default=None, metavar="N",
                   help="columns per scale when quantizing (a multiple of 32; default: int8 one scale per output "
                        "row, int4 32)")


def add_cache_flags(p) -> None:
    """The prefix-cache flags of every command that runs the engine (LLM(enable_prefix_caching=...) and friends)."""
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV blocks and Gated DeltaNet state snapshots of earlier prompts (default: on)")
    p.add_argument("--state-snapshot-bytes", type=non_negative_int, default=None, metavar="N",
                   help="memory for the prefix cache's state snapshots (default: 8 per sequence slot, at most 1 GiB "
                        "on CPU; 0: none, so only n > 1 completions share a prompt)")


def cache_kwargs(args) -> dict:
    return dict(enable_prefix_caching=args.enable_prefix_caching, state_snapshot_bytes=args.state_snapshot_bytes)


def quantization_kwargs(args) -> dict:
    return dict(quantization=args.quantization, lm_head_quantization=args.lm_head_quantization,
                quantization_group_size=args.quantization_group_size)
