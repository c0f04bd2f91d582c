"""`LLM`: the offline Python API, with vLLM's names and semantics. Every call drives the one batching engine."""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import itertools
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from qwen35.config import EngineConfig
from qwen35.engine.llm_engine import LLMEngine
from qwen35.hub import resolve_model
from qwen35.models.loader import load_model
from qwen35.multimodal.config import MediaLimits, ProcessorConfig
from qwen35.multimodal.inputs import MediaPolicy, as_list, prepare_prompt, video_list
from qwen35.outputs import RequestOutput
from qwen35.sampling_params import SamplingParams

# generation_config.json key -> SamplingParams field (what vLLM takes from it by default)
GENERATION_DEFAULTS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                       "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def media_limits(limit_mm_per_prompt: dict[str, int] | None) -> MediaLimits:
    limits = MediaLimits()
    if not isinstance(limit_mm_per_prompt, (dict, type(None))):
        raise ValueError(f"limit_mm_per_prompt takes {{'image': n, 'video': m}}, got {limit_mm_per_prompt!r}")
    for key, value in (limit_mm_per_prompt or {}).items():
        if key not in ("image", "video") or not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"limit_mm_per_prompt takes {{'image': n, 'video': m}} with n, m >= 0; "
                             f"got {key}={value!r}")
        limits = dataclasses.replace(limits, **{f"max_{key}s_per_prompt": value})
    return limits


def check_device(device: str | torch.device) -> torch.device:
    """The device if this torch build and machine can run on it; else a ValueError saying why, before any loading."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r} (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"device {device!r}: {why}")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif dev.type != "cpu":
        raise ValueError(f"device {device!r} is not supported (use cpu, cuda or cuda:N)")
    return dev


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


class LLM:
    def __init__(self, model: str | Path | None = None, dtype: str = "auto", device: str = "cpu", seed: int = 0,
                 max_model_len: int | None = None, max_num_seqs: int = 32, max_num_batched_tokens: int = 2048,
                 block_size: int = 16, kv_cache_bytes: int | None = None, kv_cache_memory_fraction: float = 0.5,
                 tokenizer: str | Path | None = None, skip_tokenizer_init: bool = False,
                 limit_mm_per_prompt: dict[str, int] | None = None, allowed_local_media_path: str | Path | None = None,
                 allow_remote_media: bool = False, allowed_media_domains: Sequence[str] | None = None,
                 media_fetch_timeout: float = 10.0, language_model_only: bool = False,
                 native_kernels: bool | None = None, quantization: str | None = None,
                 lm_head_quantization: str = "auto", quantization_group_size: int | None = None,
                 enable_prefix_caching: bool = True, state_snapshot_bytes: int | None = None,
                 revision: str | None = None):
        """limit_mm_per_prompt: {"image": n, "video": m} (defaults in multimodal.config.MediaLimits).
        allowed_local_media_path / allow_remote_media: where `image_url` / `video_url` chat parts may point
        besides data: URLs (media given directly in `multi_modal_data` is always taken); remote media only from
        public addresses, or if allowed_media_domains is given from those hosts only (wherever they resolve), each
        fetch within media_fetch_timeout seconds. language_model_only:
        load a multimodal checkpoint without its vision tower (text only, less memory). native_kernels: run the
        text decoder on the native CPU kernels (default: for bf16/fp16 and quantized weights on CPU; see
        backends.cpu.wanted). quantization: "int8" / "int4" quantize a float checkpoint's decoder weights while
        loading (round to nearest; int8 one scale per output row, int4 groups of quantization_group_size = 32
        columns with zero points), "none" dequantizes a quantized checkpoint; default (None): the checkpoint's own
        format (float stays float, FP8 block checkpoints run as int8, GPTQ-Int4 as int4). lm_head_quantization:
        "auto" (int8 when the model is quantized), "int8", "int4", "none". enable_prefix_caching: reuse the KV
        blocks and Gated DeltaNet state snapshots earlier prompts left in the cache (README: prefix caching);
        state_snapshot_bytes: the snapshot pool's memory (default: 8 per sequence slot, at most 1 GiB on CPU).
        model: a checkpoint directory or a Hugging Face repo id ("Qwen/Qwen3.5-0.8B", at `revision`), taken from the
        local Hugging Face cache or downloaded (qwen35.hub); `model_name` is then the repo id, else the folder name."""
        check_device(device)
        fix_mmap_threshold()
        if model is None:
            from qwen35.demo import demo_checkpoint

            model = demo_checkpoint()
        self.model_path = resolve_model(model, revision)
        self.model_name = str(model) if self.model_path != Path(model).expanduser() else self.model_path.name
        self.model, self.model_config, self.load_report = load_model(self.model_path, dtype=dtype, device=device,
                                                                     vision=not language_model_only,
                                                                     quantization=quantization,
                                                                     lm_head_quantization=lm_head_quantization,
                                                                     group_size=quantization_group_size)
        self.processor_config = None
        if self.model.visual is not None:
            self.processor_config = ProcessorConfig.from_dir(self.model_path, self.model_config.vision)
        self.media_limits = media_limits(limit_mm_per_prompt)
        self.media_policy = MediaPolicy.of(allowed_local_media_path, allow_remote_media, allowed_media_domains,
                                           media_fetch_timeout)
        gen_path = self.model_path / "generation_config.json"
        self.generation_config = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
        self.tokenizer = None
        if not skip_tokenizer_init:
            from qwen35.tokenizer import Tokenizer

            self.tokenizer = Tokenizer.from_dir(tokenizer or self.model_path, self.generation_config)
        engine_config = EngineConfig(max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                                     max_num_batched_tokens=max_num_batched_tokens, block_size=block_size,
                                     kv_cache_bytes=kv_cache_bytes, kv_cache_memory_fraction=kv_cache_memory_fraction,
                                     seed=seed, native_kernels=native_kernels,
                                     enable_prefix_caching=enable_prefix_caching,
                                     state_snapshot_bytes=state_snapshot_bytes)
        self.engine = LLMEngine(self.model, self.model_config, self.tokenizer, engine_config, device)
        self._ids = itertools.count()
        release_free_heap()

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams() with the checkpoint's generation_config.json defaults, as vLLM does."""
        return SamplingParams().with_defaults(self._generation_defaults())

    def _generation_defaults(self) -> dict:
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

    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Generate for one prompt or a list; results in input order (request ids count up from submission)."""
        finished = [out for out in self.stream(prompts, sampling_params) if out.finished]
        return sorted(finished, key=lambda out: int(out.request_id))

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
