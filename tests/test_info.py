"""`qwen35 info`: sizes computed from a config agree with the real checkpoint and with the released models."""

import pytest

from qwen35.cli import main
from qwen35.config import ModelConfig
from qwen35.info import model_stats
from qwen35.models.loader import load_model
from qwen35.presets import PRESETS


@pytest.mark.parametrize("kind", ["dense", "moe", "next", "dense_vl"])
def test_counts_equal_the_loaded_checkpoint(checkpoint, kind):
    path, hf = checkpoint(kind)
    model, config, _ = load_model(path, dtype="float32")
    s = model_stats(config)
    vision = sum(p.numel() for p in model.visual.parameters()) if model.visual is not None else 0
    assert (s["params"]["vision"] > 0) == (kind == "dense_vl") and s["params"]["vision"] == vision
    # a tied head counted once; the vision tower counted on its own
    assert s["params"]["total"] + vision == sum(p.numel() for p in model.parameters())
    assert s["params"]["total"] + vision == sum(p.numel() for p in hf.parameters())
    cfg = config.text
    if cfg.num_experts:
        inactive = s["params"]["routed_experts"] * (cfg.num_experts - cfg.num_experts_per_tok) // cfg.num_experts
        assert s["params"]["active"] == s["params"]["total"] - inactive


@pytest.mark.parametrize("name, total, active", [
    ("qwen3.5-0.8b", 0.75e9, 0.75e9), ("qwen3.5-9b", 8.95e9, 8.95e9), ("qwen3.5-27b", 26.9e9, 26.9e9),
    ("qwen3.5-35b-a3b", 35e9, 3.4e9), ("qwen3.5-122b-a10b", 122e9, 9.8e9), ("qwen3.5-397b-a17b", 397e9, 17.3e9),
    ("qwen3-next-80b-a3b", 80e9, 3.9e9),
])
def test_presets_land_on_the_advertised_sizes(name, total, active):
    s = model_stats(ModelConfig.from_hf(PRESETS[name]))
    assert abs(s["params"]["total"] - total) / total < 0.02
    assert abs(s["params"]["active"] - active) / active < 0.05


def test_info_on_a_checkpoint_dir_and_all_presets(checkpoint, capsys):
    path, _ = checkpoint("moe")
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "experts          8 routed, 3 per token" in out and "KV cache" in out
    assert "(routed experts " in out
    assert main(["info", "all", "--json"]) == 0
    assert '"qwen3.5-397b-a17b"' in capsys.readouterr().out


def test_info_says_what_the_counts_cover(capsys):
    assert main(["info", "qwen3.5-0.8b"]) == 0
    out = capsys.readouterr().out
    assert "routed experts" not in out  # dense: no experts to speak of
    assert "active per token (language model)" in out
    assert "  vision tower     100.59M parameters, bf16 0.19 GiB (not in the figures above)" in out
    assert main(["info", "qwen3-next-80b-a3b"]) == 0  # no vision tower: no line for it
    assert "vision tower" not in capsys.readouterr().out


def test_info_prints_each_format_and_a_quantized_checkpoint(checkpoint, tmp_path, capsys):
    import json
    import shutil

    s = model_stats(ModelConfig.from_hf(PRESETS["qwen3.5-397b-a17b"]))["weight_bytes"]
    assert s["int4"] < s["fp8"] < s["int8"] < s["bf16"] and s["int8"] < 1.01 * s["fp8"]
    path, _ = checkpoint("dense")
    shutil.copytree(path, tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True,
                                  "desc_act": False}
    (tmp_path / "q" / "config.json").write_text(json.dumps(cfg))
    assert main(["info", str(tmp_path / "q")]) == 0
    out = capsys.readouterr().out
    assert "  checkpoint       quantized: int4 (GPTQ, group 128)" in out and ", int8 " in out
