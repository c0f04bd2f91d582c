"""Speculative decoding with the MTP head, end to end: greedy output with speculation is the greedy output without
it, token for token — single requests, batches mixing speculative and plain requests, chunked prefill, prefix
caching on and off, n > 1, preemption mid-speculation, every acceptance count 0..k (forced through the engine's
draft hook), stops and max_tokens landing inside accepted drafts, logprobs, structured output — on the reference
path and the CPU backend, for the MoE, dense and Qwen3-Next kinds and the demo model (whose trained head gets real
drafts accepted). Afterwards no block, slot or request is left. Then rejection sampling keeps the target
distribution: chi-square tests of `verify_token` on a toy vocabulary, and of the tokens the engine verifies."""

import itertools
import math

import numpy as np
import pytest
import torch
from PIL import Image

from qwen35 import LLM, SamplingParams, StructuredOutputsParams
from qwen35.backends.cpu import CpuDecoder
from qwen35.cache.hybrid import HybridCache
from qwen35.engine.sampler import SampleRow, verify_token
from tests.test_mtp import mtp_checkpoint

BACKENDS = {"ref": dict(dtype="float32", native_kernels=False), "cpu": dict(dtype="bfloat16")}
MAX_TOKENS = 16
# lengths around a block (16) and a chunk of the recurrent form (16); two prompts share a 40-token prefix
PROMPT_LENGTHS = [3, 17, 40, 66]
# Logprobs with and without speculation differ by the rounding of chunks of other shapes only (float32)
TOL = 1e-4


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, 150, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


PROMPTS = [tokens(n, 10 + n) for n in PROMPT_LENGTHS]
PROMPTS.append(PROMPTS[2] + tokens(9, 99))  # resumes from the first's blocks with prefix caching


def greedy(max_tokens: int = MAX_TOKENS, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)


def spec(k: int, **kw) -> dict:
    return {"method": "mtp", "num_speculative_tokens": k, **kw}


def assert_all_free(llm: LLM) -> None:
    eng = llm.engine
    assert not eng.has_unfinished_requests()
    assert not eng.scheduler.running and not eng.scheduler.waiting
    assert eng.blocks.num_free == eng.blocks.num_blocks
    assert eng.slots.num_free == eng.slots.num_slots
    assert eng.snapshots.num_pinned == 0


class Oracle:
    """A draft hook that knows each prompt's greedy continuation: at each step it drafts the true next tokens for the
    first `a` positions and wrong ones after, `a` taken from `plan` (cycling through 0..k by default), so the step
    must accept exactly `a`. `plain(request)` requests get no drafts (they decode one token a step). It keeps what
    the engine's SpecDecodeStats must add up to."""

    def __init__(self, refs: dict[tuple, list[int]], k: int, vocab: int, plan=None, plain=lambda r: False):
        self.refs, self.k, self.vocab, self.plain = refs, k, vocab, plain
        self.plan = plan if plan is not None else itertools.cycle(range(k + 1))
        self.num_drafts = self.num_draft_tokens = self.num_accepted = 0
        self.accepted_per_pos = [0] * k
        self.forced = set()

    def __call__(self, req, drafts: list[int]) -> list[int]:
        if self.plain(req):
            return []
        n = len(drafts)
        assert 0 < n <= min(self.k, req.max_total_tokens - req.num_tokens - 1)  # never drafts past max_tokens
        true = self.refs[tuple(req.prompt_token_ids)][len(req.output_token_ids):][:n]
        assert true, "the request went on past its reference output"
        a = min(next(self.plan), len(true))
        self.forced.add(a)
        self.num_drafts += 1
        self.num_draft_tokens += n
        self.num_accepted += a
        for i in range(a):
            self.accepted_per_pos[i] += 1
        # past the end of a reference that stopped, any token: the request stops before
        return (true[:a] + [(t + 1) % self.vocab for t in true[a:]] + [0] * n)[:n]

    def check(self, stats, before) -> None:
        """stats: the engine's SpecDecodeStats now, `before` its `counts` when the oracle started (the engine verified
        only this oracle's drafts in between)."""
        now = counts(stats)
        assert [now[i] - before[i] for i in range(3)] == [self.num_drafts, self.num_draft_tokens, self.num_accepted]
        assert [x - y for x, y in zip(now[3], before[3])] == self.accepted_per_pos


