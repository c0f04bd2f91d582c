"""The native CPU kernel library: every `csrc/*.c` compiled into one shared object with the system C compiler on
first use (~1-2 s), cached under the qwen35 cache directory by a hash of the sources, loaded with ctypes.

The kernels need x86-64 with AVX2 + FMA (detected at run time from /proc/cpuinfo); `features()` also reports
AVX-512 so wider paths can be chosen where a CPU has them. Without a compiler, on other CPUs, or with
QWEN35_NATIVE=0, `available()` is False and the engine runs the reference model.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from qwen35.paths import cache_dir

logger = logging.getLogger(__name__)
CSRC = Path(__file__).parent / "csrc"


def sources() -> list[Path]:
    return sorted(CSRC.glob("*.c"))


@functools.cache
def features() -> frozenset[str]:
    """The CPU's instruction-set flags that matter here (avx2, fma, f16c, avx512f, avx512bw, avx512vnni, ...)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return frozenset(line.split(":", 1)[-1].split())


def available() -> bool:
    if os.environ.get("QWEN35_NATIVE", "1") == "0":
        return False
    try:
        return _lib() is not None
    except OSError as e:
        logger.warning("qwen35: native CPU kernels unavailable (%s); using PyTorch's matmuls", e)
        return False


def function(name: str, argtypes: list, restype=None):
    """A kernel entry point with its C signature declared (once per name)."""
    fn = getattr(_lib(), name)
    if fn.argtypes is None:
        fn.argtypes, fn.restype = argtypes, restype
    return fn


@functools.cache
def _lib() -> ctypes.CDLL:
    if platform.machine() not in ("x86_64", "AMD64") or not {"avx2", "fma"} <= features():
        raise OSError("the native kernels need an x86-64 CPU with AVX2 and FMA")
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise OSError("no C compiler (cc, gcc or clang) found")
    files = sources() + sorted(CSRC.glob("*.h"))
    digest = hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in files)).hexdigest()[:16]
    out = cache_dir() / "native" / f"qwen35_cpu-{digest}.so"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            tmp_out = Path(tmp) / out.name
            cmd = [cc, "-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC", *map(str, sources()), "-o",
                   str(tmp_out), "-lm"]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise OSError(f"compiling the native kernels failed: {r.stderr.strip()[:500]}")
            os.replace(tmp_out, out)
    return ctypes.CDLL(str(out))
