"""Tensor and expert parallelism on CPU over gloo with 2 processes: the shard plan's pieces rebuild every tensor, a
sharded model's float32 logits equal the whole model's (TP=2 and EP=2, on head counts, widths, experts and
vocabularies that split unevenly or are replicated), the engine under TP=2 / EP=2 gives one process's tokens (prefix
cache hits, n > 1, chunked prefill, preemption, MTP speculation), and impossible splits or dead workers are clear
errors."""

import dataclasses
import re
import shutil
import sys
import threading
import time

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from qwen35 import LLM, SamplingParams
from qwen35.cache.spec import AttentionCacheSpec, LinearCacheSpec
from qwen35.config import ModelConfig, TextConfig
from qwen35.distributed.parallel import WorkerDied, init
from qwen35.distributed.shard import Piece, ShardError, ShardPlan, split
from qwen35.models.batch import ForwardBatch, SeqChunk
from qwen35.models.loader import load_model
from tests.test_mtp import mtp_checkpoint
from tests.test_speculative import Oracle
from tests.tiny_models import BASE, MOE, build

RANKS = 2
# 3 KV heads / 3 GDN key heads over 2 ranks (uneven), odd FFN widths, 5 experts, a vocabulary of 161.
UNEVEN = dict(num_attention_heads=6, num_key_value_heads=3, linear_num_key_heads=3, linear_num_value_heads=6,
              vocab_size=161)
# One KV head, kept by both ranks, which split its 4 q heads.
REPLICATED_KV = dict(num_attention_heads=4, num_key_value_heads=1)
EXPERTS = dict(num_experts=5, moe_intermediate_size=31, shared_expert_intermediate_size=47)
CHECKPOINTS = {
    "dense-uneven-tied": ("dense", dict(UNEVEN, intermediate_size=95)),
    "dense-kv1-untied": ("dense", dict(REPLICATED_KV, intermediate_size=95, tie_word_embeddings=False,
                                       vocab_size=161)),
    "moe-uneven-tied": ("moe", dict(UNEVEN, **EXPERTS, tie_word_embeddings=True)),
    "next-kv1-uneven-untied": ("next", dict(REPLICATED_KV, **EXPERTS, linear_num_key_heads=3,
                                            linear_num_value_heads=6, intermediate_size=95, vocab_size=161)),
}
# The released BF16 MoE layout: fused 3D experts (transformers writes one 2D tensor per expert), under
# model.language_model.*; its reference is the checkpoint it was made from.
FUSED = {"moe-uneven-tied-fused": "moe-uneven-tied"}
# (case, checkpoint, expert parallel)
CASES = [(name, name, False) for name in [*CHECKPOINTS, *FUSED]] + [
    (f"{name}-ep", name, True) for name in [*CHECKPOINTS, *FUSED] if CHECKPOINTS[FUSED.get(name, name)][0] != "dense"]
PROMPT_LENGTHS = [1, 7, 70, 33]


def text_config(kind: str, **overrides) -> TextConfig:
    model_type = {"dense": "qwen3_5_text", "moe": "qwen3_5_moe_text", "next": "qwen3_next"}[kind]
    extra = {"dense": dict(intermediate_size=96), "moe": MOE, "next": dict(MOE, intermediate_size=80,
                                                                           mlp_only_layers=[1])}[kind]
    return TextConfig.from_hf({**BASE, **extra, **overrides, "model_type": model_type})


def prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def logits_of(model, seqs: list[list[int]]) -> torch.Tensor:
    batch = ForwardBatch.build([SeqChunk(s, want_logits="all") for s in seqs])
    with torch.no_grad():
        return model.compute_logits(model(batch.input_ids, batch)[batch.logits_indices])


# ---- the plan, without processes


