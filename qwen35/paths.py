"""Where qwen35 keeps files it builds (compiled kernels): `$QWEN35_CACHE`, else `~/.cache/qwen35`."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("QWEN35_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "qwen35")
    return Path(root)
