"""The GPU backend (CUDA): Triton kernels for the causal conv and paged attention, flash-linear-attention's gated
delta rule, grouped-GEMM experts and CUDA graphs for decode steps, behind a decoder the model never sees."""