@pytest.mark.parametrize("n,parts", [(1, 1), (5, 2), (3, 2), (161, 2), (7, 3), (2, 5), (64, 8)])
def test_split_is_contiguous_near_even_and_covers(n, parts):
    ranges = [split(n, parts, r) for r in range(parts)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    sizes = [hi - lo for lo, hi in ranges]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_piece_take_and_shape():
    t = torch.arange(2 * 10 * 3).reshape(2, 10, 3)
    p = Piece(1, ((1, 3), (6, 9)))
    assert p.take(t).tolist() == torch.cat([t[:, 1:3], t[:, 6:9]], dim=1).tolist()
    assert p.shape([2, 10, 3]) == [2, 5, 3] == list(p.take(t).shape)
    bias = Piece(0, (), first_rank_only=True)
    assert torch.equal(bias.take(t, 0), t) and torch.equal(bias.take(t, 1), torch.zeros_like(t))
    assert bias.shape([2, 10, 3]) == [2, 10, 3]


PLAN_CONFIGS = {
    "dense-uneven": ("dense", dict(UNEVEN, intermediate_size=95)),
    "dense-kv1": ("dense", REPLICATED_KV),
    "moe-uneven": ("moe", dict(UNEVEN, **EXPERTS)),
    "next-kv1": ("next", dict(REPLICATED_KV, **EXPERTS, linear_num_key_heads=3, linear_num_value_heads=6,
                              intermediate_size=95)),
    "kv2-over-4": ("dense", dict(num_attention_heads=8, num_key_value_heads=2, linear_num_key_heads=4,
                                 linear_num_value_heads=8)),
}


def full_tensors(cfg: TextConfig) -> dict[str, torch.Tensor]:
    """Random tensors of every sharded kind, shaped as the checkpoint's (our canonical names)."""
    g = torch.Generator().manual_seed(0)
    H, D = cfg.hidden_size, cfg.head_dim
    shapes = {
        "model.embed_tokens.weight": (cfg.vocab_size, H), "lm_head.weight": (cfg.vocab_size, H),
        "model.layers.0.linear_attn.in_proj_qkv.weight": (cfg.conv_dim, H),
        "model.layers.0.linear_attn.conv1d.weight": (cfg.conv_dim, 1, cfg.linear_conv_kernel_dim),
        "model.layers.0.linear_attn.in_proj_z.weight": (cfg.value_dim, H),
        "model.layers.0.linear_attn.in_proj_b.weight": (cfg.linear_num_value_heads, H),
        "model.layers.0.linear_attn.in_proj_a.weight": (cfg.linear_num_value_heads, H),
        "model.layers.0.linear_attn.A_log": (cfg.linear_num_value_heads,),
        "model.layers.0.linear_attn.dt_bias": (cfg.linear_num_value_heads,),
        "model.layers.0.linear_attn.out_proj.weight": (H, cfg.value_dim),
        "model.layers.3.self_attn.q_proj.weight": (2 * cfg.num_attention_heads * D, H),
        "model.layers.3.self_attn.k_proj.weight": (cfg.num_key_value_heads * D, H),
        "model.layers.3.self_attn.v_proj.weight": (cfg.num_key_value_heads * D, H),
        "model.layers.3.self_attn.o_proj.weight": (H, cfg.num_attention_heads * D),
    }
    if cfg.intermediate_size:
        shapes.update({f"model.layers.1.mlp.{p}_proj.weight": (cfg.intermediate_size, H) for p in ("gate", "up")})
        shapes["model.layers.1.mlp.down_proj.weight"] = (H, cfg.intermediate_size)
    if cfg.num_experts:
        E, inter, shared = cfg.num_experts, cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size
        shapes["model.layers.0.mlp.experts.gate_up_proj"] = (E, 2 * inter, H)
        shapes["model.layers.0.mlp.experts.down_proj"] = (E, H, inter)
        shapes.update({f"model.layers.0.mlp.shared_expert.{p}_proj.weight": (shared, H) for p in ("gate", "up")})
        shapes["model.layers.0.mlp.shared_expert.down_proj.weight"] = (H, shared)
    return {n: torch.randn(s, generator=g) for n, s in shapes.items()}


def by_rank(cfg, size, name, t, ep=False):
    return [ShardPlan(cfg, r, size, ep).piece(name).take(t, r) for r in range(size)]


@pytest.mark.parametrize("config,size", [("dense-uneven", 2), ("dense-uneven", 3), ("dense-kv1", 2),
                                         ("moe-uneven", 2), ("moe-uneven", 3), ("next-kv1", 2), ("kv2-over-4", 4)])
def test_every_ranks_pieces_rebuild_each_tensor(config, size):
    """Concatenating the ranks' pieces (per q/k/v segment, per [gate | up] half, per head) rebuilds the tensor, and
    each piece has the shape of the local config's module."""
    kind, overrides = PLAN_CONFIGS[config]
    cfg = text_config(kind, **overrides)
    plans = [ShardPlan(cfg, r, size) for r in range(size)]
    locals_ = [p.local_config() for p in plans]
    kd, vd = cfg.key_dim, cfg.value_dim
    for name, t in full_tensors(cfg).items():
        parts = by_rank(cfg, size, name, t)
        if name.endswith(("in_proj_qkv.weight", "conv1d.weight")):
            segs = [p.split([lc.key_dim, lc.key_dim, lc.value_dim]) for p, lc in zip(parts, locals_)]
            q, k, v = (torch.cat([s[i] for s in segs]) for i in range(3))
            assert torch.equal(torch.cat([q, k, v]), t), name
            assert all(p.shape[0] == lc.conv_dim for p, lc in zip(parts, locals_))
            assert (q.shape[0], k.shape[0], v.shape[0]) == (kd, kd, vd)
        elif name.endswith("experts.gate_up_proj"):
            halves = [p.split(p.shape[1] // 2, dim=1) for p in parts]
            gate, up = (torch.cat([h[i] for h in halves], dim=1) for i in range(2))
            assert torch.equal(torch.cat([gate, up], dim=1), t)
            assert [p.shape[1] for p in parts] == [2 * lc.moe_intermediate_size for lc in locals_]
        elif name.endswith("self_attn.k_proj.weight") or name.endswith("self_attn.v_proj.weight"):
            if cfg.num_key_value_heads >= size:
                assert torch.equal(torch.cat(parts), t), name
            else:  # each rank holds the one KV head its q heads read
                for r, p in enumerate(parts):
                    kv = r * cfg.num_key_value_heads // size
                    assert torch.equal(p, t[kv * cfg.head_dim:(kv + 1) * cfg.head_dim]), (name, r)
            assert [p.shape[0] for p in parts] == [lc.num_key_value_heads * cfg.head_dim for lc in locals_]
        else:
            dim = {"out_proj": 1, "o_proj": 1, "down_proj": 1}.get(name.split(".")[-2], 0)
            if name.endswith("experts.down_proj"):
                dim = 2
            assert torch.equal(torch.cat(parts, dim=dim), t), name
    # the local configs' sizes add up to the global ones
    assert sum(lc.linear_num_key_heads for lc in locals_) == cfg.linear_num_key_heads
    assert sum(lc.linear_num_value_heads for lc in locals_) == cfg.linear_num_value_heads
    assert sum(lc.conv_dim for lc in locals_) == cfg.conv_dim
    assert sum(lc.num_attention_heads for lc in locals_) == cfg.num_attention_heads
    assert sum(lc.num_key_value_heads for lc in locals_) == max(cfg.num_key_value_heads, size)
    for field in ("intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size"):
        assert sum(getattr(lc, field) for lc in locals_) == getattr(cfg, field), field
    assert all(lc.vocab_size == cfg.vocab_size and lc.num_experts == cfg.num_experts for lc in locals_)


@pytest.mark.parametrize("heads,kv_heads,size", [(6, 3, 2), (6, 3, 3), (4, 1, 2), (4, 1, 4), (8, 2, 4), (6, 2, 4)],
                         ids=["kv3-tp2", "kv3-tp3", "kv1-tp2", "kv1-tp4", "kv2-q8-tp4", "kv2-q6-tp4"])
def test_q_heads_read_their_own_kv_head(heads, kv_heads, size):
    """Each rank's q heads are those of its KV heads' groups, in the unsharded model's grouping, and every q head is
    on exactly one rank."""
    cfg = text_config("dense", num_attention_heads=heads, num_key_value_heads=kv_heads, linear_num_key_heads=4,
                      linear_num_value_heads=8)
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    seen = []
    for r in range(size):
        plan = ShardPlan(cfg, r, size)
        (q0, q1), (k0, k1) = plan.q_heads, plan.kv_heads
        assert q1 > q0 and (q1 - q0) % (k1 - k0) == 0
        local_group = (q1 - q0) // (k1 - k0)
        for h in range(q0, q1):  # the local GQA mapping (q head i reads kv head i // local_group) is the global one
            assert h // group == k0 + (h - q0) // local_group, (r, h)
        seen += range(q0, q1)
    assert seen == list(range(cfg.num_attention_heads))


def test_expert_parallel_splits_whole_experts():
    cfg = text_config("moe", **EXPERTS)
    t = torch.randn(cfg.num_experts, 2 * cfg.moe_intermediate_size, cfg.hidden_size)
    parts = by_rank(cfg, 2, "model.layers.0.mlp.experts.gate_up_proj", t, ep=True)
    assert [p.shape[0] for p in parts] == [3, 2] and torch.equal(torch.cat(parts), t)
    plans = [ShardPlan(cfg, r, 2, expert_parallel=True) for r in range(2)]
    assert all(p.local_config().moe_intermediate_size == cfg.moe_intermediate_size for p in plans)
    # per-expert tensors (a checkpoint with one tensor per expert): renamed to the rank's index, others skipped
    name = "model.layers.2.mlp.experts.{}.down_proj.weight"
    assert [plans[0].local_name(name.format(e)) for e in range(5)] == [name.format(0), name.format(1),
                                                                         name.format(2), None, None]
    assert [plans[1].local_name(name.format(e)) for e in range(5)] == [None, None, None, name.format(0),
                                                                         name.format(1)]
    assert plans[0].piece(name.format(0)) is None
    assert ShardPlan(cfg, 1, 2).local_name(name.format(4)) == name.format(4)  # TP keeps every expert


GDN4 = dict(linear_num_key_heads=4, linear_num_value_heads=8)  # enough GDN heads for 4 ranks


@pytest.mark.parametrize("kind,overrides,size,ep,words", [
    ("dense", dict(linear_num_key_heads=1, linear_num_value_heads=2), 2, False, "it has 1 Gated DeltaNet key heads"),
    ("dense", dict(GDN4, num_attention_heads=6, num_key_value_heads=3), 4, False, "its 3 key/value heads"),
    ("dense", dict(GDN4, num_attention_heads=2, num_key_value_heads=2), 4, False, "serves 1 query heads"),
    ("moe", dict(GDN4, num_experts=3, num_experts_per_tok=2), 4, True, "it has 3 experts"),
    ("dense", dict(GDN4, intermediate_size=3, num_attention_heads=8), 4, False, r"its intermediate_size \(3\)"),
], ids=["gdn-heads", "kv-not-divisor", "q-heads", "experts", "ffn-width"])
def test_impossible_splits_are_refused(kind, overrides, size, ep, words):
    with pytest.raises(ShardError, match=rf"cannot split this .* model over {size} ranks: .*{words}"):
        ShardPlan(text_config(kind, **overrides), 0, size, ep)


# ---- sharded models in one group of 2 processes


def fused_copy(src, dst):
    """`src` (transformers' per-expert tensors) with each layer's experts fused into gate_up_proj / down_proj."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    per_expert = re.compile(r"^model\.(layers\.\d+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")
    tensors, experts = {}, {}
    for name, t in load_file(str(src / "model.safetensors")).items():
        if m := per_expert.match(name):
            experts.setdefault(m[1], {})[(int(m[2]), m[3])] = t
        else:
            tensors["model.language_model." + name.removeprefix("model.") if name.startswith("model.") else name] = t
    for base, parts in experts.items():
        n = 1 + max(e for e, _ in parts)
        tensors[f"model.language_model.{base}.gate_up_proj"] = torch.stack(
            [torch.cat([parts[e, "gate"], parts[e, "up"]]) for e in range(n)])
        tensors[f"model.language_model.{base}.down_proj"] = torch.stack([parts[e, "down"] for e in range(n)])
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def _sharded_logits(rank: int, init_method: str, jobs: list, out: str) -> None:
    """Each rank loads every case's shard and runs the prompts; every rank saves its (gathered) logits."""
    torch.set_num_threads(1)  # two ranks on two cores
    comm = init(rank, RANKS, torch.device("cpu"), init_method)
    try:
        for case, path, ep, seqs in jobs:
            plan = ShardPlan(ModelConfig.from_dir(path).text, rank, RANKS, ep)
            model, _, report = load_model(path, dtype="float32", progress=False, shard=plan, comm=comm)
            torch.save({"logits": logits_of(model, seqs), "spec": model.cache_spec(), "read": report.num_bytes,
                        "comm": dataclasses.asdict(comm.stats)}, f"{out}/{case}-{rank}.pt")
    finally:
        comm.close()


@pytest.fixture(scope="module")
def sharded(checkpoint, tmp_path_factory):
    """case -> (the whole model, its LoadReport, the prompts, [each rank's results], the HF model); all cases in one
    spawned group."""
    tmp = tmp_path_factory.mktemp("tp")
    built = {name: checkpoint(kind, **overrides) for name, (kind, overrides) in CHECKPOINTS.items()}
    paths = {name: path for name, (path, _) in built.items()}
    paths.update({name: fused_copy(paths[base], tmp / name) for name, base in FUSED.items()})
    jobs = [(case, str(paths[ck]), ep, prompts(CHECKPOINTS[FUSED.get(ck, ck)][1].get("vocab_size", 160), seed=i))
            for i, (case, ck, ep) in enumerate(CASES)]
    mp.spawn(_sharded_logits, args=(f"file://{tmp}/store", jobs, str(tmp)), nprocs=RANKS, join=True)
    whole = {}
    for ck, p in paths.items():
        model, _, report = load_model(p, dtype="float32", progress=False)
        whole[ck] = model, report
    for name, base in FUSED.items():  # the same weights in the other layout
        assert all(torch.equal(a, b) for a, b in zip(whole[name][0].state_dict().values(),
                                                    whole[base][0].state_dict().values()))
    return {case: (*whole[ck], seqs, [torch.load(f"{tmp}/{case}-{r}.pt", weights_only=False) for r in range(RANKS)],
                   built[FUSED.get(ck, ck)][1])
            for (case, ck, _), (_, _, _, seqs) in zip(CASES, jobs)}


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_sharded_logits_equal_the_whole_model(sharded, case):
    """Full-vocabulary float32 logits of a packed batch of unequal prompts: norm-relative error (per prompt, over all
    its positions and the whole vocabulary) below 1e-5 (measured ~1.5e-6), the same argmax everywhere. Norm-relative,
    not per element: the all-reduces add in another order, and float32 rounding alone moves single logits by up to
    ~7e-5 (HF's float32 against its float64 on these models), more than an elementwise 1e-5."""
    model, _, seqs, ranks, _ = sharded[case]
    ref = logits_of(model, seqs)
    assert ref.abs().max() > 1.0  # O(1) logits: the comparison means something
    for r, got in enumerate(ranks):
        assert got["logits"].shape == ref.shape == (sum(PROMPT_LENGTHS), model.cfg.vocab_size)
        assert torch.equal(got["logits"], ranks[0]["logits"]), f"rank {r} gathered other logits than rank 0"
    got = ranks[0]["logits"]
    at = 0
    for n in PROMPT_LENGTHS:
        a, b = got[at:at + n], ref[at:at + n]
        rel = ((a - b).norm() / b.norm()).item()
        assert rel < 1e-5, f"prompt of {n} tokens: norm-relative error {rel:.2e}"
        at += n
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    assert ranks[0]["comm"]["all_reduce_bytes"] > 0 and ranks[0]["comm"]["all_gather_bytes"] > 0


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_sharded_logits_match_transformers(sharded, case):
    """On these awkward shapes the sharded logits also match transformers 5.23 (each prompt alone) within the
    project's float32 tolerance against it, 1e-4."""
    _, _, seqs, ranks, hf = sharded[case]
    if getattr(hf.config.get_text_config(), "num_experts", 0):
        hf.set_experts_implementation("eager")  # HF's grouped_mm needs 16-byte strides: not with 31-wide experts
    for ids, ours in zip(seqs, ranks[0]["logits"].split(PROMPT_LENGTHS)):
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0]
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_each_rank_reads_its_slice_of_the_checkpoint(sharded, case):
    """Each rank reads well under the whole checkpoint, and the ranks together little more than all of it (norms,
    routers, a replicated KV head are read by both; Qwen3-Next's fused in_proj_qkvz / in_proj_ba are read whole by
    each rank, then cut)."""
    model, report, _, ranks, _ = sharded[case]
    read = [r["read"] for r in ranks]
    assert all(n < 0.75 * report.num_bytes for n in read), (read, report.num_bytes)
    if not model.cfg.fused_gdn_projections:
        assert report.num_bytes <= sum(read) < 1.1 * report.num_bytes, (read, report.num_bytes)


@pytest.mark.parametrize("case", [c[0] for c in CASES if not c[2]])
def test_each_rank_caches_its_own_heads(sharded, case):
    """The KV cache and the Gated DeltaNet state slots are per rank: the ranks' heads add up to the model's (a
    single KV head is kept by every rank)."""
    model, _, _, ranks, _ = sharded[case]
    full = model.cache_spec()
    specs = [r["spec"] for r in ranks]
    assert all(s.keys() == full.keys() for s in specs)
    cfg = model.cfg
    for layer, whole in full.items():
        mine = [s[layer] for s in specs]
        if isinstance(whole, AttentionCacheSpec):
            heads = [m.num_kv_heads for m in mine]
            assert sum(heads) == max(whole.num_kv_heads, RANKS) and min(heads) >= 1, (layer, heads)
            assert all(m.head_dim == whole.head_dim for m in mine)
        else:
            assert isinstance(whole, LinearCacheSpec)
            assert sum(m.num_v_heads for m in mine) == whole.num_v_heads, layer
            assert sum(m.conv_dim for m in mine) == whole.conv_dim, layer
            assert all((m.k_head_dim, m.v_head_dim, m.conv_history) == (whole.k_head_dim, whole.v_head_dim,
                                                                         whole.conv_history) for m in mine)
    if cfg.linear_num_key_heads == 3:  # uneven: whole k-head groups, 2 + 1, with their 2 v heads each
        assert [s[cfg.layer_types.index("linear_attention")].num_v_heads for s in specs] == [4, 2]


# ---- the engine: rank 0 schedules and samples, a spawned worker follows


def tokens(n: int, seed: int, vocab: int = 150) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def engine_outputs(path, hook=None, max_model_len=256, **kw) -> tuple[list, dict, int]:
    """Greedy and seeded requests through the engine: a prompt whose prefix an earlier request cached, n > 1 (forks),
    unequal prompts in one batch, prompts longer than the step's token budget (chunked prefill). hook: the engine's
    draft hook. Returns the outputs, the speculative decoding counters and the number of preemptions."""
    llm = LLM(str(path), dtype="float32", skip_tokenizer_init=True, max_num_batched_tokens=40, block_size=16,
              max_model_len=max_model_len, **kw)
    llm.engine.draft_hook = hook
    try:
        greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=0)
        prefix = tokens(70, 1)
        first = llm.generate([prefix + tokens(5, 2)], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True,
                                                                     logprobs=0, prompt_logprobs=0))
        batch = [prefix + tokens(9, 3), tokens(3, 4), tokens(57, 5), tokens(33, 6)]
        params = [greedy, SamplingParams(temperature=0, n=2, max_tokens=12, ignore_eos=True),
                  SamplingParams(temperature=1.0, n=3, seed=7, max_tokens=8, ignore_eos=True), greedy]
        outs = first + llm.generate(batch, params)
        return outs, dataclasses.asdict(llm.engine.spec_stats), llm.engine.scheduler_preemptions
    finally:
        llm.shutdown()


