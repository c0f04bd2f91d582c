"""Quantized weights in: FP8 block checkpoints and GPTQ-Int4 checkpoints built from tiny models the way the releases
store them, and load-time int8 / int4 of a float checkpoint. Each is checked against transformers running the
dequantized weights (float32, 1e-4 as the parity tests) or against our model holding the dequantized weights."""

import json
import math
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qwen35.backends.cpu import CpuDecoder, library
from qwen35.config import ConfigError
from qwen35.layers.quant import QuantExperts, QuantLinear
from qwen35.models.batch import ForwardBatch, SeqChunk
from qwen35.models.loader import CheckpointError, load_model
from qwen35.models.quantized import CHECKPOINT_QUANTIZED, not_converted
from qwen35.quant import fp8_block_dequantize, from_fp8_block, from_gptq

TOL = 1e-4
PROMPTS = [[3, 17, 99, 5, 42, 7, 150, 1, 8, 64, 33, 2, 120], [11, 12, 13, 14, 90, 91]]


def read_all(path):
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def write(path, tensors, config_src, quantization_config=None):
    path.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((config_src / "config.json").read_text())
    if quantization_config is not None:
        cfg["quantization_config"] = quantization_config
    (path / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(path / "model.safetensors"))
    return path


def hf_logits(path, prompts):
    import transformers as tf

    hf = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return [hf(torch.tensor([p])).logits[0] for p in prompts]


def our_logits(model, prompts):
    batch = ForwardBatch.build([SeqChunk(p, want_logits="all") for p in prompts])
    with torch.no_grad():
        return list(model.compute_logits(model(batch.input_ids, batch)[batch.logits_indices]).split(
            [len(p) for p in prompts]))


def quantized_names(tensors, skip=()):
    return [k for k in tensors if k.endswith(".weight") and CHECKPOINT_QUANTIZED.match(k[:-7])
            and not not_converted(k[:-7], skip)]


def to_fp8(w, block):
    """The release's recipe: per block, scale = amax / 448, fp8 = w / scale; weight_scale_inv = scale."""
    bn, bk = block
    n, k = w.shape
    gn, gk = math.ceil(n / bn), math.ceil(k / bk)
    padded = torch.zeros(gn * bn, gk * bk)
    padded[:n, :k] = w
    amax = padded.reshape(gn, bn, gk, bk).abs().amax((1, 3))
    scale = torch.where(amax > 0, amax / 448, 1.0)
    fp8 = (w / scale.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]).to(torch.float8_e4m3fn)
    return fp8, scale.float()


def fp8_checkpoint(checkpoint, tmp_path, kind, block, src=None, scale_dtype=torch.float32):
    """(fp8 dir, float dir with the dequantized weights). modules_to_not_convert as Qwen lists them (embedding,
    head, mtp.fc) plus one decoder linear, which must stay float. src: another float checkpoint dir to convert;
    scale_dtype: the scales' dtype (F32 in DeepSeek-style files, BF16 in some Qwen ones)."""
    src = src or checkpoint(kind)[0]
    tensors = read_all(src)
    skip = ["lm_head", "model.embed_tokens", "mtp.fc", "model.layers.2.mlp.shared_expert.up_proj",
            "model.layers.1.linear_attn.out_proj"]
    fp8, deq = dict(tensors), dict(tensors)
    for name in quantized_names(tensors, skip):
        w8, s = to_fp8(tensors[name], block)
        s = s.to(scale_dtype)
        fp8[name], fp8[name + "_scale_inv"] = w8, s
        deq[name] = fp8_block_dequantize(w8, s, block)
    qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block),
          "modules_to_not_convert": skip}
    return write(tmp_path / "fp8", fp8, src, qc), write(tmp_path / "deq", deq, src)


@pytest.mark.parametrize("kind", ["dense", "moe", "next"])
def test_fp8_checkpoint_dequantized_matches_transformers(checkpoint, tmp_path, kind):
    scale_dtype = torch.bfloat16 if kind == "moe" else torch.float32
    fp8_dir, deq_dir = fp8_checkpoint(checkpoint, tmp_path, kind, (32, 32), scale_dtype=scale_dtype)
    ref = hf_logits(deq_dir, PROMPTS)
    model, _, report = load_model(fp8_dir, dtype="float32", quantization="none")
    assert report.checkpoint_format == "fp8 (e4m3, 32x32 blocks)" and report.quantization == "none"
    assert not any(isinstance(m, (QuantLinear, QuantExperts)) for m in model.modules())
    for ours, theirs in zip(our_logits(model, PROMPTS), ref):
        assert theirs.abs().max() > 1.0
        torch.testing.assert_close(ours, theirs, atol=TOL, rtol=0)


