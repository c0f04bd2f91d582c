"""The training loop: full fine-tuning or LoRA with AdamW, linear warmup + cosine decay, gradient accumulation,
grad-norm clipping and optional bf16 autocast over float32 master weights; periodic eval loss; resumable
checkpoints; a JSONL log. `train` takes any model object (a fine-tuned checkpoint or one built from a config) and
token samples; `finetune` is the whole job on a checkpoint directory and a data file (`qwen35 finetune`).

Reproducibility: the data order of epoch e is a shuffle seeded by (seed, e), LoRA's init and dropout draw from
torch's generator seeded by `seed`, and a resumed run restores the data position, optimizer, step and RNG, so it
logs the same losses as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qwen35.config import ModelConfig
from qwen35.models.loader import checkpoint_files, load_model
from qwen35.tokenizer import Tokenizer
from qwen35.train.checkpoint import (check_adapter_targets, latest_checkpoint, load_training_state, save_adapter,
                                     save_checkpoint, save_training_state)
from qwen35.train.data import Sample, load_samples, pack, split_eval
from qwen35.train.lora import DEFAULT_TARGETS, apply_lora, merged_state_dict
from qwen35.train.loss import lm_loss, shift_labels, training_batch

LOG_FILE = "train_log.jsonl"


@dataclass
class TrainConfig:
    learning_rate: float | None = None  # default 1e-4 with LoRA, 1e-5 for full fine-tuning
    epochs: int = 1
    max_steps: int | None = None  # overrides epochs (the data repeats as needed)
    batch_tokens: int = 4096  # packed tokens per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine decays to learning_rate * min_lr_ratio
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = 1.0  # 0: no clipping
    bf16: bool = False  # bf16 autocast; weights and optimizer stay float32
    seed: int = 0
    eval_every: int = 0  # steps between eval losses (0: only at the end), when there is eval data
    save_every: int = 0  # steps between resumable checkpoints in out_dir/checkpoint-N (0: none)
    gradient_checkpointing: bool = False
    router_aux_loss_coef: float | None = None  # MoE load-balancing loss; None: the model config's
    mtp_loss_weight: float = 0.0  # weight of the MTP head's loss (models with an MTP head)
    lora_rank: int = 0  # 0: full fine-tuning
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS
    save_adapter: bool = False  # finetune: write a PEFT adapter instead of the merged checkpoint
    # finetune's data options
    max_seq_length: int | None = None  # default: batch_tokens (capped by the model's context)
    eval_data: str | None = None
    eval_fraction: float = 0.0
    on_bad_sample: str = "error"  # or "skip"
    enable_thinking: bool | None = None  # passed to the chat template (None: the template's default)
    device: str = "cpu"  # finetune: where the model is loaded and trained (train() uses the model's device)
    progress: bool | None = None  # progress bar; default: when stderr is a terminal

    def __post_init__(self):
        at_least_1 = {"epochs": self.epochs, "grad_accum": self.grad_accum, "batch_tokens": self.batch_tokens,
                      "max_steps": self.max_steps if self.max_steps is not None else 1}
        not_negative = {"warmup_steps": self.warmup_steps, "eval_every": self.eval_every, "save_every": self.save_every,
                        "lora_rank": self.lora_rank, "max_grad_norm": self.max_grad_norm,
                        "weight_decay": self.weight_decay}
        problems = [f"{k} must be at least 1, got {v}" for k, v in at_least_1.items() if v < 1]
        problems += [f"{k} must not be negative, got {v}" for k, v in not_negative.items() if v < 0]
        problems += [f"{k} must be in [0, 1), got {v}" for k, v in (("lora_dropout", self.lora_dropout),
                                                                     ("eval_fraction", self.eval_fraction))
                     if not 0 <= v < 1]
        if self.learning_rate is not None and not self.learning_rate > 0:
            problems.append(f"learning_rate must be positive, got {self.learning_rate}")
        if self.on_bad_sample not in ("error", "skip"):
            problems.append(f"on_bad_sample must be 'error' or 'skip', got {self.on_bad_sample!r}")
        if problems:
            raise ValueError("; ".join(problems))


class ProgressBar:
    """One stderr line redrawn in place: steps, a bar, loss, eval loss, tokens/s and time left."""

    def __init__(self, total: int, done: int):
        self.total, self.start_step, self.t0 = total, done, time.perf_counter()

    def update(self, step: int, entry: dict, eval_loss: float | None) -> None:
        frac = step / self.total
        bar = "#" * round(24 * frac) + "." * (24 - round(24 * frac))
        per_step = (time.perf_counter() - self.t0) / max(1, step - self.start_step)
        left = int(per_step * (self.total - step))
        ev = f" eval {eval_loss:.4f}" if eval_loss is not None else ""
        print(f"\rstep {step}/{self.total} [{bar}] loss {entry['loss']:.4f}{ev} {entry['tokens_per_s']:.0f} tok/s "
              f"{left // 60}:{left % 60:02d} left ", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        print(file=sys.stderr)


@dataclass
class TrainResult:
    history: list[dict]  # one entry per step: step, loss, lr, grad_norm, tokens_per_s (+ eval_loss)
    step: int
    eval_loss: float | None = None
    model: nn.Module | None = None  # the trained model (LoRA modules still wrapped)


def lr_at(step: int, total: int, base: float, warmup: int, min_ratio: float = 0.0) -> float:
    """Linear warmup from 0 over `warmup` steps, then cosine decay to base * min_ratio at `total` (HF's
    get_cosine_schedule_with_warmup when min_ratio = 0)."""
    if step < warmup:
        return base * step / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def prepare_model(model: nn.Module, cfg: TrainConfig) -> list[nn.Parameter]:
    """Make the model trainable as the config says; returns the parameters the optimizer updates."""
    if cfg.lora_rank > 0:
        apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    else:
        for name, p in model.named_parameters():
            p.requires_grad_(not name.startswith("visual."))  # text-only training never reaches the vision tower
    if hasattr(model, "model"):
        model.model.gradient_checkpointing = cfg.gradient_checkpointing
    return [p for p in model.parameters() if p.requires_grad]


def _as_samples(samples) -> list[Sample]:
    out = [s if isinstance(s, Sample) else Sample(list(s), [True] * len(s), f"sample {i}")
           for i, s in enumerate(samples)]
    for s in out:
        if not any(s.mask[1:]):  # a micro-batch of such samples would have a NaN loss
            raise ValueError(f"{s.where}: no token to predict (a sample needs at least two tokens)")
    return out


def _epoch_plan(lengths: list[int], batch_tokens: int, seed: int, epoch: int) -> list[list[int]]:
    order = list(range(len(lengths)))
    random.Random(f"{seed}/{epoch}").shuffle(order)
    return pack(lengths, batch_tokens, order)


def _loss(model, samples: list[Sample], micro: list[int], cfg: TrainConfig, coef):
    ids = [samples[i].ids for i in micro]
    device = model.lm_head.weight.device  # the batch goes where the model is
    labels = shift_labels(ids, [samples[i].mask for i in micro], device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16) if cfg.bf16 else nullcontext():
        return lm_loss(model, training_batch(ids, device=device), labels, router_aux_loss_coef=coef,
                       mtp_loss_weight=cfg.mtp_loss_weight)


@torch.no_grad()
def evaluate(model: nn.Module, samples, cfg: TrainConfig) -> float:
    """Token-weighted mean LM loss over `samples` (assistant tokens only for chats)."""
    samples = _as_samples(samples)
    was_training = model.training
    model.eval()
    total = count = 0.0
    for micro in pack([len(s) for s in samples], cfg.batch_tokens):
        out = _loss(model, samples, micro, cfg, None)
        total += float(out.lm_loss) * float(out.num_tokens)
        count += float(out.num_tokens)
    model.train(was_training)
    return total / max(count, 1.0)


def train(model: nn.Module, samples, out_dir: str | Path, cfg: TrainConfig | None = None, eval_samples=None,
          resume_from: str | Path | None = None, log=None) -> TrainResult:
    """Train `model` in place on `samples` (`Sample`s, or token lists whose every token is a target). Writes
    out_dir/train_log.jsonl and, every `save_every` steps, out_dir/checkpoint-N (resumable with `resume_from`).
    The caller saves the trained model (see `finetune`, or checkpoint.save_checkpoint for a model from scratch)."""
    cfg = cfg or TrainConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = log or (lambda msg: print(msg, file=sys.stderr))
    samples = _as_samples(samples)
    eval_samples = _as_samples(eval_samples) if eval_samples else []
    lengths = [len(s) for s in samples]
    if not samples:
        raise ValueError("no training samples")
    if cfg.mtp_loss_weight and getattr(model, "mtp", None) is None:
        raise ValueError("mtp_loss_weight needs a model with an MTP head (model.mtp)")
    torch.manual_seed(cfg.seed)
    params = prepare_model(model, cfg)
    base_lr = cfg.learning_rate or (1e-4 if cfg.lora_rank > 0 else 1e-5)
    optimizer = torch.optim.AdamW(params, lr=base_lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay)
    coef = cfg.router_aux_loss_coef
    if cfg.max_steps:
        total = cfg.max_steps
        epochs = itertools.count()
    else:
        total = -(-sum(len(_epoch_plan(lengths, cfg.batch_tokens, cfg.seed, e)) for e in range(cfg.epochs))
                  // cfg.grad_accum)
        epochs = range(cfg.epochs)
    stream = (micro for e in epochs for micro in _epoch_plan(lengths, cfg.batch_tokens, cfg.seed, e))

    step, position, history = 0, 0, []
    if resume_from is not None:
        state = load_training_state(model, optimizer, resume_from)
        step, position, history = state["step"], state["position"], state["history"]
        torch.set_rng_state(state["torch_rng"])
        stream = itertools.islice(stream, position, None)
        log(f"resumed from {resume_from} at step {step}")
    with open(out_dir / LOG_FILE, "w") as f:
        f.writelines(json.dumps(h) + "\n" for h in history)

    show = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
    bar = ProgressBar(total, step) if show else None
    model.train()
    eval_loss = None
    while step < total:
        micros = list(itertools.islice(stream, cfg.grad_accum))
        if not micros:
            break
        start = time.perf_counter()
        lr = lr_at(step, total, base_lr, cfg.warmup_steps, cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        num_targets = sum(sum(m for s in (samples[i] for i in micro) for m in s.mask[1:]) for micro in micros)
        loss_sum = 0.0
        for micro in micros:
            out = _loss(model, samples, micro, cfg, coef)
            (out.loss * (float(out.num_tokens) / num_targets)).backward()
            loss_sum += float(out.lm_loss.detach()) * float(out.num_tokens)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        position += len(micros)
        tokens = sum(lengths[i] for micro in micros for i in micro)
        entry = {"step": step, "loss": loss_sum / num_targets, "lr": lr, "grad_norm": float(grad_norm),
                 "tokens": tokens, "tokens_per_s": tokens / (time.perf_counter() - start)}
        if eval_samples and ((cfg.eval_every and step % cfg.eval_every == 0) or step == total):
            entry["eval_loss"] = eval_loss = evaluate(model, eval_samples, cfg)
        history.append(entry)
        with open(out_dir / LOG_FILE, "a") as f:
            f.write(json.dumps(entry) + "\n")
        if bar is not None:
            bar.update(step, entry, eval_loss)
        if cfg.save_every and step % cfg.save_every == 0 and step < total:
            save_training_state(model, optimizer, {"step": step, "position": position, "history": history,
                                                   "torch_rng": torch.get_rng_state()},
                                out_dir / f"checkpoint-{step}")
    if bar is not None:
        bar.close()
    model.eval()
    last = history[-1] if history else {}
    log(f"trained {step} steps: loss {last.get('loss', float('nan')):.4f}"
        + (f", eval loss {eval_loss:.4f}" if eval_loss is not None else ""))
    return TrainResult(history, step, eval_loss, model)


def finetune(model_dir: str | Path, data: str | Path, out_dir: str | Path, config: TrainConfig | None = None,
             resume: bool | str | Path = False, log=None, **options) -> TrainResult:
    """Fine-tune the checkpoint in `model_dir` on `data` (chat or text JSONL, or .txt) and write the result to
    `out_dir`: an HF checkpoint (LoRA merged), or with save_adapter a PEFT adapter. options: TrainConfig fields.
    resume: True continues from out_dir's latest checkpoint-N, a path from that checkpoint."""
    cfg = dataclasses.replace(config or TrainConfig(), **options)
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if out_dir.resolve() == model_dir.resolve():
        raise ValueError(f"{out_dir}: the output directory must not be the model directory it reads")
    if cfg.save_adapter and cfg.lora_rank <= 0:
        raise ValueError("save_adapter needs LoRA (lora_rank > 0)")
    log = log or (lambda msg: print(msg, file=sys.stderr))
    mconfig = ModelConfig.from_dir(model_dir)
    if cfg.save_adapter:
        check_adapter_targets(mconfig, cfg.lora_targets)
    tokenizer = Tokenizer.from_dir(model_dir)
    max_len = cfg.max_seq_length or min(cfg.batch_tokens, mconfig.text.max_position_embeddings)
    if max_len > cfg.batch_tokens:
        raise ValueError(f"max_seq_length {max_len} exceeds batch_tokens {cfg.batch_tokens}: a sample must fit in "
                         "one micro-batch")
    if max_len > mconfig.text.max_position_embeddings:
        raise ValueError(f"max_seq_length {max_len} exceeds the model's context "
                         f"({mconfig.text.max_position_embeddings} positions)")
    kwargs = {} if cfg.enable_thinking is None else {"enable_thinking": cfg.enable_thinking}
    samples = load_samples(data, tokenizer, max_len, cfg.on_bad_sample, kwargs, log)
    if cfg.eval_data:
        eval_samples = load_samples(cfg.eval_data, tokenizer, max_len, cfg.on_bad_sample, kwargs, log)
    else:
        samples, eval_samples = split_eval(samples, cfg.eval_fraction, cfg.seed)
    resume_from = None
    if resume:
        resume_from = latest_checkpoint(out_dir) if resume is True else Path(resume)
        if resume_from is None:
            raise FileNotFoundError(f"{out_dir}: no checkpoint-N to resume from")
    log(f"{len(samples)} training samples ({sum(map(len, samples))} tokens), {len(eval_samples)} held out")
    # the MTP head (if the checkpoint has one) comes along: --mtp-loss-weight trains it with the trunk
    model, _, _ = load_model(model_dir, dtype=torch.float32, device=cfg.device, vision=False,
                             progress=False, mtp=True)
    result = train(model, samples, out_dir, cfg, eval_samples, resume_from, log)
    multimodal = any(n.startswith("model.language_model.") for n in checkpoint_files(model_dir))
    if cfg.save_adapter:
        save_adapter(model, out_dir, mconfig, base_model=str(model_dir), multimodal=multimodal,
                     targets=cfg.lora_targets)
    else:
        save_checkpoint(merged_state_dict(model), out_dir, source_dir=model_dir)
    log(f"saved {'adapter' if cfg.save_adapter else 'checkpoint'} to {out_dir}")
    return result