def assert_same(got: list, want: list) -> None:
    """The same tokens (greedy and seeded sampling alike), cached prefixes, and the tokens' logprobs (sampled and
    prompt) within 1e-4."""
    assert len(got) == len(want)
    assert got[0].prompt_logprobs and len(got[0].prompt_logprobs) == len(want[0].prompt_logprobs)
    for a, b in zip(got[0].prompt_logprobs[1:], want[0].prompt_logprobs[1:]):
        assert a.keys() == b.keys() and all(abs(a[t].logprob - b[t].logprob) < 1e-4 for t in a)
    for g, w in zip(got, want):
        assert g.num_cached_tokens == w.num_cached_tokens
        assert [o.token_ids for o in g.outputs] == [o.token_ids for o in w.outputs], g.prompt_token_ids[:5]
        for go, wo in zip(g.outputs, w.outputs):
            for a, b in zip(go.logprobs or [], wo.logprobs or []):
                (ta, la), (tb, lb) = next(iter(a.items())), next(iter(b.items()))
                assert ta == tb and abs(la.logprob - lb.logprob) < 1e-4


def test_engine_under_expert_parallel_gives_the_same_tokens(checkpoint):
    """Qwen3-Next (a replicated KV head, 3 GDN key heads, 5 experts) with EP=2 against one process, in a KV cache of
    9 blocks that makes the scheduler preempt and recompute requests (the KV head is whole on each rank, so both
    engines get the same blocks and the same schedule)."""
    kind, overrides = CHECKPOINTS["next-kv1-uneven-untied"]
    path = checkpoint(kind, **overrides)[0]
    small = dict(max_model_len=128, kv_cache_bytes=9 * 16 * 256)  # 256 bytes per token: 1 layer x K, V x 32 x fp32
    want, _, want_preempted = engine_outputs(path, native_kernels=False, **small)
    got, _, got_preempted = engine_outputs(path, tensor_parallel_size=2, enable_expert_parallel=True, **small)
    assert got_preempted == want_preempted > 0
    assert got[1].num_cached_tokens > 0  # the second prompt resumed from the first's cached prefix
    assert [len(o.outputs) for o in got] == [1, 1, 2, 3, 1]
    assert_same(got, want)


