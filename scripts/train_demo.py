"""Train the embedded demo model from scratch: the command that produced qwen35/data/demo.

A tiny model in the Qwen3.5-MoE layout (Gated DeltaNet and gated-attention layers alternating, each with a sparse MoE
FFN and a shared expert, one MTP layer, a small vision tower; two attention layers rather than the releases' one in
four, so so small a model can learn to copy names from the question), trained on a corpus every machine has offline: the
Python standard library's own documentation (`pydoc_data.topics`, docstrings), shaped into chats in the Qwen3.5 chat
format (qwen35/train/corpus.py). Its vocabulary is the subset of Qwen3.5's tokens the corpus uses, renumbered
(qwen35/tokenizer_subset.py): any text still encodes. The vision tower is not trained (there are no images offline);
it keeps its random initialisation so the demo takes images and videos through the whole stack.

    python scripts/train_demo.py                    # ~20 minutes on 2 CPU cores; writes qwen35/data/demo
    python scripts/train_demo.py --out /tmp/demo    # elsewhere, e.g. to check the held-out figures reproduce

It prints and writes (demo_metrics.json in the output) the held-out perplexity and MTP top-1 accuracy of the weights
as shipped (bfloat16), and with --plot draws the loss curve.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from qwen35.config import ModelConfig
from qwen35.demo import DEMO_DIR, GENERATION_CONFIG, PREPROCESSOR_CONFIG, VIDEO_PREPROCESSOR_CONFIG
from qwen35.models.loader import load_model
from qwen35.models.mtp import add_mtp
from qwen35.models.qwen3_5 import Qwen3_5ForCausalLM
from qwen35.tokenizer import Tokenizer
from qwen35.tokenizer_subset import build_subset_tokenizer
from qwen35.train.checkpoint import save_checkpoint
from qwen35.train.corpus import CHAT_TEMPLATE_PATH, build_corpus, encode_samples
from qwen35.train.data import Sample, pack
from qwen35.train.loss import lm_loss, shift_labels, training_batch
from qwen35.train.trainer import TrainConfig, train

HIDDEN = 192
# The corpus has no reasoning, so the demo's template opens an empty think block unless thinking is asked for (as
# the Qwen3.5 template does with enable_thinking=False); a "<think>\n" prompt would be a token sequence it never saw.
NO_THINKING_DEFAULT = "{%- if enable_thinking is not defined %}{%- set enable_thinking = false %}{%- endif %}\n"


def demo_config(special: dict[str, int], vocab_size: int) -> dict:
    """The demo's config.json: the released Qwen3.5-MoE layout at toy sizes."""
    text = {
        "vocab_size": vocab_size, "hidden_size": HIDDEN, "num_hidden_layers": 4, "full_attention_interval": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 48,
        "linear_num_key_heads": 4, "linear_num_value_heads": 4, "linear_key_head_dim": 32,
        "linear_value_head_dim": 48, "linear_conv_kernel_dim": 4,
        "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 96,
        "shared_expert_intermediate_size": 256, "norm_topk_prob": True, "router_aux_loss_coef": 0.001,
        "mtp_num_hidden_layers": 1, "mtp_use_dedicated_embeddings": False,
        "rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10_000_000, "partial_rotary_factor": 0.25,
                            "mrope_section": [2, 2, 2], "mrope_interleaved": True},
        "eos_token_id": special["<|im_end|>"], "model_type": "qwen3_5_moe_text",
    }
    vision = {"depth": 2, "hidden_size": 128, "intermediate_size": 256, "num_heads": 2, "patch_size": 16,
              "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 2304,
              "out_hidden_size": HIDDEN, "hidden_act": "gelu_pytorch_tanh", "deepstack_visual_indexes": []}
    return {
        "architectures": ["Qwen3_5MoeForConditionalGeneration"], "model_type": "qwen3_5_moe", "dtype": "bfloat16",
        "tie_word_embeddings": True, "text_config": text, "vision_config": vision,
        "image_token_id": special["<|image_pad|>"], "video_token_id": special["<|video_pad|>"],
        "vision_start_token_id": special["<|vision_start|>"], "vision_end_token_id": special["<|vision_end|>"],
    }


@torch.no_grad()
def init_weights(model: Qwen3_5ForCausalLM, seed: int) -> None:
    """As transformers initialises Qwen3.5 (initializer_range 0.02): matrices N(0, 0.02), zero-centred norms at 0,
    the gated norm at 1, dt_bias 1, A_log = log U(0.01, 16); the conv keeps torch's default. The vision tower (not
    trained) gets N(0, 0.02) matrices, unit norms and zero biases."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("A_log"):
            p.copy_(torch.empty(p.shape).uniform_(0.01, 16, generator=g).log())
        elif name.endswith("dt_bias") or "linear_attn.norm" in name:
            p.fill_(1.0)
        elif "norm" in name and not name.startswith("visual."):
            p.zero_()
        elif name.startswith("visual.") and p.dim() == 1:  # untrained tower: unit norms, zero biases
            p.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
        elif "conv1d" in name:
            continue
        else:
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    add_mtp(model, std=0.02, generator=g)


def samples(tokenizer: Tokenizer, corpus_samples) -> list[Sample]:
    """Every token is a target: the user turns teach the model English too, and the chat format's markers."""
    return [Sample(ids, [True] * len(ids), f"corpus {i}")
            for i, (ids, _) in enumerate(encode_samples(tokenizer, corpus_samples))]


