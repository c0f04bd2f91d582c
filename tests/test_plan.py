"""`qwen35 plan`: at one device its figures are `qwen35 info`'s; over 8 and 4 devices the 397B's rank-0 weights, KV
cache and state equal arithmetic written out by hand from the preset's numbers; impossible layouts and bad flags are
clear errors."""

import json
import shutil

import pytest

from qwen35.cli import main
from qwen35.config import ModelConfig
from qwen35.info import GIB, model_stats
from qwen35.plan import parse_memory, plan, rank_share, shard_shape
from qwen35.presets import PRESETS

H200 = 141 * 10**9


def _layout(p, name="TP"):
    return next(lay for lay in p["layouts"] if lay["layout"] == name)


def _assert_equals_info(config):
    info = model_stats(config)
    layouts = ["TP", "TP+EP"] if config.text.num_experts else ["TP"]
    for quantization, fmt in [("none", "bf16"), ("fp8", "fp8"), ("int8", "int8"), ("int4", "int4")]:
        p = plan(config, 1, H200, quantization)
        for name in layouts:
            lay = _layout(p, name)
            assert lay["weight_bytes"] == info["weight_bytes"][fmt], (name, fmt)
            assert lay["vision_bytes"] == 2 * info["params"]["vision"]
            assert lay["kv_cache_bytes_per_token"] == info["kv_cache_bytes_per_token"]
            assert lay["recurrent_state_bytes_per_sequence"] == info["recurrent_state_bytes_per_sequence"]
            assert lay["all_reduce_bytes_per_token"] == lay["all_gather_bytes_per_token"] == 0


@pytest.mark.parametrize("name", ["qwen3.5-0.8b", "qwen3.5-35b-a3b", "qwen3-next-80b-a3b"])
def test_one_gpu_is_info(name):
    _assert_equals_info(ModelConfig.from_hf(PRESETS[name]))


def test_one_gpu_is_info_on_a_checkpoint(checkpoint):
    path, _ = checkpoint("moe")
    _assert_equals_info(ModelConfig.from_dir(path))


