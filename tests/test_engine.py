"""The engine: scheduler and cache managers without a model, then the hybrid-cache consistency suite — requests
batched with strangers, split into awkward prefill chunks, preempted and resumed, aborted — must produce exactly
what each produces alone, and every block and slot must be free afterwards."""

import pytest
import torch

from qwen35 import LLM, SamplingParams
from qwen35.cache.manager import BlockManager, SlotPool
from qwen35.engine.llm_engine import EngineError
from qwen35.engine.request import Request, Status
from qwen35.engine.scheduler import Scheduler
from qwen35.sampling_params import SamplingParamsError


def make_req(rid, n_prompt, max_tokens=4):
    return Request(rid, list(range(1, n_prompt + 1)), SamplingParams(max_tokens=max_tokens))


def test_scheduler_chunks_prefill_under_budget_and_admits_fcfs():
    s = Scheduler(BlockManager(64, 4), SlotPool(3), max_num_seqs=3, max_num_batched_tokens=10)
    a, b, c, d = (make_req(x, n) for x, n in (("a", 7), ("b", 6), ("c", 2), ("d", 1)))
    for r in (a, b, c, d):
        s.add(r)
    step = s.schedule()
    assert [(x.request.request_id, x.num_tokens) for x in step] == [("a", 7), ("b", 3)]
    assert [x.completes_known_tokens for x in step] == [True, False]
    for x in step:
        x.request.num_computed_tokens += x.num_tokens
    a.output_token_ids.append(5)
    step = s.schedule()  # a decodes, b finishes its prompt, c is admitted; d waits for a sequence slot
    assert [(x.request.request_id, x.num_tokens) for x in step] == [("a", 1), ("b", 3), ("c", 2)]
    assert len(s.running) == 3 and list(s.waiting) == [d]
    s.finish(b)
    assert b.status is Status.FINISHED and b.block_ids == [] and s.slots.num_free == 1


def test_scheduler_preempts_newest_when_blocks_run_out_and_frees_everything():
    blocks, slots = BlockManager(4, 2), SlotPool(4)
    s = Scheduler(blocks, slots, max_num_seqs=4, max_num_batched_tokens=100)
    a, b = make_req("a", 4), make_req("b", 3)
    s.add(a), s.add(b)
    for x in s.schedule():
        x.request.num_computed_tokens += x.num_tokens
    assert blocks.num_free == 0
    a.output_token_ids.append(1)  # a needs a third block: b (newest) is preempted
    step = s.schedule()
    assert [x.request.request_id for x in step] == ["a"]
    assert b.status is Status.WAITING and b.num_computed_tokens == 0 and b.num_preemptions == 1
    assert s.waiting[0] is b and b.state_slot is None
    s.finish(a), s.finish(b)
    assert blocks.num_free == 4 and slots.num_free == 4


@pytest.fixture(scope="module")
def moe(checkpoint):
    path, hf = checkpoint("moe", seed=21)
    return path, hf


def prompts_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 150, (n,), generator=g).tolist() for n in lengths]


LENGTHS = [5, 70, 33, 130, 1, 64, 65, 17, 200, 2]


def make_llm(path, **kw):
    kw.setdefault("max_model_len", 320)
    return LLM(path, dtype="float32", skip_tokenizer_init=True, **kw)


def assert_all_free(llm):
    eng = llm.engine
    assert not eng.has_unfinished_requests()
    assert eng.blocks.num_free == eng.blocks.num_blocks
    assert eng.slots.num_free == eng.slots.num_slots


@pytest.fixture(scope="module")
def alone(moe):
    """Each request run alone, greedy and seeded-sampled: the reference for the consistency suite."""
    path, _ = moe
    llm = make_llm(path, max_num_seqs=1)
    prompts = prompts_of(LENGTHS, seed=1)
    greedy = SamplingParams(temperature=0, max_tokens=24)
    seeded = [SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=100 + i, max_tokens=24)
              for i in range(len(prompts))]
    ref_greedy = [llm.generate(p, greedy)[0].outputs[0].token_ids for p in prompts]
    ref_seeded = [llm.generate(p, sp)[0].outputs[0].token_ids for p, sp in zip(prompts, seeded)]
    assert_all_free(llm)
    return prompts, greedy, seeded, ref_greedy, ref_seeded


def test_engine_greedy_matches_transformers_request_by_request(moe, alone):
    _, hf = moe
    prompts, _, _, ref_greedy, _ = alone
    for p, out in list(zip(prompts, ref_greedy))[:4]:
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False, min_new_tokens=24)
        assert out == ref[0, len(p):].tolist()


