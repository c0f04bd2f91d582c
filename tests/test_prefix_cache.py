"""Prefix caching end to end: every request that resumes from the cache (KV blocks by content hash, Gated DeltaNet
state snapshots at 16-token boundaries) produces exactly the tokens it produces with caching off, greedy and seeded,
and resumes exactly where the design says it can — prompts diverging just before, at and after a snapshot, a
snapshot that resumed requests must leave untouched, requests sharing a prefix in one step, n > 1, chunked prefill,
preemption while blocks are shared, a second chat turn whose template stripped the thinking block, an edited last
message, a regenerate, and an image inserted mid-history or swapped for another. Afterwards every block and slot is
free (cached, evictable content allowed) and no snapshot is held."""

import hashlib
import itertools
import json

import numpy as np
import pytest
import torch
from PIL import Image

from qwen35 import LLM, SamplingParams
from qwen35.cache.hybrid import HybridCache
from qwen35.demo import DEMO_DIR

BLOCK = 16
MAX_TOKENS = 8
SNAPSHOT_POOL = 16 << 20  # far more snapshots than these tests take: the expected resume points assume no eviction
SEEDS = itertools.count(1000)
# Logprobs with and without caching differ by float32 rounding only (chunks of other shapes): ~2e-6 measured. A
# resumed state that is off shows here long before it flips a sampled token (the tiny models forget fast).
TOL = 1e-4


def floor16(n: int) -> int:
    return n // BLOCK * BLOCK


def snapshot_positions(n: int) -> set[int]:
    """Where a prompt of n tokens leaves state snapshots: the last block boundary before its last token, and the last
    one before its last 9 tokens (a next turn's template may rewrite the generation prompt's tail)."""
    return {p for p in (floor16(n - 1), floor16(n - 9)) if p > 0}


def greedy(n: int = 1, max_tokens: int = MAX_TOKENS) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, n=n, ignore_eos=True, logprobs=0)


def seeded(n: int = 1, max_tokens: int = MAX_TOKENS) -> SamplingParams:
    return SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=next(SEEDS), max_tokens=max_tokens, n=n,
                          ignore_eos=True, logprobs=0)


def both(prompts: list, n: int = 1, max_tokens: int = MAX_TOKENS) -> tuple[list, list[SamplingParams]]:
    """Each prompt twice in one call: greedy, then seeded (all greedy ones first)."""
    return prompts + prompts, [greedy(n, max_tokens)] * len(prompts) + [seeded(n, max_tokens) for _ in prompts]


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, 150, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def image_key(img: Image.Image) -> str:
    return f"{img.size}:{hashlib.sha256(img.tobytes()).hexdigest()}"


def common_blocks(a: tuple, b: tuple) -> int:
    n = 0
    while (n + 1) * BLOCK <= min(len(a), len(b)) and a[n * BLOCK:(n + 1) * BLOCK] == b[n * BLOCK:(n + 1) * BLOCK]:
        n += 1
    return n