@pytest.mark.parametrize("kind, block", [("moe", (32, 32)), ("dense", (128, 128))])
def test_fp8_checkpoint_runs_as_int8(checkpoint, tmp_path, kind, block):
    fp8_dir, deq_dir = fp8_checkpoint(checkpoint, tmp_path, kind, block)
    model, _, report = load_model(fp8_dir, dtype="float32")
    assert "int8" in report.quantization and report.quantization.endswith("from fp8 (e4m3, "
                                                                        f"{block[0]}x{block[1]} blocks)")
    assert isinstance(model.lm_head, QuantLinear)  # auto: the head int8 too
    assert isinstance(model.model.layers[0].linear_attn.in_proj_qkv, QuantLinear)
    assert not isinstance(model.model.layers[1].linear_attn.out_proj, QuantLinear)  # modules_to_not_convert
    assert not isinstance(model.model.layers[0].linear_attn.in_proj_a, QuantLinear)
    ref = hf_logits(deq_dir, PROMPTS)
    # Requantizing an fp8 group to int8 rounds each weight by at most max|w| / 254 of its (row, group) unless the
    # group is exact (see from_fp8_block), a relative change of <= 0.4%. The tiny random models are sensitive:
    # 0.3% random noise on every matrix moves their logits (~3) by ~0.17; measured here 0.11 (moe, 32x32 blocks)
    # to 0.63 (dense, 128x128 blocks: one block per matrix, groups of whole rows).
    for ours, theirs in zip(our_logits(model, PROMPTS), ref):
        assert (ours - theirs).abs().max() < 1.0
        assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() >= 0.8


