"""YaRN long context against transformers 5.23: the frequencies and attention factor bit for bit, float32 logits
and greedy continuations past the original context on tiny dense, MoE and Qwen3-Next models (prefill, the
engine's decode, the CPU backend's fused decode), M-RoPE kept; max_model_len refused past the covered positions;
`qwen35 info`'s long-context lines.

The tiny models use rope_theta 100 and an original context of 32 positions, so that YaRN's ramp falls across
their 4 frequency slots (the real models' 64 slots over 262144 positions) and short sequences go well past it."""

import pytest
import torch

from qwen35 import LLM, SamplingParams
from qwen35.backends.cpu import CpuDecoder
from qwen35.cli import main
from qwen35.config import ConfigError, ModelConfig, TextConfig
from qwen35.engine.llm_engine import EngineError
from qwen35.info import model_stats
from qwen35.models.loader import load_model
from qwen35.ops.rope import inv_freq, rope_cos_sin, yarn_attention_factor, yarn_inv_freq
from qwen35.presets import PRESETS
from tests.test_model_vs_transformers import TOL, hf_logits, our_logits, prompts_of
from tests.tiny_models import run_pieces

ROPE = {"rope_type": "default", "rope_theta": 100.0, "partial_rotary_factor": 0.25, "mrope_section": [2, 1, 1],
        "mrope_interleaved": True}
YARN = {**ROPE, "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
KINDS = ["dense", "moe", "next"]
# each kind with other optional fields, so every one meets the reference somewhere
EXTRA = {"dense": {}, "moe": {"truncate": False, "beta_fast": 8.0, "beta_slow": 0.5},
         "next": {"mscale": 1.0, "mscale_all_dim": 0.5}}


def yarn_checkpoint(checkpoint, kind):
    return checkpoint(kind, rope_parameters={**YARN, **EXTRA[kind]}, max_position_embeddings=128)


def hf_yarn(rope: dict, **kw):
    """transformers' YaRN frequencies and attention factor for a Qwen3.5 text config with these rope parameters."""
    import transformers as tf
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = tf.Qwen3_5TextConfig(rope_parameters=dict(rope), **kw)
    return ROPE_INIT_FUNCTIONS["yarn"](cfg)


@pytest.mark.parametrize("extra", [{}, {"truncate": False}, {"beta_fast": 16, "beta_slow": 2}, {"factor": 2.0},
                                   {"mscale": 0.8, "mscale_all_dim": 0.5}, {"attention_factor": 1.3}])
def test_frequencies_and_attention_factor_equal_transformers(extra):
    """At the real Qwen3.5 shape (64 slots, theta 1e7, 262144 original positions): equal to the last bit."""
    rope = {"rope_type": "yarn", "rope_theta": 1e7, "partial_rotary_factor": 0.25, "mrope_section": [11, 11, 10],
            "mrope_interleaved": True, "factor": 4.0, "original_max_position_embeddings": 262144, **extra}
    ref, ref_factor = hf_yarn(rope, head_dim=256, max_position_embeddings=int(262144 * rope["factor"]))
    text = TextConfig.from_hf({"model_type": "qwen3_5_text", "vocab_size": 8, "hidden_size": 8,
                               "num_hidden_layers": 4, "num_attention_heads": 2, "num_key_value_heads": 2,
                               "intermediate_size": 8, "max_position_embeddings": 262144, "rope_parameters": rope})
    args = vars(text.rope_scaling)
    ours = yarn_inv_freq(text.rotary_dim, text.rope_theta, **args)
    assert torch.equal(ours, ref)
    assert yarn_attention_factor(**args) == ref_factor
    plain = inv_freq(text.rotary_dim, text.rope_theta)
    assert ours[0] == plain[0] and torch.equal(ours[-1], plain[-1] / rope["factor"])  # fast kept, slow stretched
    assert text.max_context_len == int(262144 * rope["factor"])


@pytest.mark.parametrize("kind", KINDS)
def test_prefill_logits_match_transformers_past_the_original_context(checkpoint, kind):
    path, hf = yarn_checkpoint(checkpoint, kind)
    model = load_model(path, dtype="float32")[0]
    rotary = hf.model.rotary_emb
    assert torch.equal(model.model.inv_freq, rotary.inv_freq) and model.model.rope_scale == rotary.attention_scaling
    assert not torch.equal(model.model.inv_freq, inv_freq(8, 100.0)) and model.model.rope_scale > 1
    prompts = prompts_of([120, 50], seed=1)
    for ours, ids in zip(our_logits(model, prompts), prompts):
        torch.testing.assert_close(ours, hf_logits(hf, ids), atol=TOL, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_engine_greedy_decode_matches_transformers(checkpoint, kind):
    """Greedy through the engine (batched decode, paged K/V) picks at every step the token transformers' logits
    rank first for the same prefix, i.e. transformers' greedy generate; checked in one reference forward per
    sequence rather than 40 decode steps."""
    path, hf = yarn_checkpoint(checkpoint, kind)
    llm = LLM(str(path), dtype="float32", skip_tokenizer_init=True)
    assert llm.engine.max_model_len == 128  # YaRN's 32 x 4, the default
    prompts = prompts_of([20, 40], seed=2)  # decode runs from position 20 / 40 to 60 / 80
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=40))
    for p, out in zip(prompts, outs):
        new = list(out.outputs[0].token_ids)
        assert len(new) == 40
        assert hf_logits(hf, p + new)[len(p) - 1:-1].argmax(-1).tolist() == new