class Twins:
    """An LLM with prefix caching and its twin without. Requests run on the cached one; `snaps` and `blocks` hold the
    prompt prefixes (token ids, image placeholders tagged with their image) where the cache has a state snapshot or
    a full KV block, to say where a new request must resume. `finish` replays everything with caching off, which must
    give the same tokens.

    The model of the design: a request resumes at the deepest snapshot that agrees with it, short of its last token,
    among those whose blocks are cached. A prompt snapshots at floor16(L-1) and floor16(L-9) (too short here for the
    interval ones); a request whose cached blocks reach deeper than its snapshot snapshots at that depth (a branch
    point). A request that needs blocks an earlier request of the same call is computing waits for it, which
    snapshots where the two part: it resumes there."""

    def __init__(self, on: LLM, off: LLM, image_token_id: int | None = None):
        self.on, self.off, self.image_token_id = on, off, image_token_id
        self.snaps, self.blocks, self.done = set(), set(), []

    def predict(self, keys: list[tuple]) -> list[int]:
        """Resume points of one call's requests, admitted in order; then what they leave behind is recorded."""
        wants, earlier, snaps = [], [], set()
        for k in keys:
            limit = (len(k) - 1) // BLOCK
            h = 0
            while h < limit and k[:(h + 1) * BLOCK] in self.blocks:
                h += 1
            common = max((common_blocks(k, q) for q in earlier), default=0)
            if common > h < limit:  # waits for the earlier request's snapshot where they part
                want = min(common, limit) * BLOCK
            else:
                want = max((p for p in range(BLOCK, h * BLOCK + 1, BLOCK) if k[:p] in self.snaps), default=0)
                if h * BLOCK > want:
                    snaps.add(k[:h * BLOCK])
            wants.append(want)
            earlier.append(k)
            snaps |= {k[:p] for p in snapshot_positions(len(k))} | ({k[:want]} if want else set())
        self.snaps |= snaps
        return wants

    def remember_blocks(self, keys: tuple, outputs) -> None:
        """Full blocks of what was computed: the prompt and each completion's tokens but its last."""
        for c in outputs:
            seq = keys + tuple(c.token_ids[:-1])
            self.blocks |= {seq[:p] for p in range(BLOCK, len(seq) + 1, BLOCK)}

    def generate(self, prompts: list, sampling_params: list[SamplingParams], check: str = "exact"):
        images = [[image_key(i) for i in p["multi_modal_data"]["image"]] if isinstance(p, dict) else []
                  for p in prompts]
        outs = self.on.generate(prompts, sampling_params)
        return self._record("generate", prompts, sampling_params, {}, images, outs, check)

    def chat(self, conversations: list, sampling_params: list[SamplingParams], check: str = "exact", **kw):
        images = [[image_key(p["image"]) for m in c if isinstance(m["content"], list) for p in m["content"]
                   if p["type"] == "image"] for c in conversations]
        outs = self.on.chat(conversations, sampling_params, **kw)
        return self._record("chat", conversations, sampling_params, kw, images, outs, check)

    def _record(self, how, prompts, sampling_params, kw, images, outs, check):
        """check: "exact" (resumes where predicted), "at_least" (the engine may resume deeper than predicted:
        requests admitted together, chunk-end snapshots) or "any" (KV pressure may evict what was predicted)."""
        assert len(outs) == len(prompts)
        keys = [self.keys(o.prompt_token_ids, imgs) for o, imgs in zip(outs, images)]
        for o, k, want in zip(outs, keys, self.predict(keys)):
            assert o.num_cached_tokens % BLOCK == 0 and 0 <= o.num_cached_tokens < len(o.prompt_token_ids)
            if check == "exact":
                assert o.num_cached_tokens == want, (o.num_cached_tokens, want)
            elif check == "at_least":
                assert o.num_cached_tokens >= want, (o.num_cached_tokens, want)
        for o, k in zip(outs, keys):
            self.remember_blocks(k, o.outputs)
        self.done += [(how, repr(kw), kw, p, sp, o) for p, sp, o in zip(prompts, sampling_params, outs)]
        return outs

    def keys(self, ids: list[int], images: list[str]) -> tuple:
        """Token ids, each image placeholder paired with its image: prompts agree only where both agree."""
        out, it, prev, label = [], iter(images), None, None
        for t in ids:
            if t == self.image_token_id:
                if prev != t:
                    label = next(it)
                out.append((t, label))
            else:
                out.append(t)
            prev = t
        assert next(it, None) is None, "every image has its placeholders"
        return tuple(out)

    def finish(self):
        """Replay what ran with caching on, with caching off (one batch per kind of call; batching changes nothing
        there): the same tokens for every completion, the same logprobs within TOL. Then everything is free and no
        snapshot is held."""
        for (how, _, kw), group in itertools.groupby(sorted(self.done, key=lambda d: d[:2]), key=lambda d: d[:3]):
            group = list(group)
            run = self.off.generate if how == "generate" else lambda *a: self.off.chat(*a, **kw)
            refs = run([d[3] for d in group], [d[4] for d in group])
            for (*_, o), r in zip(group, refs):
                assert r.prompt_token_ids == o.prompt_token_ids and r.num_cached_tokens == 0
                assert [c.token_ids for c in o.outputs] == [c.token_ids for c in r.outputs], o.prompt_token_ids
                for c, rc in zip(o.outputs, r.outputs):
                    assert_close(c.logprobs, rc.logprobs, c.token_ids)
                if r.prompt_logprobs is not None:
                    assert_close(o.prompt_logprobs[1:], r.prompt_logprobs[1:], o.prompt_token_ids[1:])
        self.done = []
        for llm in (self.on, self.off):
            eng = llm.engine
            assert not eng.has_unfinished_requests()
            assert eng.blocks.num_free == eng.blocks.num_blocks
            assert eng.slots.num_free == eng.slots.num_slots
        assert self.on.engine.snapshots.num_pinned == 0
        assert self.on.engine.blocks.num_cached > 0  # what was cached is kept (evictable), not dropped


