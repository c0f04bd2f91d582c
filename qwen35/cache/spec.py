"""What each decoder layer keeps between steps. The model declares its layers' specs (`cache_spec()`); the cache
allocates tensors from them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AttentionCacheSpec:
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class LinearCacheSpec:
    conv_dim: int
    conv_history: int  # kernel width - 1 past inputs
    num_v_heads: int
    k_head_dim: int
    v_head_dim: int