def counts(stats) -> tuple:
    return stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens, list(stats.accepted_per_pos)


@pytest.fixture(scope="module")
def tiny(checkpoint, tmp_path_factory):
    """tiny(kind, backend, k=0, **engine_kw) -> LLM over the tiny checkpoint of `kind` with an MTP head (random), one
    per distinct request in the module; tiny.ref(kind, backend): greedy outputs of PROMPTS without speculation."""
    made, refs, paths = {}, {}, {}

    def get(kind: str, backend: str, k: int = 0, **kw) -> LLM:
        key = (kind, backend, k, repr(sorted(kw.items())))
        if key not in made:
            if kind not in paths:
                paths[kind] = mtp_checkpoint(kind, checkpoint, tmp_path_factory.mktemp("spec"))[0]
            kw.setdefault("max_model_len", 256)
            if k:
                kw["speculative_config"] = spec(k, **kw.pop("spec_kw", {}))
            made[key] = LLM(str(paths[kind]), skip_tokenizer_init=True, **BACKENDS[backend], **kw)
            assert isinstance(made[key].engine.runner.decoder, CpuDecoder) == (backend == "cpu")
        return made[key]

    def ref(kind: str, backend: str) -> dict[tuple, list[int]]:
        if (kind, backend) not in refs:
            llm = get(kind, backend, max_num_seqs=1)
            refs[kind, backend] = {tuple(p): o.outputs[0].token_ids for p, o in
                                   zip(PROMPTS, llm.generate(PROMPTS, greedy(2 * MAX_TOKENS)))}
        return refs[kind, backend]

    get.ref = ref
    return get


