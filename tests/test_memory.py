"""Resident memory: loading a checkpoint leaves no freed C heap behind. glibc keeps the pages that large frees
leave inside its heap (over 200 MB after building the real tokenizer) unless it is told to give them back."""

import platform
import subprocess
import sys

import pytest

from tests.tiny_models import build
from tests.tokenizer_fixtures import add_qwen35_tokenizer

LOAD = r"""
import ctypes, ctypes.util, sys
from qwen35 import LLM

def rss_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024

llm = LLM(sys.argv[1], dtype="float32", max_model_len=256)
before = rss_mib()
ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
print(before - rss_mib())
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc_trim")
def test_loading_leaves_no_freed_heap_resident(tmp_path):
    build("dense", tmp_path, seed=1, vocab_size=248320)
    add_qwen35_tokenizer(tmp_path)
    out = subprocess.run([sys.executable, "-c", LOAD, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    released = float(out.stdout.split()[-1])
    assert released < 16, f"{released:.0f} MiB of freed heap was still resident after loading"


STEPS = r"""
import random, sys
import torch
from qwen35.llm import fix_mmap_threshold

def rss_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024

fix_mmap_threshold()
rng = random.Random(0)
big = torch.ones(32 << 20, dtype=torch.uint8)
del big  # with glibc's default, freeing this raises the mmap threshold to 32 MiB
start, keep = rss_mib(), []
for _ in range(300):  # a server's steps: transient buffers of varying size, small allocations that stay
    x = torch.ones(rng.randint(256 << 10, 16 << 20), dtype=torch.uint8)
    keep.append(torch.ones(rng.randint(8, 64)))
    del x
print(rss_mib() - start)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_serving_steps_do_not_ratchet_resident_memory():
    out = subprocess.run([sys.executable, "-c", STEPS], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    growth = float(out.stdout.split()[-1])
    assert growth < 4, f"RSS grew {growth:.1f} MiB over 300 steps that free all their buffers"



QUANTIZE = r"""
import gc, sys
from qwen35 import LLM
from qwen35.llm import release_free_heap

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) * 1024

kw = dict(dtype="bfloat16", quantization="int4", max_model_len=64, max_num_seqs=1, kv_cache_bytes=1 << 20,
          skip_tokenizer_init=True)
warm = LLM(sys.argv[2], **kw)  # first use: thread pools, kernel library, allocator arenas
del warm
gc.collect()
release_free_heap()
before = status("VmRSS")
llm = LLM(sys.argv[1], **kw)
assert type(llm.engine.runner.decoder).__name__ == "CpuDecoder"
print(status("VmHWM") - before, status("VmRSS") - before)
"""


@pytest.mark.skipif(platform.system() != "Linux", reason="/proc/self/status")
def test_quantizing_while_loading_never_holds_the_float_model(tmp_path):
    """Load-time int4 of a float checkpoint, then the CPU backend's packing: what the load adds to resident memory,
    at its peak, stays below the model in bf16 alone (the float model is never held whole, let alone beside its
    quantized copy), and what stays is the int4 weights (~1/3 of bf16) plus little."""
    build("dense", tmp_path / "big", seed=1, hidden_size=512, intermediate_size=4096, num_hidden_layers=4)
    build("dense", tmp_path / "warm", seed=1)
    params = (tmp_path / "big" / "model.safetensors").stat().st_size / 4  # a float32 file
    out = subprocess.run([sys.executable, "-c", QUANTIZE, str(tmp_path / "big"), str(tmp_path / "warm")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    peak, kept = map(int, out.stdout.split()[-2:])
    bf16 = 2 * params
    assert peak < bf16, f"loading added {peak / 2**20:.0f} MiB at its peak; the model in bf16 is {bf16 / 2**20:.0f} MiB"
    assert kept < 0.45 * bf16, f"{kept / 2**20:.0f} MiB stayed resident"