class Drafts(Oracle):
    """test_speculative.Oracle (drafts forced to be accepted 0, 1 or 2 at a time, from the plain greedy outputs;
    none for sampled requests), noting what the MTP head itself drafted at each step."""

    def __init__(self, refs):
        super().__init__(refs, 2, 150, plain=lambda r: r.params.temperature > 0)
        self.proposed = []

    def __call__(self, req, drafts):
        self.proposed.append((req.prompt_token_ids[:3], len(req.output_token_ids), list(drafts)))
        return super().__call__(req, drafts)


def test_engine_under_tensor_parallel_speculates_the_same(checkpoint, tmp_path):
    """A dense model with uneven heads and an MTP head (its attention layer sharded too) drafting 2 tokens, under
    TP=2 and on one process: the head drafts the same tokens, and the verified tokens, cache hits and speculative
    counters are the same."""
    kind, overrides = CHECKPOINTS["dense-uneven-tied"]
    path = mtp_checkpoint(kind, lambda k: checkpoint(k, **overrides), tmp_path)[0]
    spec = dict(speculative_config={"method": "mtp", "num_speculative_tokens": 2})
    plain = engine_outputs(path, native_kernels=False)[0]
    refs = {tuple(o.prompt_token_ids): o.outputs[0].token_ids for o in plain}
    want_drafts, got_drafts = Drafts(refs), Drafts(refs)
    want, want_spec, _ = engine_outputs(path, want_drafts, native_kernels=False, **spec)
    got, got_spec, _ = engine_outputs(path, got_drafts, tensor_parallel_size=2, **spec)
    assert got_drafts.proposed == want_drafts.proposed and len(got_drafts.proposed) > 10
    assert got_spec == want_spec and got_spec["num_accepted_tokens"] > 0
    assert got_drafts.forced == {0, 1, 2}
    assert got[1].num_cached_tokens > 0
    assert_same(got, want)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in plain]