def assert_close(logprobs, ref, token_ids):
    diff = max(abs(x[t].logprob - y[t].logprob) for x, y, t in zip(logprobs, ref, token_ids, strict=True))
    assert diff < TOL, diff


def make_llm(path, caching: bool, **kw):
    kw.setdefault("max_model_len", 320)
    if caching:
        kw.setdefault("state_snapshot_bytes", SNAPSHOT_POOL)
    else:
        kw["enable_prefix_caching"] = False
    return LLM(path, dtype="float32", skip_tokenizer_init=True, **kw)


@pytest.fixture(scope="module")
def twins(checkpoint):
    """twins(kind, **engine_kw) -> Twins: a cached LLM per distinct request, all of a kind sharing one uncached
    reference (its outputs do not depend on chunking or cache size); kept for the module, tests use disjoint
    prompts."""
    made, refs = {}, {}

    def get(kind: str = "moe", **kw) -> Twins:
        key = (kind, repr(sorted(kw.items())))
        if key not in made:
            path = checkpoint(kind, seed=21)[0]
            if kind not in refs:
                refs[kind] = make_llm(path, False)
            made[key] = Twins(make_llm(path, True, **kw), refs[kind])
        return made[key]

    return get


def diverging(prompt: list[int], agree: int, extra: int, seed: int) -> list[int]:
    """prompt's first `agree` tokens, then `extra` others (the first one surely different)."""
    if agree == len(prompt):
        return prompt + tokens(extra, seed)
    return prompt[:agree] + [(prompt[agree] + 1) % 150] + tokens(extra - 1, seed)


@pytest.mark.parametrize("kind", ["moe", "next"])
def test_divergence_just_before_at_and_after_a_snapshot(twins, kind):
    """A 50-token prompt leaves snapshots at 48 and 32: prompts agreeing with it on 49 or 48 tokens resume at 48 (all
    of them at once), on 47 fall back to 32, on 31 find nothing; the same prompt again resumes at 48. A second copy of
    a prompt in the same call waits for the first, which snapshots where they part (at the copy's last boundary)."""
    t = twins(kind)
    first = tokens(50, 200)
    assert [o.num_cached_tokens for o in t.generate(*both([first]))] == [0, 48]
    cases = {49: 48, 48: 48, 47: 32, 33: 32, 32: 32, 31: 0}
    prompts = [diverging(first, agree, 40, 201 + agree) for agree in cases] + [first]
    outs = t.generate(*both(prompts))
    assert [o.num_cached_tokens for o in outs] == [*cases.values(), 48] + [80, 80, 80, 64, 64, 64, 48]
    # prompt logprobs need every prompt position computed: such a request takes nothing from the cache
    sp = SamplingParams(temperature=0, max_tokens=2, logprobs=0, prompt_logprobs=1)
    (out,) = t.generate([first], [sp], check="any")
    assert out.num_cached_tokens == 0 and len(out.prompt_logprobs) == len(first)
    t.finish()


