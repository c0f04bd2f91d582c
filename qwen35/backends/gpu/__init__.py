"""The GPU backend (CUDA): Triton kernels for the causal conv and paged attention (conv.py, attention.py),
flash-linear-attention's gated delta rule (gdn.py; the optional `fla-core` package), grouped-GEMM experts and CUDA
graphs for decode steps (decoder.py), behind a decoder the model never sees. The engine's runner asks `decoder_for`;
each kernel has its reference beside it (ops/) and a fallback where its package is missing."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def wanted(device, gpu_backend: bool | None) -> bool:
    """Default: on CUDA devices. gpu_backend=True runs it anywhere (on a CPU with its torch fallbacks, or Triton's
    interpreter: how the tests exercise it); False keeps the reference model."""
    return torch.device(device).type == "cuda" if gpu_backend is None else gpu_backend


def decoder_for(model, device, cache, *, gpu_backend: bool | None = None, graphs: bool = True,
                max_num_seqs: int = 1, max_blocks: int = 1, kernels=None):
    """A decoder.GpuDecoder for the model, or None to run the model itself. graphs: decode steps from CUDA graphs
    (padded the same way, but eager, off CUDA); they need the cache's scratch slot and block. kernels: a
    decoder.Kernels (default: the fastest this device has)."""
    if not wanted(device, gpu_backend):
        return None
    # imported here: the kernel modules import triton, which a CPU-only run never needs
    from qwen35.backends.gpu.decoder import GpuDecoder, graphs_worthwhile, pick_kernels
    device = torch.device(device)
    kernels = kernels or pick_kernels(device, model.dtype)
    graphs = graphs and cache is not None and cache.scratch_slot is not None
    if graphs and device.type == "cuda" and not graphs_worthwhile(model, kernels):
        logger.info("qwen35: decode steps run eagerly: %s cannot be captured in a CUDA graph", kernels.describe())
        graphs = False
    logger.info("qwen35: GPU backend: %s; decode steps %s", kernels.describe(),
                "from CUDA graphs" if graphs else "eager")
    decoder = GpuDecoder(model, kernels, cache=cache, graphs=graphs, max_num_seqs=max_num_seqs,
                         max_blocks=max_blocks)
    if graphs and device.type == "cuda":
        with torch.cuda.device(device):
            decoder.graphs.capture_all()
    return decoder
