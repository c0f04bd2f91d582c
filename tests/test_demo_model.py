"""The embedded default: the trained demo model shipped in the package (scripts/train_demo.py made it). Its
held-out figures are the ones recorded beside it, it answers a Python question in the corpus's English, and the
training script runs end to end in a few steps (the full from-scratch run stays out of CI)."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qwen35.demo import DEMO_DIR
from qwen35.models.loader import load_model
from qwen35.tokenizer import Tokenizer
from qwen35.train.corpus import build_corpus, encode_samples
from qwen35.train.data import pack
from qwen35.train.loss import lm_loss, shift_labels, training_batch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def corpus():
    return build_corpus(seed=0)


@pytest.fixture(scope="module")
def metrics():
    return json.loads((DEMO_DIR / "demo_metrics.json").read_text())


def test_the_demo_is_the_trained_model_with_an_mtp_head():
    config = json.loads((DEMO_DIR / "config.json").read_text())
    text = config["text_config"]
    assert config["model_type"] == "qwen3_5_moe" and "random_weights" not in config
    assert text["mtp_num_hidden_layers"] == 1 and text["num_experts"] > 1 and text["shared_expert_intermediate_size"]
    assert "linear_attention" in [("full_attention" if (i + 1) % text["full_attention_interval"] == 0
                                   else "linear_attention") for i in range(text["num_hidden_layers"])]
    model, _, report = load_model(DEMO_DIR, dtype="float32", mtp=True)
    assert model.mtp is not None and not report.set_aside


def test_every_shipped_tensor_is_finite_and_moderate():
    """The untrained vision tower too: a parameter left uninitialised (torch.empty) would ship memory garbage."""
    for name, t in load_file(str(DEMO_DIR / "model.safetensors")).items():
        assert torch.isfinite(t).all() and t.float().abs().max() < 100, name


@torch.no_grad()
def test_held_out_perplexity_and_mtp_accuracy_are_the_recorded_ones(corpus, metrics):
    """The shipped weights, evaluated here on the held-out chats, give the perplexity and MTP top-1 accuracy that
    docs/demo-model.md quotes (the corpus is rebuilt from this Python's standard library)."""
    trained_on = metrics["corpus"]
    if (corpus.python_version, corpus.platform) != (trained_on["python_version"], trained_on["platform"]):
        pytest.skip(f"the demo was trained on the documentation of Python {trained_on['python_version']} "
                    f"({trained_on['platform']}), this is {corpus.python_version} ({corpus.platform})")
    assert corpus.sha256 == trained_on["sha256"]  # same Python, same corpus, whatever the process imported
    tokenizer = Tokenizer.from_dir(DEMO_DIR)
    model, _, _ = load_model(DEMO_DIR, dtype="float32", mtp=True)
    data = [ids for ids, _ in encode_samples(tokenizer, corpus.heldout)]
    nll = count = correct = scored = 0.0
    for micro in pack([len(s) for s in data], 4096):
        ids = [data[i] for i in micro]
        out = lm_loss(model, training_batch(ids), shift_labels(ids), router_aux_loss_coef=0.0, mtp_loss_weight=1.0)
        nll += float(out.lm_loss) * out.num_tokens
        count += out.num_tokens
        correct += out.mtp_correct
        scored += out.mtp_tokens
    assert count == metrics["heldout_tokens"]
    assert math.exp(nll / count) == pytest.approx(metrics["heldout_perplexity"], rel=1e-3)
    assert correct / scored == pytest.approx(metrics["mtp_top1_accuracy"], abs=2e-3)
    assert metrics["heldout_perplexity"] < 0.01 * tokenizer.vocab_size  # far from a uniform guess


def test_its_template_does_not_think_unless_asked():
    """Trained without reasoning, the demo's prompts open an empty think block by default (what the corpus holds);
    the terminal chat leaves the choice to the template unless --no-think or /think says otherwise."""
    from qwen35.chat.template import ChatTemplate

    template = ChatTemplate(Tokenizer.from_dir(DEMO_DIR).chat_template)
    m = [{"role": "user", "content": "Hi"}]
    assert template.render(m, add_generation_prompt=True).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert template.render(m, add_generation_prompt=True, enable_thinking=True).endswith("assistant\n<think>\n")


def test_it_answers_a_python_question_in_the_corpus_english(corpus):
    """Greedy answer to a question about the standard library: words the documentation uses, not gibberish."""
    from qwen35 import LLM, SamplingParams

    words = set(re.findall(r"[a-z]+", " ".join(corpus.texts("train")).lower()))
    llm = LLM()
    out = llm.chat([{"role": "user", "content": "What does the function `os.path.join` do?"}],
                   SamplingParams(temperature=0, max_tokens=48))[0].outputs[0].text
    answer = re.findall(r"[a-z]+", out.lower())
    assert len(answer) >= 10, out
    assert sum(w in words for w in answer) >= 0.9 * len(answer), out
    assert {"the", "a", "path", "is", "of", "to"} & set(answer), out


def test_training_script_smoke(tmp_path):
    """scripts/train_demo.py end to end on 48 chats and 2 steps: tokenizer, model, training with the MTP loss, the
    shipped checkpoint, its metrics and a loss curve; the result loads and generates."""
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_demo.py"), "--out", str(out), "--steps", "2",
                        "--limit", "48", "--batch-tokens", "2048"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "demo_metrics.json").read_text())
    assert m["steps"] == 2 and 0 < m["mtp_top1_accuracy"] < 1 and math.isfinite(m["heldout_perplexity"])
    assert {"tokenizer.json", "vocab_map.json", "config.json", "generation_config.json", "model.safetensors",
            "train_log.json", "preprocessor_config.json"} <= {p.name for p in out.iterdir()}
    from qwen35 import LLM, SamplingParams

    text = LLM(out).generate(["def"], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0].outputs[0]
    assert len(text.token_ids) == 3


CHATS = [
    [{"role": "user", "content": f"What is the capital of {country}?"},
     {"role": "assistant", "content": f"The capital of {country} is {city}."}]
    for country, city in [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
                          ("Egypt", "Cairo"), ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Chile", "Santiago")]
]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_finetune_the_demo_round_trips_through_transformers(lora, tmp_path):
    """Fine-tune the demo (full, with its MTP head trained too; or LoRA) on a small chat JSONL: the loss falls, and
    the saved checkpoint gives the same logits in transformers and in qwen35."""
    import transformers

    from qwen35.train import finetune

    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS))
    out = tmp_path / "out"
    options = dict(lora_rank=8, lora_alpha=16, learning_rate=1e-2) if lora else \
        dict(learning_rate=1e-3, mtp_loss_weight=0.3)
    result = finetune(DEMO_DIR, data, out, max_steps=6, batch_tokens=512, seed=0, **options)
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < 0.7 * losses[0], losses

    before = {k: v for k, v in load_file(str(DEMO_DIR / "model.safetensors")).items() if k.startswith("mtp.")}
    after = {k: v for k, v in load_file(str(out / "model.safetensors")).items() if k.startswith("mtp.")}
    assert sorted(after) == sorted(before)
    assert torch.equal(after["mtp.fc.weight"], before["mtp.fc.weight"]) == lora  # LoRA leaves the head alone

    ids = Tokenizer.from_dir(out).encode("What is the capital of Peru? The capital")
    ours, _, _ = load_model(out, dtype="float32")
    batch = training_batch([ids])
    with torch.no_grad():
        mine = ours.compute_logits(ours(batch.input_ids, batch))
        hf = transformers.AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32)
        theirs = hf(input_ids=torch.tensor([ids])).logits[0]
    torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)
