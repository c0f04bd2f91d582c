"""The MTP head in the released Qwen3.5 layout: parameter names and shapes, strict loading of `mtp.*`, its forward
against a naive per-token reference written from the formula, the loss's masks, no leakage between packed samples,
transformers still loading a checkpoint that carries `mtp.*`, and a few training steps raising its accuracy."""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from qwen35.models.batch import ForwardBatch, SeqChunk
from qwen35.models.loader import CheckpointError, load_model
from qwen35.train.mtp import IGNORE_INDEX, mtp_loss, mtp_targets
from tests.tiny_models import random_mtp

DENSE_FFN = ["mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]
MOE_FFN = ["mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.shared_expert.gate_proj.weight",
           "mlp.shared_expert.up_proj.weight", "mlp.shared_expert.down_proj.weight", "mlp.shared_expert_gate.weight"]
ATTN = ["input_layernorm.weight", "post_attention_layernorm.weight"] + [
    f"self_attn.{n}.weight" for n in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")]
HEAD = ["mtp.fc.weight", "mtp.pre_fc_norm_embedding.weight", "mtp.pre_fc_norm_hidden.weight", "mtp.norm.weight"]


def released_names(kind):
    return sorted(HEAD + [f"mtp.layers.0.{n}" for n in ATTN + (MOE_FFN if kind == "moe" else DENSE_FFN)])


def with_mtp(kind, checkpoint, seed=0):
    """Our fp32 model of a tiny checkpoint, with a fresh MTP head whose norms are non-trivial too."""
    src, hf = checkpoint(kind)
    model, _, _ = load_model(src, dtype="float32")
    random_mtp(model, seed)
    return model, hf


def mtp_checkpoint(kind, checkpoint, tmp_path, edit=None, config_edit=None):
    """A copy of the tiny HF checkpoint with `mtp.*` tensors added to its safetensors file and
    `mtp_num_hidden_layers: 1` in its config; returns (dir, the mtp tensors written)."""
    src, _ = checkpoint(kind)
    dst = tmp_path / f"{kind}-mtp"
    shutil.copytree(src, dst)
    model, _ = with_mtp(kind, checkpoint, seed=1)
    mtp = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("mtp.")}
    tensors = load_file(str(dst / "model.safetensors"))
    tensors.update(mtp)
    if edit:
        edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    text = cfg.get("text_config", cfg)  # the multimodal releases keep the text fields in text_config
    text["mtp_num_hidden_layers"], text["mtp_use_dedicated_embeddings"] = 1, False
    if config_edit:
        config_edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst, mtp


def packed(lengths, vocab, seed=0, want="all"):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]
    return seqs, ForwardBatch.build([SeqChunk(s, want_logits=want) for s in seqs])


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_parameter_names_are_the_released_layout(kind, checkpoint):
    model, _ = with_mtp(kind, checkpoint)
    sd = {k: v for k, v in model.state_dict().items() if k.startswith("mtp.")}
    assert sorted(sd) == released_names(kind)
    assert len(sd) == (15 if kind == "dense" else 19)  # 15 for a dense model, as the released dense checkpoints
    c = model.cfg
    H, D = c.hidden_size, c.head_dim
    assert sd["mtp.fc.weight"].shape == (H, 2 * H)
    assert sd["mtp.layers.0.self_attn.q_proj.weight"].shape == (2 * c.num_attention_heads * D, H)
    if kind == "moe":
        assert sd["mtp.layers.0.mlp.experts.gate_up_proj"].shape == (c.num_experts, 2 * c.moe_intermediate_size, H)
    # the shared embedding and head are the trunk's: not MTP parameters, and not duplicated in the state dict
    assert not any("embed" in k.replace("pre_fc_norm_embedding", "") or "lm_head" in k for k in sd)
    assert model.mtp.layers[0].layer_type == "full_attention"


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_checkpoint_with_mtp_loads_in_both_modes(kind, checkpoint, tmp_path):
    path, written = mtp_checkpoint(kind, checkpoint, tmp_path)
    model, config, report = load_model(path, dtype="float32", mtp=True)
    assert config.text.mtp_num_hidden_layers == 1
    got = {k: v for k, v in model.state_dict().items() if k.startswith("mtp.")}
    assert sorted(got) == sorted(written)
    for k in written:
        torch.testing.assert_close(got[k], written[k], rtol=0, atol=0, msg=k)
    assert "mtp." not in report.set_aside
    plain, _, report = load_model(path, dtype="float32")
    assert plain.mtp is None and report.set_aside["mtp."] == len(written)


