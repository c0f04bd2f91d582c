"""The `qwen35` console script (also `python -m qwen35`): one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from qwen35 import __version__
from qwen35.cli_types import int_list, positive_int
from qwen35.engine_args import EngineArgs, add_cli_args, device
from qwen35.hub import resolve_model

DEMO_NOTE = ("a 7M-parameter demo trained in minutes on the Python documentation: it knows a little about Python "
             "and nothing else")


def _resolve_config(target: str, revision: str | None = None):
    from qwen35.config import ModelConfig
    from qwen35.presets import PRESETS

    if target.lower() in PRESETS:
        return ModelConfig.from_hf(PRESETS[target.lower()])
    path = resolve_model(target, revision, weights=False)
    if path.is_dir():
        return ModelConfig.from_dir(path)
    raise ValueError(f"{target!r} is neither a checkpoint directory nor a preset ({', '.join(PRESETS)}, all) nor a "
                     "Hugging Face repo id (owner/name)")


def cmd_info(args) -> int:
    from qwen35.info import format_stats, model_stats
    from qwen35.presets import PRESETS

    targets = list(PRESETS) if args.target == "all" else [args.target]
    stats = {t: model_stats(_resolve_config(t, args.revision)) for t in targets}
    if args.json:
        print(json.dumps(stats if len(targets) > 1 else stats[targets[0]], indent=2))
    else:
        print("\n\n".join(format_stats(t, s) for t, s in stats.items()))
    return 0


def cmd_plan(args) -> int:
    from qwen35.plan import format_plan, parse_memory, plan

    config = _resolve_config(args.target, args.revision)
    quantization = args.quantization
    if quantization is None:  # the checkpoint's own format, else bf16
        q = config.quantization
        quantization = "none" if q is None else "fp8" if q.method == "fp8" else f"int{q.bits}"
    p = plan(config, args.gpus, parse_memory(args.gpu_memory), quantization, args.context,
             args.gpu_memory_utilization)
    print(json.dumps(p, indent=2) if args.json else format_plan(args.target, p))
    return 0


def cmd_forward(args) -> int:
    import torch

    from qwen35.backends.cpu import decoder_for
    from qwen35.config import ModelConfig
    from qwen35.demo import demo_checkpoint
    from qwen35.models.batch import ForwardBatch, SeqChunk
    from qwen35.models.loader import load_model

    path = resolve_model(args.model, args.revision) if args.model else demo_checkpoint()
    if args.model is None:
        print(f"Using the embedded default model at {path} ({DEMO_NOTE}).")
    vocab = ModelConfig.from_dir(path).text.vocab_size
    ids = args.token_ids or list(range(1, 65))
    if not all(0 <= t < vocab for t in ids):
        raise ValueError(f"--token-ids must be in 0..{vocab - 1}, got {ids}")
    t0 = time.time()
    model, config, report = load_model(path, dtype=args.dtype, device=args.device, quantization=args.quantization,
                                       lm_head_quantization=args.lm_head_quantization,
                                       group_size=args.quantization_group_size)
    print(f"Loaded {config.model_type}: {report.num_tensors} tensors, {report.num_bytes / 1e6:.1f} MB "
          f"in {time.time() - t0:.2f}s" + (f"; set aside {report.set_aside}" if report.set_aside else "")
          + (f"; weights {report.quantization}" if report.quantization != "none" else ""))
    model = decoder_for(model, args.device) or model  # as the engine runs it
    batch = ForwardBatch.build([SeqChunk(ids)], device=args.device)
    with torch.inference_mode():
        t0 = time.time()
        logits = model.compute_logits(model(batch.input_ids, batch)[batch.logits_indices])[0].float()
        dt = time.time() - t0
    top = torch.topk(logits.log_softmax(-1), 5)
    print(f"Forward pass over {len(ids)} tokens in {dt * 1000:.1f} ms; top next-token ids: "
          + ", ".join(f"{i} ({lp:.2f})" for i, lp in zip(top.indices.tolist(), top.values.tolist())))
    return 0


SAMPLING_FLAGS = [  # (flag, type, help); each maps to the SamplingParams field of the same name
    ("max_tokens", int, "maximum new tokens (default: generation_config, else 16; chat: 1024)"),
    ("temperature", float, "0 = greedy"), ("top_p", float, None), ("top_k", int, "0 or -1 disables"),
    ("min_p", float, None), ("repetition_penalty", float, None), ("presence_penalty", float, None),
    ("frequency_penalty", float, None), ("seed", int, None), ("min_tokens", int, None),
    ("logprobs", int, "top logprobs per generated token (needs --json)"),
    ("prompt_logprobs", int, "top logprobs per prompt token (needs --json)"), ("n", int, "completions per prompt"),
]
NOT_IN_CHAT = ("n", "logprobs", "prompt_logprobs")


class _NotInChat(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"argument {option_string}: not available in chat, which shows one answer as text "
                     "(qwen35 generate --json takes it)")


def add_model_flags(p) -> None:
    p.add_argument("--model", help="checkpoint directory or Hugging Face repo id, e.g. Qwen/Qwen3.5-0.8B, from the "
                   "local Hugging Face cache or downloaded (default: the embedded demo model)")
    p.add_argument("--revision", help="with a repo id: the branch, tag or commit (default: main)")


def _add_engine_flags(p) -> None:
    add_model_flags(p)
    p.add_argument("--image", action="append", default=[], metavar="FILE", help="attach an image (repeatable)")
    p.add_argument("--video", action="append", default=[], metavar="FILE", help="attach a video (repeatable)")
    add_cli_args(p, groups=("model", "engine"))


def _add_sampling_flags(p, skip=()) -> None:
    for name, typ, help_ in SAMPLING_FLAGS:
        if name in skip:
            p.add_argument("--" + name.replace("_", "-"), action=_NotInChat, help=argparse.SUPPRESS)
        else:
            p.add_argument("--" + name.replace("_", "-"), type=typ, help=help_)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--stop-token-ids", type=int_list, help="comma-separated token ids that end generation")
    p.add_argument("--ignore-eos", action="store_true", default=None)
    p.add_argument("--no-skip-special-tokens", dest="skip_special_tokens", action="store_false", default=None)


def _add_constraint_flags(p) -> None:
    g = p.add_argument_group("structured output (one of)").add_mutually_exclusive_group()
    g.add_argument("--json-schema", metavar="SCHEMA", help="the output is JSON matching this schema (JSON text)")
    g.add_argument("--json-schema-file", metavar="FILE", help="the same, read from a file")
    g.add_argument("--json-object", action="store_true", default=None, help="the output is a JSON object")
    g.add_argument("--regex", help="the output matches this regular expression")
    g.add_argument("--choice", action="append", metavar="TEXT", help="the output is one of these (repeatable)")
    g.add_argument("--grammar", help="the output follows this Lark (or GBNF) grammar")
    g.add_argument("--grammar-file", metavar="FILE", help="the same, read from a file")


def _constraint(args):
    """The --json-schema / --regex / ... flags as StructuredOutputsParams (None without any), checked before the
    model loads (a bad schema's compile error comes once the tokenizer is there)."""
    from qwen35.sampling_params import StructuredOutputsParams

    def read(flag, path):
        try:
            return Path(path).read_text("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--{flag} {path}: cannot read it ({e})") from None

    schema = args.json_schema if args.json_schema_file is None else read("json-schema-file", args.json_schema_file)
    grammar = args.grammar if args.grammar_file is None else read("grammar-file", args.grammar_file)
    given = dict(json=schema, json_object=args.json_object, regex=args.regex, choice=args.choice, grammar=grammar)
    given = {k: v for k, v in given.items() if v is not None}
    try:
        return StructuredOutputsParams(**given) if given else None
    except ValueError as e:
        flag = "--json-schema" + ("-file" if args.json_schema_file else "") if "json" in given else "--constraint"
        raise ValueError(f"{flag}: {str(e).removeprefix('SamplingParams.structured_outputs json ')}") from None


def _make_llm(args):
    from qwen35.llm import LLM

    if args.model is None:
        print(f"Using the embedded default model ({DEMO_NOTE}; pass --model DIR for a real checkpoint).",
              file=sys.stderr)
    return LLM(args.model, revision=args.revision, **EngineArgs.cli_kwargs(args))


def _sampling_params(args, **overrides):
    """The user's sampling flags, validated before any model is loaded; generation_config fills the rest later."""
    from qwen35.sampling_params import SamplingParams

    given = {name: getattr(args, name, None) for name, _, _ in SAMPLING_FLAGS}
    given.update(stop=args.stop, ignore_eos=args.ignore_eos, skip_special_tokens=args.skip_special_tokens,
                 stop_token_ids=args.stop_token_ids,
                 structured_outputs=_constraint(args) if hasattr(args, "json_schema") else None)
    for k, v in overrides.items():
        if given.get(k) is None:
            given[k] = v
    return SamplingParams.from_optional(**given)


def _logprobs_json(entries):
    if entries is None:
        return None
    return [None if e is None else {str(t): vars(lp) for t, lp in e.items()} for e in entries]


IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_PLACEHOLDER = "<|vision_start|><|video_pad|><|vision_end|>"


def _with_media(prompt: str, images: list[str], videos: list[str]):
    """A raw prompt with --image / --video files: placeholders go in front unless the prompt has its own."""
    if not images and not videos:
        return prompt
    if "<|image_pad|>" not in prompt and "<|video_pad|>" not in prompt:
        prompt = IMAGE_PLACEHOLDER * len(images) + VIDEO_PLACEHOLDER * len(videos) + prompt
    return {"prompt": prompt, "multi_modal_data": {"image": images, "video": videos}}


def _check_files(args) -> None:
    for flag in ("image", "video"):
        for f in getattr(args, flag):
            if not Path(f).is_file():
                raise FileNotFoundError(f"--{flag} {f}: no such file")


def cmd_generate(args) -> int:
    params = _sampling_params(args)
    _check_files(args)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    llm = _make_llm(args)
    params = params.with_defaults(llm.generation_defaults())
    prompt = _with_media(prompt, args.image, args.video)
    if args.json:
        out = llm.generate(prompt, params)[0]
        print(json.dumps({
            "prompt": out.prompt, "prompt_token_ids": out.prompt_token_ids,
            "prompt_logprobs": _logprobs_json(out.prompt_logprobs),
            "outputs": [{"index": c.index, "text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason,
                         "stop_reason": c.stop_reason, "cumulative_logprob": c.cumulative_logprob,
                         "logprobs": _logprobs_json(c.logprobs)} for c in out.outputs],
        }, ensure_ascii=False, indent=2))
        return 0
    printed: dict[int, int] = {}
    for out in llm.stream(prompt, params):
        for c in out.outputs:
            if params.n > 1:
                continue
            sys.stdout.write(c.text[printed.get(c.index, 0):])
            sys.stdout.flush()
            printed[c.index] = len(c.text)
    if params.n > 1:
        for c in out.outputs:
            print(f"--- completion {c.index} ({c.finish_reason})\n{c.text}")
    else:
        print()
    return 0


def cmd_chat(args) -> int:
    from qwen35.chat_repl import ChatRepl

    params = _sampling_params(args, max_tokens=1024)
    _check_files(args)
    llm = _make_llm(args)
    attachments = [("image", p) for p in args.image] + [("video", p) for p in args.video]
    return ChatRepl(llm, params.with_defaults(llm.generation_defaults()), system=args.system,
                    thinking=False if args.no_think else None, show_reasoning=not args.hide_reasoning,
                    show_stats=not args.no_stats, attachments=attachments).run()


def cmd_finetune(args) -> int:
    from qwen35.train.trainer import TrainConfig, finetune

    options = dict(
        learning_rate=args.learning_rate, epochs=args.epochs, max_steps=args.max_steps, batch_tokens=args.batch_tokens,
        grad_accum=args.grad_accum, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm, bf16=args.bf16, seed=args.seed, eval_every=args.eval_every,
        save_every=args.save_every, gradient_checkpointing=args.gradient_checkpointing,
        mtp_loss_weight=args.mtp_loss_weight, router_aux_loss_coef=args.router_aux_loss_coef,
        lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout, save_adapter=args.save_adapter, max_seq_length=args.max_seq_length,
        eval_data=args.eval_data, eval_fraction=args.eval_fraction, on_bad_sample=args.on_bad_sample,
        device=args.device)
    if args.lora_targets:
        options["lora_targets"] = tuple(t for t in args.lora_targets.split(",") if t)
    finetune(resolve_model(args.model, args.revision), args.data, args.output, TrainConfig(),
             resume=args.resume or False, **options)
    return 0


def _add_finetune_parser(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a checkpoint (full or LoRA) on chat or text data",
                       description="Writes an HF checkpoint (or with --save-adapter a PEFT adapter), train_log.jsonl "
                                   "and, with --save-every, resumable checkpoint-N directories to --output.")
    p.add_argument("--model", required=True, help="checkpoint directory or Hugging Face repo id to start from")
    p.add_argument("--revision", help="with a repo id: the branch, tag or commit (default: main)")
    p.add_argument("--data", required=True, help="JSONL of {\"messages\": [...], \"tools\": [...]} chats (loss on "
                   "assistant tokens) or {\"text\": ...} lines, or a .txt file")
    p.add_argument("--output", "--output-dir", dest="output", required=True, help="output directory")
    p.add_argument("--learning-rate", "--lr", type=float, help="peak learning rate (default 1e-4 LoRA, 1e-5 full)")
    p.add_argument("--epochs", "--num-train-epochs", type=positive_int, default=1)
    p.add_argument("--max-steps", type=positive_int, help="optimizer steps (overrides --epochs)")
    p.add_argument("--batch-tokens", type=positive_int, default=4096, help="packed tokens per micro-batch")
    p.add_argument("--grad-accum", "--gradient-accumulation-steps", dest="grad_accum", type=positive_int, default=1,
                   help="micro-batches per optimizer step")
    p.add_argument("--max-seq-length", type=positive_int, help="longest sample in tokens (default --batch-tokens)")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (weights and optimizer stay float32)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in the backward")
    p.add_argument("--device", type=device, default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--mtp-loss-weight", type=float, default=0.0, help="weight of the MTP head's loss")
    p.add_argument("--router-aux-loss-coef", type=float, default=None,
                   help="MoE load-balancing loss coefficient (default: the checkpoint config's, when its "
                        "output_router_logits is true; else off)")
    p.add_argument("--lora-rank", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--lora-targets", help="comma-separated Linear names (default: all decoder projections: "
                   "q_proj,k_proj,v_proj,o_proj,in_proj_qkv,in_proj_z,out_proj,gate_proj,up_proj,down_proj)")
    p.add_argument("--save-adapter", action="store_true", help="save the LoRA adapter (PEFT layout), not merged")
    p.add_argument("--eval-data", help="held-out file, same formats as --data")
    p.add_argument("--eval-fraction", type=float, default=0.0, help="hold out this fraction of --data instead")
    p.add_argument("--eval-every", "--eval-steps", dest="eval_every", type=int, default=0,
                   help="steps between eval losses (0: at the end only)")
    p.add_argument("--save-every", "--save-steps", dest="save_every", type=int, default=0,
                   help="steps between resumable checkpoints (0: none)")
    p.add_argument("--resume", nargs="?", const=True, metavar="CHECKPOINT",
                   help="continue from the output's latest checkpoint-N (or the one given)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--on-bad-sample", choices=["error", "skip"], default="error",
                   help="a bad line (malformed JSON, rejected by the template, too long): stop (default) or skip it")
    p.set_defaults(func=cmd_finetune)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qwen35", description="Run Qwen3.5 / Qwen3-Next checkpoints.")
    parser.add_argument("--version", action="version", version=f"qwen35 {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="parameters, memory, KV-cache and state sizes of a checkpoint or preset")
    p.add_argument("target", help="checkpoint directory, Hugging Face repo id (only its config.json is read), "
                   "preset name (e.g. qwen3.5-397b-a17b) or 'all'")
    p.add_argument("--revision", help="with a repo id: the branch, tag or commit (default: main)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("plan", help="how a model lays out over N GPUs: per-rank weights, KV cache, state, sequences "
                       "that fit, per parallel layout")
    p.add_argument("target", help="checkpoint directory, Hugging Face repo id (only its config.json is read) or preset")
    p.add_argument("--revision", help="with a repo id: the branch, tag or commit (default: main)")
    p.add_argument("--gpus", type=positive_int, required=True, help="devices (ranks) to lay the model over")
    p.add_argument("--gpu-memory", default="141GB",
                   help="memory per device: 141GB (10^9 bytes), 131GiB (2^30 bytes) or a number of GiB "
                   "(default: 141GB, an H200)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="the fraction of each device's memory to use (default: 0.9, as vLLM)")
    p.add_argument("--quantization", choices=["fp8", "int8", "int4", "none"],
                   help="weight format (default: the checkpoint's own, else none = bf16)")
    p.add_argument("--context", type=positive_int, default=32768, help="tokens per sequence (default: 32768)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("forward", help="load a checkpoint and run one forward pass (smoke test)")
    add_model_flags(p)
    p.add_argument("--token-ids", type=int_list, help="comma-separated prompt token ids (default 1..64)")
    add_cli_args(p, only=("dtype", "device", "quantization", "lm_head_quantization", "quantization_group_size"))
    p.set_defaults(func=cmd_forward)

    p = gen = sub.add_parser("generate", help="complete a prompt, streaming to stdout")
    p.add_argument("prompt", help="the prompt text, or - to read it from stdin")
    p.add_argument("--json", action="store_true", help="print the structured result instead of streaming")
    _add_engine_flags(p)
    _add_sampling_flags(p)
    _add_constraint_flags(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat in the terminal (streams; /help for commands)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--no-think", action="store_true",
                   help="start with thinking off (default: on, off for the embedded demo model)")
    p.add_argument("--hide-reasoning", action="store_true", help="do not print the reasoning (a 'thinking' line shows)")
    p.add_argument("--no-stats", action="store_true", help="no timing line after each answer (/stats toggles it)")
    _add_engine_flags(p)
    _add_sampling_flags(p, skip=NOT_IN_CHAT)
    p.set_defaults(func=cmd_chat)

    from qwen35.serve.server_cli import add_serve_parser

    add_serve_parser(sub)
    _add_finetune_parser(sub)

    args = parser.parse_args(argv)
    if args.command == "generate" and not args.json and (args.logprobs is not None or args.prompt_logprobs is not None):
        gen.error("--logprobs and --prompt-logprobs need --json (the streamed text has no place for them)")
    from qwen35.chat.template import ChatTemplateError
    from qwen35.config import ConfigError
    from qwen35.engine.llm_engine import EngineError
    from qwen35.models.loader import CheckpointError
    from qwen35.sampling_params import SamplingParamsError

    # Exit status: 0 success; 2 bad arguments or input (argparse's usage errors and these one-line errors); 1 a
    # runtime failure (an uncaught exception, with its traceback); 130 interrupted.
    try:
        return args.func(args)
    except (ConfigError, CheckpointError, EngineError, SamplingParamsError, ChatTemplateError, FileNotFoundError,
            ValueError) as e:
        print(f"qwen35 {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qwen35 {args.command}: interrupted", file=sys.stderr)
        return 130


def _entry() -> int:
    try:
        return main()
    except BrokenPipeError:  # output piped into e.g. `head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