def test_resumed_request_leaves_the_snapshot_it_started_from_untouched(twins):
    """A (49 tokens) leaves a snapshot at 48; B resumes from it and goes on for 30 tokens; then A' (50 tokens) and A
    again resume from the same snapshot and compute only 2 and 1 tokens, so their outputs rest on it: had B run in
    the snapshot instead of a copy of it, they would differ from caching off. Alongside, C (80 tokens, a snapshot at
    64) is extended twice: each extension recomputes tokens 64..79, whose full KV block C cached."""
    t = twins()
    a, c = tokens(49, 300), tokens(80, 303)
    b, a2 = diverging(a, 48, 30, 301), diverging(a, 48, 2, 302)
    c1, c2 = diverging(c, 80, 20, 304), diverging(c, 80, 20, 305)
    resumed = [[o.num_cached_tokens for o in t.generate(*both(p))] for p in ([a, c], [b, c1], [a2, c2], [a, c])]
    # c1 snapshots at 80, the branch point where its cached blocks outrun the snapshot it resumed from; c2 resumes
    # there; c again at 64, short of its last token; second copies in one call wait for the first (b's at 64, c1's
    # and c2's at 96, c's at 64)
    assert resumed == [[0, 0, 48, 64], [48, 64, 64, 96], [48, 80, 48, 96], [48, 64, 48, 64]]
    t.finish()


def test_prefix_shared_within_one_step_and_n_greater_than_one(twins):
    """Requests sharing 150 uncached tokens arrive in one step: the later ones wait for the first, which snapshots at
    144 where they part; two sharing a cached prefix arrive together and resume from the same snapshot; what the
    first ones cached then serves their continuations (and a new prompt on the shared prefix resumes at 144). n = 3
    forks one prefill into three completions."""
    t = twins()
    prefix, warm = tokens(150, 500), tokens(150, 501)
    pair = [prefix + tokens(20, 502), prefix + tokens(35, 503)]
    outs = t.generate(*both(pair + [warm + tokens(4, 504)]), check="at_least")  # warm: a snapshot at 144
    assert outs[0].num_cached_tokens == 0
    later = [pair[0] + tokens(25, 505), pair[1] + tokens(25, 506), warm + tokens(20, 507), warm + tokens(35, 508)]
    fan = prefix + tokens(40, 509)
    prompts, sp = both(later)
    outs = t.generate(prompts + [fan, fan], sp + [greedy(n=3), seeded(n=3)])
    assert [o.num_cached_tokens for o in outs] == [160, 176, 144, 144, 192, 208, 160, 176, 144, 176]
    fans = outs[-2:]
    assert all(len(o.outputs) == 3 for o in fans)
    assert len({tuple(c.token_ids) for c in fans[0].outputs}) == 1 < len({tuple(c.token_ids) for c in fans[1].outputs})
    outs = t.generate(*both([fan + tokens(10, 510)], n=3))
    assert [o.num_cached_tokens for o in outs] == [176, 192]
    t.finish()


@pytest.mark.parametrize("chunk", [20, 37], ids=lambda c: f"budget{c}")
def test_chunked_prefill_with_caching(twins, chunk):
    """Prompts prefilled in small chunks side by side give what they give with caching off; a long prompt then
    resumes far past the first chunk and prefills the rest in chunks again. (A small budget admits requests one
    after another, so a request may resume from snapshots an earlier one of its call took in the meantime: those
    checks are lower bounds.)"""
    t = twins(max_num_batched_tokens=chunk, max_num_seqs=8)
    prompts = [tokens(n, 600 + chunk + n) for n in (70, 160, 17)]
    t.generate(*both(prompts), check="at_least")
    follow = [[prompts[1] + tokens(40, 601 + chunk + i), prompts[0], diverging(prompts[0], 60, 50, 603 + chunk + i)]
              for i in range(2)]
    outs = t.generate(follow[0] + follow[1], [greedy()] * 3 + [seeded() for _ in range(3)], check="at_least")
    assert [o.num_cached_tokens for o in outs[:3]] == [144, 64, 48]
    assert outs[3].num_cached_tokens == 160  # the branch point the first took, where its cached blocks ended
    t.finish()