def outputs(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def expected(refs: dict, prompts, max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    return [refs[tuple(p)][:max_tokens] for p in prompts]


@pytest.mark.parametrize("kind,backend,k", [("moe", "ref", 1), ("moe", "ref", 3), ("moe", "cpu", 1), ("moe", "cpu", 3),
                                            ("dense", "ref", 3), ("dense", "cpu", 2), ("next", "ref", 2),
                                            ("next", "cpu", 3)], ids=lambda v: str(v))
def test_every_acceptance_count_gives_the_plain_greedy_output(tiny, kind, backend, k):
    """Single requests, one at a time: drafts forced to be accepted 0, 1, .., k tokens in turn give exactly what
    decoding without speculation gives, and the engine's statistics count exactly the forced acceptances."""
    refs = tiny.ref(kind, backend)
    llm = tiny(kind, backend, k)
    oracle = Oracle(refs, k, 150)
    llm.engine.draft_hook = oracle
    before = counts(llm.engine.spec_stats)
    try:
        got = [outputs(llm.generate([p], greedy()))[0] for p in PROMPTS]
    finally:
        llm.engine.draft_hook = None
    assert got == expected(refs, PROMPTS)
    assert oracle.forced == set(range(k + 1))
    oracle.check(llm.engine.spec_stats, before)
    assert_all_free(llm)


@pytest.mark.parametrize("backend,k,caching", [("ref", 1, False), ("ref", 3, True), ("cpu", 1, True),
                                               ("cpu", 3, False)], ids=lambda v: str(v))
def test_batch_mixing_speculative_and_plain_requests(tiny, backend, k, caching):
    """All prompts at once in prefill chunks of 13 tokens (a verify chunk may be cut short by the budget), half of
    the requests drafting (forced acceptance counts), half decoding plainly; then the head's own drafts (random, so
    mostly rejected); with prefix caching the second call resumes from what the first left in the cache."""
    refs = tiny.ref("moe", backend)
    llm = tiny("moe", backend, k, max_num_batched_tokens=13, max_num_seqs=8, enable_prefix_caching=caching)
    prompts = PROMPTS + PROMPTS[::-1]
    plain = {tuple(p) for p in PROMPTS[1::2]}
    llm.engine.draft_hook = Oracle(refs, k, 150, plain=lambda r: tuple(r.prompt_token_ids) in plain)
    try:
        outs = llm.generate(prompts, greedy())
    finally:
        llm.engine.draft_hook = None
    assert outputs(outs) == expected(refs, prompts)
    assert llm.engine.spec_stats.num_accepted_tokens > 0
    outs = llm.generate(prompts, greedy())
    assert outputs(outs) == expected(refs, prompts)
    assert any(o.num_cached_tokens for o in outs) == caching
    assert_all_free(llm)


@pytest.mark.parametrize("budget", [2, 3])
def test_token_budget_cuts_the_verify_chunk(tiny, budget):
    """With fewer tokens per step than 1 + k, a decoding request verifies only the drafts that fit (budget - 1)."""
    refs = tiny.ref("moe", "cpu")
    llm = tiny("moe", "cpu", 3, max_num_batched_tokens=budget)
    before = list(llm.engine.spec_stats.accepted_per_pos)
    llm.engine.draft_hook = Oracle(refs, 3, 150, plan=itertools.repeat(3))
    try:
        outs = llm.generate(PROMPTS, greedy())
    finally:
        llm.engine.draft_hook = None
    assert outputs(outs) == expected(refs, PROMPTS)
    accepted = [a - b for a, b in zip(llm.engine.spec_stats.accepted_per_pos, before)]
    assert all(accepted[:budget - 1]) and not any(accepted[budget - 1:]), accepted
    assert_all_free(llm)


@pytest.mark.parametrize("backend", ["ref", "cpu"])
def test_preempted_mid_speculation(tiny, backend):
    """A KV cache too small for the requests together: as their outputs grow the newest are preempted with drafts
    waiting to be verified (and their rings of slots out), recomputed and resumed, and still give the plain greedy
    output."""
    k, n_out = 3, 48
    prompts = [tokens(20, 300 + i) for i in range(5)]
    more = {tuple(p): o for p, o in zip(prompts, outputs(tiny("moe", backend, max_num_seqs=1).generate(
        prompts, greedy(n_out))))}
    probe = tiny("moe", backend, k)
    per_token = HybridCache.bytes_per_token(probe.engine.model.cache_spec(mtp=True), probe.engine.model.dtype)
    # each request ends at 68 tokens + 2 drafted past them: 5 blocks of 16, 25 together; 12 hold two or three
    llm = tiny("moe", backend, k, kv_cache_bytes=12 * 16 * per_token, max_model_len=128, max_num_seqs=8)
    assert llm.engine.blocks.num_blocks == 12
    llm.engine.draft_hook = Oracle(more, k, 150, plan=itertools.cycle([3, 3, 1]))
    sched = llm.engine.scheduler
    with_drafts = []  # whether each preempted request had drafts waiting to be verified
    preempt = sched._preempt
    sched._preempt = lambda req: (with_drafts.append(bool(req.spec_token_ids)), preempt(req))
    try:
        outs = llm.generate(prompts, greedy(n_out))
    finally:
        llm.engine.draft_hook = None
        del sched._preempt
    assert outputs(outs) == [more[tuple(p)] for p in prompts]
    assert llm.engine.scheduler_preemptions == len(with_drafts) and any(with_drafts), with_drafts
    assert llm.engine.spec_stats.num_accepted_tokens > 0
    assert_all_free(llm)


@pytest.mark.parametrize("backend", ["ref", "cpu"])
def test_n_siblings_forked_after_the_prefill(tiny, backend):
    """n = 3 greedy completions share one prefill (prefix caching forks the siblings from it, the MTP head's K/V of
    the shared partial block included), then draft and verify each on its own (different acceptance counts)."""
    refs = tiny.ref("moe", backend)
    llm = tiny("moe", backend, 2)
    forks = []
    fork = llm.engine.runner.fork
    llm.engine.runner.fork = lambda *a, **kw: (forks.append(kw.get("mtp_only", False)), fork(*a, **kw))
    llm.engine.draft_hook = Oracle(refs, 2, 150, plan=itertools.cycle([2, 0, 1, 1]))
    try:
        outs = llm.generate(PROMPTS[:3], greedy(n=3))
    finally:
        llm.engine.draft_hook = None
        del llm.engine.runner.fork
    assert [[c.token_ids for c in o.outputs] for o in outs] == [[r] * 3 for r in expected(refs, PROMPTS[:3])]
    assert forks.count(True) == forks.count(False) == 6
    assert_all_free(llm)


def test_abort_mid_speculation_frees_everything(tiny):
    """Requests aborted while drafts wait for verification (and their rings of slots are out) free every block and
    slot; the others finish with their plain greedy output."""
    refs = tiny.ref("moe", "cpu")
    llm = tiny("moe", "cpu", 3)
    eng = llm.engine
    eng.draft_hook = Oracle(refs, 3, 150, plan=itertools.cycle([1, 3, 0, 2]))
    for i, p in enumerate(PROMPTS):
        eng.add_request(str(i), p, greedy())
    finished, pending = {}, 0
    try:
        for step in range(100):
            if step == 3:
                pending = sum(bool(r.spec_token_ids) for r in eng.scheduler.running)
                eng.abort("1"), eng.abort("3")
            finished.update({o.request_id: o.outputs[0].token_ids for o in eng.step() if o.finished})
            if not eng.has_unfinished_requests():
                break
    finally:
        eng.draft_hook = None
    assert pending > 0
    assert finished == {str(i): refs[tuple(p)][:MAX_TOKENS] for i, p in enumerate(PROMPTS) if i not in (1, 3)}
    assert_all_free(llm)


def test_disable_by_batch_size(tiny):
    """No drafts while more than disable_by_batch_size requests run; drafts again once fewer remain."""
    refs = tiny.ref("moe", "cpu")
    llm = tiny("moe", "cpu", 2, spec_kw={"disable_by_batch_size": 2}, max_num_seqs=8)
    oracle = Oracle(refs, 2, 150, plan=itertools.repeat(2))
    before = counts(llm.engine.spec_stats)
    running = []

    def hook(req, drafts):
        running.append(len(llm.engine.scheduler.running))
        return oracle(req, drafts)

    llm.engine.draft_hook = hook
    try:
        # the short ones finish early; the last two then speculate
        outs = llm.generate(PROMPTS, [greedy(4), greedy(4), greedy(8), greedy(), greedy()])
    finally:
        llm.engine.draft_hook = None
    assert outputs(outs) == [refs[tuple(p)][:n] for p, n in zip(PROMPTS, [4, 4, 8, 16, 16])]
    assert running and max(running) <= 2
    oracle.check(llm.engine.spec_stats, before)
    assert_all_free(llm)


def test_cpu_default_stops_drafting_past_the_crossover(demo, monkeypatch):
    """Without disable_by_batch_size, a CPU engine drafts only while at most CPU_SPEC_MAX_BATCH requests run (past
    that a step is compute-bound and speculation costs more than it saves)."""
    from qwen35.engine import speculative

    monkeypatch.setattr(speculative, "CPU_SPEC_MAX_BATCH", 2)
    llm = demo(1)
    running = []

    def hook(req, drafts):
        running.append(len(llm.engine.scheduler.running))
        return drafts

    llm.engine.draft_hook = hook
    try:
        want = [o.outputs[0].token_ids for o in demo().generate(DEMO_PROMPTS, [greedy(4), greedy(8), greedy(30),
                                                                               greedy(30)])]
        got = llm.generate(DEMO_PROMPTS, [greedy(4), greedy(8), greedy(30), greedy(30)])
    finally:
        llm.engine.draft_hook = None
    assert [o.outputs[0].token_ids for o in got] == want
    assert running and max(running) <= 2
    assert_all_free(llm)


@pytest.mark.parametrize("backend", ["ref", "cpu"])
def test_logprobs_equal_those_without_speculation(tiny, backend):
    """The logprobs of tokens verified in a speculative chunk are those of the same tokens decoded one by one (top
    3 ids, ranks, values within float32 rounding), accepted drafts, rejected ones and bonus tokens alike; prompt
    logprobs are untouched. Caching off in both, so that both prefill the same chunks (bf16 prefills of other chunk
    shapes differ by ~1e-4 already; the CPU backend's verify rows equal its decode rows exactly)."""
    base = tiny("moe", backend, max_num_seqs=1, enable_prefix_caching=False)
    llm = tiny("moe", backend, 3, enable_prefix_caching=False)
    sp = greedy(logprobs=3, prompt_logprobs=2)
    ref_outs = base.generate(PROMPTS[:3], sp)
    llm.engine.draft_hook = Oracle(tiny.ref("moe", backend), 3, 150)
    try:
        outs = llm.generate(PROMPTS[:3], sp)
    finally:
        llm.engine.draft_hook = None
    for o, r in zip(outs, ref_outs):
        assert len(o.prompt_logprobs) == len(r.prompt_logprobs) and o.prompt_logprobs[0] is None
        for x, y in zip(o.prompt_logprobs[1:], r.prompt_logprobs[1:]):
            assert list(x) == list(y) and all(abs(x[t].logprob - y[t].logprob) < TOL for t in y)
    got, ref = [o.outputs[0] for o in outs], [o.outputs[0] for o in ref_outs]
    for c, r in zip(got, ref):
        assert c.token_ids == r.token_ids
        for x, y in zip(c.logprobs, r.logprobs, strict=True):
            assert list(x)[:3] == list(y)[:3]
            assert all(x[t].rank == y[t].rank and abs(x[t].logprob - y[t].logprob) < TOL for t in y)
        assert abs(c.cumulative_logprob - r.cumulative_logprob) < TOL
    assert_all_free(llm)


def chi_square_pvalue(counts: list[int], probs: list[float]) -> float:
    """Pearson's test of counts against probabilities (cells of probability 0 must be empty): the p-value, from the
    chi-square distribution's upper tail (the regularised upper incomplete gamma function)."""
    n = sum(counts)
    assert all(c == 0 for c, p in zip(counts, probs) if p == 0), (counts, probs)
    cells = [(c, n * p) for c, p in zip(counts, probs) if p > 0]
    assert min(e for _, e in cells) >= 5, "too few draws for the chi-square approximation"
    stat = sum((c - e) ** 2 / e for c, e in cells)
    df = len(cells) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


ALPHA = 1e-3  # every draw is seeded: a pass is deterministic, and a correct sampler fails one case in a thousand


def test_chi_square_pvalue_rejects_a_wrong_distribution():
    assert chi_square_pvalue([260, 240, 500], [0.25, 0.25, 0.5]) > 0.5
    assert chi_square_pvalue([330, 170, 500], [0.25, 0.25, 0.5]) < ALPHA
    # closed forms of the tail: erfc(sqrt(x / 2)) for one degree of freedom, e^(-x/2) (1 + x/2) for four
    x = 20**2 / 30 + 20**2 / 70
    assert chi_square_pvalue([50, 50], [0.3, 0.7]) == pytest.approx(math.erfc(math.sqrt(x / 2)), rel=1e-9)
    x = 4 * 10**2 / 200  # one count in each of 4 cells off by 10 (from 200 of 1000)
    got = chi_square_pvalue([210, 190, 210, 190, 200], [0.2] * 5)
    assert got == pytest.approx(math.exp(-x / 2) * (1 + x / 2), rel=1e-9)


TOY_LOGITS = [1.5, 1.0, 0.4, 0.0, -0.7, -2.0]


def toy_target(temperature: float, top_k: int, top_p: float) -> list[float]:
    """The distribution to sample from, from the definitions: softmax at the temperature, the top_k most likely
    kept, then the smallest set of the most likely whose mass reaches top_p, renormalised."""
    w = [math.exp(x / temperature) for x in TOY_LOGITS]
    order = sorted(range(len(w)), key=lambda i: -w[i])[:top_k or None]
    kept, mass, total = [], 0.0, sum(w[i] for i in order)
    for i in order:
        kept.append(i)
        mass += w[i] / total
        if mass >= top_p:
            break
    z = sum(w[i] for i in kept)
    return [w[i] / z if i in kept else 0.0 for i in range(len(w))]


@pytest.mark.parametrize("temperature,top_k,top_p,draft", [
    (1.0, 0, 1.0, 0), (1.0, 0, 1.0, 5),  # the likeliest and the least likely token drafted
    (0.7, 3, 1.0, 1), (0.7, 3, 1.0, 4),  # a draft top_k drops is never kept
    (1.5, 0, 0.7, 2), (1.5, 0, 0.7, 5),  # nor one top_p drops
    (2.0, 4, 0.9, 3)], ids=lambda v: str(v))
def test_verify_token_keeps_the_target_distribution(temperature, top_k, top_p, draft):
    """Rejection sampling against a one-hot draft: whatever is drafted, the tokens come out with the target
    probabilities (3000 seeded draws, chi-square; the draft's own cell included: it is kept as often as it is
    likely, never when the filters drop it)."""
    probs = toy_target(temperature, top_k, top_p)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    row = SampleRow(params, [], [], torch.Generator().manual_seed(1234), [])
    logits = torch.tensor(TOY_LOGITS)
    draws = [verify_token(logits, row, draft) for _ in range(3000)]
    seen = [draws.count(t) for t in range(len(TOY_LOGITS))]
    assert chi_square_pvalue(seen, probs) > ALPHA, (seen, probs)
    assert torch.equal(logits, torch.tensor(TOY_LOGITS))  # the caller's row is left as it was


def test_verify_token_greedy_is_the_argmax_whatever_the_draft():
    row = SampleRow(SamplingParams(temperature=0), [], [], None, [])
    logits = torch.tensor(TOY_LOGITS)
    assert [verify_token(logits, row, d) for d in range(6)] == [0] * 6
    banned = SampleRow(SamplingParams(temperature=0), [], [], None, [0])  # below min_tokens, say
    assert verify_token(logits, banned, 0) == 1


def test_engine_verified_tokens_follow_the_model_distribution(tiny):
    """Sampled requests (temperature 2, drawing among 3 token ids) with k = 1: the first token is sampled after the
    prefill, the second verified against a forced draft (the likeliest of the three, or one that is not allowed at
    all). The pairs follow p(t1) p(t2 | t1) from the model's logprobs without speculation (chi-square)."""
    base = tiny("moe", "cpu", max_num_seqs=1)
    llm = tiny("moe", "cpu", 1, spec_kw={"disable_by_batch_size": 64}, max_num_seqs=64)  # drafting at any batch
    prompt, allowed, T, N = tokens(6, 77), [11, 60, 123], 2.0, 600

    def target(ids):
        lp = base.generate([ids], greedy(1, logprobs=160))[0].outputs[0].logprobs[0]
        w = [math.exp(lp[t].logprob / T) for t in allowed]
        return [x / sum(w) for x in w]

    p1 = target(prompt)
    p2 = {t: target(prompt + [t]) for t in allowed}
    probs = [p1[i] * p2[a][j] for i, a in enumerate(allowed) for j in range(3)]
    likely = {a: allowed[max(range(3), key=lambda j: p2[a][j])] for a in allowed}
    llm.engine.draft_hook = lambda r, d: [likely[r.output_token_ids[0]] if r.params.seed % 2 else 0]
    sp = [SamplingParams(temperature=T, seed=s, max_tokens=3, allowed_token_ids=allowed, ignore_eos=True)
          for s in range(N)]
    try:
        outs = llm.generate([prompt] * N, sp)
    finally:
        llm.engine.draft_hook = None
    pairs = [tuple(o.outputs[0].token_ids[:2]) for o in outs]
    seen = [pairs.count((a, b)) for a in allowed for b in allowed]
    assert chi_square_pvalue(seen, probs) > ALPHA, (seen, [round(N * p) for p in probs])
    stats = llm.engine.spec_stats
    assert stats.num_drafts == N and 0 < stats.num_accepted_tokens < N // 2
    assert_all_free(llm)


DEMO_PROMPTS = ["The capital of France is", "Once upon a time", "def fib(n):", "Hello, my name is"]


@pytest.fixture(scope="module")
def demo():
    """demo(k=0, **engine_kw) -> LLM over the demo model (trained MTP head) on the CPU backend, one per request."""
    made = {}

    def get(k: int = 0, **kw) -> LLM:
        key = (k, repr(sorted(kw.items())))
        if key not in made:
            kw.setdefault("max_model_len", 512)
            if k:
                kw["speculative_config"] = spec(k)
            made[key] = LLM(**kw)
            assert isinstance(made[key].engine.runner.decoder, CpuDecoder)
        return made[key]

    return get


@pytest.mark.parametrize("k", [1, 3])
def test_demo_head_drafts_get_accepted_and_change_nothing(demo, k):
    """The trained head's own drafts: many are accepted, and greedy tokens and logprobs are those without
    speculation, beside seeded sampled requests in the same batch (which take the rejection-sampling path, and
    draw what they draw alone)."""
    sampled = [SamplingParams(temperature=0.8, top_p=0.9, seed=i, max_tokens=30, ignore_eos=True) for i in range(2)]
    sp = [greedy(40, logprobs=2)] * len(DEMO_PROMPTS) + sampled
    prompts = DEMO_PROMPTS + DEMO_PROMPTS[:2]
    ref = [o.outputs[0] for o in demo().generate(prompts, sp)][:len(DEMO_PROMPTS)]
    llm = demo(k)
    got = [o.outputs[0] for o in llm.generate(prompts, sp)]
    for c, r in zip(got, ref, strict=False):
        assert (c.token_ids, c.text) == (r.token_ids, r.text)
        for x, y in zip(c.logprobs, r.logprobs, strict=True):
            assert list(x) == list(y) and all(abs(x[t].logprob - y[t].logprob) < TOL for t in y)
    # a seeded request draws the same tokens whatever shares its batch (its drafts are its own)
    alone = [llm.generate(p, s)[0].outputs[0].token_ids for p, s in zip(DEMO_PROMPTS, sampled)]
    assert [c.token_ids for c in got[len(DEMO_PROMPTS):]] == alone and [len(t) for t in alone] == [30, 30]
    stats = llm.engine.spec_stats
    assert stats.acceptance_rate > 0.3 and all(n > 0 for n in stats.accepted_per_pos), stats
    assert_all_free(llm)


def test_demo_stops_inside_accepted_drafts(demo):
    """With every draft accepted (k = 3), a step appends output tokens 4i + 1 .. 4i + 4; a stop token, a stop string
    and a length limit that end the output at one of the first three of them end the request there, exactly as
    without speculation (tokens, text, finish and stop reasons)."""
    base, llm = demo(), demo(3)
    tok = base.get_tokenizer()
    prompt = DEMO_PROMPTS[1]
    ref = base.generate(prompt, greedy(48))[0].outputs[0].token_ids
    inside = [j for j in range(5, 44) if j % 4 != 0]
    j_tok = next(j for j in inside if ref[j] not in ref[:j])
    j_str, stop = next((j, s) for j in inside if j > j_tok and (s := tok.decode([ref[j]]).strip()).isalpha()
                       and s not in tok.decode(ref[:j]))
    cases = [(greedy(48, stop_token_ids=[ref[j_tok]]), j_tok, "stop"), (greedy(48, stop=[stop]), j_str, "stop"),
             (greedy(j_tok + 1), j_tok, "length")]
    refs = {tuple(tok.encode(prompt)): ref}
    drafts, first = llm.engine.spec_stats.num_drafts, llm.engine.spec_stats.accepted_per_pos[0]
    for sp, j, reason in cases:
        want = base.generate(prompt, sp)[0].outputs[0]
        assert (len(want.token_ids), want.finish_reason) == (j + 1, reason)
        llm.engine.draft_hook = Oracle(refs, 3, 10000, plan=itertools.repeat(3))
        try:
            got = llm.generate(prompt, sp)[0].outputs[0]
        finally:
            llm.engine.draft_hook = None
        assert (got.token_ids, got.text, got.finish_reason, got.stop_reason) == \
            (want.token_ids, want.text, want.finish_reason, want.stop_reason)
    stats = llm.engine.spec_stats  # every step kept its first draft (a stop cuts short the steps after it)
    assert stats.accepted_per_pos[0] - first == stats.num_drafts - drafts >= len(cases)
    assert_all_free(llm)


@pytest.mark.parametrize("constraint", [{"choice": ["Paris", "London", "a city in France"]},
                                        {"regex": r"[A-Z][a-z]+( [a-z]+){2,5}\."}], ids=["choice", "regex"])
def test_demo_structured_output_with_speculation(demo, constraint):
    """A grammar masks each verified row after the tokens accepted before it: the greedy output under a choice or
    regex constraint is the one without speculation (drafts the grammar forbids are rejected)."""
    sp = SamplingParams(temperature=0, max_tokens=24, structured_outputs=StructuredOutputsParams(**constraint))
    ref = [o.outputs[0] for o in demo().generate(DEMO_PROMPTS, sp)]
    llm = demo(3)
    before = llm.engine.spec_stats.num_draft_tokens
    got = [o.outputs[0] for o in llm.generate(DEMO_PROMPTS, sp)]
    assert [(c.token_ids, c.text, c.finish_reason) for c in got] == [(c.token_ids, c.text, c.finish_reason)
                                                                    for c in ref]
    assert llm.engine.spec_stats.num_draft_tokens > before
    assert_all_free(llm)


def test_demo_penalties_and_bans_see_the_tokens_accepted_before(demo):
    """Each verified row is processed with the output as it stands after the drafts accepted before it: repetition
    and frequency penalties, logit biases, bad words and min_tokens (eos banned) give the output without
    speculation, with every acceptance count forced."""
    base, llm = demo(), demo(3)
    sp = SamplingParams(temperature=0, max_tokens=40, min_tokens=30, repetition_penalty=1.3, frequency_penalty=0.4,
                        logit_bias={13: 2.0}, bad_words=["the"])
    want = [o.outputs[0] for o in base.generate(DEMO_PROMPTS, sp)]
    tok = base.get_tokenizer()
    refs = {tuple(tok.encode(p)): o.token_ids for p, o in zip(DEMO_PROMPTS, want)}
    llm.engine.draft_hook = Oracle(refs, 3, 10000)
    try:
        got = [o.outputs[0] for o in llm.generate(DEMO_PROMPTS, sp)]
    finally:
        llm.engine.draft_hook = None
    assert [(c.token_ids, c.text) for c in got] == [(c.token_ids, c.text) for c in want]
    plain = [o.outputs[0].token_ids for o in base.generate(DEMO_PROMPTS, greedy(40))]
    assert all(c.token_ids[:len(p)] != p for c, p in zip(want, plain))  # the settings do change the output
    assert_all_free(llm)


def test_demo_image_prompt(demo):
    """A prompt with an image (3D positions, which the MTP head's positions past the prompt follow): the head's own
    drafts, then forced acceptance counts, give the output without speculation."""
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8))
    messages = [{"role": "user", "content": [{"type": "image", "image": img},
                                             {"type": "text", "text": "What is in the picture?"}]}]
    want = demo().chat(messages, greedy(32))[0]
    llm = demo(3)
    assert llm.chat(messages, greedy(32))[0].outputs[0].token_ids == want.outputs[0].token_ids
    llm.engine.draft_hook = Oracle({tuple(want.prompt_token_ids): want.outputs[0].token_ids}, 3, 10000)
    try:
        got = llm.chat(messages, greedy(32))[0]
    finally:
        llm.engine.draft_hook = None
    assert got.prompt_token_ids == want.prompt_token_ids and got.outputs[0].token_ids == want.outputs[0].token_ids
    assert_all_free(llm)