@pytest.mark.parametrize("chunk", [7, 64, 1000], ids=lambda c: f"budget{c}")
def test_batched_with_strangers_and_chunked_prefill_equals_alone(moe, alone, chunk):
    path, _ = moe
    prompts, greedy, seeded, ref_greedy, ref_seeded = alone
    llm = make_llm(path, max_num_batched_tokens=chunk, max_num_seqs=8)
    outs = llm.generate(prompts, greedy)
    assert [o.outputs[0].token_ids for o in outs] == ref_greedy
    outs = llm.generate(prompts, seeded)
    assert [o.outputs[0].token_ids for o in outs] == ref_seeded
    assert_all_free(llm)


def test_preempted_and_resumed_requests_produce_the_same(moe, alone):
    path, _ = moe
    prompts, greedy, seeded, ref_greedy, ref_seeded = alone
    # 320-token max_model_len needs 20 blocks of 16; 26 blocks hold only a few of these requests at a time
    llm = make_llm(path, kv_cache_bytes=26 * 16 * llm_bytes_per_token(path), max_num_seqs=8,
                   max_num_batched_tokens=96)
    outs = llm.generate(prompts + prompts, [greedy] * len(prompts) + seeded)
    assert [o.outputs[0].token_ids for o in outs] == ref_greedy + ref_seeded
    assert llm.engine.scheduler_preemptions > 0
    assert_all_free(llm)


def llm_bytes_per_token(path):
    from qwen35.cache.hybrid import HybridCache
    from qwen35.models.loader import load_model

    model = load_model(path, dtype="float32")[0]
    return HybridCache.bytes_per_token(model.cache_spec(), torch.float32)


def test_abort_mid_flight_frees_everything_and_spares_the_rest(moe, alone):
    path, _ = moe
    prompts, greedy, _, ref_greedy, _ = alone
    llm = make_llm(path, max_num_batched_tokens=40, max_num_seqs=8)
    eng = llm.engine
    for i, p in enumerate(prompts):
        eng.add_request(str(i), p, greedy)
    finished = {}
    for step in range(200):
        if step == 3:
            eng.abort("1")  # mid prefill
            eng.abort("4")  # decoding
        if step == 9:
            eng.abort("8")
        for out in eng.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0].token_ids
        if not eng.has_unfinished_requests():
            break
    for i, ref in enumerate(ref_greedy):
        if str(i) not in ("1", "4", "8"):
            assert finished[str(i)] == ref
    assert_all_free(llm)


def test_n_greater_than_one(moe, alone):
    path, _ = moe
    prompts, greedy, _, ref_greedy, _ = alone
    llm = make_llm(path, max_num_seqs=8)
    out = llm.generate(prompts[1], SamplingParams(n=3, temperature=0, max_tokens=24))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(c.token_ids == ref_greedy[1] for c in out.outputs)
    sampled = llm.generate(prompts[1], SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=24))[0]
    again = llm.generate(prompts[1], SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=24))[0]
    assert [c.token_ids for c in sampled.outputs] == [c.token_ids for c in again.outputs]
    assert len({tuple(c.token_ids) for c in sampled.outputs}) > 1
    assert_all_free(llm)


def test_logprobs_match_transformers(moe):
    path, hf = moe
    llm = make_llm(path)
    (p,) = prompts_of([40], seed=9)
    out = llm.generate(p, SamplingParams(temperature=0, max_tokens=5, logprobs=3, prompt_logprobs=2))[0]
    full = p + out.outputs[0].token_ids
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([full])).logits[0].float(), -1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(p)
    for t in range(1, len(p)):
        entry = out.prompt_logprobs[t]
        assert p[t] in entry and len(entry) in (2, 3)
        assert abs(entry[p[t]].logprob - ref[t - 1, p[t]].item()) < 1e-4
        assert entry[p[t]].rank == int((ref[t - 1] > ref[t - 1, p[t]]).sum()) + 1
    total = 0.0
    for j, (tok, entry) in enumerate(zip(out.outputs[0].token_ids, out.outputs[0].logprobs)):
        row = ref[len(p) - 1 + j]
        top = torch.topk(row, 3).indices.tolist()
        assert list(entry)[:3] == top and entry[tok].rank == 1
        assert abs(entry[tok].logprob - row[tok].item()) < 1e-4
        total += entry[tok].logprob
    assert abs(out.outputs[0].cumulative_logprob - total) < 1e-6


def test_stop_token_ids_min_tokens_and_length(moe, alone):
    path, _ = moe
    prompts, _, _, ref_greedy, _ = alone
    llm = make_llm(path)
    ref = ref_greedy[2]
    stop_at = ref[5]
    out = llm.generate(prompts[2], SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[stop_at]))[0].outputs[0]
    first = ref.index(stop_at)
    assert out.token_ids == ref[: first + 1] and out.finish_reason == "stop" and out.stop_reason == stop_at
    out = llm.generate(prompts[2], SamplingParams(temperature=0, max_tokens=7))[0].outputs[0]
    assert out.token_ids == ref[:7] and out.finish_reason == "length"
    out = llm.generate(prompts[2], SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[ref[0]],
                                                  min_tokens=3))[0].outputs[0]
    assert len(out.token_ids) >= 3 and ref[0] not in out.token_ids[1:3]
    assert_all_free(llm)


