"""Built-in geometries of the released Qwen3.5 sizes and Qwen3-Next-80B-A3B, as
the config.json a checkpoint of that size carries. Used by `qwen35 info`, the benchmarks and the embedded demo."""

from __future__ import annotations

ROPE = {"rope_type": "default", "rope_theta": 10_000_000, "partial_rotary_factor": 0.25,
        "mrope_section": [11, 11, 10], "mrope_interleaved": True}
# Three ViT sizes: small for 0.8B, medium for 2B/4B, large above.
_PATCH = {"patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 2304}
VIT_SMALL = {"depth": 12, "hidden_size": 768, "intermediate_size": 3072, "num_heads": 12, **_PATCH}
VIT_MEDIUM = {"depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "num_heads": 16, **_PATCH}
VISION = {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16, **_PATCH}


def _text(hidden, layers, heads, kv_heads, v_heads, **kw):
    return {"vocab_size": 248320, "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "head_dim": 256, "linear_num_key_heads": 16,
            "linear_num_value_heads": v_heads, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
            "linear_conv_kernel_dim": 4, "full_attention_interval": 4, "rms_norm_eps": 1e-6,
            "max_position_embeddings": 262144, "rope_parameters": dict(ROPE), **kw}


def _dense(hidden, layers, heads, kv_heads, v_heads, inter, tie, vit=VISION):
    text = _text(hidden, layers, heads, kv_heads, v_heads, intermediate_size=inter, tie_word_embeddings=tie)
    return {"model_type": "qwen3_5", "architectures": ["Qwen3_5ForConditionalGeneration"], "dtype": "bfloat16",
            "tie_word_embeddings": tie, "text_config": text, "vision_config": {**vit, "out_hidden_size": hidden}}


def _moe(hidden, layers, heads, kv_heads, v_heads, experts, top_k, inter):
    text = _text(hidden, layers, heads, kv_heads, v_heads, num_experts=experts, num_experts_per_tok=top_k,
                 moe_intermediate_size=inter, shared_expert_intermediate_size=inter, tie_word_embeddings=False)
    return {"model_type": "qwen3_5_moe", "architectures": ["Qwen3_5MoeForConditionalGeneration"],
            "dtype": "bfloat16", "tie_word_embeddings": False, "text_config": text,
            "vision_config": {**VISION, "out_hidden_size": hidden}}


PRESETS: dict[str, dict] = {
    "qwen3.5-0.8b": _dense(1024, 24, 8, 2, 16, 3584, True, VIT_SMALL),
    "qwen3.5-2b": _dense(2048, 24, 8, 2, 16, 6144, True, VIT_MEDIUM),
    "qwen3.5-4b": _dense(2560, 32, 16, 4, 32, 9216, True, VIT_MEDIUM),
    "qwen3.5-9b": _dense(4096, 32, 16, 4, 32, 12288, False),
    "qwen3.5-27b": _dense(5120, 64, 24, 4, 48, 17408, False),
    "qwen3.5-35b-a3b": _moe(2048, 40, 16, 2, 32, 256, 8, 512),
    "qwen3.5-122b-a10b": _moe(3072, 48, 32, 2, 64, 256, 8, 1024),
    "qwen3.5-397b-a17b": _moe(4096, 60, 32, 2, 64, 512, 10, 1024),
    "qwen3-next-80b-a3b": {
        "model_type": "qwen3_next", "architectures": ["Qwen3NextForCausalLM"], "dtype": "bfloat16",
        **_text(2048, 48, 16, 2, 32, vocab_size=151936, intermediate_size=5120, num_experts=512,
                num_experts_per_tok=10, moe_intermediate_size=512, shared_expert_intermediate_size=512,
                norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False,
                max_position_embeddings=262144),
    },
}


def preset(name: str) -> dict:
    key = name.lower()
    if key not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[key]