def test_multimodal_release_layout(checkpoint, tmp_path):
    """model.language_model.* + model.visual.* + top-level mtp.*, the config's MTP fields inside text_config."""
    path, written = mtp_checkpoint("moe_vl", checkpoint, tmp_path)
    model, config, _ = load_model(path, dtype="float32", mtp=True)
    assert model.visual is not None and config.text.mtp_num_hidden_layers == 1
    for k, v in written.items():
        torch.testing.assert_close(model.get_parameter(k), v, rtol=0, atol=0, msg=k)


def test_per_expert_mtp_tensors_are_fused(checkpoint, tmp_path):
    """MTP experts stored one 2D tensor per expert and projection load into the fused 3D tensors."""
    def split(t):
        gate_up, down = t.pop("mtp.layers.0.mlp.experts.gate_up_proj"), t.pop("mtp.layers.0.mlp.experts.down_proj")
        for e in range(gate_up.shape[0]):
            gate, up = gate_up[e].chunk(2)
            t.update({f"mtp.layers.0.mlp.experts.{e}.gate_proj.weight": gate.clone(),
                      f"mtp.layers.0.mlp.experts.{e}.up_proj.weight": up.clone(),
                      f"mtp.layers.0.mlp.experts.{e}.down_proj.weight": down[e].clone()})

    path, written = mtp_checkpoint("moe", checkpoint, tmp_path, edit=split)
    model, _, _ = load_model(path, dtype="float32", mtp=True)
    for k in ("mtp.layers.0.mlp.experts.gate_up_proj", "mtp.layers.0.mlp.experts.down_proj"):
        torch.testing.assert_close(model.get_parameter(k), written[k], rtol=0, atol=0, msg=k)


def test_qwen3_next_names_the_layer_count_differently():
    from qwen35.config import TextConfig

    base = dict(vocab_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1,
                num_experts=2, num_experts_per_tok=1, moe_intermediate_size=4)
    assert TextConfig.from_hf({**base, "num_nextn_predict_layers": 1}, "qwen3_next").mtp_num_hidden_layers == 1
    assert TextConfig.from_hf({**base, "mtp_num_hidden_layers": 1}, "qwen3_5_moe_text").mtp_num_hidden_layers == 1
    assert TextConfig.from_hf(base, "qwen3_5_moe_text").mtp_num_hidden_layers == 0


def test_transformers_ignores_mtp_tensors(checkpoint, tmp_path):
    import transformers as tf

    path, _ = mtp_checkpoint("dense", checkpoint, tmp_path)
    _, hf = checkpoint("dense")
    hf2 = tf.Qwen3_5ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor([[3, 17, 99, 4, 150, 8, 21]])
    with torch.no_grad():
        ref, got = hf(ids).logits[0], hf2(ids).logits[0]
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    ours, _, _ = load_model(path, dtype="float32", mtp=True)
    batch = ForwardBatch.build([SeqChunk(ids[0].tolist(), want_logits="all")])
    with torch.no_grad():
        torch.testing.assert_close(ours.compute_logits(ours(batch.input_ids, batch)), ref, rtol=1e-4, atol=1e-4)