def error_within(seconds: float, fn) -> BaseException | None:
    """What fn raised, failing the test instead of hanging when it takes longer than `seconds`."""
    box = []

    def run():
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still waiting after {seconds} s"
    return box[0] if box else None


@pytest.mark.parametrize("when", ["idle", "mid-step"])
def test_a_dead_worker_is_a_clear_error(checkpoint, when):
    """The worker killed between calls, or while rank 0 waits for it in an all-reduce of a step: that generate and
    the next raise WorkerDied naming the worker and its exit code, without waiting for a timeout."""
    path = checkpoint("dense")[0]
    llm = LLM(str(path), dtype="float32", skip_tokenizer_init=True, tensor_parallel_size=2)
    try:
        sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        assert len(llm.generate([[1, 2, 3]], sp)[0].outputs[0].token_ids) == 4
        worker = llm.workers.processes[0]
        if when == "idle":
            worker.kill()
            worker.join(timeout=10)
        else:
            comm, calls = llm.workers.comm, []
            all_reduce = comm.all_reduce

            def kill_on_the_fifth(x):
                calls.append(1)
                if len(calls) == 5:
                    worker.kill()
                    worker.join(timeout=10)
                return all_reduce(x)

            comm.all_reduce = kill_on_the_fifth
        for _ in range(2):  # at once, and again on the next call
            error = error_within(10, lambda: llm.generate([[4, 5, 6]], sp))
            assert isinstance(error, WorkerDied), error
            assert re.search(rf"worker 1 \(pid {worker.pid}\) exited with code -9", str(error)), str(error)
    finally:
        llm.shutdown()
    assert not worker.is_alive()


