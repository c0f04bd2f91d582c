"""Quantized weights under tensor and expert parallelism. Cutting a quantized weight (`Piece.take`) is exact: it
dequantizes to the cut of the dequantized whole, for rows, experts, column groups, per-row scales and packed int4;
a cut inside a group is refused. End to end, an FP8 checkpoint with EP and a GPTQ checkpoint with TP over 2 gloo
ranks give the single-process quantized model's greedy tokens and logprobs."""

import pytest
import torch

from qwen35 import LLM, SamplingParams
from qwen35.distributed.shard import Piece
from qwen35.quant import quantize
from tests.test_quantized_checkpoints import fp8_checkpoint, gptq_checkpoint
from tests.tiny_models import build

# Widths a 2-way split cuts at the edges of 32-column groups (value dim 4 x 32, o_proj 4 x 32, experts 64).
ALIGNED = dict(linear_value_head_dim=32, moe_intermediate_size=64, shared_expert_intermediate_size=64,
               intermediate_size=128)


@pytest.mark.parametrize("bits, group, has_zeros", [(8, 32, False), (8, None, False), (4, 32, True), (4, 16, False)])
@pytest.mark.parametrize("piece", [
    Piece(0, ((3, 9), (20, 25))),  # rows in two segments (a Gated DeltaNet q | k | v cut)
    Piece(1, ((32, 64),)),  # columns at group edges
    Piece(1, ((0, 32), (96, 128))),  # two column ranges
], ids=["rows", "columns", "two-column-ranges"])
def test_cutting_a_quantized_weight_is_exact(bits, group, has_zeros, piece):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(30, 128, generator=g)
    qw = quantize(w, bits, group, symmetric=not has_zeros if bits == 4 else None)
    if group is None and piece.dim == 1:  # one scale per whole row: the cut keeps it, in one group of its width
        assert piece.take(qw).group == sum(hi - lo for lo, hi in piece.ranges)
    cut = piece.take(qw)
    assert torch.equal(cut.dequantize(), piece.take(qw.dequantize()))


def test_stacked_experts_cut_by_expert_and_by_width():
    qw = quantize(torch.randn(6, 64, 96), 8, 32)
    by_expert = Piece(0, ((2, 5),))
    assert torch.equal(by_expert.take(qw).dequantize(), qw.dequantize()[2:5])
    down = Piece(2, ((32, 96),))  # down_proj [E, H, I]: the rank's intermediate columns
    assert torch.equal(down.take(qw).dequantize(), qw.dequantize()[:, :, 32:96])


@pytest.mark.parametrize("piece, message", [
    (Piece(1, ((0, 48),)), "do not cut at group edges"),
    (Piece(1, ((0, 33),)), "do not cut at group edges"),
])
def test_a_cut_inside_a_group_is_refused(piece, message):
    qw = quantize(torch.randn(8, 128), 4, 32)
    assert not piece.fits_groups((8, 128), 32, 4)
    with pytest.raises(ValueError, match=message):
        piece.take(qw)
    assert Piece(1, ((0, 64),)).fits_groups((8, 128), 32, 4) and Piece(0, ((0, 3),)).fits_groups((8, 128), 32, 4)


def test_a_module_a_rank_cannot_cut_stays_float():
    """int4 in groups of 32 over the tiny model's 96-wide value heads: a 2-way split cuts out_proj's columns at 48."""
    from qwen35.config import ModelConfig
    from qwen35.distributed.shard import ShardPlan
    from qwen35.models.quantized import QuantSpec, local_specs
    from qwen35.models.qwen3_5 import Qwen3_5ForCausalLM
    from tests.tiny_models import BASE

    cfg = ModelConfig.from_hf({"model_type": "qwen3_5_text", **BASE, "intermediate_size": 96}).text
    plan = ShardPlan(cfg, 1, 2)
    with torch.device("meta"):
        whole, local = Qwen3_5ForCausalLM(cfg), Qwen3_5ForCausalLM(plan.local_config())
    names = ["model.layers.0.linear_attn.in_proj_qkv", "model.layers.0.linear_attn.out_proj",
             "model.layers.3.self_attn.o_proj", "model.layers.0.mlp.down_proj"]
    warnings = []
    specs = local_specs(whole, local, {n: QuantSpec(4, (32,), True) for n in names}, plan, warnings.append)
    # rows cut anywhere; o_proj's 128 columns cut at 64; out_proj's 96 and down_proj's 96 at 48: inside a group
    assert set(specs) == {names[0], names[2]}
    assert len(warnings) == 2 and "model.layers.0.linear_attn.out_proj: rank 1's columns" in warnings[0]
    per_row = local_specs(whole, local, {names[1]: QuantSpec(8, (96,))}, plan, warnings.append)
    assert per_row[names[1]].groups == (48,)  # one scale per whole row covers the rank's half


def _compare(path, **tp):
    prompts = [[1, 5, 9, 33, 2, 7], [3, 4, 100, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34]]
    sp = SamplingParams(max_tokens=6, temperature=0, prompt_logprobs=0, logprobs=0)
    ref = LLM(path, dtype="float32", skip_tokenizer_init=True, native_kernels=False)
    want = ref.generate(prompts, sp)
    llm = LLM(path, dtype="float32", skip_tokenizer_init=True, tensor_parallel_size=2, **tp)
    try:
        assert llm.load_report.quantization == ref.load_report.quantization  # the same modules, same formats
        got = llm.generate(prompts, sp)
    finally:
        llm.shutdown()
    for a, b in zip(want, got):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        pa = [next(iter(p.values())).logprob for p in a.prompt_logprobs[1:]]
        pb = [next(iter(p.values())).logprob for p in b.prompt_logprobs[1:]]
        assert pa == pytest.approx(pb, rel=1e-5, abs=1e-5)


def _checkpoint(tmp_path, kind):
    def make(k, **kw):
        d = tmp_path / "src"
        d.mkdir(exist_ok=True)
        return d, build(k, d, **{**ALIGNED, **kw})

    return make


def test_fp8_checkpoint_with_expert_parallelism(tmp_path):
    """Per-expert FP8 weights and their block scales go to the rank holding the expert, under its local index."""
    fp8, _ = fp8_checkpoint(_checkpoint(tmp_path, "moe"), tmp_path, "moe", (32, 32))
    _compare(fp8, enable_expert_parallel=True)


def test_gptq_checkpoint_with_tensor_parallelism(tmp_path):
    """Packed int4 with zero points, cut by rows and at group edges by columns."""
    gptq, _ = gptq_checkpoint(_checkpoint(tmp_path, "dense"), tmp_path, "dense", 32, False)
    _compare(gptq)