def test_missing_mtp_tensor_is_named(checkpoint, tmp_path):
    path, _ = mtp_checkpoint("moe", checkpoint, tmp_path, edit=lambda t: t.pop("mtp.layers.0.self_attn.k_norm.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor mtp\.layers\.0\.self_attn\.k_norm\.weight"):
        load_model(path, dtype="float32", mtp=True)
    assert load_model(path, dtype="float32")[0].mtp is None  # set aside, as before, when not asked for


def test_unexpected_mtp_tensor_is_named(checkpoint, tmp_path):
    path, _ = mtp_checkpoint("dense", checkpoint, tmp_path,
                             edit=lambda t: t.update({"mtp.layers.1.input_layernorm.weight": torch.zeros(64)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor mtp\.layers\.1\.input_layernorm\.weight"):
        load_model(path, dtype="float32", mtp=True)


def test_wrongly_shaped_mtp_tensor_is_named(checkpoint, tmp_path):
    path, _ = mtp_checkpoint("dense", checkpoint, tmp_path,
                             edit=lambda t: t.update({"mtp.fc.weight": torch.zeros(64, 64)}))
    with pytest.raises(CheckpointError, match=r"mtp\.fc\.weight has shape \[64, 64\], expected \[64, 128\]"):
        load_model(path, dtype="float32", mtp=True)


def test_config_must_describe_the_mtp_tensors(checkpoint, tmp_path):
    path, _ = mtp_checkpoint("dense", checkpoint, tmp_path, config_edit=lambda c: c.pop("mtp_num_hidden_layers"))
    with pytest.raises(CheckpointError, match=r"'mtp_num_hidden_layers' is 0"):
        load_model(path, dtype="float32", mtp=True)
    shutil.rmtree(path)
    path, _ = mtp_checkpoint("dense", checkpoint, tmp_path,
                             config_edit=lambda c: c.update(mtp_use_dedicated_embeddings=True))
    with pytest.raises(CheckpointError, match=r"'mtp_use_dedicated_embeddings' is true"):
        load_model(path, dtype="float32", mtp=True)


def test_checkpoint_without_mtp_leaves_none(checkpoint):
    src, _ = checkpoint("dense")
    model, _, _ = load_model(src, dtype="float32", mtp=True)
    assert model.mtp is None
    with pytest.raises(ValueError, match="no MTP head"):
        batch = ForwardBatch.build([SeqChunk([1, 2, 3])])
        mtp_loss(model, torch.zeros(3, 64), batch, torch.tensor([2, 3, IGNORE_INDEX]))


def naive_mtp(sd, cfg, hidden, next_ids, lengths, embed):
    """The head's maths token by token, from the state dict alone: zero-centred RMSNorms, fc over [embedding |
    hidden], then one full-attention layer (per-head [query | gate] rows, q/k norms, partial NeoX RoPE at the
    slot's position, causal GQA over the slots of its own sequence, sigmoid gate) and the model's FFN, then norm."""
    w = {k[len("mtp."):]: v for k, v in sd.items() if k.startswith("mtp.")}
    eps, H, D = cfg.rms_norm_eps, cfg.hidden_size, cfg.head_dim
    Nh, Nkv, rd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.rotary_dim

    def norm(x, weight):
        return x * torch.rsqrt(x.pow(2).mean() + eps) * (1 + weight)

    def rope(x, t):  # x [D]
        freqs = t / cfg.rope_theta ** (torch.arange(0, rd, 2, dtype=torch.float32) / rd)
        cos, sin = torch.cat([freqs, freqs]).cos(), torch.cat([freqs, freqs]).sin()
        x1, x2 = x[: rd // 2], x[rd // 2: rd]
        return torch.cat([x[:rd] * cos + torch.cat([-x2, x1]) * sin, x[rd:]])

    def swiglu(x, gate, up, down):
        return down @ (F.silu(gate @ x) * (up @ x))

    def ffn(x):
        p = "layers.0.mlp."
        if not cfg.is_moe:
            return swiglu(x, w[p + "gate_proj.weight"], w[p + "up_proj.weight"], w[p + "down_proj.weight"])
        probs = torch.softmax(w[p + "gate.weight"] @ x, -1)
        top = probs.topk(cfg.num_experts_per_tok)
        out = torch.zeros(H)
        for weight, e in zip(top.values / top.values.sum(), top.indices.tolist()):
            gate, up = w[p + "experts.gate_up_proj"][e].chunk(2, dim=0)
            out = out + weight * swiglu(x, gate, up, w[p + "experts.down_proj"][e])
        shared = swiglu(x, w[p + "shared_expert.gate_proj.weight"], w[p + "shared_expert.up_proj.weight"],
                        w[p + "shared_expert.down_proj.weight"])
        return out + torch.sigmoid(w[p + "shared_expert_gate.weight"] @ x) * shared

    a = "layers.0.self_attn."
    out, start = [], 0
    for n in lengths:
        us, ks, vs = [], [], []
        for t in range(n):
            i = start + t
            e = norm(embed[next_ids[i]], w["pre_fc_norm_embedding.weight"])
            u = w["fc.weight"] @ torch.cat([e, norm(hidden[i], w["pre_fc_norm_hidden.weight"])])
            x = norm(u, w["layers.0.input_layernorm.weight"])
            qg = (w[a + "q_proj.weight"] @ x).view(Nh, 2 * D)
            k = (w[a + "k_proj.weight"] @ x).view(Nkv, D)
            ks.append(torch.stack([rope(norm(k[j], w[a + "k_norm.weight"]), t) for j in range(Nkv)]))
            vs.append((w[a + "v_proj.weight"] @ x).view(Nkv, D))
            heads = []
            for h in range(Nh):
                q = rope(norm(qg[h, :D], w[a + "q_norm.weight"]), t)
                kv = h // (Nh // Nkv)
                scores = torch.stack([q @ ks[s][kv] for s in range(t + 1)]) / math.sqrt(D)  # slots 0..t only
                o = sum(p * vs[s][kv] for s, p in enumerate(torch.softmax(scores, 0)))
                heads.append(o * torch.sigmoid(qg[h, D:]))
            u = u + w[a + "o_proj.weight"] @ torch.cat(heads)
            u = u + ffn(norm(u, w["layers.0.post_attention_layernorm.weight"]))
            us.append(norm(u, w["norm.weight"]))
        out += us
        start += n
    return torch.stack(out)


@pytest.mark.parametrize("kind", ["dense", "moe", "next"])
def test_forward_matches_naive_reference_on_packed_sequences(kind, checkpoint):
    model, _ = with_mtp(kind, checkpoint)
    lengths = [5, 1, 9, 3]
    seqs, batch = packed(lengths, model.cfg.vocab_size)
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(sum(lengths), model.cfg.hidden_size, generator=g)
    next_ids = torch.randint(0, model.cfg.vocab_size, (sum(lengths),), generator=g)
    with torch.no_grad():
        got = model.mtp(hidden, next_ids, batch)
        ref = naive_mtp(model.state_dict(), model.cfg, hidden, next_ids, lengths, model.model.embed_tokens.weight)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_targets_never_cross_samples():
    batch = ForwardBatch.build([SeqChunk([10, 11, 12, 13]), SeqChunk([20]), SeqChunk([30, 31, 32])])
    labels = torch.tensor([11, IGNORE_INDEX, 13, IGNORE_INDEX,  # a masked label inside sample 0
                           IGNORE_INDEX,
                           31, 32, IGNORE_INDEX])
    next_ids, targets = mtp_targets(batch, labels)
    # x_{i+1} from the input ids even where the label is masked; 0 on each sample's last row
    assert next_ids.tolist() == [11, 12, 13, 0, 0, 31, 32, 0]
    # target of row i is labels[i+1] in the same sample: x_{i+2}
    assert targets.tolist() == [IGNORE_INDEX, 13, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 32, IGNORE_INDEX,
                                IGNORE_INDEX]
    with pytest.raises(ValueError, match=r"labels must have shape \[8\]"):
        mtp_targets(batch, labels[:-1])


def next_token_labels(lengths, seqs):
    return torch.tensor([t for s in seqs for t in s[1:] + [IGNORE_INDEX]])


def test_packed_loss_equals_per_sample_losses(checkpoint):
    model, _ = with_mtp("moe", checkpoint)
    lengths = [6, 2, 7]
    seqs, batch = packed(lengths, model.cfg.vocab_size, seed=5)
    labels = next_token_labels(lengths, seqs)
    with torch.no_grad():
        loss, correct, count = mtp_loss(model, model(batch.input_ids, batch), batch, labels)
        total, hits, n = 0.0, 0, 0
        for s in seqs:
            b = ForwardBatch.build([SeqChunk(s)])
            one, c, k = mtp_loss(model, model(b.input_ids, b), b, next_token_labels([len(s)], [s]))
            total, hits, n = total + one * k, hits + c, n + k
    assert count == n == sum(max(k - 2, 0) for k in lengths)  # rows with a token after next in the same sample
    assert correct == hits
    torch.testing.assert_close(loss, total / n, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_no_gradient_across_packed_samples(kind, checkpoint):
    """Sample B's MTP loss, through the trunk (attention, conv, recurrent state) and the head, does not reach
    sample A's (or C's) embeddings; it does reach B's."""
    model, _ = with_mtp(kind, checkpoint)
    lengths = [7, 6, 5]
    seqs, batch = packed(lengths, model.cfg.vocab_size, seed=2)
    labels = next_token_labels(lengths, seqs)
    b = slice(7, 13)
    only_b = torch.full_like(labels, IGNORE_INDEX)
    only_b[b] = labels[b]
    embeds = model.model.embed_tokens(batch.input_ids).detach().requires_grad_()
    loss, _, count = mtp_loss(model, model(batch.input_ids, batch, inputs_embeds=embeds), batch, only_b)
    assert count == 4
    loss.backward()
    grad = embeds.grad.abs().sum(-1)
    assert torch.all(grad[:7] == 0) and torch.all(grad[13:] == 0)
    # B's scored rows 7..10 (row i is scored on x_{i+2}) see their own inputs; rows 11, 12 come after them all
    assert torch.all(grad[7:11] > 0) and torch.all(grad[11:13] == 0)


def test_detach_keeps_the_trunk_out_of_the_mtp_gradient(checkpoint):
    model, _ = with_mtp("dense", checkpoint)
    seqs, batch = packed([8], model.cfg.vocab_size)
    embeds = model.model.embed_tokens(batch.input_ids).detach().requires_grad_()
    hidden = model(batch.input_ids, batch, inputs_embeds=embeds)
    loss, _, _ = mtp_loss(model, hidden, batch, next_token_labels([8], seqs), detach=True)
    loss.backward()
    assert embeds.grad is None


def test_a_few_steps_raise_mtp_accuracy(checkpoint):
    model, _ = with_mtp("dense", checkpoint)
    for p in model.parameters():
        p.requires_grad_(True)
    g = torch.Generator().manual_seed(7)
    seq = torch.randint(0, model.cfg.vocab_size, (24,), generator=g).tolist()
    batch = ForwardBatch.build([SeqChunk(seq)])
    labels = next_token_labels([24], [seq])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    accuracy = []
    for _ in range(10):
        main = F.cross_entropy(model.compute_logits(hidden := model(batch.input_ids, batch))[:-1], labels[:-1])
        loss, correct, count = mtp_loss(model, hidden, batch, labels)
        accuracy.append(correct / count)
        opt.zero_grad()
        (main + loss).backward()
        opt.step()
    assert accuracy[0] < 0.2 and accuracy[-1] > 0.8, accuracy


def test_lm_loss_adds_the_weighted_mtp_loss(checkpoint):
    from qwen35.train.loss import lm_loss, shift_labels, training_batch

    model, _ = with_mtp("moe", checkpoint)
    seqs, _ = packed([9, 3, 12], model.cfg.vocab_size, seed=2)
    batch, labels = training_batch(seqs), shift_labels(seqs)
    with torch.no_grad():
        plain = lm_loss(model, batch, labels)
        both = lm_loss(model, batch, labels, mtp_loss_weight=0.3)
        mtp, correct, count = mtp_loss(model, model(batch.input_ids, batch), batch, labels)
    assert plain.mtp_loss is None and both.mtp_tokens == count == 7 + 1 + 10 and both.mtp_correct == correct
    torch.testing.assert_close(both.loss, plain.loss + 0.3 * mtp)