@pytest.mark.parametrize("kind", ["dense", "next"])
def test_cpu_backend_fused_decode_matches_transformers(checkpoint, kind):
    """The CPU backend builds its own cos/sin for its fused decode layers: they must be YaRN's too."""
    path, hf = yarn_checkpoint(checkpoint, kind)
    model = CpuDecoder(load_model(path, dtype="float32")[0])
    assert model.fused
    prompts = prompts_of([70, 40], seed=3)
    cuts = [list(range(20, 70)), list(range(10, 40))]  # one token per step from position 20 / 10 on
    for ours, ids in zip(run_pieces(model, prompts, cuts), prompts):
        torch.testing.assert_close(ours, hf_logits(hf, ids), atol=TOL, rtol=0)


def test_yarn_changes_every_mrope_axis_as_transformers(checkpoint):
    """Some engines drop YaRN when M-RoPE is on: distinct T/H/W positions (an image's) must get the stretched
    frequencies and the attention factor on all three axes, as transformers' interleaved M-RoPE does."""
    path, hf = yarn_checkpoint(checkpoint, "dense")
    model = load_model(path, dtype="float32")[0]
    g = torch.Generator().manual_seed(0)
    positions = torch.randint(0, 120, (3, 50), generator=g)
    ref_cos, ref_sin = hf.model.rotary_emb(torch.zeros(1, dtype=torch.float32), positions[:, None, :])
    cos, sin = rope_cos_sin(positions, model.model.inv_freq, model.cfg.mrope_section, torch.float32,
                            model.model.rope_scale)
    torch.testing.assert_close(cos, ref_cos[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(sin, ref_sin[0], atol=1e-6, rtol=0)
    plain, _ = rope_cos_sin(positions, inv_freq(8, 100.0), model.cfg.mrope_section, torch.float32)
    for slot in (1, 2):  # H and W slots of the interleaved layout differ from plain RoPE's
        assert (cos[:, slot] - plain[:, slot]).abs().max() > 0.1


def config(**text):
    return {"model_type": "qwen3_5_text", "vocab_size": 8, "hidden_size": 8, "num_hidden_layers": 4,
            "num_attention_heads": 2, "num_key_value_heads": 2, "intermediate_size": 8,
            "max_position_embeddings": 262144, **text}


def test_config_forms():
    """Qwen's model cards add `rope_scaling` next to `rope_parameters`: its keys win, theta and M-RoPE stay."""
    card = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 262144}
    text = TextConfig.from_hf(config(rope_parameters={**ROPE, "rope_theta": 1e7, "mrope_section": [11, 11, 10]},
                                     rope_scaling=card))
    assert text.rope_theta == 1e7 and text.mrope_section == (11, 11, 10)
    assert text.rope_scaling.factor == 4.0 and text.max_context_len == 1_048_576
    wrapped = ModelConfig.from_hf({"model_type": "qwen3_5", "text_config": config(rope_parameters={**ROPE, **card})})
    assert wrapped.text.rope_scaling == text.rope_scaling
    no_original = TextConfig.from_hf(config(rope_scaling={"type": "yarn", "factor": 2}))  # as transformers
    assert no_original.rope_scaling.original_max_position_embeddings == 262144
    assert TextConfig.from_hf(config(rope_parameters=ROPE)).rope_scaling is None
    with pytest.raises(ConfigError, match=r"config: field 'rope_scaling.rope_type' 'longrope' is not supported"):
        TextConfig.from_hf(config(rope_scaling={"rope_type": "longrope", "factor": 4.0}))
    with pytest.raises(ConfigError, match=r"config.text_config.rope_parameters: required field 'factor' is missing"):
        ModelConfig.from_hf({"model_type": "qwen3_5", "text_config": config(rope_parameters={**ROPE,
                                                                                           "rope_type": "yarn"})})
    with pytest.raises(ConfigError, match=r"field 'factor' must be positive"):
        TextConfig.from_hf(config(rope_scaling={"rope_type": "yarn", "factor": 0}))


def test_max_model_len_past_the_covered_positions_is_refused(checkpoint):
    path, _ = checkpoint("dense")  # plain RoPE, max_position_embeddings 4096
    with pytest.raises(EngineError, match="exceeds the model's max_position_embeddings \\(4096\\); to go further "
                                          "enable YaRN: add \"rope_scaling\": {\"rope_type\": \"yarn\", "
                                          "\"factor\": 4.0, \"original_max_position_embeddings\": 4096} to "
                                          "config.json"):
        LLM(str(path), dtype="float32", skip_tokenizer_init=True, max_model_len=4097)
    path, _ = yarn_checkpoint(checkpoint, "dense")
    with pytest.raises(EngineError, match="max_model_len=129 exceeds the 128 positions YaRN extends this model to"):
        LLM(str(path), dtype="float32", skip_tokenizer_init=True, max_model_len=129)


def test_info_quotes_one_sequence_at_262k_and_1m(checkpoint, capsys):
    s = model_stats(ModelConfig.from_hf(PRESETS["qwen3.5-397b-a17b"]))
    state = s["recurrent_state_bytes_per_sequence"]
    assert s["one_sequence_cache_bytes"] == {"262k": 262144 * s["kv_cache_bytes_per_token"] + state,
                                             "1M": 1048576 * s["kv_cache_bytes_per_token"] + state}
    assert main(["info", "qwen3.5-397b-a17b"]) == 0
    out = capsys.readouterr().out
    assert "  at 262k tokens   7.68 GiB KV cache + state, one sequence\n" in out  # 60 layers, 15 full attention
    assert "  at 1M tokens     30.18 GiB KV cache + state, one sequence; past the model's 262144 positions: " \
           "needs YaRN" in out
    path, _ = yarn_checkpoint(checkpoint, "dense")
    assert main(["info", str(path), "--json"]) == 0
    assert '"max_context_len": 128' in capsys.readouterr().out
