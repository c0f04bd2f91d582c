"""argparse types shared by the `qwen35` subcommands. Each checks its flag's value while the command line is parsed,
before any model loads, so a bad value is a one-line usage error naming the flag (argparse prefixes
"argument --flag:") and exit status 2."""

from __future__ import annotations

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


def api_key(value: str) -> str:
    from qwen35.serve.middleware import check_api_key

    return _checked(check_api_key, value)
