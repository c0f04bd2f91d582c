"""The engine: scheduler + cache managers + model runner, joined by `step()`. Requests join and leave the running
batch at every step; each step is one packed forward that mixes prefill chunks and decode tokens. With prefix caching
(on by default) a request resumes past what earlier prompts left in the cache, and n > 1 completions share one
prefill. With a speculative_config, the MTP head drafts and each step verifies (speculative.py)."""

from __future__ import annotations

import itertools
import logging
import os
from dataclasses import replace

import torch

from qwen35.backends import gpu
from qwen35.cache.hybrid import HybridCache
from qwen35.cache.manager import BlockManager, SlotPool
from qwen35.cache.prefix import PrefixCache, PrefixCacheStats, SnapshotPool
from qwen35.config import EngineConfig
from qwen35.engine.request import Request
from qwen35.engine.runner import ModelRunner
from qwen35.engine.sampler import SampleRow, sample_many, sample_row, top_logprobs
from qwen35.engine.scheduler import Scheduler
from qwen35.engine.speculative import SpecDecodeStats, SpeculativeDecoding
from qwen35.engine.structured import StructuredOutputs
from qwen35.outputs import CompletionOutput, Logprob, RequestOutput
from qwen35.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

MiB = 2**20
CPU_KV_DEFAULT_BYTES = 4 * 2**30
SNAPSHOT_DEFAULT_BYTES = 2**30  # at most; and at most 8 snapshots per sequence slot
class EngineError(ValueError):
    """A request or engine setting the engine cannot honour; the message says why."""


class RequestFailed(RuntimeError):
    """The engine failed one request in a step (the others carried on); the message says why."""


def _token(tok: int | Exception) -> int:
    if isinstance(tok, Exception):
        raise tok
    return tok


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


def check_max_model_len(max_model_len: int, text) -> None:
    """`text`: the model's TextConfig. Positions past what its rotary covers give garbage quietly: refuse them."""
    if max_model_len <= text.max_context_len:
        return
    if text.rope_scaling:
        raise EngineError(f"max_model_len={max_model_len} exceeds the {text.max_context_len} positions YaRN extends "
                          f"this model to (original_max_position_embeddings x factor); raise 'factor' in config.json")
    raise EngineError(
        f"max_model_len={max_model_len} exceeds the model's max_position_embeddings ({text.max_position_embeddings}); "
        f"to go further enable YaRN: add \"rope_scaling\": {{\"rope_type\": \"yarn\", \"factor\": 4.0, "
        f"\"original_max_position_embeddings\": {text.max_position_embeddings}}} to config.json (in text_config for "
        f"multimodal checkpoints)")


