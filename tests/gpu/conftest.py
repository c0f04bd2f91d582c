"""The GPU tests (marked `gpu`; pyproject deselects them by default): on a CUDA machine run with `pytest -m gpu
tests/gpu`. Where CUDA is absent, QWEN35_GPU_TESTS_ON_CPU=1 runs the same tests on this CPU with the GPU backend
forced (its torch fallbacks, decode steps padded as the graphs pad them but eager), so their logic is exercised
everywhere; otherwise they skip.

transformers is a reference here too, on the device: it takes fla's kernels for its gated delta rule when `fla`
imports (decided when its modeling modules are imported), and fla's kernels multiply fp32 in tf32 (~1e-3). The
reference is transformers' own torch path, so its modeling modules are imported here with fla (and causal_conv1d)
hidden; our backend still finds fla afterwards."""

import importlib
import importlib.util
import os
import sys

import pytest
import torch

ON_CPU = os.environ.get("QWEN35_GPU_TESTS_ON_CPU") == "1"
HIDDEN = ("fla", "causal_conv1d")


def _import_transformers_on_its_torch_path() -> None:
    if not any(importlib.util.find_spec(k) for k in HIDDEN):
        return  # nothing to hide (a CPU run): transformers is imported when a test needs it
    saved = {k: m for k, m in sys.modules.items() if k.split(".")[0] in HIDDEN}
    for k in saved:
        del sys.modules[k]
    sys.modules.update(dict.fromkeys(HIDDEN))  # None: `import fla` raises ImportError
    try:
        for name in ("qwen3_5", "qwen3_5_moe", "qwen3_next"):
            importlib.import_module(f"transformers.models.{name}.modeling_{name}")
    except ImportError:  # no transformers (or an older one without these models): tests needing it skip
        pass
    finally:
        for k in HIDDEN:
            del sys.modules[k]
        sys.modules.update(saved)


_import_transformers_on_its_torch_path()


@pytest.fixture(scope="session")
def device() -> str:
    """"cuda", or "cpu" under QWEN35_GPU_TESTS_ON_CPU=1; the test skips otherwise."""
    if torch.cuda.is_available():
        return "cuda"
    if ON_CPU:
        return "cpu"
    pytest.skip("needs a CUDA device (QWEN35_GPU_TESTS_ON_CPU=1 runs these tests' logic on the CPU)")


@pytest.fixture(scope="session")
def backend(device) -> dict:
    """LLM(...) arguments that put the GPU backend on `device`: chosen by default on CUDA (what is tested there),
    forced on the CPU."""
    return {"device": device, "gpu_backend": None if device == "cuda" else True}
