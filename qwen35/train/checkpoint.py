"""What training writes to disk: an HF-format checkpoint directory (the inverse of models/loader.py's name
mapping), a LoRA adapter in PEFT's layout, and the resumable training state.

A checkpoint keeps the tensor names of the one it was fine-tuned from: `model.language_model.` and the vision
tower for multimodal checkpoints, per-expert 2D tensors when the source stored experts so, Qwen3-Next's fused
GDN projections; tensors the model did not load (a vision tower loaded text-only, an MTP head the model lacks)
are copied from the source unchanged. Every tensor keeps its source dtype. Tokenizer, chat template, generation
and preprocessor configs are copied over.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from qwen35.config import ModelConfig
from qwen35.models.loader import checkpoint_files
from qwen35.train.lora import lora_modules

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
COPIED_SUFFIXES = (".json", ".jinja", ".txt", ".model", ".tiktoken")
NOT_COPIED = ("model.safetensors.index.json", "adapter_config.json")
STATE_FILE, WEIGHTS_FILE = "training_state.pt", "trainable.safetensors"


def hf_name(name: str, multimodal: bool) -> str:
    """Our parameter or module name -> the checkpoint's (`model.` -> `model.language_model.` in multimodal ones)."""
    if name.startswith("visual."):
        return "model." + name
    if multimodal and name.startswith("model."):
        return "model.language_model." + name[len("model."):]
    return name


