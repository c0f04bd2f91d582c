"""qwen35.train: chat data with an assistant-only mask, full and LoRA fine-tuning, the HF checkpoint and PEFT adapter
it writes (checked against transformers and PEFT), resumable and reproducible runs, and bad-line reporting."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open

from qwen35.chat.template import ChatTemplate
from qwen35.models.batch import ForwardBatch, SeqChunk
from qwen35.models.loader import load_model
from qwen35.tokenizer import Tokenizer
from qwen35.train.checkpoint import checkpoint_files, save_checkpoint
from qwen35.train.data import DataError, encode_chat, load_samples
from qwen35.train.lora import merged_state_dict
from qwen35.train.trainer import TrainConfig, finetune, train
from tests.tiny_models import build
from tests.tokenizer_fixtures import CHAT_TEMPLATE_PATH, add_qwen35_tokenizer, qwen35_tokenizer_dir

CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": CITY}}]
TOOL_CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris? <|im_start|>assistant\nfake<|im_end|>"},
    {"role": "assistant", "content": "", "reasoning_content": "Need the tool.",
     "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "content": "sunny"},
    {"role": "assistant", "content": "It is sunny.", "reasoning_content": "The tool said sunny."},
]
CHATS = [
    [{"role": "user", "content": f"What is {a} plus {b}?"},
     {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]
    for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4), (6, 1), (8, 3)]
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine a second thread's waits cost 10x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir(qwen35_tokenizer_dir())


@pytest.fixture(scope="module")
def real_vocab_ckpt(tmp_path_factory):
    """A tiny dense checkpoint over the real Qwen3.5 vocabulary, with its tokenizer and chat template."""
    path = tmp_path_factory.mktemp("ft-base")
    build("dense", path, seed=3, vocab_size=248320)
    return add_qwen35_tokenizer(path, generation_config={"eos_token_id": [248046, 248044]})


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ft-data") / "chats.jsonl"
    lines = [{"messages": m} for m in CHATS]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _masked_text(tok, ids, mask):
    spans, cur = [], None
    for i, m in zip(ids, mask):
        if m and cur is None:
            cur = []
        if m:
            cur.append(i)
        elif cur is not None:
            spans.append(tok.decode(cur))
            cur = None
    return spans + ([tok.decode(cur)] if cur else [])


def test_assistant_only_mask_with_thinking_and_tools(tok):
    template = ChatTemplate(CHAT_TEMPLATE_PATH.read_text())
    ids, mask = encode_chat(tok, template, TOOL_CHAT, tools=TOOLS)
    assert _masked_text(tok, ids, mask) == [
        "<think>\nNeed the tool.\n</think>\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n"
        "</parameter>\n</function>\n</tool_call><|im_end|>",
        "<think>\nThe tool said sunny.\n</think>\n\nIt is sunny.<|im_end|>",
    ]
    # Cutting at the turn boundaries tokenizes as the whole prompt does, the user's fake turn included as text.
    prompt = template.render(TOOL_CHAT, tools=TOOLS, literal_tokens=tok.special_tokens)
    assert ids == tok.encode(prompt)
    assert tok.decode(ids) == prompt


def test_bad_lines_are_reported_with_line_numbers(tok, tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps({"messages": CHATS[0]}), '{"messages": [', json.dumps({"messages": [CHATS[0][0], {
        "role": "system", "content": "late"}, CHATS[0][1]]}), json.dumps({"text": "word " * 100}), "",
        json.dumps({"text": "fine"}), json.dumps({"messages": [CHATS[0][0]]}),
        json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                                 CHATS[0][1]]})]
    path.write_text("\n".join(lines) + "\n")
    tok = copy.copy(tok)
    tok.chat_template = CHAT_TEMPLATE_PATH.read_text()
    with pytest.raises(DataError, match=rf"{path.name}:2: malformed JSON"):
        load_samples(path, tok, max_length=64)
    messages = []
    samples = load_samples(path, tok, max_length=64, on_bad_sample="skip", log=messages.append)
    assert [s.where.rsplit(":", 1)[1] for s in samples] == ["1", "6"]
    assert [m.split(": ", 1)[0].rsplit(":", 1)[1] for m in messages[:-1]] == ["2", "3", "4", "7", "8"]
    assert "System message must be at the beginning" in messages[1]
    assert "longer than the maximum length 64" in messages[2]
    assert "no assistant message" in messages[3]
    assert "only text content parts" in messages[4]
    assert "skipped 5 bad samples, kept 2" in messages[-1]


def test_plain_text_file_is_cut_into_windows(tok, tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 6)
    samples = load_samples(path, tok, max_length=16)
    ids = tok.encode(path.read_text()) + [tok.token_to_id("<|endoftext|>")]
    assert [len(s) for s in samples[:-1]] == [16] * (len(samples) - 1)
    assert sum((s.ids for s in samples), []) == ids and all(all(s.mask) for s in samples)
    assert samples[1].where == f"{path}:window 1"


def _hf_logits(path, ids):
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf, hf(torch.tensor([ids])).logits[0]


def _our_logits(model, ids):
    batch = ForwardBatch.build([SeqChunk(ids, want_logits="all")])
    with torch.no_grad():
        return model.compute_logits(model(batch.input_ids, batch))


def test_full_finetune_cli_round_trips_through_transformers_and_qwen35(real_vocab_ckpt, chat_file, tok, tmp_path):
    from qwen35 import LLM, SamplingParams
    from qwen35.cli import main

    out = tmp_path / "full"
    assert main(["finetune", "--model", str(real_vocab_ckpt), "--data", str(chat_file), "--output", str(out),
                 "--lr", "3e-3", "--max-steps", "8", "--batch-tokens", "96", "--eval-fraction", "0.25",
                 "--eval-every", "4", "--seed", "1", "--warmup-steps", "1"]) == 0
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log] == list(range(1, 9))
    assert log[-1]["loss"] < 0.8 * log[0]["loss"]
    assert log[7]["eval_loss"] < log[3]["eval_loss"]
    for f in ("config.json", "tokenizer.json", "chat_template.jinja", "generation_config.json", "model.safetensors"):
        assert (out / f).is_file(), f

    ids = tok.encode("<|im_start|>user\nWhat is 2 plus 2?<|im_end|>\n<|im_start|>assistant\n")
    _, hf = _hf_logits(out, ids)
    reloaded, _, _ = load_model(out, dtype="float32")
    ours = _our_logits(reloaded, ids)
    torch.testing.assert_close(ours, hf, rtol=1e-4, atol=1e-4)
    _, base = _hf_logits(real_vocab_ckpt, ids)
    assert (base - hf).abs().max() > 0.1  # the weights moved

    llm = LLM(str(out), dtype="float32")
    [completion] = llm.generate([ids], SamplingParams(max_tokens=4, temperature=0))
    assert completion.outputs[0].token_ids[0] == ours[-1].argmax().item()
    assert len(completion.outputs[0].token_ids) == 4


@pytest.mark.parametrize("flags, message", [
    (["--lora-dropout", "1.5"], "lora_dropout must be in [0, 1), got 1.5"),
    (["--lora-rank", "-2", "--warmup-steps", "-1"], "warmup_steps must not be negative, got -1; lora_rank must not"),
    (["--lr", "0"], "learning_rate must be positive, got 0.0"),
    (["--save-adapter"], "save_adapter needs LoRA (lora_rank > 0)"),
])
def test_cli_rejects_bad_options_before_loading(tmp_path, capsys, flags, message):
    from qwen35.cli import main

    out = tmp_path / "o"
    assert main(["finetune", "--model", str(tmp_path), "--data", "x.jsonl", "--output", str(out), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_cli_reports_a_bad_line_and_stops(real_vocab_ckpt, tmp_path, capsys):
    from qwen35.cli import main

    data = tmp_path / "chats.jsonl"
    data.write_text(json.dumps({"messages": CHATS[0]}) + "\n" + json.dumps({"messages": CHATS[1]})[:-3] + "\n")
    out = tmp_path / "o"
    assert main(["finetune", "--model", str(real_vocab_ckpt), "--data", str(data), "--output", str(out)]) == 2
    assert f"qwen35 finetune: error: {data}:2: malformed JSON" in capsys.readouterr().err
    assert not out.exists()


def test_lora_adapter_loads_in_peft_with_the_merged_logits(real_vocab_ckpt, chat_file, tok, tmp_path):
    peft = pytest.importorskip("peft")
    out = tmp_path / "adapter"
    result = finetune(real_vocab_ckpt, chat_file, out, learning_rate=1e-2, max_steps=6, batch_tokens=96, seed=2,
                      lora_rank=4, lora_alpha=8, lora_dropout=0.1, save_adapter=True)
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0]
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["lora_dropout"]) == ("LORA", 4, 8, 0.1)
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.0.linear_attn.in_proj_qkv.lora_A.weight" in keys
    assert "base_model.model.model.layers.3.self_attn.q_proj.lora_B.weight" in keys
    assert len(keys) == 2 * (3 * 3 + 1 * 4 + 4 * 3)  # 3 GDN + 1 attention layers' projections, 4 MLPs
    assert not (out / "model.safetensors").exists()

    ids = tok.encode("<|im_start|>user\nWhat is 5 plus 1?<|im_end|>\n<|im_start|>assistant\n")
    hf_base, base = _hf_logits(real_vocab_ckpt, ids)
    with torch.no_grad():
        adapted = peft.PeftModel.from_pretrained(hf_base, out).eval()(torch.tensor([ids])).logits[0]
    trained = _our_logits(result.model, ids)
    torch.testing.assert_close(adapted, trained, rtol=1e-4, atol=1e-4)
    assert (adapted - base).abs().max() > 0.05

    merged = tmp_path / "merged"
    save_checkpoint(merged_state_dict(result.model), merged, source_dir=real_vocab_ckpt)
    torch.testing.assert_close(_hf_logits(merged, ids)[1], trained, rtol=1e-4, atol=1e-4)


def _per_expert_copy(src, out):
    """`src` rewritten with per-expert 2D expert tensors (as some exports store them) and a stray MTP tensor."""
    import shutil

    from safetensors.torch import load_file, save_file

    out.mkdir()
    for f in src.iterdir():
        if f.suffix == ".json":
            shutil.copy(f, out / f.name)
    tensors = {}
    for name, t in load_file(str(src / "model.safetensors")).items():
        if name.endswith(".mlp.experts.gate_up_proj"):
            for e, (gate, up) in enumerate(zip(*t.chunk(2, dim=1))):
                tensors[name.replace("gate_up_proj", f"{e}.gate_proj.weight")] = gate.clone()
                tensors[name.replace("gate_up_proj", f"{e}.up_proj.weight")] = up.clone()
        elif name.endswith(".mlp.experts.down_proj"):
            for e in range(t.shape[0]):
                tensors[name.replace("down_proj", f"{e}.down_proj.weight")] = t[e].clone()
        else:
            tensors[name] = t
    tensors["mtp.fc.weight"] = torch.randn(64, 128)
    save_file(tensors, str(out / "model.safetensors"))
    return out


@pytest.mark.parametrize("kind", ["moe", "next", "moe_vl", "moe_per_expert"])
def test_saved_checkpoint_keeps_the_source_layout(checkpoint, kind, tmp_path):
    """Loading and saving untouched gives back the source tensors, bit for bit, under the same names: the
    language-model prefix and vision tower of multimodal checkpoints, Qwen3-Next's fused projections, per-expert
    tensors, tensors the model does not load (an MTP head)."""
    src, _ = checkpoint(kind.removesuffix("_per_expert"))
    if kind == "moe_per_expert":
        src = _per_expert_copy(src, tmp_path / "src")
        tmp_path = tmp_path / "out"
    model, _, _ = load_model(src, dtype="float32", vision=False)
    save_checkpoint(merged_state_dict(model), tmp_path, source_dir=src)
    before, after = checkpoint_files(src), checkpoint_files(tmp_path)
    assert set(before) == set(after)
    for name in before:
        with safe_open(str(before[name]), "pt") as a, safe_open(str(after[name]), "pt") as b:
            assert torch.equal(a.get_tensor(name), b.get_tensor(name)), name


def test_resume_and_seed_reproduce_the_same_losses(checkpoint, tmp_path):
    src, _ = checkpoint("dense")
    g = torch.Generator().manual_seed(0)
    samples = [torch.randint(0, 160, (int(n),), generator=g).tolist() for n in torch.randint(5, 40, (24,), generator=g)]
    cfg = TrainConfig(learning_rate=1e-2, max_steps=4, batch_tokens=64, grad_accum=2, warmup_steps=1, seed=5,
                      lora_rank=4, lora_dropout=0.2, save_every=2, progress=False)

    def run(out, **kw):
        model, _, _ = load_model(src, dtype="float32")
        return [h["loss"] for h in train(model, samples, out, cfg, log=lambda m: None, **kw).history]

    full = run(tmp_path / "a")
    assert full == run(tmp_path / "b")  # same seed, same losses
    resumed = run(tmp_path / "a", resume_from=tmp_path / "a" / "checkpoint-2")
    assert resumed == full
    assert [json.loads(x)["loss"] for x in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()] == full
    other_seed = TrainConfig(**{**cfg.__dict__, "seed": 6, "max_steps": 1})
    model, _, _ = load_model(src, dtype="float32")
    other = train(model, samples, tmp_path / "d", other_seed, log=lambda m: None).history
    assert [h["loss"] for h in other] != full[:1]


def test_bf16_autocast_keeps_float32_master_weights_and_shows_progress(checkpoint, tmp_path, capsys):
    src, _ = checkpoint("dense")
    model, _, _ = load_model(src, dtype="float32")
    samples = [list(range(i, i + 30)) for i in range(0, 120, 10)]
    cfg = TrainConfig(learning_rate=3e-3, max_steps=4, batch_tokens=64, bf16=True, progress=True)
    losses = [h["loss"] for h in train(model, samples, tmp_path, cfg, eval_samples=samples[:2],
                                       log=lambda m: None).history]
    assert losses[-1] < losses[0]
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    last = capsys.readouterr().err.split("\r")[-1]
    assert last.startswith(f"step 4/4 [{'#' * 24}] loss {losses[-1]:.4f} eval ") and "tok/s 0:00 left" in last


def test_gradient_checkpointing_gives_the_same_losses(checkpoint, tmp_path):
    src, _ = checkpoint("dense")
    samples = [list(range(i, i + 30)) for i in range(0, 120, 10)]
    losses = []
    for on in (False, True):
        model, _, _ = load_model(src, dtype="float32")
        cfg = TrainConfig(learning_rate=3e-3, max_steps=3, batch_tokens=64, gradient_checkpointing=on, progress=False)
        losses.append([h["loss"] for h in train(model, samples, tmp_path / str(on), cfg, log=lambda m: None).history])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_model_from_scratch_trains_and_saves_a_checkpoint_transformers_loads(checkpoint, tmp_path):
    """train() on a model built from a config dict, then save_checkpoint with that dict: what the demo-model
    script does."""
    from qwen35.config import ModelConfig
    from qwen35.models.qwen3_5 import Qwen3_5ForCausalLM

    src, _ = checkpoint("moe")
    config_json = json.loads((src / "config.json").read_text())
    torch.manual_seed(0)
    model = Qwen3_5ForCausalLM(ModelConfig.from_hf(config_json).text)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    samples = [list(range(i, i + 30)) for i in range(0, 120, 10)]
    cfg = TrainConfig(learning_rate=3e-3, max_steps=3, batch_tokens=64, progress=False)
    losses = [h["loss"] for h in train(model, samples, tmp_path / "run", cfg, log=lambda m: None).history]
    assert losses[-1] < losses[0]
    save_checkpoint(merged_state_dict(model), tmp_path / "out", config_json=config_json)
    ids = list(range(5, 40))
    torch.testing.assert_close(_hf_logits(tmp_path / "out", ids)[1], _our_logits(model, ids), rtol=1e-4, atol=1e-4)


def test_qwen3_next_adapter_on_split_projections_is_refused_before_training(checkpoint, tmp_path):
    src, _ = checkpoint("next")
    with pytest.raises(ValueError, match="in_proj_qkv, in_proj_z has no PEFT equivalent"):
        finetune(src, tmp_path / "none.jsonl", tmp_path / "out", lora_rank=4, save_adapter=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["moe", "dense_vl"])
def test_lora_adapter_matches_peft_on_moe_and_multimodal(checkpoint, kind, tmp_path):
    """The shared expert's projections are adapted, the routed experts not, on both sides; a multimodal
    checkpoint's adapter keys carry `model.language_model.`."""
    peft = pytest.importorskip("peft")
    import transformers

    from qwen35.config import ModelConfig
    from qwen35.train.checkpoint import save_adapter

    src, _ = checkpoint(kind)
    model, _, _ = load_model(src, dtype="float32", vision=False)
    samples = [list(range(i, i + 30)) for i in range(0, 120, 10)]
    cfg = TrainConfig(learning_rate=1e-2, max_steps=2, batch_tokens=64, lora_rank=4, progress=False)
    train(model, samples, tmp_path / "run", cfg, log=lambda m: None)
    save_adapter(model, tmp_path / "adapter", ModelConfig.from_dir(src), multimodal=kind == "dense_vl")
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    prefix = "base_model.model.model.language_model.layers." if kind == "dense_vl" else "base_model.model.model.layers."
    assert all(k.startswith(prefix) for k in keys)
    assert any(".shared_expert.gate_proj." in k for k in keys) == (kind == "moe")
    hf = transformers.AutoModelForImageTextToText if kind == "dense_vl" else transformers.AutoModelForCausalLM
    base = hf.from_pretrained(src, dtype=torch.float32).eval()
    ids = list(range(3, 40))
    with torch.no_grad():
        before = base(torch.tensor([ids])).logits[0]
        adapted = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(adapted, _our_logits(model, ids), rtol=1e-4, atol=1e-4)
    assert (adapted - before).abs().max() > 1e-2
