"""transformers is the numerical reference, on its own torch maths: where flash-linear-attention (fla-core, the GPU
backend's optional kernels) or causal-conv1d is installed, transformers would route its gated delta rule and conv
through them (decided when its modeling modules are imported), and those cannot run on a CPU (on a GPU, fla
multiplies fp32 in tf32). So those modules are imported first with both hidden; qwen35 still finds fla afterwards.

Without CUDA, Triton kernels (the GPU backend's and fla's) run on CPU tensors in Triton's interpreter:
TRITON_INTERPRET=1 is set before anything imports a kernel module (@triton.jit reads it when it decorates)."""

import importlib
import importlib.util
import os
import sys

import pytest
import torch

torch.set_num_threads(2)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
HIDDEN = ("fla", "causal_conv1d")


def _import_transformers_on_its_torch_path() -> None:
    if not any(importlib.util.find_spec(k) for k in HIDDEN):
        return  # nothing to hide: transformers is imported when a test needs it
    saved = {k: m for k, m in sys.modules.items() if k.split(".")[0] in HIDDEN}
    for k in saved:
        del sys.modules[k]
    sys.modules.update(dict.fromkeys(HIDDEN))  # None: `import fla` raises ImportError
    try:
        for name in ("qwen3_5", "qwen3_5_moe", "qwen3_next"):
            importlib.import_module(f"transformers.models.{name}.modeling_{name}")
    except ImportError:  # no transformers: the tests that need it say so
        pass
    finally:
        for k in HIDDEN:
            del sys.modules[k]
        sys.modules.update(saved)


_import_transformers_on_its_torch_path()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(kind, **overrides) -> (dir, hf_model); built once per distinct request in a session."""
    from tests.tiny_models import build

    made = {}

    def get(kind: str, seed: int = 0, max_shard_size=None, **overrides):
        key = (kind, seed, max_shard_size, repr(sorted(overrides.items())))
        if key not in made:
            d = tmp_path_factory.mktemp(f"ckpt-{kind}")
            made[key] = (d, build(kind, d, seed=seed, max_shard_size=max_shard_size, **overrides))
        return made[key]

    return get