def test_demo_draft_vocabulary(demo):
    """draft_vocab_size: the head drafts only among the first N ids and the added tokens (its LM head reads those
    rows alone), and verification keeps the output the one without speculation."""
    sp = greedy(40)
    ref = [o.outputs[0].token_ids for o in demo().generate(DEMO_PROMPTS, sp)]
    llm = LLM(max_model_len=512, speculative_config={"method": "mtp", "num_speculative_tokens": 2,
                                                      "draft_vocab_size": 1024})
    allowed = set(llm.engine.draft_ids.tolist())
    assert set(range(1024)) <= allowed and llm.engine.eos_ids <= allowed and len(allowed) < 1100
    drafted = []
    llm.engine.draft_hook = lambda req, drafts: drafted.extend(drafts) or drafts
    assert [o.outputs[0].token_ids for o in llm.generate(DEMO_PROMPTS, sp)] == ref
    assert drafted and set(drafted) <= allowed
    assert llm.engine.spec_stats.acceptance_rate > 0.2
    assert_all_free(llm)
    with pytest.raises(ValueError, match="draft_vocab_size must be a positive integer"):
        LLM(speculative_config={"method": "mtp", "draft_vocab_size": 0})


def test_plain_engine_keeps_no_fork_pairs(demo):
    """Only a speculative engine notes the (leader, sibling) pairs forked in a step, for the MTP head's K/V it copies
    after its pass, and clears them there; a plain engine keeps none (they held finished requests forever)."""
    for llm in (demo(), demo(1)):
        outs = llm.generate(DEMO_PROMPTS[:2], SamplingParams(n=3, temperature=0.8, seed=1, max_tokens=6))
        assert all(len(o.outputs) == 3 for o in outs)
        assert llm.engine._forks == []
        assert_all_free(llm)