def test_preempted_while_blocks_are_shared(twins):
    """Requests resuming from one cached 96-token prefix, in a KV cache that holds only a few at a time: the newest
    are preempted while others still read the shared blocks, come back, and all give what they give with caching
    off."""
    model = twins().on.model
    # 20 blocks: the longest request needs 11, all together 6 shared + 31 of their own
    kv = 20 * BLOCK * HybridCache.bytes_per_token(model.cache_spec(), torch.float32)
    t = twins(kv_cache_bytes=kv, max_num_seqs=8, max_num_batched_tokens=96)
    prefix = tokens(100, 700)
    (out,) = t.generate([prefix + tokens(10, 701)], [greedy(max_tokens=16)])
    assert out.num_cached_tokens == 0
    prompts = [prefix + tokens(10 + 7 * i, 702 + i) for i in range(7)]
    sp = [greedy(max_tokens=16)] * 3 + [seeded(max_tokens=16) for _ in range(3)] + [seeded(n=2, max_tokens=16)]
    outs = t.generate(prompts, sp, check="any")
    assert outs[0].num_cached_tokens == 96
    assert t.on.engine.scheduler_preemptions > 0
    t.finish()


# Images: the tiny multimodal checkpoint, prompts as token ids with a <vision_start><image><vision_end> per image.
IMAGE, VISION_START, VISION_END = 150, 152, 153
PREPROCESSOR = {"size": {"shortest_edge": 1024, "longest_edge": 16384}, "patch_size": 8, "temporal_patch_size": 2,
                "merge_size": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}


