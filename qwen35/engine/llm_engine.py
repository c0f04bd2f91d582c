"""The engine: scheduler + cache managers + model runner, joined by `step()`. Requests join and leave the running
batch at every step; each step is one packed forward that mixes prefill chunks and decode tokens."""

from __future__ import annotations

import itertools
import os

import torch

from qwen35.cache.hybrid import HybridCache
from qwen35.cache.manager import BlockManager, SlotPool
from qwen35.config import EngineConfig
from qwen35.engine.request import Request
from qwen35.engine.runner import ModelRunner
from qwen35.engine.sampler import SampleRow, sample, top_logprobs
from qwen35.engine.scheduler import Scheduler
from qwen35.outputs import CompletionOutput, Logprob, RequestOutput
from qwen35.sampling_params import SamplingParams

MiB = 2**20
CPU_KV_DEFAULT_BYTES = 4 * 2**30


class EngineError(ValueError):
    """A request or engine setting the engine cannot honour; the message says why."""


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


class LLMEngine:
    def __init__(self, model, model_config, tokenizer, config: EngineConfig, device="cpu"):
        self.model, self.model_config, self.tokenizer, self.config = model, model_config, tokenizer, config
        self.device = torch.device(device)
        text = model_config.text
        self.max_model_len = config.max_model_len or text.max_position_embeddings
        spec = model.cache_spec()
        dtype = model.lm_head.weight.dtype
        per_token = HybridCache.bytes_per_token(spec, dtype)
        per_slot = HybridCache.bytes_per_slot(spec, dtype)
        num_blocks = self._num_blocks(per_token, per_slot)
        self.cache = HybridCache(spec, num_blocks, config.block_size, config.max_num_seqs, dtype, self.device)
        self.blocks = BlockManager(num_blocks, config.block_size)
        self.slots = SlotPool(config.max_num_seqs)
        self.scheduler = Scheduler(self.blocks, self.slots, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = ModelRunner(model, self.cache, self.device)
        self.eos_ids = set(tokenizer.eos_token_ids if tokenizer else text.eos_token_id)
        if tokenizer is not None:
            model.vocab_limit = min(tokenizer.vocab_size, text.vocab_size)
        self._parents: dict[str, list[Request]] = {}
        self._arrival = itertools.count()
        self._global_gen = torch.Generator().manual_seed(config.seed)

    def _num_blocks(self, per_token: int, per_slot: int) -> int:
        c = self.config
        bs = c.block_size
        need_one = -(-self.max_model_len // bs)
        if per_token == 0:  # no attention layers: blocks only count tokens
            return max(need_one, 1) * 4
        if c.kv_cache_bytes is not None:
            budget = c.kv_cache_bytes
        else:
            budget = int(available_memory(self.device) * c.kv_cache_memory_fraction) - per_slot * c.max_num_seqs
            # never reserve more than every sequence at full length could use
            budget = min(budget, per_token * bs * need_one * c.max_num_seqs)
            if self.device.type == "cpu":  # CPU RAM is shared with everything else: 4 GiB unless one request needs more
                budget = min(budget, max(CPU_KV_DEFAULT_BYTES, per_token * bs * need_one))
        num_blocks = budget // (per_token * bs)
        if num_blocks < need_one:
            raise EngineError(
                f"the KV cache budget ({budget / MiB:.1f} MiB) holds {num_blocks * bs} tokens, but one request of "
                f"max_model_len={self.max_model_len} needs {need_one * bs * per_token / MiB:.1f} MiB "
                f"({per_token} bytes per token); raise kv_cache_bytes or lower max_model_len")
        return num_blocks

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prompt: str | None = None, mm=None) -> None:
        """mm: the MultimodalPrompt of a prompt whose placeholders `multimodal.prompt.expand_prompt` expanded."""
        if request_id in self._parents:
            raise EngineError(f"request id {request_id!r} is already running")
        if not prompt_token_ids:
            raise EngineError("the prompt is empty")
        vocab = self.model.vocab_limit or self.model_config.text.vocab_size
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise EngineError(f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
        n_prompt = len(prompt_token_ids)
        if n_prompt >= self.max_model_len:
            raise EngineError(f"the prompt has {n_prompt} tokens; max_model_len is {self.max_model_len}, which "
                              "leaves no room for output")
        if params.max_tokens is not None and n_prompt + params.max_tokens > self.max_model_len:
            raise EngineError(f"prompt ({n_prompt} tokens) + max_tokens ({params.max_tokens}) exceeds "
                              f"max_model_len ({self.max_model_len})")
        if mm is not None:
            if self.model.visual is None:
                raise EngineError("this model has no vision tower (text-only checkpoint or loaded without vision); "
                                  "it cannot take images or videos")
            if mm.num_prompt_tokens != n_prompt:
                raise EngineError(f"multimodal positions cover {mm.num_prompt_tokens} tokens, the prompt has "
                                  f"{n_prompt}")
        else:
            vt = self.model_config
            if any(t in (vt.image_token_id, vt.video_token_id) for t in prompt_token_ids) and vt.is_multimodal:
                raise EngineError("the prompt holds image/video placeholder tokens but no image or video was given")
        if params.stop and self.tokenizer is None:
            raise EngineError("stop strings need a tokenizer")
        children = []
        for i in range(params.n):
            gen = None
            if params.seed is not None:
                gen = torch.Generator().manual_seed(params.seed + i)
            elif not params.is_greedy:
                gen = torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=self._global_gen)))
            req = Request(f"{request_id}-{i}" if params.n > 1 else request_id, list(prompt_token_ids), params,
                          prompt=prompt, index=i, arrival=next(self._arrival), generator=gen, parent_id=request_id,
                          mm=mm)
            req.max_total_tokens = min(self.max_model_len,
                                       n_prompt + (params.max_tokens or self.max_model_len))
            if params.logprobs is not None:
                req.logprobs = []
            if params.prompt_logprobs is not None:
                req.prompt_logprobs = [None]
            if self.tokenizer is not None:
                req.detokenizer = self.tokenizer.incremental_detokenizer(params.skip_special_tokens)
            children.append(req)
            self.scheduler.add(req)
        self._parents[request_id] = children

    def abort(self, request_id: str) -> None:
        for req in self._parents.pop(request_id, []):
            if not req.is_finished:
                req.finish_reason = "abort"
                self.scheduler.finish(req)

    @property
    def scheduler_preemptions(self) -> int:
        return self.scheduler.num_preemptions

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[RequestOutput]:
        """Schedule, run one forward, sample, and report every parent request that made progress."""
        chunks = self.scheduler.schedule()
        if not chunks:
            return []
        logits = self.runner.run(chunks)
        sampling = [(c, lg) for c, lg in zip(chunks, logits) if c.completes_known_tokens]
        for c, lg in zip(chunks, logits):
            if lg is not None and c.request.prompt_logprobs is not None:
                self._record_prompt_logprobs(c, lg)
            c.request.num_computed_tokens += c.num_tokens
        if sampling:
            rows = [SampleRow(c.request.params, c.request.prompt_token_ids, c.request.output_token_ids,
                              c.request.generator, self._banned(c.request)) for c, _ in sampling]
            last = torch.stack([lg[-1] for _, lg in sampling])
            tokens = sample(last, rows)
            need_lp = [i for i, (c, _) in enumerate(sampling) if c.request.params.logprobs is not None]
            if need_lp:
                k = max(sampling[i][0].request.params.logprobs for i in need_lp)
                lp_rows = top_logprobs(last[need_lp], [tokens[i] for i in need_lp], k)
                for i, lp in zip(need_lp, lp_rows):
                    self._record_logprobs(sampling[i][0].request, tokens[i], lp)
            for (c, _), tok in zip(sampling, tokens):
                self._append_token(c.request, tok)
        touched = dict.fromkeys(c.request.parent_id for c, _ in sampling)
        return [self._output(pid) for pid in touched if pid in self._parents]

    def _banned(self, req: Request) -> list[int]:
        p = req.params
        if len(req.output_token_ids) >= p.min_tokens:
            return []
        return sorted(set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_ids))

    def _decode_one(self, tok: int) -> str:
        return self.tokenizer.decode([tok]) if self.tokenizer is not None else None

    def _record_logprobs(self, req: Request, tok: int, lp) -> None:
        chosen_lp, rank, ids, lps = lp
        k = req.params.logprobs
        entry = {i: Logprob(v, r + 1, self._decode_one(i)) for r, (i, v) in enumerate(zip(ids[:k], lps[:k]))}
        entry.setdefault(tok, Logprob(chosen_lp, rank, self._decode_one(tok)))
        req.logprobs.append(entry)

    def _record_prompt_logprobs(self, c, lg: torch.Tensor) -> None:
        """Row j of a chunk starting at position `start` predicts prompt token start + j + 1."""
        r = c.request
        start, first = r.num_computed_tokens, len(r.prompt_logprobs)
        last = min(start + c.num_tokens, r.num_prompt_tokens - 1)
        if first > last:
            return
        rows = lg[first - start - 1:last - start]
        actual = r.prompt_token_ids[first:last + 1]
        for (chosen_lp, rank, ids, lps), tok in zip(top_logprobs(rows, actual, r.params.prompt_logprobs), actual):
            entry = {i: Logprob(v, n + 1, self._decode_one(i)) for n, (i, v) in enumerate(zip(ids, lps))}
            entry.setdefault(tok, Logprob(chosen_lp, rank, self._decode_one(tok)))
            r.prompt_logprobs.append(entry)

    def _append_token(self, req: Request, tok: int) -> None:
        p = req.params
        req.output_token_ids.append(tok)
        if req.logprobs is not None:
            req.cumulative_logprob += req.logprobs[-1][tok].logprob
        n_out = len(req.output_token_ids)
        is_eos = tok in self.eos_ids and not p.ignore_eos
        stop_token = n_out >= p.min_tokens and (tok in p.stop_token_ids or is_eos)
        prev_len = len(req.text)
        if req.detokenizer is not None and not (stop_token and tok not in p.stop_token_ids):
            req.text += req.detokenizer.add(tok)
        if stop_token:
            self._finish(req, "stop", tok if tok in p.stop_token_ids else None)
            return
        if p.stop and n_out >= p.min_tokens:
            # only a stop string ending inside the new text can be new
            window = max(0, prev_len - max(len(s) for s in p.stop) + 1)
            hits = [(at, s) for s in p.stop if (at := req.text.find(s, window)) >= 0]
            if hits:
                at, s = min(hits)
                req.text = req.text[: at + (len(s) if p.include_stop_str_in_output else 0)]
                self._finish(req, "stop", s)
                return
        if req.num_tokens >= req.max_total_tokens:
            self._finish(req, "length", None)

    def _finish(self, req: Request, reason: str, stop_reason) -> None:
        if req.detokenizer is not None and reason != "stop":
            req.text += req.detokenizer.finish()
        req.finish_reason, req.stop_reason = reason, stop_reason
        self.scheduler.finish(req)

    def _output(self, parent_id: str) -> RequestOutput:
        children = self._parents[parent_id]
        first = children[0]
        outs = []
        for r in children:
            text = r.text
            if not r.is_finished and r.params.stop:  # hold back what could still become a stop string
                text = text[: max(0, len(text) - max(len(s) for s in r.params.stop) + 1)]
            outs.append(CompletionOutput(r.index, text, list(r.output_token_ids),
                                         r.cumulative_logprob if r.logprobs is not None else None,
                                         list(r.logprobs) if r.logprobs is not None else None,
                                         r.finish_reason, r.stop_reason))
        finished = all(r.is_finished for r in children)
        if finished:
            del self._parents[parent_id]
        return RequestOutput(parent_id, first.prompt, list(first.prompt_token_ids), first.prompt_logprobs, outs,
                             finished)
