"""The CPU backend: native kernels (csrc/, built and loaded by library.py), packed and quantized weight formats
(weights.py), the ctypes faces of the fused decode layers (layers.py) and the decoder that runs the model's text
forward on them (decoder.py). The engine's runner asks `decoder_for` whether to use it; the model never knows."""

from __future__ import annotations

import torch

from qwen35.backends.cpu import library
from qwen35.backends.cpu.decoder import CpuDecoder, pack_linears
from qwen35.layers.quant import QuantExperts, QuantLinear


def wanted(model, device, native_kernels: bool | None) -> bool:
    """Default: on CPU for 16-bit or quantized weights when the kernels build here; fp32 weights keep PyTorch's
    matmuls, whose summation order the fp32 parity tests hold to 1e-4 (native_kernels=True runs them natively)."""
    if torch.device(device).type != "cpu" or native_kernels is False:
        return False
    if native_kernels is None and model.dtype == torch.float32 \
            and not any(isinstance(m, (QuantLinear, QuantExperts)) for m in model.modules()):
        return False
    return library.available()


def decoder_for(model, device, native_kernels: bool | None = None):
    """A CpuDecoder for the model (its text weights move into it; the vision tower's linears are packed in place),
    or None to run the model itself."""
    if not wanted(model, device, native_kernels):
        return None
    decoder = CpuDecoder(model)
    if model.visual is not None:
        pack_linears(model.visual)
    return decoder
