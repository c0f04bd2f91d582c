"""Strict loading: every way a checkpoint or config can be broken gives an error naming the tensor, file or field."""

import json
import re
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen35.config import ConfigError, ModelConfig
from qwen35.models.loader import CheckpointError, load_model


@pytest.fixture
def moe_copy(checkpoint, tmp_path):
    src, _ = checkpoint("moe")
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def rewrite(path, fn):
    tensors = load_file(str(path / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def test_missing_tensor(moe_copy):
    rewrite(moe_copy, lambda t: t.pop("model.layers.3.self_attn.q_norm.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.3\.self_attn\.q_norm\.weight"):
        load_model(moe_copy)


def test_missing_expert(moe_copy):
    rewrite(moe_copy, lambda t: t.pop("model.layers.1.mlp.experts.5.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.experts\.5\.up_proj\.weight"):
        load_model(moe_copy)


def test_unexpected_tensor(moe_copy):
    rewrite(moe_copy, lambda t: t.update({"model.layers.0.self_attn.q_proj.weight": torch.zeros(4, 4)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.layers\.0\.self_attn\.q_proj\.weight"):
        load_model(moe_copy)


def test_unknown_prefix(moe_copy):
    rewrite(moe_copy, lambda t: t.update({"encoder.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor encoder\.weight"):
        load_model(moe_copy)


def test_wrong_shape(moe_copy):
    def shrink(t):
        t["model.layers.0.linear_attn.in_proj_z.weight"] = t["model.layers.0.linear_attn.in_proj_z.weight"][:-1]
    rewrite(moe_copy, shrink)
    with pytest.raises(CheckpointError, match=r"in_proj_z\.weight has shape \[95, 64\], expected \[96, 64\]"):
        load_model(moe_copy)


def test_wrong_expert_shape(moe_copy):
    def bad(t):
        t["model.layers.2.mlp.experts.0.down_proj.weight"] = torch.zeros(64, 31)
    rewrite(moe_copy, bad)
    with pytest.raises(CheckpointError, match=r"experts\.0\.down_proj\.weight has shape \[64, 31\]"):
        load_model(moe_copy)


def test_truncated_file(moe_copy):
    f = moe_copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated or corrupt"):
        load_model(moe_copy)


def test_corrupt_header(moe_copy):
    f = moe_copy / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"garbage!!!!!"
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_model(moe_copy)


def test_missing_shard(checkpoint, tmp_path):
    src, _ = checkpoint("moe", seed=7, max_shard_size="40KB")
    dst = tmp_path / "sharded"
    shutil.copytree(src, dst)
    victim = sorted(dst.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=rf"shard {victim.name} .* is missing"):
        load_model(dst)


def test_pickle_weights_refused(tmp_path, checkpoint):
    src, _ = checkpoint("dense")
    shutil.copy(src / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match=r"pickle.*pytorch_model\.bin|pytorch_model\.bin.*never unpickles"):
        load_model(tmp_path)


def test_tied_checkpoint_has_no_lm_head(checkpoint):
    from safetensors import safe_open

    src, _ = checkpoint("dense")
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    model = load_model(src, dtype="float32")[0]
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_fused_expert_layout_loads_like_per_expert(checkpoint, tmp_path):
    """BF16 releases store experts as fused 3D tensors; transformers' save_pretrained writes per-expert 2D ones."""
    src, _ = checkpoint("moe")
    ref = load_model(src, dtype="float32")[0]
    tensors = load_file(str(src / "model.safetensors"))
    fused = {}
    for i in range(4):
        base = f"model.layers.{i}.mlp.experts"
        fused[f"{base}.gate_up_proj"] = torch.stack([
            torch.cat([tensors.pop(f"{base}.{e}.gate_proj.weight"), tensors.pop(f"{base}.{e}.up_proj.weight")])
            for e in range(8)])
        fused[f"{base}.down_proj"] = torch.stack([tensors.pop(f"{base}.{e}.down_proj.weight") for e in range(8)])
    mm = {("model.language_model." + k[len("model."):] if k.startswith("model.") else k): v
          for k, v in {**tensors, **fused}.items()}
    save_file(mm, str(tmp_path / "model.safetensors"))
    shutil.copy(src / "config.json", tmp_path / "config.json")
    model = load_model(tmp_path, dtype="float32")[0]
    for (name, a), b in zip(ref.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.pop("hidden_size"), r"required field 'hidden_size' is missing"),
    (lambda c: c.update(num_key_value_heads=3),
     r"'num_attention_heads' \(4\) is not a multiple of 'num_key_value_heads' \(3\)"),
    (lambda c: c.update(linear_num_value_heads=5), r"'linear_num_value_heads' \(5\) is not a multiple"),
    (lambda c: c.update(model_type="llama"), r"unknown model_type 'llama'"),
    (lambda c: c.update(layer_types=["linear_attention"] * 3),
     r"'layer_types' has 3 entries but num_hidden_layers is 4"),
    (lambda c: c.update(layer_types=["linear_attention"] * 3 + ["sliding"]), r"'layer_types\[3\]' is 'sliding'"),
    (lambda c: c.update(hidden_size="64"), r"field 'hidden_size' must be int"),
    (lambda c: c.update(num_experts_per_tok=9), r"'num_experts_per_tok' \(9\) exceeds 'num_experts' \(8\)"),
    (lambda c: c.update(rope_parameters={"rope_type": "longrope", "factor": 4.0}),
     r"field 'rope_parameters.rope_type' 'longrope' is not supported"),
    (lambda c: c.update(quantization_config={"quant_method": "awq"}), r"quant_method 'awq' is not supported"),
])
def test_broken_config(moe_copy, edit, message):
    cfg = json.loads((moe_copy / "config.json").read_text())
    edit(cfg)
    (moe_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=message):
        load_model(moe_copy)


def test_config_not_json(moe_copy):
    (moe_copy / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config\.json: not valid JSON"):
        load_model(moe_copy)


def test_config_parsing_rules():
    base = {"model_type": "qwen3_5_text", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 6,
            "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 16, "head_dim": 8,
            "some_future_key": {"x": 1}}
    cfg = ModelConfig.from_hf(base).text
    assert cfg.layer_types == ("linear_attention",) * 3 + ("full_attention",) + ("linear_attention",) * 2
    assert (cfg.rope_theta, cfg.partial_rotary_factor) == (10_000.0, 0.25)  # HF defaults
    cfg = ModelConfig.from_hf({**base, "full_attention_interval": 2, "rope_theta": 5e5}).text
    assert cfg.layer_types == ("linear_attention", "full_attention") * 3 and cfg.rope_theta == 5e5
    explicit = ["full_attention"] * 2 + ["linear_attention"] * 4
    assert ModelConfig.from_hf({**base, "layer_types": explicit, "full_attention_interval": 4}).text.layer_types \
        == tuple(explicit)
    wrapper = {"model_type": "qwen3_5", "text_config": {**base, "tie_word_embeddings": True}}
    assert ModelConfig.from_hf(wrapper).tie_word_embeddings  # falls back to text_config
    assert not ModelConfig.from_hf({**wrapper, "tie_word_embeddings": False}).tie_word_embeddings  # top level wins
    with pytest.raises(ConfigError, match=r"config\.text_config: required field 'vocab_size'"):
        ModelConfig.from_hf({"model_type": "qwen3_5",
                             "text_config": {k: v for k, v in base.items() if k != "vocab_size"}})


def edit_config(path, fn):
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg.get("text_config", cfg), cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def layers(text_config, n):
    text_config.pop("layer_types", None)
    text_config["num_hidden_layers"] = n


@pytest.mark.parametrize("edit, message", [
    (lambda t, c: layers(t, 10**7), r"'num_hidden_layers' is 10000000, more than 65536"),
    (lambda t, c: layers(t, 60_000), r"'num_hidden_layers' is 60000 but the checkpoint holds 4 layers"),
    (lambda t, c: layers(t, 3), r"'num_hidden_layers' is 3 but the checkpoint holds 4 layers"),
    (lambda t, c: t.update(num_experts=10**6), r"'num_experts' is 1000000 but .*layer"),
    (lambda t, c: t.update(vocab_size=10**12), r"'vocab_size' is 1000000000000 but embed_tokens\.weight has shape"),
    (lambda t, c: t.update(head_dim=2**26), r"'head_dim' is 67108864 but layer 3's k_proj\.weight has shape"),
])
def test_config_sizes_checked_against_tensors(moe_copy, edit, message):
    """Sizes a hostile config inflates are refused before any module is built or memory allocated."""
    edit_config(moe_copy, edit)
    start = time.monotonic()
    with pytest.raises((ConfigError, CheckpointError), match=message):
        load_model(moe_copy)
    assert time.monotonic() - start < 5


def test_vision_depth_checked_against_tensors(checkpoint, tmp_path):
    src, _ = checkpoint("dense_vl")
    shutil.copytree(src, tmp_path / "vl")
    edit_config(tmp_path / "vl", lambda t, c: c["vision_config"].update(depth=10**7))
    start = time.monotonic()
    with pytest.raises(CheckpointError, match=r"'vision_config\.depth' is 10000000 but the checkpoint holds 1 blocks"):
        load_model(tmp_path / "vl")
    assert time.monotonic() - start < 5
    load_model(tmp_path / "vl", vision=False)  # a tower that is set aside is not checked


@pytest.mark.parametrize("dtype, message", [
    (torch.int16, r"dtype I16, which qwen35 cannot load here \(the model's weights are floating point"),
    (torch.int32, r"dtype I32"), (torch.int64, r"dtype I64"), (torch.uint8, r"dtype U8"), (torch.bool, r"dtype BOOL"),
    (torch.float8_e4m3fn, r"dtype F8_E4M3, which qwen35 cannot load here \(FP8 and integer tensors belong only to"),
])
def test_non_float_dtype_refused(moe_copy, dtype, message):
    name = "model.layers.0.linear_attn.in_proj_z.weight"

    def retype(t):
        w = t[name].to(torch.bfloat16)
        t[name] = w.view(dtype) if dtype.itemsize == 2 else w.to(dtype)  # I16: the bf16 bits, declared I16
    rewrite(moe_copy, retype)
    with pytest.raises(CheckpointError, match=rf"tensor {re.escape(name)} has {message}"):
        load_model(moe_copy)


def test_float_dtypes_load(moe_copy):
    name = "model.layers.0.linear_attn.in_proj_z.weight"
    ref = load_model(moe_copy, dtype="float32")[0].state_dict()[name]
    rewrite(moe_copy, lambda t: t.update({name: t[name].to(torch.float64)}))
    assert torch.equal(load_model(moe_copy, dtype="float32")[0].state_dict()[name], ref)