def test_an_impossible_split_is_refused_before_any_worker_starts(checkpoint, monkeypatch):
    path = checkpoint("dense", linear_num_key_heads=1, linear_num_value_heads=2)[0]

    def no_spawn(*args):
        raise AssertionError("workers were started for a model that cannot be split")

    monkeypatch.setattr("qwen35.llm.start_group", no_spawn)
    with pytest.raises(ShardError, match="over 2 ranks: it has 1 Gated DeltaNet key heads, fewer than the ranks"):
        LLM(str(path), dtype="float32", skip_tokenizer_init=True, tensor_parallel_size=2)


def test_images_under_tensor_parallel(tmp_path):
    """The vision tower runs on rank 0 only; its embeddings reach every rank with the step (EP=2 on a MoE VL model)."""
    from tests.test_multimodal_e2e import GREEDY, PREPROCESSOR, VIDEO_PREPROCESSOR, picture
    from tests.tokenizer_fixtures import add_qwen35_tokenizer

    build("moe_vl", tmp_path, seed=7, vocab_size=248320)
    add_qwen35_tokenizer(tmp_path, preprocessor_config=PREPROCESSOR, video_preprocessor_config=VIDEO_PREPROCESSOR)
    prompts = [{"prompt": "<|vision_start|><|image_pad|><|vision_end|>Describe.",
                "multi_modal_data": {"image": picture(64, 96, 1)}}, {"prompt": "plain text"}]
    want = LLM(str(tmp_path), dtype="float32", max_model_len=1024).generate(prompts, GREEDY)
    llm = LLM(str(tmp_path), dtype="float32", max_model_len=1024, tensor_parallel_size=2, enable_expert_parallel=True)
    try:
        got = llm.generate(prompts, GREEDY)
    finally:
        llm.shutdown()
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]


