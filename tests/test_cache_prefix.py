"""The prefix cache's parts without the engine: block hashes, the block manager's sharing and eviction, the snapshot
pool's eviction order, where prompts take snapshots, the scheduler's resume / alignment / fork, and state copies
taken part-way through a chunk by the recurrent layers (equal to the state of a prefill that stopped there)."""

import pytest
import torch

from qwen35 import SamplingParams
from qwen35.backends.cpu import CpuDecoder, library
from qwen35.cache.hybrid import HybridCache
from qwen35.cache.manager import BlockManager, SlotPool
from qwen35.cache.prefix import PrefixCache, SnapshotPool, block_hashes
from qwen35.engine.request import Request
from qwen35.engine.scheduler import Scheduler
from qwen35.models.batch import ForwardBatch, SeqChunk
from qwen35.models.loader import load_model


def test_block_hashes_chain_and_see_visual_items():
    a = block_hashes(list(range(40)), 16, None, 0)
    assert len(a) == 2  # full blocks only
    b = block_hashes(list(range(16)) + [99] + list(range(17, 40)), 16, None, 0)
    assert a[0] == b[0] and a[1] != b[1]
    assert block_hashes(list(range(40)), 16, a[0], 16) == a[1:]  # extending continues the chain
    # the same token ids with another image in block 1: blocks 1 and later differ, block 0 does not
    img = lambda d: lambda s, e: d if s <= 20 < e else b""  # noqa: E731
    x, y = block_hashes(list(range(48)), 16, None, 0, img(b"cat")), block_hashes(list(range(48)), 16, None, 0,
                                                                                   img(b"dog"))
    assert x[0] == y[0] and x[1] != y[1] and x[2] != y[2]


def test_block_manager_shares_caches_and_evicts_tails_first():
    evicted = []
    m = BlockManager(4, 16, on_evict=evicted.append)
    a = m.allocate(3)
    for b, h in zip(a, (b"h0", b"h1", b"h2")):
        m.register(b, h)
    assert m.match([b"h0", b"h1", b"x", b"h2"]) == a[:2]
    m.acquire(a[:2])  # a second request shares two of them
    m.free(a)
    assert m.num_free == 2 and m.num_cached == 1  # h2's block: free, still findable
    m.free(a[:2])
    assert m.num_free == 4 and m.num_cached == 3
    m.allocate(1)  # the empty block first
    assert evicted == []
    m.allocate(1)  # then the least recently freed: the tail (h2) before the blocks a longer match needs
    assert evicted == [b"h2"] and m.match([b"h0", b"h1", b"h2"]) == a[:2]
    m.register(a[0], b"other")  # a block is registered once; a hash names one block
    assert m.match([b"other"]) == []


def test_snapshot_pool_evicts_covered_least_recently_used_and_never_pinned():
    pool = SnapshotPool(first_slot=8, num_slots=3)
    s = [pool.reserve(16 * (i + 1)) for i in range(3)]
    assert sorted(x.slot for x in s) == [8, 9, 10] and pool.num_pinned == 3
    assert pool.reserve(64) is None  # every slot is being written
    pool.publish(s[0], b"a", [])
    pool.publish(s[1], b"b", [s[0]])  # b lies deeper on a's path
    pool.publish(s[2], b"c", [])
    pool.use(pool.find(b"c")), pool.unpin(pool.find(b"c"))
    new = pool.reserve(48)  # a, the least recently used, is also covered by b: evicted first
    assert pool.find(b"a") is None and pool.find(b"b") is not None and new.slot == s[0].slot
    pool.publish(new, b"d", [])
    pool.use(pool.find(b"b"))  # pinned: a resuming request will copy it this step
    assert pool.reserve(64).slot == s[2].slot  # none covered: the least recently used unpinned one, c
    pool.drop(b"b")
    assert pool.find(b"b") is not None  # a pinned snapshot stays while a request copies it
    pool.unpin(pool.find(b"b"))
    pool.drop(b"b")
    assert pool.find(b"b") is None and pool.num_pinned == 1  # the reservation above


def test_snapshot_positions_of_a_prompt():
    pc = PrefixCache(BlockManager(8, 16), SnapshotPool(1, 4))
    assert pc._positions(16) == []  # position 15 is the last token: nothing before it on a boundary but 0
    assert pc._positions(17) == [16]
    assert pc._positions(50) == [32, 48]  # the last boundary, and one before it within the tail
    assert pc._positions(60) == [48]  # the tail stays in one block
    assert pc._positions(1000) == [256, 512, 768, 976, 992]  # every 256 tokens
    assert pc._positions(3000) == [368 * k for k in range(1, 9)] + [2976, 2992]  # at most 8 of those, evenly
    long = pc._positions(100_000)
    assert len(long) <= 8 + 2 and long[-1] == 99_984 and all(p % 16 == 0 for p in long)