def picture(seed: int) -> Image.Image:
    """64 x 64 pixels: 16 placeholder tokens."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (17, 17, 3), dtype=np.uint8)).resize((64, 64))


@pytest.fixture(scope="module")
def vl(checkpoint):
    path = checkpoint("dense_vl", seed=23)[0]
    (path / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    return Twins(make_llm(path, True), make_llm(path, False), image_token_id=IMAGE)


def test_image_inserted_mid_history_or_swapped(vl):
    """Text A B C, after A alone ran (snapshots at 32 and 16). A B <image x> C resumes at 32, before the image, not
    from A B C's snapshots (and snapshots at 48, where its cached blocks end: the block after holds the image);
    A B <image y> C (the same token ids) resumes there, at 48, not from x's snapshots past the image; A B <image x> C
    again resumes past the image. (Each second copy in a call waits for the first and resumes at its last
    boundary.)"""
    a, b, c = tokens(40, 800), tokens(20, 801), tokens(40, 802)
    x, y = picture(1), picture(2)

    def with_image(img):
        return {"prompt_token_ids": a + b + [VISION_START, IMAGE, VISION_END] + c, "multi_modal_data": {"image": [img]}}

    assert [o.num_cached_tokens for o in vl.generate(*both([a]))] == [0, 32]
    assert [o.num_cached_tokens for o in vl.generate(*both([a + b + c]))] == [32, 96]
    with_x = vl.generate(*both([with_image(x)]))
    image_at = with_x[0].prompt_token_ids.index(IMAGE)
    assert image_at == 61 and len(with_x[0].prompt_token_ids) == 118
    assert [o.num_cached_tokens for o in with_x] == [32, 112]
    with_y = vl.generate(*both([with_image(y)]))
    assert with_y[0].prompt_token_ids == with_x[0].prompt_token_ids
    assert [o.num_cached_tokens for o in with_y] == [48, 112]
    assert with_x[0].outputs[0].token_ids != with_y[0].outputs[0].token_ids  # so a hit past the image would show
    assert [o.num_cached_tokens for o in vl.generate(*both([with_image(x)]))] == [112, 112]
    vl.finish()


# Chat: the trained demo model, with its tokenizer and chat template (the released Qwen3.5 format).
@pytest.fixture(scope="module")
def demo():
    kw = dict(dtype="float32", max_model_len=512)
    return Twins(LLM(DEMO_DIR, state_snapshot_bytes=SNAPSHOT_POOL, **kw),
                 LLM(DEMO_DIR, enable_prefix_caching=False, **kw))


def reply(out, reasoning: str) -> dict:
    return {"role": "assistant", "content": out.outputs[0].text, "reasoning_content": reasoning}


@pytest.mark.parametrize("thinking", [False, True], ids=["no_thinking", "thinking"])
def test_second_chat_turn_resumes_although_the_template_strips_thinking(demo, thinking):
    """Turn 1's prompt ends with the generation prompt (`<think>` ...); turn 2 renders the reply to it without its
    reasoning, so the prompts part a few tokens before turn 1's end: turn 2 still resumes, at the deepest snapshot
    before that point, and turn 3 deeper still."""
    kw = {"chat_template_kwargs": {"enable_thinking": thinking}}
    system = {"role": "system", "content": f"You answer questions about the Python standard library ({thinking})."}
    chats = [[system, {"role": "user", "content": "How do I read a file line by line and strip the newlines?"}]] * 2
    sp = [greedy(), seeded()]
    turn1 = demo.chat(chats, sp, **kw)
    n1 = len(turn1[0].prompt_token_ids)
    assert [o.num_cached_tokens for o in turn1] == [0, floor16(n1 - 1)]  # the copy waits for the first
    chats = [chat + [reply(o, "The user wants open() and a loop."),
                     {"role": "user", "content": "And how do I write the lines back to another file?"}]
             for chat, o in zip(chats, turn1)]
    turn2 = demo.chat(chats, [greedy(), seeded()], **kw)
    for o in turn2:
        parted = next(i for i, (u, v) in enumerate(zip(turn1[0].prompt_token_ids, o.prompt_token_ids)) if u != v)
        assert n1 - 9 < parted < n1  # only the generation prompt differs
    parted = next(i for i, (u, v) in enumerate(zip(turn1[0].prompt_token_ids, turn2[0].prompt_token_ids)) if u != v)
    assert turn2[0].num_cached_tokens == max(p for p in snapshot_positions(n1) if p <= parted) > 0
    chats = [chat + [reply(o, "shutil, or a loop with write()."), {"role": "user", "content": "Thanks. And gzip?"}]
             for chat, o in zip(chats, turn2)]
    turn3 = demo.chat(chats, [greedy(), seeded()], **kw)
    assert all(o3.num_cached_tokens > o2.num_cached_tokens for o2, o3 in zip(turn2, turn3))
    demo.finish()


def test_edited_last_message_and_regenerate(demo):
    """An edited last user message resumes where the history before it was snapshotted; asking the very same again
    (regenerate) resumes at the last block boundary before the prompt's last token."""
    chat = [{"role": "user", "content": "What does the itertools module offer?"}]
    (turn1,) = demo.chat([chat], [greedy()])
    chat = chat + [reply(turn1, "Iterators.")]  # a new list: the replay with caching off renders turn 1 again
    asked = chat + [{"role": "user", "content": "Show me how chain() combines two lists of numbers into one."}]
    edited = chat + [{"role": "user", "content": "Explain how groupby() groups a sorted list of words by length."}]
    first = demo.chat([asked, asked], [greedy(), seeded()])
    assert first[0].num_cached_tokens > 0
    edit = demo.chat([edited, edited], [greedy(), seeded()])
    # turn 1's snapshot; the copy waits for the first and resumes at its last boundary
    n_edit = len(edit[0].prompt_token_ids)
    assert [o.num_cached_tokens for o in edit] == [first[0].num_cached_tokens, floor16(n_edit - 1)]
    again = demo.chat([edited, edited], [greedy(), seeded()])
    assert [o.num_cached_tokens for o in again] == [floor16(n_edit - 1)] * 2
    demo.finish()
