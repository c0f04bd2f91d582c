"""The GPU tests (marked `gpu`; pyproject deselects them by default): on a CUDA machine run with `pytest -m gpu
tests/gpu`. Where CUDA is absent, QWEN35_GPU_TESTS_ON_CPU=1 runs the same tests on this CPU with the GPU backend
forced (its torch fallbacks, decode steps padded as the graphs pad them but eager), so their logic is exercised
everywhere; otherwise they skip.
(transformers is kept off fla's kernels by tests/conftest.py.)"""

import os

import pytest
import torch

ON_CPU = os.environ.get("QWEN35_GPU_TESTS_ON_CPU") == "1"


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