def req(rid, ids, n=1):
    return Request(rid, list(ids), SamplingParams(max_tokens=4, n=n))


def test_scheduler_resumes_from_the_cache_aligns_chunks_and_forks():
    blocks, slots = BlockManager(32, 16), SlotPool(4)
    pool = SnapshotPool(4, 4)
    s = Scheduler(blocks, slots, 4, 40, prefix=PrefixCache(blocks, pool))

    def run(step):
        s.step_done()
        for c in step:
            c.request.num_computed_tokens += c.num_tokens

    a = req("a", range(50))
    s.add(a)
    step = s.schedule()  # 40 of 50 tokens fit: the chunk stops at 32, a block boundary
    assert [(c.num_tokens, c.snapshots) for c in step] == [(32, [(32, 4)])]
    run(step)
    step = s.schedule()
    assert [(c.num_tokens, c.snapshots) for c in step] == [(18, [(16, 5)])]  # 48 = floor16(49)
    run(step)
    assert pool.num_used == 2 and pool.num_pinned == 0 and blocks.num_cached == 0
    b = req("b", list(range(49)) + [7, 7, 7])  # diverges at 49: resumes at 48 from a's snapshot
    s.add(b)
    step = s.schedule()
    c = [c for c in step if c.request is b][0]
    assert b.num_cached_tokens == 48 and c.num_tokens == 4 and c.restore.slot == 5
    assert b.block_ids[:3] == a.block_ids[:3] and pool.num_pinned == 1
    run(step)
    assert pool.num_pinned == 0
    s.finish(a), s.finish(b)
    assert blocks.num_free == 32 and slots.num_free == 4
    # n > 1: the siblings wait for the first one's prefill, then take its blocks and a copy of its partial block
    kids = [req(f"k{i}", range(100, 120), n=3) for i in range(3)]
    for k in kids[1:]:
        k.fork_of = kids[0]
    for k in kids:
        s.add(k)
    step = s.schedule()
    assert [c.request for c in step] == [kids[0]]
    run(step)
    assert s.fork(kids[0], kids[1]) and s.fork(kids[0], kids[2])
    assert kids[1].block_ids[0] == kids[0].block_ids[0] and kids[1].block_ids[1] != kids[0].block_ids[1]
    assert kids[2].num_computed_tokens == 20 and not s.waiting
    for k in kids:
        s.finish(k)
    assert blocks.num_free == 32 and slots.num_free == 4


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_state_copies_part_way_equal_a_prefill_that_stopped_there(checkpoint, backend):
    """A snapshot written inside a chunk (beside a stranger in the same step) holds what a prefill of exactly those
    tokens leaves in its slot; the chunk's own outputs and final state do not change. On the reference model and
    on the CPU backend's decoder (its own conv kernel)."""
    model = load_model(checkpoint("moe", seed=5)[0], dtype="float32")[0]
    if backend == "cpu":
        if not library.available():
            pytest.skip("native kernels unavailable (no C compiler/AVX2)")
        model = CpuDecoder(model)
    g = torch.Generator().manual_seed(0)
    ids, other = torch.randint(0, 150, (70,), generator=g).tolist(), torch.randint(0, 150, (23,), generator=g).tolist()
    bs = 16

    def forward(cache, chunks):
        batch = ForwardBatch.build(chunks, bs)
        with torch.no_grad():
            return model.compute_logits(model(batch.input_ids, batch, cache)[batch.logits_indices])

    ref = HybridCache(model.cache_spec(), 16, bs, 8, torch.float32)
    forward(ref, [SeqChunk(ids[:32], state_slot=0, block_ids=[0, 1])])
    forward(ref, [SeqChunk(ids[:48], state_slot=1, block_ids=[2, 3, 4])])
    whole = forward(ref, [SeqChunk(ids, state_slot=2, block_ids=[5, 6, 7, 8, 9], want_logits="all")])

    cache = HybridCache(model.cache_spec(), 16, bs, 8, torch.float32)
    logits = forward(cache, [SeqChunk(other, state_slot=3, block_ids=[10, 11]),
                             SeqChunk(ids, state_slot=2, block_ids=[5, 6, 7, 8, 9], want_logits="all",
                                      snapshots=[(48, 6), (32, 5), (70, 7)])])
    torch.testing.assert_close(logits[1:], whole, rtol=1e-5, atol=1e-5)
    # equal up to fp32 rounding: the projections ran over other rows (the packed matmuls tile by row count)
    for i in cache.ssm:
        for snap, slot in ((5, 0), (6, 1), (7, 2)):
            torch.testing.assert_close(cache.ssm[i][snap], ref.ssm[i][slot], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(cache.conv[i][snap], ref.conv[i][slot], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache.ssm[i][2], ref.ssm[i][2], rtol=1e-5, atol=1e-5)


def test_requests_arriving_together_compute_a_shared_prefix_once():
    """b and c share a's first 40 tokens and arrive with it: they wait while a computes them and snapshots at 32,
    where their prompts part (the last block boundary they share), then resume there. d, arriving later, finds a's
    blocks cached to 64 but no snapshot past 32: it resumes at 32 and snapshots at 64, the branch point, which e
    then resumes from."""
    blocks, slots = BlockManager(64, 16), SlotPool(8)
    s = Scheduler(blocks, slots, 8, 200, prefix=PrefixCache(blocks, SnapshotPool(8, 8)))

    def run(step):
        s.step_done()
        for c in step:
            c.request.num_computed_tokens += c.num_tokens

    shared = list(range(40))
    a, b, c = (req(x, shared + [i] * 60) for i, x in enumerate("abc"))
    for r in (a, b, c):
        s.add(r)
    step = s.schedule()
    assert [x.request for x in step] == [a] and sorted(k for k, _ in step[0].snapshots) == [32, 80, 96]
    run(step)
    step = s.schedule()
    assert [(x.request, x.request.num_cached_tokens, x.num_tokens) for x in step] == [(b, 32, 68), (c, 32, 68)]
    run(step)
    d, e = req("d", a.prompt_token_ids[:72] + [4] * 40), req("e", a.prompt_token_ids[:70] + [5] * 40)
    s.add(d)
    (x,) = s.schedule()
    assert x.request is d and d.num_cached_tokens == 32 and sorted(k + 32 for k, _ in x.snapshots) == [64, 96]
    run([x])
    s.add(e)
    (x,) = s.schedule()
    assert x.request is e and e.num_cached_tokens == 64


def test_a_prompts_own_snapshots_do_not_cover_each_other():
    """A's snapshots at 80 and 96 are a pair: the next turn parts from A between them and needs 80. So 96 does not
    make 80 first to go; B, which went on from 80, does."""
    blocks, slots = BlockManager(64, 16), SlotPool(4)
    pool = SnapshotPool(4, 8)
    s = Scheduler(blocks, slots, 4, 500, prefix=PrefixCache(blocks, pool))

    def run():
        step = s.schedule()
        s.step_done()
        for c in step:
            c.request.num_computed_tokens += c.num_tokens

    a = req("a", range(100))
    s.add(a)
    run()
    hs = a.block_hashes
    assert [pool.find(hs[4]).num_covering, pool.find(hs[5]).num_covering] == [0, 0]
    b = req("b", list(range(93)) + [7] * 60)  # the next turn: parts from a at 93
    s.add(b)
    run()
    assert b.num_cached_tokens == 80
    assert [pool.find(hs[4]).num_covering, pool.find(hs[5]).num_covering] == [1, 0]


def test_the_snapshot_budget_is_checked_and_planned(checkpoint):
    """state_snapshot_bytes too small for one snapshot is an error naming it and one snapshot's size; the pool takes
    what the budget holds; caching off reserves none."""
    from qwen35 import LLM
    from qwen35.engine.llm_engine import EngineError

    path = checkpoint("moe", seed=5)[0]
    with pytest.raises(EngineError, match=r"state_snapshot_bytes \(1\) holds no snapshot: one takes \d+ bytes"):
        LLM(path, dtype="float32", skip_tokenizer_init=True, max_model_len=64, state_snapshot_bytes=1)
    llm = LLM(path, dtype="float32", skip_tokenizer_init=True, max_model_len=64, max_num_seqs=2)
    e = llm.engine
    per_slot = HybridCache.bytes_per_slot(llm.model.cache_spec(), torch.float32)
    assert e.snapshots.num_slots == 16 and e.cache.ssm[0].shape[0] == 2 + 16  # 8 per sequence slot, past them
    llm = LLM(path, dtype="float32", skip_tokenizer_init=True, max_model_len=64, state_snapshot_bytes=3 * per_slot)
    assert llm.engine.snapshots.num_slots == 3
    llm = LLM(path, dtype="float32", skip_tokenizer_init=True, max_model_len=64, enable_prefix_caching=False)
    assert llm.engine.snapshots.num_slots == 0 and llm.engine.prefix is None
