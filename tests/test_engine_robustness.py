"""One request must never hurt the others: bad values are rejected before anything is scheduled, a request that
fails inside a step fails alone, `n` is bounded and counted; and logprobs cover the model's whole vocabulary (ids
past the tokenizer's size included, as transformers reports them) while sampling never draws an id without a token.

The checkpoint is a tiny dense model whose vocabulary (160) is larger than its tokenizer's (150), with the padding
rows of the (tied) embedding scaled up so that they dominate the logits: drawing one would be easy to see."""

import asyncio
import json

import pytest
import torch

from qwen35 import LLM, SamplingParams
from qwen35.engine import llm_engine
from qwen35.engine.llm_engine import EngineError, LLMEngine, RequestFailed
from qwen35.sampling_params import SamplingParamsError
from qwen35.serve.async_engine import AsyncEngine
from tests.tiny_models import build

NUM_TOKENS, VOCAB = 150, 160
EOS = NUM_TOKENS - 1


def write_tokenizer(path):
    """A word-level tokenizer of 150 ids: w0 .. w148 and an <eos> special token."""
    import tokenizers
    from tokenizers import models, pre_tokenizers

    tok = tokenizers.Tokenizer(models.WordLevel({f"w{i}": i for i in range(EOS)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([tokenizers.AddedToken("<eos>", special=True)])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("padded-vocab")
    hf = build("dense", path, seed=3, vocab_size=VOCAB)
    with torch.no_grad():
        hf.model.embed_tokens.weight[NUM_TOKENS:] *= 4  # tied: the LM head's padding rows too
    hf.save_pretrained(path)
    write_tokenizer(path)
    return path, hf


@pytest.fixture(scope="module")
def llm(ckpt):
    out = LLM(ckpt[0], dtype="float32", max_model_len=64, max_num_seqs=4)
    assert out.tokenizer.vocab_size == NUM_TOKENS and out.model_config.text.vocab_size == VOCAB
    return out


PROMPT = [5, 17, 42, 99, 3, 140, 7]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def solo(llm):
    return llm.generate(PROMPT, GREEDY)[0].outputs[0].token_ids


def assert_nothing_left(llm):
    eng = llm.engine
    assert not eng.has_unfinished_requests() and not eng.scheduler.waiting and not eng.scheduler.running
    assert eng.blocks.num_free == eng.blocks.num_blocks and eng.slots.num_free == eng.slots.num_slots
    assert not eng._parents


# -- 1: n is bounded, and counted -------------------------------------------------------------------------------


def test_n_is_bounded_by_sampling_params_and_by_max_num_seqs(llm):
    assert SamplingParams.MAX_N == 128 and SamplingParams(n=128).n == 128
    for n in (129, 1_000_000, 2**63 - 1):
        with pytest.raises(SamplingParamsError, match=r"SamplingParams\.n must be in \[1, 128\]"):
            SamplingParams(n=n)
    with pytest.raises(EngineError, match=r"SamplingParams\.n \(5\) exceeds max_num_seqs \(4\)"):
        llm.engine.add_request("r", PROMPT, SamplingParams(n=5))
    assert_nothing_left(llm)


def test_async_engine_counts_n_and_aborts_a_queued_parent_as_one_unit(llm):
    aeng = AsyncEngine(llm)

    async def main():
        # Holding the engine thread's lock keeps the add queued: the abort arrives before the engine sees it.
        with aeng._cond:
            task = asyncio.create_task(aeng.add_request("p", PROMPT, SamplingParams(n=3, max_tokens=40)))
            await asyncio.sleep(0)
            assert aeng.num_waiting == 3
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        for _ in range(500):
            if not (aeng._commands or aeng.num_waiting or aeng.num_running or llm.engine.has_unfinished_requests()):
                break
            await asyncio.sleep(0.01)

    try:
        asyncio.run(main())
        assert aeng.num_waiting == 0 and aeng.num_running == 0
        assert_nothing_left(llm)
    finally:
        aeng.shutdown()


# -- 2: every value checked where the request is built; a failure in the step fails one request ------------------


@pytest.mark.parametrize("name", ["temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                                  "frequency_penalty"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), 10**400],
                         ids=["nan", "inf", "-inf", "int_1e400"])
def test_non_finite_numbers_are_rejected_naming_the_field(name, value):
    with pytest.raises(SamplingParamsError, match=rf"SamplingParams\.{name} must be a finite number"):
        SamplingParams(**{name: value})


def test_seed_must_fit_int64_and_types_are_checked():
    assert SamplingParams(seed=2**63 - 1).seed == 2**63 - 1 and SamplingParams(seed=-2**63).seed == -2**63
    for bad in (2**64 - 1, 2**63, -2**63 - 1):
        with pytest.raises(SamplingParamsError, match=r"SamplingParams\.seed must be in"):
            SamplingParams(seed=bad, n=2)
    for bad, field in [(dict(stop=5), "stop"), (dict(stop_token_ids=7), "stop_token_ids"),
                       (dict(ignore_eos="yes"), "ignore_eos"), (dict(logprobs=True), "logprobs")]:
        with pytest.raises(SamplingParamsError, match=rf"SamplingParams\.{field} "):
            SamplingParams(**bad)


def test_values_the_engine_knows_are_checked_in_add_request(llm):
    eng = llm.engine
    for params, match in [(SamplingParams(logprobs=VOCAB + 1), r"SamplingParams\.logprobs \(161\) exceeds the voc"),
                          (SamplingParams(prompt_logprobs=10**9), r"SamplingParams\.prompt_logprobs"),
                          (SamplingParams(stop_token_ids=[3, VOCAB], min_tokens=2), r"stop_token_ids: 160 is out")]:
        with pytest.raises(EngineError, match=match):
            eng.add_request("r", PROMPT, params)
    assert_nothing_left(llm)
    # the whole vocabulary is fine
    out = llm.generate(PROMPT, SamplingParams(max_tokens=2, logprobs=VOCAB, prompt_logprobs=VOCAB,
                                              stop_token_ids=[VOCAB - 1], min_tokens=1))[0]
    assert len(out.outputs[0].logprobs[0]) == VOCAB and len(out.prompt_logprobs[1]) == VOCAB


def test_a_params_change_after_construction_is_checked_before_anything_is_scheduled(llm):
    """The report's case: seed 2**64 - 1 with n = 2 scheduled child 0, then failed on child 1's seed."""
    params = SamplingParams(n=2, seed=1, max_tokens=4)
    params.seed = 2**64 - 1
    with pytest.raises(SamplingParamsError, match=r"SamplingParams\.seed"):
        llm.engine.add_request("r", PROMPT, params)
    assert_nothing_left(llm)


def test_a_failure_while_building_children_schedules_none(llm, monkeypatch):
    made, make = [], llm_engine.Request

    def request(*args, **kw):
        if made:
            raise RuntimeError("second child")
        made.append(make(*args, **kw))
        return made[-1]

    monkeypatch.setattr(llm_engine, "Request", request)
    with pytest.raises(RuntimeError, match="second child"):
        llm.engine.add_request("r", PROMPT, SamplingParams(n=2, max_tokens=4))
    monkeypatch.undo()
    assert len(made) == 1 and made[0].block_ids == []
    assert_nothing_left(llm)
    llm.engine.add_request("r", PROMPT, SamplingParams(n=2, max_tokens=4))  # the id is free again
    llm.engine.abort("r")
    assert_nothing_left(llm)


class Exploding:
    def add(self, tok):
        raise RuntimeError("detokenizer exploded")


# Each poisons the engine's own copy of a request's params (or its detokenizer), past every check.
POISONS = {
    "temperature_nan": lambda r: setattr(r.params, "temperature", float("nan")),
    "top_k_not_an_int": lambda r: setattr(r.params, "top_k", 2.5),
    "logprobs_past_vocab": lambda r: setattr(r.params, "logprobs", 10**6),
    "prompt_logprobs_past_vocab": lambda r: setattr(r.params, "prompt_logprobs", 10**6),
    "detokenizer_raises": lambda r: setattr(r, "detokenizer", Exploding()),
}


@pytest.mark.parametrize("poison", list(POISONS))
def test_a_request_that_fails_in_the_step_fails_alone(llm, solo, poison):
    eng = llm.engine
    eng.add_request("innocent", PROMPT, GREEDY)
    eng.add_request("bad", PROMPT[:4], SamplingParams(n=2, temperature=0.8, max_tokens=12, logprobs=2,
                                                      prompt_logprobs=1))
    eng.add_request("after", PROMPT, GREEDY)
    for r in eng._parents["bad"]:
        POISONS[poison](r)
    finished = {}
    for _ in range(100):
        for out in eng.step():
            if out.finished:
                finished[out.request_id] = out
        if not eng.has_unfinished_requests():
            break
    bad = finished["bad"]
    assert bad.error and sorted(c.finish_reason for c in bad.outputs) in (["error", "error"], ["abort", "error"])
    for rid in ("innocent", "after"):
        assert finished[rid].error is None and finished[rid].outputs[0].token_ids == solo
    assert_nothing_left(llm)


def test_async_engine_sends_a_failed_request_its_error_and_streams_the_rest(llm, solo, monkeypatch):
    eng, aeng = llm.engine, AsyncEngine(llm)

    def add_request(request_id, *args, **kw):  # runs on the engine thread, before the request's first step
        LLMEngine.add_request(eng, request_id, *args, **kw)
        if request_id == "bad":
            eng._parents["bad"][0].detokenizer = Exploding()

    monkeypatch.setattr(eng, "add_request", add_request)

    async def collect(rid):
        last = None
        async for out in await aeng.add_request(rid, PROMPT, GREEDY):
            last = out
        return last

    async def main():
        with aeng._cond:  # both adds reach the engine between the same two steps
            tasks = [asyncio.create_task(collect(rid)) for rid in ("bad", "good")]
            await asyncio.sleep(0)
        return await asyncio.gather(*tasks, return_exceptions=True)

    try:
        err, out = asyncio.run(main())
    finally:
        aeng.shutdown()
    assert isinstance(err, RequestFailed) and "detokenizer exploded" in str(err)
    assert out.outputs[0].token_ids == solo
    assert_nothing_left(llm)


# -- 15: logprobs over the model's whole vocabulary; ids without a token are never drawn -------------------------


def test_logprobs_are_over_the_full_vocabulary_as_transformers(llm, ckpt):
    _, hf = ckpt
    prompt = [5, 17, 155, 99, 159, 140, 7]  # 155 and 159: in the model's vocabulary, not the tokenizer's
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3,
                                              prompt_logprobs=2))[0]
    c = out.outputs[0]
    full = prompt + c.token_ids
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([full])).logits[0].float(), -1)
    # the padding rows dominate: a sampler that drew from the full vocabulary would pick them
    assert (ref.argmax(-1) >= NUM_TOKENS).all()
    assert c.token_ids == ref[len(prompt) - 1:-1, :NUM_TOKENS].argmax(-1).tolist()
    for t in range(1, len(prompt)):
        entry = out.prompt_logprobs[t]
        assert abs(entry[prompt[t]].logprob - ref[t - 1, prompt[t]].item()) < 1e-4
        assert entry[prompt[t]].rank == int((ref[t - 1] > ref[t - 1, prompt[t]]).sum()) + 1
    for j, (tok, entry) in enumerate(zip(c.token_ids, c.logprobs)):
        row = ref[len(prompt) - 1 + j]
        top = torch.topk(row, 3)
        assert list(entry)[:3] == top.indices.tolist()
        for i, v in zip(top.indices.tolist(), top.values.tolist()):
            assert abs(entry[i].logprob - v) < 1e-4
            assert entry[i].decoded_token == (f"w{i}" if i < NUM_TOKENS else "")  # "": an id without a token
        assert abs(entry[tok].logprob - row[tok].item()) < 1e-4 and entry[tok].rank > 1
    assert_nothing_left(llm)


def test_sampling_never_draws_an_id_without_a_token(llm):
    outs = llm.generate([PROMPT] * 4, [SamplingParams(temperature=t, max_tokens=20, ignore_eos=True, seed=i,
                                                      repetition_penalty=1.3, top_p=0.99)
                                       for i, t in enumerate((0, 0.7, 1.5, 1e308))])
    for o in outs:
        assert len(o.outputs[0].token_ids) == 20 and max(o.outputs[0].token_ids) < NUM_TOKENS
    assert_nothing_left(llm)
