"""`LLM`: the offline Python API, with vLLM's names and semantics. Every call drives the one batching engine."""

from __future__ import annotations

import ctypes
import ctypes.util
import itertools
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any


import torch

from qwen35.config import ModelConfig, SpeculativeConfig
from qwen35.distributed.shard import ShardPlan
from qwen35.engine.executor import start_group
from qwen35.engine_args import EngineArgs, check_device, media_limits
from qwen35.engine.llm_engine import LLMEngine
from qwen35.hub import resolve_model
from qwen35.models.loader import load_model
from qwen35.multimodal.config import ProcessorConfig
from qwen35.multimodal.inputs import MediaPolicy, as_list, prepare_prompt, video_list
from qwen35.outputs import RequestOutput
from qwen35.sampling_params import SamplingParams

# generation_config.json key -> SamplingParams field (what vLLM takes from it by default)
GENERATION_DEFAULTS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                       "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


PROMPT_FORMS = ("a prompt is a string, a list of token ids, or a dict with 'prompt' (a string) or "
                "'prompt_token_ids' (a list of ints) and optionally 'multi_modal_data'; pass one prompt or a list")


def _is_token_ids(p) -> bool:
    return isinstance(p, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in p)


def _describe(p) -> str:
    if isinstance(p, dict):
        return "a dict with " + ", ".join(f"{k!r}: {type(v).__name__}" for k, v in p.items()) if p else "an empty dict"
    return type(p).__name__


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"))
    except (OSError, TypeError):
        return None


def release_free_heap() -> None:
    """Hand the C heap's free pages back to the OS. glibc keeps what large frees leave inside its heap (loading
    and packing the weights free ~160 MB on the demo model), which would otherwise stay resident for good."""
    malloc_trim = getattr(_libc(), "malloc_trim", None)  # glibc only (not musl, macOS, Windows)
    if malloc_trim is not None:
        malloc_trim(0)


def fix_mmap_threshold() -> None:
    """Keep glibc's mmap threshold at its 128 KiB default for this process (every LLM sets it before loading). Left
    alone it rises to the largest block freed so far (up to 32 MiB); transient tensors then come from the heap, where
    small long-lived allocations pin the space between them: RSS creeps up with no plateau in a server, and loading
    (a tensor read, converted or quantized, packed, freed, the next one) peaks at twice what it needs.
    MALLOC_MMAP_THRESHOLD_ in the environment wins."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is not None and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD


def _no_tokenizer(text: str):
    raise ValueError("video timestamps are text: a video prompt needs a tokenizer (skip_tokenizer_init was set)")


def _generation_config(source: str, checkpoint: dict) -> dict:
    """The sampling defaults: the checkpoint's ("auto"), none ("vllm": SamplingParams' own), or a folder's."""
    if source == "auto":
        return checkpoint
    if source == "vllm":
        return {}
    path = Path(source) / "generation_config.json"
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"generation_config {source!r}: not 'auto', 'vllm' or a folder with a readable "
                         f"generation_config.json ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _chat_template(value: str) -> str:
    """A chat template given as a file or inline (as vLLM's --chat-template): a path that exists is read."""
    path = Path(value)
    try:
        if len(value) < 4096 and "\n" not in value and path.is_file():
            return path.read_text("utf-8")
    except OSError as e:
        raise ValueError(f"chat_template {value!r}: cannot read it ({e})") from None
    if "{" not in value:
        raise ValueError(f"chat_template {value!r}: no such file, and not a Jinja template")
    return value


class _Progress:
    """One line on stderr, rewritten in place: prompts done of all, elapsed time, output tokens per second."""

    def __init__(self):
        self.t0, self.tokens = time.monotonic(), 0

    def update(self, done: int, total: int, new_tokens: int) -> None:
        self.tokens += new_tokens
        dt = time.monotonic() - self.t0
        sys.stderr.write(f"\rProcessed prompts: {done}/{total} [{dt:.1f} s, {self.tokens / max(dt, 1e-9):.1f} "
                         "output tok/s]")
        sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\n")