def _hand_397b(n):
    """Rank 0's weight bytes of qwen3.5-397b-a17b over n = 4 or 8 ranks (every split even there), grouped as info's
    formats count them: decoder matrices (with their small norms / convs, as info lumps them) may be quantized; the
    embedding, LM head, routers and layer norms stay bf16. Hidden 4096, 60 layers (45 Gated DeltaNet, 15 full
    attention), vocab 248320, 512 experts of intermediate 1024 + a shared expert of 1024."""
    h = 4096
    k, v = 16 // n, 64 // n  # GDN: 16 key / 64 value heads of 128
    conv = 2 * k * 128 + v * 128  # the rank's q, k and v channels
    gdn = conv * h + conv * 4 + v * 128 * h + 2 * v * h + 2 * v + 128 + h * v * 128
    #    in_proj_qkv, conv1d,   in_proj_z,   in_proj_b/a,  A_log/dt_bias, norm, out_proj
    q = 32 // n  # 2 KV heads < n ranks: one KV head per rank, its 16 query heads split over n / 2 ranks
    attn = q * 256 * 2 * h + 2 * 256 * h + h * q * 256 + 2 * 256  # q_proj with its gate, k/v_proj, o_proj, q/k norms
    routed = 512 * 3 * h * (1024 // n)  # TP: every expert at intermediate 1024 / n (EP: 512 / n experts, same count)
    shared = 3 * (1024 // n) * h + h  # shared expert + its replicated gate (info groups the gate with it)
    quantisable = 45 * gdn + 15 * attn + 60 * (routed + shared)
    bf16_kept = 60 * 512 * h + 60 * 2 * h + h + 2 * (248320 // n) * h  # routers, layer norms, final norm, vocab rows
    return {"bf16": 2 * (quantisable + bf16_kept),
            "fp8": quantisable + quantisable * 2 // (128 * 128) + 2 * bf16_kept}


def _hand_vision():
    """The 397B's vision tower (27 blocks of width 1152, MLP 4304, merger 4 x 1152 -> 4096), bf16 bytes."""
    w, m = 1152, 4304
    block = 4 * w + (3 * w * w + 3 * w) + (w * w + w) + (m * w + m) + (w * m + w)
    merger = 2 * w + (4 * w * 4 * w + 4 * w) + (4096 * 4 * w + 4096)
    return 2 * ((w * 3 * 2 * 16 * 16 + w) + 2304 * w + 27 * block + merger)


@pytest.fixture(scope="module")
def config_397b():
    return ModelConfig.from_hf(PRESETS["qwen3.5-397b-a17b"])


@pytest.mark.parametrize("gpus, quantization, fits", [(8, "none", True), (8, "fp8", True), (4, "none", False),
                                                       (4, "fp8", True)])
def test_397b_matches_hand_arithmetic(config_397b, gpus, quantization, fits):
    p = plan(config_397b, gpus, parse_memory("141GB"), quantization, context=32768)
    fmt = "bf16" if quantization == "none" else "fp8"
    weights, vision = _hand_397b(gpus)[fmt], _hand_vision()
    kv = 15 * 2 * 1 * 256 * 2  # one KV head per rank
    k, v = 16 // gpus, 64 // gpus
    state = 45 * ((2 * k * 128 + v * 128) * 3 * 2 + v * 128 * 128 * 4)  # bf16 conv history + fp32 state
    free = int(141e9 * 0.9) - 2 * GIB - weights - vision
    assert (free > 32768 * kv + state) == fits
    for name in ("TP", "TP+EP"):
        lay = _layout(p, name)
        assert lay["weight_bytes"] == weights and lay["vision_bytes"] == vision
        assert lay["kv_cache_bytes_per_token"] == kv == 15360
        assert lay["recurrent_state_bytes_per_sequence"] == state
        assert lay["free_bytes"] == free and lay["fits"] == fits
        assert lay["max_sequences"] == max(free, 0) // (32768 * kv + state)
        assert lay["all_reduce_bytes_per_token"] == (2 * 60 + 1) * 4096 * 2
        assert lay["all_gather_bytes_per_token"] == 248320 * 2
    assert p["recommended"] == ("TP+EP" if fits else None)  # a tie on memory: whole experts per rank


def test_397b_figures_as_quoted(config_397b):
    """The headline numbers the docs quote, so a change to them is noticed."""
    bf16, fp8 = _hand_397b(8)["bf16"], _hand_397b(8)["fp8"]
    assert f"{bf16 / GIB:.2f} {fp8 / GIB:.2f}" == "92.53 46.63"
    p = plan(config_397b, 8, H200, "fp8")
    assert _layout(p, "TP+EP")["max_sequences"] == 139 and _layout(p, "TP")["rank_share"]["kv_replicas"] == 4


def test_uneven_splits_and_replication():
    cfg = ModelConfig.from_hf(PRESETS["qwen3.5-27b"]).text  # 24 q / 4 KV heads, GDN 16 k / 48 v heads
    s, shard_plan = rank_share(cfg, 3, "TP")  # rank 0 takes the remainder of every uneven split
    assert (s.k_heads, s.v_heads, s.kv_heads, s.kv_replicas, s.q_heads) == (6, 18, 2, 1, 12)
    assert (s.vocab, s.intermediate) == (82774, 5803)  # 248320 = 3 * 82773 + 1; 17408 = 3 * 5802 + 2
    shard = shard_shape(shard_plan)
    assert shard("model.layers.0.linear_attn.in_proj_qkv.weight", (8192, 5120)) == (2 * 6 * 128 + 18 * 128, 5120)
    assert shard("model.layers.3.self_attn.o_proj.weight", (5120, 6144)) == (5120, 12 * 256)
    assert shard("model.layers.0.mlp.down_proj.weight", (5120, 17408)) == (5120, 5803)
    s, _ = rank_share(cfg, 8, "TP")  # 4 KV heads over 8 ranks: each on 2 ranks, its 6 query heads split 3 + 3
    assert (s.kv_heads, s.kv_replicas, s.q_heads) == (1, 2, 3)


@pytest.mark.parametrize("name, gpus, why", [
    ("qwen3.5-397b-a17b", 32, "it has 16 Gated DeltaNet key heads, fewer than the ranks"),
    ("qwen3.5-27b", 6, "its 4 key/value heads are fewer than the ranks and the ranks are not a multiple of them"),
    ("qwen3.5-0.8b", 16, "each of its 2 key/value heads serves 4 query heads, fewer than the 8 ranks"),
])
def test_impossible_layouts_say_why(name, gpus, why):
    with pytest.raises(ValueError, match=why):
        plan(ModelConfig.from_hf(PRESETS[name]), gpus, H200)


def test_dense_model_has_no_expert_parallel_layout():
    p = plan(ModelConfig.from_hf(PRESETS["qwen3.5-0.8b"]), 2, H200)
    ep = _layout(p, "TP+EP")
    assert not ep["possible"] and "no routed experts" in ep["reason"] and p["recommended"] == "TP"


@pytest.mark.parametrize("text, n", [("141GB", 141 * 10**9), ("131GiB", 131 * 2**30), ("80", 80 * 2**30),
                                     ("79.5gib", int(79.5 * 2**30))])
def test_gpu_memory_sizes(text, n):
    assert parse_memory(text) == n


@pytest.mark.parametrize("text", ["lots", "0", "-5GB", "12TB", "GB", ""])
def test_gpu_memory_garbage_is_rejected(text):
    with pytest.raises(ValueError, match="--gpu-memory .*141GB"):
        parse_memory(text)


def test_cli_prints_and_json_parses(capsys):
    assert main(["plan", "qwen3.5-397b-a17b", "--gpus", "8", "--quantization", "fp8"]) == 0
    out = capsys.readouterr().out
    assert "  recommended      TP+EP: --tensor-parallel-size 8 --enable-expert-parallel" in out
    assert "    weights        46.63 GiB fp8 + vision tower 0.85 GiB bf16 (rank 0 only)" in out
    assert "2.00 GiB for activations and workspace" in out and "139 sequences of 32768 tokens -> fits" in out
    assert main(["plan", "qwen3.5-397b-a17b", "--gpus", "4", "--gpu-memory", "141GB", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["gpus"] == 4 and p["weight_format"] == "bf16" and p["recommended"] is None
    assert [lay["fits"] for lay in p["layouts"]] == [False, False]


def test_cli_on_a_checkpoint_takes_its_quantization(checkpoint, tmp_path, capsys):
    path, _ = checkpoint("moe")
    assert main(["plan", str(path), "--gpus", "2", "--gpu-memory", "1", "--context", "64", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["weight_format"] == "bf16"
    shutil.copytree(path, tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True,
                                  "desc_act": False}
    (tmp_path / "q" / "config.json").write_text(json.dumps(cfg))
    assert main(["plan", str(tmp_path / "q"), "--gpus", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["weight_format"] == "int4"


@pytest.mark.parametrize("argv, message", [
    (["--gpus", "8", "--gpu-memory", "lots"], "qwen35 plan: error: --gpu-memory 'lots'"),
    (["--gpus", "32"], "qwen35 plan: error: cannot split this qwen3_5_moe_text model over 32 ranks: it has 16 Gated "
                                           "DeltaNet key heads"),
    (["--gpus", "8", "--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization must be in (0, 1]"),
])
def test_cli_errors(argv, message, capsys):
    assert main(["plan", "qwen3.5-397b-a17b", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--gpus", "0"], ["--gpus", "8", "--quantization", "fp4"], []])
def test_cli_usage_errors(argv):
    with pytest.raises(SystemExit) as e:
        main(["plan", "qwen3.5-397b-a17b", *argv])
    assert e.value.code == 2