@torch.no_grad()
def held_out_metrics(model, data: list[Sample], batch_tokens: int) -> dict:
    """Per-token perplexity over the held-out chats (every token after the first of each chat), and the MTP
    head's top-1 accuracy on the token after next."""
    model.eval()
    nll = count = mtp_correct = mtp_count = 0.0
    for micro in pack([len(s) for s in data], batch_tokens):
        ids = [data[i].ids for i in micro]
        batch, labels = training_batch(ids), shift_labels(ids)
        out = lm_loss(model, batch, labels, router_aux_loss_coef=0.0, mtp_loss_weight=1.0)
        nll += float(out.lm_loss) * float(out.num_tokens)
        count += float(out.num_tokens)
        mtp_correct += out.mtp_correct
        mtp_count += out.mtp_tokens
    return {"heldout_tokens": int(count), "heldout_loss": nll / count, "heldout_perplexity": math.exp(nll / count),
            "mtp_top1_accuracy": mtp_correct / mtp_count, "mtp_tokens": int(mtp_count)}


def plot(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="train loss", lw=1)
    ev = [h for h in history if "eval_loss" in h]
    ax.plot([h["step"] for h in ev], [h["eval_loss"] for h in ev], "o-", label="held-out loss", ms=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("qwen35 demo model, trained from scratch on 2 CPU cores")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEMO_DIR, help="output checkpoint directory (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--mtp-weight", type=float, default=0.3)
    p.add_argument("--threads", type=int, default=2, help="torch threads (results depend slightly on it)")
    p.add_argument("--limit", type=int, help="use only the first N train and held-out chats (smoke tests)")
    p.add_argument("--plot", type=Path, help="write the loss curve here (PNG; needs matplotlib)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()

    corpus = build_corpus(seed=args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    vocab = build_subset_tokenizer(corpus.texts("train") + corpus.texts("heldout"), args.out,
                                   chat_template=NO_THINKING_DEFAULT + CHAT_TEMPLATE_PATH.read_text(),
                                   meta=corpus.describe())
    tokenizer = Tokenizer.from_dir(args.out)
    train_data, heldout = samples(tokenizer, corpus.train), samples(tokenizer, corpus.heldout)
    if args.limit:
        train_data, heldout = train_data[:args.limit], heldout[:args.limit]
    print(f"corpus: {len(train_data)} train chats ({sum(map(len, train_data))} tokens), {len(heldout)} held out "
          f"({sum(map(len, heldout))} tokens); vocabulary {vocab.num_tokens} (padded {vocab.vocab_size})",
          file=sys.stderr)

    config = demo_config(vocab.special_ids, vocab.vocab_size)
    mc = ModelConfig.from_hf(config)
    torch.manual_seed(args.seed)
    model = Qwen3_5ForCausalLM(mc.text, mc.vision)
    init_weights(model, args.seed)
    num_params = sum(p.numel() for p in model.parameters())
    print(f"model: {num_params / 1e6:.2f} M parameters (MTP head and vision tower included)", file=sys.stderr)

    cfg = TrainConfig(learning_rate=args.lr, max_steps=args.steps, batch_tokens=args.batch_tokens,
                      warmup_steps=max(1, args.steps // 20), min_lr_ratio=0.1, weight_decay=0.1,
                      adam_betas=(0.9, 0.95), mtp_loss_weight=args.mtp_weight, seed=args.seed,
                      eval_every=max(1, args.steps // 20), progress=sys.stderr.isatty())
    with tempfile.TemporaryDirectory() as work:
        result = train(model, train_data, work, cfg, eval_samples=heldout)
    minutes = (time.time() - t0) / 60

    # Ship bfloat16 (the released dtype), A_log and the gated norm in float32 as the releases keep them.
    state = {n: t.detach().to(torch.float32 if n.endswith(("A_log", "linear_attn.norm.weight")) else torch.bfloat16)
             for n, t in model.state_dict().items()}
    save_checkpoint(state, args.out, config_json=config)
    (args.out / "generation_config.json").write_text(json.dumps(
        {**GENERATION_CONFIG, "bos_token_id": vocab.special_ids["<|endoftext|>"],
         "pad_token_id": vocab.special_ids["<|endoftext|>"],
         "eos_token_id": [vocab.special_ids["<|im_end|>"], vocab.special_ids["<|endoftext|>"]]}, indent=2))
    (args.out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2))
    (args.out / "video_preprocessor_config.json").write_text(json.dumps(VIDEO_PREPROCESSOR_CONFIG, indent=2))

    shipped, _, _ = load_model(args.out, dtype="float32", mtp=True)
    metrics = {**held_out_metrics(shipped, heldout, args.batch_tokens), "train_minutes": round(minutes, 1),
               "steps": result.step, "final_train_loss": result.history[-1]["loss"], "parameters": num_params,
               "seed": args.seed, "threads": args.threads, "torch": torch.__version__, "corpus": corpus.describe()}
    (args.out / "demo_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (args.out / "train_log.json").write_text(json.dumps(result.history) + "\n")
    if args.plot:
        plot(result.history, args.plot)
    print(f"held-out perplexity {metrics['heldout_perplexity']:.2f}, MTP top-1 {metrics['mtp_top1_accuracy']:.3f}; "
          f"{minutes:.1f} min; written to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