class LLM:
    def __init__(self, model: str | Path | None = None, **kwargs):
        """model: a checkpoint folder, or a Hugging Face repo id ("Qwen/Qwen3.5-0.8B", at `revision`) taken from the
        local Hugging Face cache or downloaded (qwen35.hub; `model_name` is then the repo id, else the folder name);
        default: the embedded demo model. kwargs: the settings of
        `qwen35.engine_args.EngineArgs` (each field's help says what it does; `qwen35 serve --help` lists them too):
        revision, dtype, device, seed, max_model_len, max_num_seqs, max_num_batched_tokens, block_size, kv_cache_bytes,
        kv_cache_memory_fraction, enable_prefix_caching, state_snapshot_bytes, tokenizer, skip_tokenizer_init,
        chat_template, generation_config, language_model_only, quantization, lm_head_quantization,
        quantization_group_size, native_kernels, speculative_config (MTP drafting: {"method": "mtp",
        "num_speculative_tokens": k}), tensor_parallel_size and enable_expert_parallel (one model over N processes:
        spawned here, or torchrun's ranks; `shutdown()` stops them), and the media policy: limit_mm_per_prompt,
        allowed_local_media_path, allow_remote_media, allowed_media_domains, media_fetch_timeout (image_url /
        video_url chat parts may point at local files inside allowed_local_media_path, and with allow_remote_media
        at public addresses, or at the allowed_media_domains hosts wherever they resolve). An unknown keyword is a
        TypeError naming it."""
        a = self.args = EngineArgs.from_kwargs(**kwargs)
        device = a.device
        check_device(device)
        SpeculativeConfig.of(a.speculative_config)  # a bad one is refused before the model loads
        fix_mmap_threshold()
        if model is None:
            from qwen35.demo import demo_checkpoint

            model = demo_checkpoint()
        self.model_path = resolve_model(model, a.revision)
        self.model_name = str(model) if self.model_path != Path(model).expanduser() else self.model_path.name
        load_kwargs = dict(dtype=a.dtype, quantization=a.quantization, lm_head_quantization=a.lm_head_quantization,
                           group_size=a.quantization_group_size, mtp=a.speculative_config is not None)
        self.workers = None  # the other ranks of a tensor-parallel model
        if a.tensor_parallel_size > 1:
            self._load_sharded(a, device, load_kwargs)
        else:
            self.model, self.model_config, self.load_report = load_model(self.model_path, device=device,
                                                                         vision=not a.language_model_only,
                                                                         **load_kwargs)
        self.processor_config = None
        if self.model.visual is not None:
            self.processor_config = ProcessorConfig.from_dir(self.model_path, self.model_config.vision)
        self.media_limits = media_limits(a.limit_mm_per_prompt)
        self.media_policy = MediaPolicy.of(a.allowed_local_media_path, a.allow_remote_media, a.allowed_media_domains,
                                           a.media_fetch_timeout)
        gen_path = self.model_path / "generation_config.json"
        checkpoint_generation = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
        self.generation_config = _generation_config(a.generation_config, checkpoint_generation)
        self.tokenizer = None
        if not a.skip_tokenizer_init:
            from qwen35.tokenizer import Tokenizer

            # stop ids always come from the checkpoint's own generation config (Qwen3.5 stops on two eos ids)
            self.tokenizer = Tokenizer.from_dir(a.tokenizer or self.model_path, checkpoint_generation)
            if a.chat_template is not None:
                self.tokenizer.chat_template = _chat_template(a.chat_template)
        engine_config = a.engine_config(default_max_tokens=self.generation_defaults().get("max_tokens"))
        self.engine = LLMEngine(self.model, self.model_config, self.tokenizer, engine_config, device, self.workers)
        self._ids = itertools.count()
        release_free_heap()

    def _load_sharded(self, a: EngineArgs, device: str, load_kwargs: dict) -> None:
        """Rank 0's shard here, the others' in the worker processes (spawned here, or torchrun's), loaded at once."""
        if a.native_kernels:
            raise ValueError("native_kernels=True: the native CPU kernels do not run under tensor parallelism (each "
                             "rank runs the reference model); leave native_kernels unset")
        # rank 0's plan, built first: an impossible split is refused before any worker starts
        plan = ShardPlan(ModelConfig.from_dir(self.model_path).text, 0, a.tensor_parallel_size,
                         a.enable_expert_parallel)
        self.workers = start_group(a.tensor_parallel_size, torch.device(device))
        self.workers.send("worker", ("load",), (str(self.model_path), load_kwargs, a.enable_expert_parallel),
                          reply=True)
        error = None
        try:
            self.model, self.model_config, self.load_report = load_model(
                self.model_path, device=self.workers.comm.device, vision=not a.language_model_only, **load_kwargs,
                shard=plan, comm=self.workers.comm)
        except Exception as e:
            error = e
        try:
            self.workers.replies("loading the checkpoint")  # every rank answers, so none is left waiting
        except Exception:
            self.workers.close()
            raise
        if error is not None:
            self.workers.close()
            raise error

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers (a no-op on one process); the LLM cannot generate afterwards."""
        if self.workers is not None:
            self.workers.close()
            self.workers = None

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams() with the checkpoint's generation_config.json defaults, as vLLM does."""
        return SamplingParams().with_defaults(self.generation_defaults())

    def generation_defaults(self) -> dict:
        """The SamplingParams fields the generation config sets (see --generation-config), for `with_defaults`."""
        return {field: self.generation_config[key] for key, field in GENERATION_DEFAULTS.items()
                if self.generation_config.get(key) is not None}

    def _prompts(self, prompts) -> list[dict]:
        if isinstance(prompts, (str, dict)) or (_is_token_ids(prompts) and len(prompts) > 0):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise TypeError(f"{PROMPT_FORMS}; got {type(prompts).__name__}")
        out = []
        for p in prompts:
            if isinstance(p, str):
                p = {"prompt": p}
            elif _is_token_ids(p):
                p = {"prompt_token_ids": list(p)}
            elif not (isinstance(p, dict) and isinstance(p.get("prompt"), (str, type(None)))
                      and (p.get("prompt") is not None or "prompt_token_ids" in p)
                      and _is_token_ids(p.get("prompt_token_ids", []))):
                raise TypeError(f"{PROMPT_FORMS}; got {_describe(p)}")
            out.append(dict(p))
        for p in out:
            if "prompt_token_ids" not in p:
                if self.tokenizer is None:
                    raise ValueError("text prompts need a tokenizer (this LLM was made with skip_tokenizer_init)")
                p["prompt_token_ids"] = self.tokenizer.encode(p["prompt"])
            p["prompt_token_ids"], p["mm"] = self._multimodal(p)
        return out

    def _multimodal(self, p: dict):
        data = p.get("multi_modal_data") or {}
        unknown = set(data) - {"image", "video"}
        if unknown:
            raise ValueError(f"multi_modal_data takes 'image' and 'video', not {', '.join(sorted(unknown))}")
        images, videos = as_list(data.get("image")), video_list(data.get("video"))
        if (images or videos) and self.processor_config is None:
            raise ValueError("this model takes text only (no vision tower"
                             f"{' loaded' if self.model_config.vision else ''}); it cannot take images or videos")
        encode = self.tokenizer.encode if self.tokenizer is not None else _no_tokenizer
        return prepare_prompt(p["prompt_token_ids"], images, videos, self.model_config, self.processor_config,
                              encode, self.media_limits, self.media_policy)

    def _params(self, sampling_params, n: int) -> list[SamplingParams]:
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * n
        if not isinstance(sampling_params, (list, tuple)) or not all(isinstance(p, SamplingParams)
                                                                     for p in sampling_params):
            raise TypeError("sampling_params must be a SamplingParams or a list of them (one per prompt), got "
                            f"{type(sampling_params).__name__}")
        if len(sampling_params) != n:
            raise ValueError(f"got {len(sampling_params)} SamplingParams for {n} prompts")
        return list(sampling_params)

    def _submit(self, prompts, sampling_params) -> list[str]:
        items = self._prompts(prompts)
        params = self._params(sampling_params, len(items))
        ids = []
        try:
            for item, p in zip(items, params):
                rid = str(next(self._ids))
                self.engine.add_request(rid, item["prompt_token_ids"], p, item.get("prompt"), mm=item.get("mm"))
                ids.append(rid)
        except Exception:
            for rid in ids:
                self.engine.abort(rid)
            raise
        return ids

    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for one prompt or a list; results in input order (request ids count up from submission).
        use_tqdm: a progress line on stderr (prompts done, output tokens/s) for more than one prompt, when stderr
        is a terminal."""
        many = isinstance(prompts, (list, tuple)) and not _is_token_ids(prompts) and len(prompts) > 1
        progress = _Progress() if use_tqdm and many and sys.stderr.isatty() else None
        finished = []
        for out in self.stream(prompts, sampling_params):
            if out.finished:
                finished.append(out)
                if progress is not None:
                    progress.update(len(finished), len(prompts), sum(len(c.token_ids) for c in out.outputs))
        if progress is not None:
            progress.close()
        return sorted(finished, key=lambda out: int(out.request_id))

    def get_tokenizer(self):
        """The `qwen35.tokenizer.Tokenizer` (encode, decode, chat_template, eos ids), as vLLM's LLM.get_tokenizer."""
        return self.tokenizer

    def stream(self, prompts, sampling_params=None, output_kind: str = "cumulative") -> Iterator[RequestOutput]:
        """Yield RequestOutputs as requests progress; the last one of each request has `finished` set.

        output_kind "cumulative": text, token ids and logprobs so far; "delta": only what is new since that
        request's previous yield (as vLLM's RequestOutputKind.DELTA). Closing the iterator early aborts what is
        still running and frees its cache."""
        if output_kind not in ("cumulative", "delta"):
            raise ValueError(f"output_kind must be 'cumulative' or 'delta', got {output_kind!r}")
        ids = self._submit(prompts, sampling_params)
        pending = set(ids)
        sent: dict[tuple[str, int], tuple[int, int]] = {}  # (request, completion) -> (chars, tokens) yielded
        try:
            while pending:
                if not self.engine.has_unfinished_requests():
                    raise RuntimeError(f"engine idle with {len(pending)} requests unreported")
                for out in self.engine.step():
                    if out.request_id not in pending:
                        continue
                    if out.finished:
                        pending.discard(out.request_id)
                    if output_kind == "delta":
                        for c in out.outputs:
                            chars, toks = sent.get((out.request_id, c.index), (0, 0))
                            sent[(out.request_id, c.index)] = (len(c.text), len(c.token_ids))
                            c.text, c.token_ids = c.text[chars:], c.token_ids[toks:]
                            if c.logprobs is not None:
                                c.logprobs = c.logprobs[toks:]
                    yield out
        finally:
            for rid in pending:
                self.engine.abort(rid)

    def chat(self, messages, sampling_params=None, tools: list[dict] | None = None,
             chat_template_kwargs: dict[str, Any] | None = None, add_generation_prompt: bool = True,
             escape_special_tokens: bool = False, continue_final_message: bool = False):
        """escape_special_tokens: encode special-token strings inside message content (e.g. a user's literal
        `<|im_end|>`) as plain text instead of special tokens (the default, as in vLLM).
        continue_final_message: continue the final (assistant) message instead of starting a new one."""
        from qwen35.chat import chat as _chat

        return _chat(self, messages, sampling_params, tools, chat_template_kwargs, add_generation_prompt,
                     escape_special_tokens, continue_final_message)