def test_step_messages_move_whole_to_a_device():
    """On GPUs a step's arguments go by the host (a pickled CUDA tensor would unpickle on rank 0's GPU): `move`
    reaches every tensor of a ForwardBatch, in tuples, lists and dicts, and leaves the rest alone."""
    from qwen35.engine.executor import move
    from qwen35.models.batch import ForwardBatch, SeqChunk

    batch = ForwardBatch.build([SeqChunk([1, 2, 3], state_slot=0, block_ids=[0]), SeqChunk([4], num_past=2,
                                state_slot=1, block_ids=[1])], 16, torch.device("cpu"))
    args, kwargs = move((torch.ones(2), batch, [torch.zeros(1), "x"]), torch.device("meta")), \
        move({"inputs_embeds": torch.ones(4, 2), "n": 3}, torch.device("meta"))
    moved = args[1]
    assert args[0].is_meta and args[2][0].is_meta and args[2][1] == "x" and kwargs["inputs_embeds"].is_meta
    assert kwargs["n"] == 3 and type(moved) is ForwardBatch
    for f in dataclasses.fields(batch):
        value = getattr(moved, f.name)
        assert not isinstance(value, torch.Tensor) or value.is_meta, f.name
    assert moved.state_copies == batch.state_copies


def _dies_at_start(rank, size, init_method, device):
    sys.exit(3)


def test_a_worker_that_dies_before_joining_is_a_clear_error_at_once():
    """Not a wait for the group's 30-minute timeout: rank 0 watches the workers while it joins."""
    from qwen35.engine.executor import spawn_workers

    threads, start = torch.get_num_threads(), time.monotonic()
    with pytest.raises(WorkerDied, match=r"tensor-parallel worker 1 \(pid \d+\) exited with code 3 before joining"):
        spawn_workers(2, torch.device("cpu"), target=_dies_at_start)
    assert time.monotonic() - start < 60 and torch.get_num_threads() == threads