def test_fp8_mtp_head_is_dequantized_and_shards_are_joined(checkpoint, tmp_path):
    """The released FP8 checkpoints quantize the MTP layer's projections: the head stays float (dequantized). A
    weight and its scale in different shards load as in one file."""
    from tests.test_mtp import mtp_checkpoint

    src, _ = mtp_checkpoint("dense", checkpoint, tmp_path)
    fp8_dir, _ = fp8_checkpoint(checkpoint, tmp_path, "dense", (32, 32), src=src)
    tensors = read_all(fp8_dir)
    model = load_model(fp8_dir, dtype="float32", mtp=True)[0]
    q = model.mtp.layers[0].self_attn.q_proj
    assert isinstance(q, torch.nn.Linear) and isinstance(model.model.layers[3].self_attn.q_proj, QuantLinear)
    want = fp8_block_dequantize(tensors["mtp.layers.0.self_attn.q_proj.weight"],
                                tensors["mtp.layers.0.self_attn.q_proj.weight_scale_inv"], (32, 32))
    assert torch.equal(q.weight, want)
    # two shards: every weight_scale_inv in the second, its weight in the first
    shards = {"a.safetensors": {k: v for k, v in tensors.items() if not k.endswith("_scale_inv")},
              "b.safetensors": {k: v for k, v in tensors.items() if k.endswith("_scale_inv")}}
    (fp8_dir / "model.safetensors").unlink()
    for fname, part in shards.items():
        save_file(part, str(fp8_dir / fname))
    index = {"weight_map": {k: f for f, part in shards.items() for k in part}}
    (fp8_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    sharded = load_model(fp8_dir, dtype="float32", mtp=True)[0]
    for (name, a), (_, b) in zip(model.state_dict().items(), sharded.state_dict().items()):
        assert torch.equal(a, b), name


def test_fp8_to_int8_is_exact_when_representable():
    g = torch.Generator().manual_seed(0)
    ints = torch.randint(-15, 16, (64, 256), generator=g).float() * 4  # fp8-exact integers, |q| <= 60
    ints[:, 128:] = torch.randint(-127, 128, (64, 128), generator=g).float() / 8  # not all fp8: rounded
    w8 = ints.to(torch.float8_e4m3fn)
    scale_inv = torch.rand(1, 2, generator=g) + 0.5
    qw = from_fp8_block(w8, scale_inv)
    assert qw.group == 128 and qw.q.dtype == torch.int8
    ref = fp8_block_dequantize(w8, scale_inv)
    assert torch.equal(qw.dequantize()[:, :128], ref[:, :128])  # exact groups stay bit-exact
    err = (qw.dequantize() - ref).abs().amax(1) / ref.abs().amax(1)
    assert err.max() <= 1 / 254 + 1e-6


def gptq_pack(q, z, s, group, sym):
    """GPTQ v1 tensors from integers q [N, K] in 0..15, stored zeros z [N, K // group] (zero point - 1 in v1),
    scales s [N, K // group] fp16: qweight int32 [K/8, N] packed along K, qzeros [K/G, N/8] packed along N."""
    def pack(x):  # [..., 8] of 4-bit values -> int32
        v = (x.long() << (4 * torch.arange(8))).sum(-1)
        return torch.where(v >= 2**31, v - 2**32, v).to(torch.int32)

    n, k = q.shape
    qweight = pack(q.t().reshape(k // 8, 8, n).transpose(1, 2))  # [K/8, N]
    qzeros = pack(z.t().reshape(z.shape[1], n // 8, 8))  # [ceil(K/G), N/8]
    return dict(qweight=qweight, qzeros=qzeros, scales=s.t().contiguous(),
                g_idx=(torch.arange(k) // group).to(torch.int32))


def test_gptq_unpack_is_bit_exact():
    g = torch.Generator().manual_seed(1)
    n, k, group = 48, 256, 128
    q = torch.randint(0, 16, (n, k), generator=g)
    z = torch.randint(0, 16, (n, k // group), generator=g)
    z[0, 0] = 15  # v1's stored 15: zero point 16
    s = (torch.rand(n, k // group, generator=g) * 0.05 + 1e-3).half()
    t = gptq_pack(q, z, s, group, sym=False)
    qw = from_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, group, sym=False)
    # GPTQ's own dequantization, by the definition: w[n, k] = (q - (z + 1)) * s of k's group
    ref = (q - (z + 1).repeat_interleave(group, 1)).float() * s.float().repeat_interleave(group, 1)
    assert qw.group == 128 and torch.equal(qw.dequantize(), ref)
    assert torch.equal(qw.dequantize(torch.float16), ref.half())  # = GPTQ's fp16 maths (one rounding)
    assert torch.equal(from_gptq(t["qweight"], t["qzeros"], t["scales"], None, 4, group, sym=False,
                                 group=32).dequantize(), ref)
    v2 = from_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, group, sym=False, zero_offset=0)
    assert torch.equal(v2.dequantize(), (q - z.repeat_interleave(group, 1)).float()
                       * s.float().repeat_interleave(group, 1))
    sym = gptq_pack(q, torch.full_like(z, 7), s, group, sym=True)
    qs = from_gptq(sym["qweight"], sym["qzeros"], sym["scales"], sym["g_idx"], 4, group, sym=True)
    assert qs.zeros is None and torch.equal(qs.dequantize(), (q - 8).float() * s.float().repeat_interleave(group, 1))
    with pytest.raises(ValueError, match="act-order"):
        from_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"].flip(0), 4, group, sym=False)
    with pytest.raises(ValueError, match="zero points are not all 7"):
        from_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, group, sym=True)


def gptq_checkpoint(checkpoint, tmp_path, kind, group, sym):
    src, _ = checkpoint(kind)
    tensors = read_all(src)
    skip = ["lm_head", "model.embed_tokens"]
    gq, deq = dict(tensors), dict(tensors)
    for name in quantized_names(tensors, skip):
        w = tensors[name]
        n, k = w.shape
        kp = -(-k // group) * group  # GPTQ's last group may be partial: its statistics over the columns present
        wg = torch.nn.functional.pad(w, (0, kp - k)).reshape(n, kp // group, group)
        if sym:
            s = (wg.abs().amax(-1) / 7).half()
            z = torch.full(s.shape, 7)
        else:
            lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
            s = ((hi - lo) / 15).half()
            z = torch.round(-lo / s.float()).clamp(1, 16) - 1
        sf = s.float().repeat_interleave(group, 1)[:, :k]
        zf = (z + 1).repeat_interleave(group, 1)[:, :k]
        q = torch.round(w / sf + zf).clamp(0, 15)
        mod = name[:-len(".weight")]
        del gq[name]
        gq.update({f"{mod}.{part}": t for part, t in gptq_pack(q.long(), z.long(), s, group, sym).items()})
        deq[name] = (q - zf) * sf
    qc = {"quant_method": "gptq", "bits": 4, "group_size": group, "sym": sym, "desc_act": False,
          "modules_to_not_convert": skip}
    return write(tmp_path / "gptq", gq, src, qc), write(tmp_path / "deq", deq, src)


@pytest.mark.parametrize("kind, group, sym", [("moe", 32, True), ("dense", 32, False), ("next", 128, False)])
def test_gptq_checkpoint_matches_transformers_on_the_dequantized_model(checkpoint, tmp_path, kind, group, sym):
    gptq_dir, deq_dir = gptq_checkpoint(checkpoint, tmp_path, kind, group, sym)
    ref = hf_logits(deq_dir, PROMPTS)
    model, _, report = load_model(gptq_dir, dtype="float32", lm_head_quantization="none")
    assert report.checkpoint_format == f"int4 (GPTQ, group {group}{'' if sym else ', zero points'})"
    assert report.quantization.startswith("int4 (")
    q_proj = model.model.layers[3].self_attn.q_proj
    assert isinstance(q_proj, QuantLinear) and q_proj.bits == 4 and (q_proj.zeros is None) == sym
    gdn = model.model.layers[0].linear_attn  # Qwen3-Next's fused in_proj_qkvz: split, both parts int4, exact
    assert isinstance(gdn.in_proj_qkv, QuantLinear) and isinstance(gdn.in_proj_z, QuantLinear)
    if kind == "next":
        from qwen35.models.qwen3_next import split_fused_gdn

        name = "model.layers.0.linear_attn.in_proj_qkvz.weight"
        want = split_fused_gdn(model.cfg, name, read_all(deq_dir)[name])
        for part in ("in_proj_qkv", "in_proj_z"):
            got = getattr(gdn, part).quantized.dequantize()
            assert torch.equal(got, want[f"model.layers.0.linear_attn.{part}.weight"])
    for ours, theirs in zip(our_logits(model, PROMPTS), ref):
        assert theirs.abs().max() > 1.0
        torch.testing.assert_close(ours, theirs, atol=TOL, rtol=0)
    floats = load_model(gptq_dir, dtype="float32", quantization="none")[0]
    assert not any(isinstance(m, QuantLinear) for m in floats.modules())
    for ours, theirs in zip(our_logits(floats, PROMPTS), ref):
        torch.testing.assert_close(ours, theirs, atol=TOL, rtol=0)


def dequantized_copy(quant_model, float_model):
    """float_model's weights replaced by quant_model's dequantized ones."""
    with torch.no_grad():
        for name, m in quant_model.named_modules():
            if isinstance(m, QuantLinear):
                float_model.get_submodule(name).weight = torch.nn.Parameter(m.quantized.dequantize())
            elif isinstance(m, QuantExperts):
                f = float_model.get_submodule(name)
                f.gate_up_proj = torch.nn.Parameter(m.gate_up_proj.dequantize())
                f.down_proj = torch.nn.Parameter(m.down_proj.dequantize())
    return float_model


@pytest.mark.parametrize("kind, quantization", [("dense", "int8"), ("moe", "int8"), ("next", "int4"), ("moe", "int4")])
def test_load_time_quantization_is_the_model_on_dequantized_weights(checkpoint, kind, quantization):
    path, _ = checkpoint(kind)
    model, _, report = load_model(path, dtype="float32", quantization=quantization)
    assert report.checkpoint_format == "float" and report.quantization.endswith("from float")
    floats = load_model(path, dtype="float32")[0]
    ref = our_logits(floats, PROMPTS)
    layer = model.model.layers[0]
    assert isinstance(layer.linear_attn.in_proj_qkv, QuantLinear) and isinstance(model.lm_head, QuantLinear)
    assert not isinstance(layer.linear_attn.in_proj_b, QuantLinear)
    if kind != "dense":
        assert isinstance(layer.mlp.experts, QuantExperts)
        assert not isinstance(layer.mlp.shared_expert_gate, QuantLinear)
    if kind == "dense":  # a tied head quantized: the embedding keeps the checkpoint's floats
        assert torch.equal(model.model.embed_tokens.weight, floats.model.embed_tokens.weight)
    deq = dequantized_copy(model, floats)
    for ours, same, r in zip(our_logits(model, PROMPTS), our_logits(deq, PROMPTS), ref):
        torch.testing.assert_close(ours, same, atol=1e-5, rtol=0)
        assert not torch.equal(ours, r)  # the weights did change


DEMO_TEXT = """The json module provides functions to encode Python objects as JSON text and to decode JSON text
back into Python objects. Use json.dumps() to turn a dictionary into a string and json.loads() to parse a string.
A list comprehension builds a new list by evaluating an expression for each item of an iterable, optionally
filtered by a condition. The with statement wraps a block in the methods of a context manager, so files are
closed even when an exception is raised. Use pathlib.Path to join paths, read text and list a directory; the
os module offers lower-level functions. A generator function uses yield to produce values one at a time."""


@pytest.mark.parametrize("quantization, top1, max_kl", [("int8", 0.97, 3e-3), ("int4", 0.85, 0.03)])
def test_quality_on_the_trained_demo_model(quantization, top1, max_kl):
    """The demo model is trained, so its logits have meaning. Defaults (int8 per channel, int4 groups of 32 with
    zero points; the head int8), against float32 over these 132 tokens: int8 mean KL 0.0014, top-1 100%; int4
    KL 0.0096, top-1 92.4% (over 1024 tokens of the README: int8 0.0003 / 98.6%, int4 0.014 / 86.6%)."""
    from tokenizers import Tokenizer

    from qwen35.demo import DEMO_DIR

    ids = Tokenizer.from_file(str(DEMO_DIR / "tokenizer.json")).encode(DEMO_TEXT).ids
    ref = our_logits(load_model(DEMO_DIR, dtype="float32")[0], [ids])[0].log_softmax(-1)
    out = our_logits(load_model(DEMO_DIR, dtype="float32", quantization=quantization)[0], [ids])[0].log_softmax(-1)
    kl = (ref.exp() * (ref - out)).sum(-1).mean()
    agree = (ref.argmax(-1) == out.argmax(-1)).float().mean()
    assert kl < max_kl and agree >= top1, (kl, agree)


def test_group_size_and_layers_left_in_float(checkpoint, caplog):
    path, _ = checkpoint("moe")
    model, _, report = load_model(path, dtype="float32", quantization="int4", group_size=64)
    # K = 96 (in_proj_z's output into out_proj) and the experts' K = 32 are not multiples of 64
    assert isinstance(model.model.layers[0].linear_attn.in_proj_qkv, QuantLinear)
    assert model.model.layers[0].linear_attn.in_proj_qkv.group == 64
    assert not isinstance(model.model.layers[0].linear_attn.out_proj, QuantLinear)
    assert not isinstance(model.model.layers[0].mlp.experts, QuantExperts)
    assert model.lm_head.bits == 8 and model.lm_head.group == 64  # the int8 head: one scale per row (K = 64)
    assert "linear_attn.out_proj: 96 input columns are not a multiple of the group (64)" in caplog.text
    with pytest.raises(ValueError, match="quantization must be one of"):
        load_model(path, quantization="int3")


def test_quant_linear_state_dict_and_to(checkpoint):
    path, _ = checkpoint("moe")
    model = load_model(path, dtype="float32", quantization="int4")[0]
    lin = model.model.layers[3].self_attn.q_proj
    sd = lin.state_dict()
    assert set(sd) == {"q", "scales", "zeros"} and sd["q"].dtype == torch.uint8
    x = torch.randn(3, lin.in_features)
    torch.testing.assert_close(lin.to(torch.float64)(x.double()).float(), lin(x), atol=1e-5, rtol=0)


def corrupt(checkpoint, tmp_path, edit_tensors=None, edit_qc=None, kind="moe"):
    fp8_dir, _ = fp8_checkpoint(checkpoint, tmp_path, kind, (32, 32))
    if edit_tensors:
        t = read_all(fp8_dir)
        edit_tensors(t)
        save_file(t, str(fp8_dir / "model.safetensors"))
    if edit_qc:
        cfg = json.loads((fp8_dir / "config.json").read_text())
        edit_qc(cfg["quantization_config"])
        (fp8_dir / "config.json").write_text(json.dumps(cfg))
    return fp8_dir


Q = "model.layers.3.self_attn.q_proj"


@pytest.mark.parametrize("edit_tensors, edit_qc, error, message", [
    (None, lambda q: q.update(quant_method="bitsandbytes"), ConfigError, r"quant_method 'bitsandbytes' is not supp"),
    (None, lambda q: q.update(quant_method="gptq", bits=3), ConfigError, r"field 'bits' is 3"),
    (None, lambda q: q.update(quant_method="gptq", bits=4, desc_act=True), ConfigError, r"'desc_act' is true"),
    (None, lambda q: q.update(weight_block_size=[128]), ConfigError, r"'weight_block_size' must be two"),
    (lambda t: t.pop(Q + ".weight_scale_inv"), None, CheckpointError,
     rf"tensor {Q}\.weight is FP8 but its {Q}\.weight_scale_inv is missing"),
    (lambda t: t.update({Q + ".weight_scale_inv": torch.ones(3, 2)}), None, CheckpointError,
     rf"tensor {Q}: weight_scale_inv has shape \[3, 2\], expected \[8, 2\]"),
    (lambda t: t.update({"model.layers.0.mlp.gate.weight": t["model.layers.0.mlp.gate.weight"].to(
        torch.float8_e4m3fn)}), None, CheckpointError,
     r"tensor model\.layers\.0\.mlp\.gate\.weight has dtype F8_E4M3, which qwen35 cannot load here"),
    (lambda t: t.update({Q + ".weight_scale_inv": torch.ones(8, 2, dtype=torch.int32)}), None, CheckpointError,
     rf"tensor {Q}\.weight_scale_inv has dtype I32"),
    (lambda t: t.update({"model.layers.0.linear_attn.in_proj_a.weight_scale_inv": torch.ones(1, 2)}), None,
     CheckpointError, r"in_proj_a\.weight_scale_inv has dtype F32, which qwen35 cannot load here .*never quantized"),
])
def test_bad_quantized_checkpoints(checkpoint, tmp_path, edit_tensors, edit_qc, error, message):
    path = corrupt(checkpoint, tmp_path, edit_tensors, edit_qc)
    with pytest.raises(error, match=message):
        load_model(path, dtype="float32")


def test_gptq_errors_name_the_tensor(checkpoint, tmp_path):
    gptq_dir, _ = gptq_checkpoint(checkpoint, tmp_path, "dense", 32, True)
    t = read_all(gptq_dir)
    t[Q + ".scales"] = t[Q + ".scales"][:1]
    save_file(t, str(gptq_dir / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"tensor {Q}: scales has shape \[1, 256\], expected \[2, 256\]"):
        load_model(gptq_dir)
    t[Q + ".qweight"] = t[Q + ".qweight"].flatten()
    save_file(t, str(gptq_dir / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"tensor {Q} has shape \[2048\], expected \[256, 64\]"):
        load_model(gptq_dir)
    del t[Q + ".qzeros"]
    save_file(t, str(gptq_dir / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"missing tensor {Q}\.qzeros"):
        load_model(gptq_dir)
    shutil.rmtree(gptq_dir)


@pytest.mark.skipif(not library.available(), reason="native kernels unavailable (no C compiler/AVX2)")
@pytest.mark.parametrize("fmt, kind", [("fp8", "moe"), ("gptq", "dense"), ("gptq", "next")])
def test_released_formats_run_on_the_cpu_backend(checkpoint, tmp_path, fmt, kind, monkeypatch):
    """FP8 (as int8) and GPTQ-Int4 checkpoints through the CPU backend's kernels: the same logits as the reference
    model on the same quantized weights, up to fp32 summation order (prompts on the fp32-input kernels, as decode
    steps run them; the int8-input prompt kernels have their own tests in tests/backends/test_matmul.py)."""
    from qwen35.backends.cpu import decoder

    monkeypatch.setattr(decoder, "MANY_ROWS", 1 << 30)
    if fmt == "fp8":
        path, _ = fp8_checkpoint(checkpoint, tmp_path, kind, (32, 32))
    else:
        path, _ = gptq_checkpoint(checkpoint, tmp_path, kind, 32 if kind == "dense" else 128, sym=False)
    ref = load_model(path, dtype="float32")[0]
    dec = CpuDecoder(load_model(path, dtype="float32")[0])
    assert dec.layers[3][1].qkv.format == ("int8" if fmt == "fp8" else "int4")
    for ours, theirs in zip(our_logits(dec, PROMPTS), our_logits(ref, PROMPTS)):
        assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()


@pytest.mark.parametrize("bits, group, symmetric", [(8, None, None), (8, 32, None), (4, 32, None), (4, 64, True)])
def test_quantize_in_chunks_is_quantize_whole(monkeypatch, bits, group, symmetric):
    """A large tensor is quantized a few rows at a time (bounded fp32 temporaries); the result is the same."""
    from qwen35 import quant

    w = torch.randn(3, 70, 256, generator=torch.Generator().manual_seed(0)).bfloat16()
    whole = quant.quantize(w, bits, group, symmetric)
    monkeypatch.setattr(quant, "CHUNK", 1000)  # 3 rows a chunk
    chunked = quant.quantize(w, bits, group, symmetric)
    for name in ("q", "scales", "zeros"):
        a, b = getattr(whole, name), getattr(chunked, name)
        assert (a is None and b is None) or torch.equal(a, b), name