class LLMEngine(SpeculativeDecoding):
    def __init__(self, model, model_config, tokenizer, config: EngineConfig, device="cpu", workers=None):
        """workers: the other ranks of a tensor-parallel model (distributed/executor.py `WorkerGroup`); each
        allocates the same blocks and slots for its own heads."""
        self.model, self.model_config, self.tokenizer, self.config = model, model_config, tokenizer, config
        self.device = torch.device(device)
        text = model_config.text
        self.max_model_len = config.max_model_len or text.max_context_len
        check_max_model_len(self.max_model_len, text)
        self.speculative = config.speculative_config
        k = self.num_spec = self.speculative.num_speculative_tokens if self.speculative else 0
        if k and getattr(model, "mtp", None) is None:
            raise EngineError("speculative_config method 'mtp' needs the checkpoint's MTP head: this checkpoint has "
                              "no mtp.* tensors (or the model was loaded without mtp=True)")
        spec = model.cache_spec(mtp=bool(k))
        dtype = model.dtype
        per_token = HybridCache.bytes_per_token(spec, dtype)
        per_slot = HybridCache.bytes_per_slot(spec, dtype)
        num_snapshots = self._num_snapshots(per_slot)
        seq_slots = config.max_num_seqs * (1 + k)  # with speculation each request has a ring of k more
        num_blocks = self._num_blocks(per_token, per_slot * (seq_slots + num_snapshots))
        graphs = workers is None and not config.enforce_eager and gpu.wanted(self.device, config.gpu_backend)
        self.cache = HybridCache(spec, num_blocks, config.block_size, seq_slots + num_snapshots, dtype, self.device,
                                 scratch=graphs)  # the scratch block and slot that pad a graph's decode steps
        self.blocks = BlockManager(num_blocks, config.block_size)
        self.slots = SlotPool(seq_slots)
        self.snapshots = SnapshotPool(seq_slots, num_snapshots)  # slots past the running requests'
        self.prefix = None
        if config.enable_prefix_caching:
            self.prefix = PrefixCache(self.blocks, self.snapshots if per_slot else None)
        self.scheduler = Scheduler(self.blocks, self.slots, config.max_num_seqs, config.max_num_batched_tokens,
                                   prefix=self.prefix, num_spec=k)
        logger.info("cache: %d KV blocks of %d tokens (%.1f MiB), %d state slots + %d snapshots (%.1f MiB)%s%s",
                    num_blocks, config.block_size, num_blocks * config.block_size * per_token / MiB,
                    seq_slots, num_snapshots, (seq_slots + num_snapshots) * per_slot / MiB,
                    "" if self.prefix else "; prefix caching off", f"; MTP drafts {k} tokens per step" if k else "")
        if workers is not None:
            workers.send("worker", ("make_cache",), (bool(k), num_blocks, config.block_size, seq_slots + num_snapshots),
                         reply=True)
            workers.replies("allocating the cache")
        self.runner = ModelRunner(model, self.cache, self.device, config.native_kernels, mtp=bool(k), workers=workers,
                                  gpu_backend=config.gpu_backend, graphs=graphs, max_num_seqs=config.max_num_seqs,
                                  max_blocks=-(-self.max_model_len // config.block_size))
        self.spec_stats = SpecDecodeStats(k)
        self.draft_hook = None  # tests: fn(request, drafts) -> the drafts to verify instead
        self._forks: list[tuple[Request, Request]] = []  # (leader, sibling) forked this step
        self.eos_ids = set(tokenizer.eos_token_ids if tokenizer else text.eos_token_id)
        # ids at or past the tokenizer's size (the embedding's padding rows) have no token: never drawn
        self.vocab_limit = min(tokenizer.vocab_size, text.vocab_size) if tokenizer is not None else text.vocab_size
        self._parents: dict[str, list[Request]] = {}
        self._arrival = itertools.count()
        self._failed: list[str] = []  # parents failed since the last step's outputs
        self._global_gen = torch.Generator().manual_seed(config.seed)
        # row by row (numpy's argmax) is fastest on a CPU; a GPU wants one transfer for the step
        self.batched_sampling = self.device.type != "cpu"
        self.draft_ids = self._draft_ids(self.speculative.draft_vocab_size) if k else None
        self.structured = None
        if tokenizer is not None:
            self.structured = StructuredOutputs(tokenizer, text.vocab_size, (tokenizer.token_to_id("<think>"),
                                                                             tokenizer.token_to_id("</think>")))

    def _num_snapshots(self, per_slot: int) -> int:
        """Snapshots the pool holds: state_snapshot_bytes' worth, by default 8 per sequence slot within
        SNAPSHOT_DEFAULT_BYTES (a tenth of free memory on a GPU)."""
        c = self.config
        if not c.enable_prefix_caching or per_slot == 0:
            return 0
        if c.state_snapshot_bytes is not None:
            if 0 < c.state_snapshot_bytes < per_slot:
                raise EngineError(f"state_snapshot_bytes ({c.state_snapshot_bytes}) holds no snapshot: one takes "
                                  f"{per_slot} bytes (0 turns snapshots off)")
            return c.state_snapshot_bytes // per_slot
        cap = SNAPSHOT_DEFAULT_BYTES if self.device.type == "cpu" else available_memory(self.device) // 10
        return max(1, min(8 * c.max_num_seqs, cap // per_slot))

    def _num_blocks(self, per_token: int, state_bytes: int) -> int:
        c = self.config
        bs = c.block_size
        need_one = -(-self.max_model_len // bs)
        if per_token == 0:  # no attention layers: blocks only count tokens
            return max(need_one, 1) * 4
        if c.kv_cache_bytes is not None:
            budget = c.kv_cache_bytes
        else:
            budget = int(available_memory(self.device) * c.kv_cache_memory_fraction) - state_bytes
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
        """mm: the MultimodalPrompt of a prompt whose placeholders `multimodal.prompt.expand_prompt` expanded.
        Everything is checked and every completion built before any is queued: a rejected request leaves nothing."""
        if request_id in self._parents:
            raise EngineError(f"request id {request_id!r} is already running")
        params = replace(params)  # validated again, and a copy: later changes by the caller cannot reach the step
        prompt_token_ids = self._truncate(prompt_token_ids, params, mm)
        self._check(prompt_token_ids, params, mm)
        children = [self._child(request_id, i, prompt_token_ids, params, prompt, mm) for i in range(params.n)]
        if self.prefix is not None:  # one prefill: the others are forked from the first's
            for sib in children[1:]:
                sib.fork_of = children[0]
        for req in children:
            self.scheduler.add(req)
        self._parents[request_id] = children

    def _truncate(self, prompt_token_ids: list[int], params: SamplingParams, mm) -> list[int]:
        """The prompt's last `truncate_prompt_tokens` tokens (-1: as many as leave room for max_tokens or one)."""
        k = params.truncate_prompt_tokens
        if k is None:
            return prompt_token_ids
        if k > self.max_model_len:
            raise EngineError(f"SamplingParams.truncate_prompt_tokens ({k}) exceeds max_model_len "
                              f"({self.max_model_len})")
        if k == -1:
            k = self.max_model_len - (params.max_tokens or 1)
        if k >= len(prompt_token_ids):
            return prompt_token_ids
        if mm is not None:
            raise EngineError("truncate_prompt_tokens cannot cut a prompt with images or videos")
        return list(prompt_token_ids[len(prompt_token_ids) - k:]) if k > 0 else []

    def _check(self, prompt_token_ids: list[int], params: SamplingParams, mm) -> None:
        if not prompt_token_ids:
            raise EngineError("the prompt is empty")
        vocab = self.model_config.text.vocab_size
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise EngineError(f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
        if params.n > self.config.max_num_seqs:
            raise EngineError(f"SamplingParams.n ({params.n}) exceeds max_num_seqs ({self.config.max_num_seqs}), "
                              "the number of sequences this engine runs at once")
        for name in ("logprobs", "prompt_logprobs"):
            if (getattr(params, name) or 0) > vocab:
                raise EngineError(f"SamplingParams.{name} ({getattr(params, name)}) exceeds the vocabulary size "
                                  f"({vocab})")
        bad = [t for t in params.stop_token_ids if t >= vocab]
        if bad:
            raise EngineError(f"SamplingParams.stop_token_ids: {bad[0]} is outside the vocabulary (0..{vocab - 1})")
        for name in ("logit_bias", "allowed_token_ids"):  # ids that can be drawn: those with a token
            bad = [t for t in getattr(params, name) or () if t >= self.vocab_limit]
            if bad:
                raise EngineError(f"SamplingParams.{name}: {bad[0]} is not a token id (0..{self.vocab_limit - 1})")
        if params.structured_outputs is not None and self.structured is None:
            raise EngineError("structured output needs a tokenizer")
        if params.bad_words and self.tokenizer is None:
            raise EngineError("bad_words need a tokenizer")
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

    def _child(self, request_id: str, i: int, prompt_token_ids: list[int], params: SamplingParams, prompt, mm
               ) -> Request:
        gen = None
        # a request's generator lives where its logits are (a GPU's draws differ from a CPU's for the same seed)
        if params.seed is not None:  # an int64 seed + i (i < SamplingParams.MAX_N) stays within torch's uint64
            gen = torch.Generator(self.device).manual_seed(params.seed + i)
        elif not params.is_greedy:
            gen = torch.Generator(self.device).manual_seed(int(torch.randint(2**62, (1,), generator=self._global_gen)))
        req = Request(f"{request_id}-{i}" if params.n > 1 else request_id, list(prompt_token_ids), params,
                      prompt=prompt, index=i, arrival=next(self._arrival), generator=gen, parent_id=request_id, mm=mm)
        req.max_total_tokens = len(prompt_token_ids) + self.max_new_tokens(len(prompt_token_ids), params.max_tokens)
        if params.logprobs is not None:
            req.logprobs = []
        if params.prompt_logprobs is not None and i == 0:  # reported once per parent
            req.prompt_logprobs = [None]
        if self.tokenizer is not None:
            req.detokenizer = self.tokenizer.incremental_detokenizer(params.skip_special_tokens)
        if params.structured_outputs is not None:
            req.grammar = self.structured.matcher(params.structured_outputs, req.prompt_token_ids)
        if params.bad_words:
            req.bad_words_ids = self._bad_words_ids(params.bad_words)
        return req

    def max_new_tokens(self, num_prompt_tokens: int, max_tokens: int | None) -> int:
        """The one place a missing max_tokens is decided: the room left in the context (at most the generation
        config's max_new_tokens, EngineConfig.default_max_tokens); a given one was checked against that room."""
        room = self.max_model_len - num_prompt_tokens
        if max_tokens is not None:
            return min(max_tokens, room)
        return min(room, self.config.default_max_tokens or room)

    def abort(self, request_id: str) -> None:
        for req in self._parents.pop(request_id, []):
            if not req.is_finished:
                req.finish_reason = "abort"
                self.scheduler.finish(req)

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats:
        return self.prefix.stats if self.prefix is not None else PrefixCacheStats()

    @property
    def scheduler_preemptions(self) -> int:
        return self.scheduler.num_preemptions

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[RequestOutput]:
        """Schedule, run one forward, sample, and report every parent request that made progress or failed.

        The forward is shared (it updates every sequence's cache in place), so its failure is the caller's; what
        follows runs request by request, and a request that raises there fails alone (`_fail`)."""
        chunks = self.scheduler.schedule()
        if not chunks:
            return []
        try:
            logits = self.runner.run(chunks)
        except BaseException:
            self.scheduler.step_done(ok=False)
            raise
        self.scheduler.step_done()
        sampling = [(c.request, lg[-1]) for c, lg in zip(chunks, logits) if c.completes_known_tokens and not c.drafts]
        for c, lg in zip(chunks, logits):
            if lg is not None and c.request.prompt_logprobs is not None:
                self._guarded(c.request, self._record_prompt_logprobs, c, lg)
            c.request.num_computed_tokens += c.num_known
        sampling += self._fork(sampling)
        sampling = [(r, lg) for r, lg in sampling if not r.is_finished]
        if sampling:
            reqs = [r for r, _ in sampling]
            last = torch.stack([lg for _, lg in sampling]).float()
            self._constrain(last, reqs)
            drawable = last[:, :self.vocab_limit]  # ids without a token are never drawn; logprobs see them all
            rows = [SampleRow(r.params, r.prompt_token_ids, r.output_token_ids, r.generator, self._banned(r))
                    for r in reqs]
            if self.batched_sampling:  # a GPU: every row's token in one transfer, not a sync or two per row
                drawn = sample_many(drawable, rows)
                tokens = [None if r.is_finished else self._guarded(r, _token, drawn[i]) for i, r in enumerate(reqs)]
            else:
                tokens = [None if r.is_finished else self._guarded(r, sample_row, drawable[i], rows[i])
                          for i, r in enumerate(reqs)]  # a sibling's failure finishes a request mid-loop
            self._record_logprobs(last, reqs, tokens)
            for r, tok in zip(reqs, tokens):
                if not r.is_finished:
                    self._guarded(r, self._append_token, r, tok)
        verified = [(c, lg) for c, lg in zip(chunks, logits) if c.drafts]
        for c, lg in verified:
            self._verify(c, lg)
        if self.num_spec:
            self._propose(chunks)
        touched = dict.fromkeys([r.parent_id for r, _ in sampling] + [c.request.parent_id for c, _ in verified]
                                + self._failed)
        self._failed = []
        return [self._output(pid) for pid in touched if pid in self._parents]

    def _constrain(self, last: torch.Tensor, reqs: list[Request]) -> None:
        """Grammar masks on the rows of constrained requests (in place: their logprobs see the constraint, as in
        vLLM). A row whose grammar allows nothing fails its request."""
        rows = [i for i, r in enumerate(reqs) if r.grammar is not None and r.grammar.active and not r.is_finished]
        if not rows:
            return
        try:
            masks = self.structured.fill_masks([reqs[i].grammar for i in rows])
            empty = self.structured.apply_masks(last, masks, rows)
        except Exception as e:  # a broken matcher: fail those requests, not the step
            for i in rows:
                self._fail(reqs[i], e)
            return
        for j, i in enumerate(rows):
            if empty[j]:
                self._fail(reqs[i], ValueError(f"structured output: no token can continue the output under its "
                                               f"constraint ({reqs[i].grammar.error()})"))

    def _fork(self, sampling: list) -> list:
        """n > 1 siblings waiting on a prompt whose prefill just ended: forked from it, and sampled from its logits."""
        out = []
        for r, lg in sampling:
            if r.output_token_ids or r.num_computed_tokens != r.num_prompt_tokens:
                continue
            for sib in self._parents.get(r.parent_id, []):
                if sib.fork_of is r and not sib.is_finished:
                    if self.scheduler.fork(r, sib):
                        self.runner.fork(r, sib)
                        if self.num_spec:  # the MTP head's K/V of the copied block follows (_propose)
                            self._forks.append((r, sib))
                        out.append((sib, lg))
                    else:  # no slot or block now: it waits, and will resume from the cache
                        sib.fork_of = None
        return out

    def _record_logprobs(self, last: torch.Tensor, reqs: list[Request], tokens: list[int | None]) -> None:
        """The sampled tokens' logprobs, for the requests that asked: one batched top-k, or row by row if that
        raises, so that only a bad row's request fails."""
        rows = [i for i, r in enumerate(reqs) if r.logprobs is not None and not r.is_finished]
        if not rows:
            return
        try:
            lps = top_logprobs(last[rows], [tokens[i] for i in rows], max(reqs[i].params.logprobs for i in rows))
        except Exception:
            lps = [self._guarded(reqs[i], lambda i=i: top_logprobs(last[i:i + 1], [tokens[i]],
                                                                   reqs[i].params.logprobs)[0]) for i in rows]
        for i, lp in zip(rows, lps):
            if not reqs[i].is_finished:
                self._guarded(reqs[i], self._add_logprobs, reqs[i], tokens[i], lp)

    def _guarded(self, req: Request, fn, *args):
        """fn(*args), or None after failing `req` if it raises."""
        try:
            return fn(*args)
        except Exception as e:
            self._fail(req, e)
            return None

    def _fail(self, req: Request, exc: Exception) -> None:
        """Finish a request whose sampling or output handling raised, with its siblings (one unit): "error" for it,
        "abort" for the siblings still running. The step carries on with every other request."""
        logger.error("request %s failed in the engine step; the other requests continue", req.request_id,
                     exc_info=exc)
        req.error = f"{type(exc).__name__}: {exc}"
        for r in self._parents.get(req.parent_id, [req]):
            if r is req or not r.is_finished:
                r.finish_reason = "error" if r is req else "abort"
                self.scheduler.finish(r)
        self._failed.append(req.parent_id)

    def _banned(self, req: Request) -> list[int]:
        p, out = req.params, req.output_token_ids
        banned = set()
        if len(out) < p.min_tokens:
            banned = set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_ids)
        for seq in req.bad_words_ids:  # the last token of a bad word whose other tokens were just generated
            if len(seq) == 1 or (len(out) >= len(seq) - 1 and out[len(out) - len(seq) + 1:] == seq[:-1]):
                banned.add(seq[-1])
        return sorted(banned)

    def _bad_words_ids(self, words: list[str]) -> list[list[int]]:
        """Each word's tokens as written and after a space (as vLLM: a word mid-sentence is spelt with it)."""
        seqs = []
        for w in words:
            for text in (w.lstrip(), " " + w.lstrip()):
                ids = self.tokenizer.encode(text)
                if ids and ids not in seqs:
                    seqs.append(ids)
        return seqs

    def _decode_one(self, tok: int) -> str:
        return self.tokenizer.decode([tok]) if self.tokenizer is not None else None

    def _add_logprobs(self, req: Request, tok: int, lp) -> None:
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
        if req.grammar is not None:
            req.grammar.accept(tok, tok in self.eos_ids)
        req.output_token_ids.append(tok)
        if req.logprobs is not None:
            req.cumulative_logprob += req.logprobs[-1][tok].logprob
        n_out = len(req.output_token_ids)
        is_eos = tok in self.eos_ids and not p.ignore_eos
        stop_token = n_out >= p.min_tokens and (tok in p.stop_token_ids or is_eos)
        prev_len = len(req.text)
        # as vLLM: the token that stops the request (eos or a stop_token_ids id) stays out of the text unless
        # include_stop_str_in_output
        if req.detokenizer is not None and not (stop_token and not p.include_stop_str_in_output):
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
                             finished, error=next((r.error for r in children if r.error), None),
                             num_cached_tokens=first.num_cached_tokens or 0)
