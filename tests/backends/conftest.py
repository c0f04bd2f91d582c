"""Triton kernels run on this CPU in Triton's interpreter (TRITON_INTERPRET=1, set before any kernel module is
imported, since @triton.jit reads it when it decorates). Where CUDA is present they compile and run on the GPU."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