def fuse_gdn(cfg, prefix: str, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of models.qwen3_next.split_fused_gdn: one layer's split projections -> Qwen3-Next's fused ones."""
    Nk, dk, dv = cfg.linear_num_key_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim
    r = cfg.linear_num_value_heads // Nk
    get = lambda leaf: parts[f"{prefix}.{leaf}.weight"]  # noqa: E731
    H = get("in_proj_qkv").shape[-1]
    q, k, v = get("in_proj_qkv").split([Nk * dk, Nk * dk, Nk * r * dv])
    qkvz = torch.cat([q.reshape(Nk, dk, H), k.reshape(Nk, dk, H), v.reshape(Nk, r * dv, H),
                      get("in_proj_z").reshape(Nk, r * dv, H)], dim=1)
    ba = torch.cat([get("in_proj_b").reshape(Nk, r, H), get("in_proj_a").reshape(Nk, r, H)], dim=1)
    return {f"{prefix}.in_proj_qkvz.weight": qkvz.reshape(-1, H), f"{prefix}.in_proj_ba.weight": ba.reshape(-1, H)}


def checkpoint_tensors(state: dict[str, torch.Tensor], config: ModelConfig, source_names=(),
                       multimodal: bool | None = None) -> dict[str, torch.Tensor]:
    """Our state dict (plain names, see lora.merged_state_dict) under the checkpoint's names. `source_names`: the
    source checkpoint's tensor names, whose layout (language-model prefix, per-expert tensors) is kept."""
    cfg = config.text
    source_names = set(source_names)
    if multimodal is None:
        multimodal = any(n.startswith("model.language_model.") for n in source_names) if source_names else \
            config.vision is not None
    out, gdn = {}, {}
    for name, t in state.items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if cfg.fused_gdn_projections and re.search(r"\.linear_attn\.in_proj_(qkv|z|b|a)\.weight$", name):
            gdn[name] = t
            continue
        base = name.rsplit(".", 1)[0]
        # per-expert 2D tensors where the source stored this layer's experts so (else transformers' fused 3D)
        if base.endswith(".mlp.experts") and hf_name(f"{base}.0.gate_proj.weight", multimodal) in source_names:
            for e in range(t.shape[0]):
                if name.endswith("gate_up_proj"):
                    gate, up = t[e].chunk(2)
                    out[hf_name(f"{base}.{e}.gate_proj.weight", multimodal)] = gate
                    out[hf_name(f"{base}.{e}.up_proj.weight", multimodal)] = up
                else:
                    out[hf_name(f"{base}.{e}.down_proj.weight", multimodal)] = t[e]
            continue
        out[hf_name(name, multimodal)] = t
    for prefix in sorted({n.rsplit(".", 2)[0] for n in gdn}):
        for name, t in fuse_gdn(cfg, prefix, gdn).items():
            out[hf_name(name, multimodal)] = t
    return out


def save_checkpoint(state: dict[str, torch.Tensor], out_dir: str | Path, source_dir: str | Path | None = None,
                    config_json: dict | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write an HF checkpoint directory. With `source_dir`: its config, tokenizer and other small files are copied,
    tensor names and dtypes follow its tensors, and its tensors absent from `state` are copied unchanged. Without
    (a model trained from scratch): `config_json` is written and tensors are saved in `dtype` (default: as given)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if source_dir is None and config_json is None:
        raise ValueError("save_checkpoint needs the source checkpoint or a config.json dict")
    files = checkpoint_files(Path(source_dir)) if source_dir is not None else {}
    config = ModelConfig.from_dir(source_dir) if source_dir is not None else ModelConfig.from_hf(config_json)
    tensors = checkpoint_tensors(state, config, files)
    source_dtypes = {}
    for f in set(files.values()):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                if name in tensors:
                    source_dtypes[name] = st.get_slice(name).get_dtype()
                elif files.get(name) == f:  # set aside by the loader (not in the model): keep as it was
                    tensors[name] = st.get_tensor(name)
    st_dtypes = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
    for name, t in tensors.items():
        want = st_dtypes.get(source_dtypes.get(name), dtype or t.dtype)
        t = t.detach().to("cpu", want).contiguous()
        # safetensors refuses tensors sharing storage (an expert's slice of the 3D tensor): copy only those
        tensors[name] = t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    if source_dir is not None:
        for f in Path(source_dir).iterdir():
            if f.is_file() and f.suffix in COPIED_SUFFIXES and f.name not in NOT_COPIED and f.parent != out_dir:
                shutil.copy(f, out_dir / f.name)
    else:
        (out_dir / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
    return out_dir


def check_adapter_targets(config: ModelConfig, targets) -> None:
    split = sorted({"in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b"} & set(targets))
    if config.text.fused_gdn_projections and split:
        raise ValueError(f"Qwen3-Next stores its GDN input projections fused (in_proj_qkvz, in_proj_ba), so an "
                         f"adapter on {', '.join(split)} has no PEFT equivalent: leave them out of the LoRA targets "
                         "or save the merged model")


def save_adapter(model: nn.Module, out_dir: str | Path, config: ModelConfig, base_model: str | None = None,
                 multimodal: bool | None = None, targets=()) -> Path:
    """The model's LoRA adapters in PEFT's layout: adapter_config.json and adapter_model.safetensors with keys
    `base_model.model.<checkpoint module path>.lora_A.weight` / `.lora_B.weight` (float32)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    wrapped = lora_modules(model)
    if not wrapped:
        raise ValueError("the model has no LoRA adapters to save")
    if multimodal is None:
        multimodal = config.vision is not None
    check_adapter_targets(config, [n.rsplit(".", 1)[-1] for n in wrapped])
    tensors = {}
    for name, m in wrapped.items():
        key = f"base_model.model.{hf_name(name, multimodal)}"
        tensors[f"{key}.lora_A.weight"] = m.lora_A.detach().float().contiguous().clone()
        tensors[f"{key}.lora_B.weight"] = m.lora_B.detach().float().contiguous().clone()
    first = next(iter(wrapped.values()))
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": first.rank, "lora_alpha": first.alpha,
        "lora_dropout": first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0,
        "target_modules": sorted(set(targets) or {n.rsplit(".", 1)[-1] for n in wrapped}),
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "modules_to_save": None, "use_rslora": False, "use_dora": False, "layers_to_transform": None,
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    return out_dir


def save_training_state(model: nn.Module, optimizer, state: dict, ckpt_dir: str | Path) -> Path:
    """Trainable parameters (safetensors) + optimizer state + step, data position, RNG and log (torch.save of
    tensors and plain data only, read back with weights_only=True)."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    weights = {n: p.detach().contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}
    save_file(weights, str(ckpt_dir / WEIGHTS_FILE))
    torch.save({**state, "optimizer": optimizer.state_dict()}, ckpt_dir / STATE_FILE)
    return ckpt_dir


def load_training_state(model: nn.Module, optimizer, ckpt_dir: str | Path) -> dict:
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / STATE_FILE).is_file():
        raise FileNotFoundError(f"{ckpt_dir}: no {STATE_FILE} (not a training checkpoint)")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    weights = load_file(str(ckpt_dir / WEIGHTS_FILE))
    if set(weights) != set(params):
        diff = sorted(set(weights) ^ set(params))[:5]
        raise ValueError(f"{ckpt_dir}: its trainable parameters differ from this run's (e.g. {', '.join(diff)}); "
                         "resume with the same model and LoRA options")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(weights[n])
    state = torch.load(ckpt_dir / STATE_FILE, weights_only=True)
    optimizer.load_state_dict(state.pop("optimizer"))
    return state


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = [(int(m[1]), p) for p in Path(out_dir).glob("checkpoint-*") if (m := re.fullmatch(r"checkpoint-(\d+)",
                                                                                              p.name))]
    return max(found)[1] if found else None