def test_bad_requests_are_clear_errors_and_leave_nothing_behind(moe):
    path, _ = moe
    llm = make_llm(path, max_model_len=100)
    with pytest.raises(EngineError, match="max_model_len"):
        llm.generate([1] * 100, SamplingParams(max_tokens=1))
    with pytest.raises(EngineError, match=r"prompt \(90 tokens\) \+ max_tokens \(20\) exceeds max_model_len \(100\)"):
        llm.generate([[1] * 5, [1] * 90], SamplingParams(max_tokens=20))
    with pytest.raises(EngineError, match="outside the vocabulary"):
        llm.generate([5, 100000], SamplingParams(max_tokens=1))
    with pytest.raises(EngineError, match="empty"):
        llm.generate({"prompt_token_ids": []}, SamplingParams(max_tokens=1))
    for bad, field in [(dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(n=0), "n"),
                       (dict(max_tokens=0), "max_tokens"), (dict(top_k=-5), "top_k"), (dict(min_p=2), "min_p"),
                       (dict(presence_penalty=3), "presence_penalty"), (dict(stop=[""]), "stop"),
                       (dict(logprobs=-1), "logprobs"), (dict(min_tokens=5, max_tokens=2), "min_tokens"),
                       (dict(repetition_penalty=0), "repetition_penalty"), (dict(seed="x"), "seed")]:
        with pytest.raises(SamplingParamsError, match=rf"SamplingParams\.{field} "):
            SamplingParams(**bad)
    assert_all_free(llm)
    with pytest.raises(EngineError, match=r"KV cache budget .* needs"):
        make_llm(path, max_model_len=100, kv_cache_bytes=1000)


def test_streaming_yields_growing_outputs_and_closing_aborts(moe, alone):
    path, _ = moe
    prompts, greedy, _, ref_greedy, _ = alone
    llm = make_llm(path)
    seen = {}
    for out in llm.stream(prompts[:3], greedy):
        prev = seen.get(out.request_id, [])
        assert out.outputs[0].token_ids[: len(prev)] == prev
        seen[out.request_id] = out.outputs[0].token_ids
    assert [seen[k] for k in sorted(seen, key=int)] == ref_greedy[:3]
    it = llm.stream(prompts[:3], greedy)
    next(it)
    it.close()
    assert_all_free(llm)


def test_64_requests_offline_under_a_budget_of_a_few_requests(moe):
    path, _ = moe
    g = torch.Generator().manual_seed(64)
    lengths = torch.randint(1, 120, (64,), generator=g).tolist()
    prompts = prompts_of(lengths, seed=64)
    params = [SamplingParams(temperature=0, max_tokens=int(m)) for m in torch.randint(1, 40, (64,), generator=g)]
    ref_llm = make_llm(path, max_model_len=160, max_num_seqs=1)
    ref = [ref_llm.generate(p, sp)[0].outputs[0].token_ids for p, sp in zip(prompts, params)]
    # 40 blocks of 16 tokens: room for about four 160-token requests at once
    llm = make_llm(path, max_model_len=160, kv_cache_bytes=40 * 16 * llm_bytes_per_token(path), max_num_seqs=16,
                   max_num_batched_tokens=128)
    outs = llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outs] == ref
    assert all(o.finished and o.outputs[0].finish_reason == "length" for o in outs)
    assert llm.engine.scheduler_preemptions > 0
    assert_all_free(llm)


def test_cache_managers_reuse_the_lowest_free_indices():
    # The cache is allocated uninitialised: pages become resident when first written. Requests that come and go must
    # keep reusing the same low blocks and slots, not walk through the whole pool (RSS growing for hours).
    blocks, slots = BlockManager(1000, 16), SlotPool(32)
    for _ in range(50):
        held = [blocks.allocate(3) for _ in range(4)]
        s = [slots.allocate() for _ in range(4)]
        for h in held[::-1]:
            blocks.free(h)
        for x in s:
            slots.free(x)
    assert max(blocks.allocate(12)) == 11 and blocks.num_free == 988
    assert sorted(slots.allocate() for _ in range(4)) == [0, 1, 2, 3]


def test_batched_sampling_path_gives_the_same_tokens(moe, alone):
    """The GPU engine's sampling (every row's token in one transfer) on this CPU: the same greedy and seeded tokens
    as the row-by-row path, in the same steps."""
    path, _ = moe
    prompts, greedy, seeded, ref_greedy, ref_seeded = alone
    llm = make_llm(path, max_num_seqs=8)
    assert not llm.engine.batched_sampling  # a CPU's default
    llm.engine.batched_sampling = True
    outs = llm.generate(prompts + prompts, [greedy] * len(prompts) + seeded)
    assert [o.outputs[0].token_ids for o in outs] == ref_greedy + ref_seeded
    assert_all_free(llm)
