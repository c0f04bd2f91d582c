"""The hybrid-cache consistency suite on the device, through the GPU backend (its kernels; decode steps eager: the
fp32 MoE's per-expert loop cannot be captured, test_gpu_parity checks the graphs): each request run whole and alone
is the reference; prefilled in small pieces, batched with strangers, preempted and resumed, resumed from the prefix
cache, and decoded speculatively with the MTP head, it gives the same greedy tokens, and the same seeded samples
(speculative ones against speculation alone: rejection sampling draws other random numbers). fp32 (the tiny MoE
checkpoint with an MTP head): other chunk shapes round differently by ~1e-6, far below any gap between tokens; bf16
rounding of other shapes could flip a near tie, so bf16 is checked by test_gpu_parity against transformers instead.
Afterwards every block and slot is free."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen35 import LLM, SamplingParams
from qwen35.backends.gpu.decoder import GpuDecoder
from qwen35.cache.hybrid import HybridCache
from qwen35.models.loader import load_model
from tests.tiny_models import random_mtp

pytestmark = pytest.mark.gpu

MAX_TOKENS = 8
MAX_MODEL_LEN = 128


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, 150, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# around a block (16) and a chunk of the delta rule (64); the last extends the second (a prefix-cache hit)
BASE = [tokens(n, 40 + n) for n in (5, 70, 33)]
PROMPTS = BASE + [BASE[1] + tokens(9, 91)]
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
SEEDED = [SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=100 + i, max_tokens=MAX_TOKENS, ignore_eos=True)
          for i in range(len(PROMPTS))]
SPEC = {"method": "mtp", "num_speculative_tokens": 2}


@pytest.fixture(scope="module")
def path(checkpoint, tmp_path_factory) -> str:
    """The tiny MoE checkpoint with a random MTP head added (`mtp.*` tensors, mtp_num_hidden_layers: 1), as
    tests/test_mtp.py's mtp_checkpoint makes it."""
    src = checkpoint("moe", seed=21)[0]
    dst = tmp_path_factory.mktemp("gpu-mtp") / "moe-mtp"
    shutil.copytree(src, dst)
    model = load_model(src, dtype="float32")[0]
    random_mtp(model, seed=1)
    tensors = load_file(str(dst / "model.safetensors"))
    tensors.update({k: v.clone() for k, v in model.state_dict().items() if k.startswith("mtp.")})
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["mtp_num_hidden_layers"], cfg["mtp_use_dedicated_embeddings"] = 1, False
    (dst / "config.json").write_text(json.dumps(cfg))
    return str(dst)


def make_llm(path, backend, **kw) -> LLM:
    kw.setdefault("enable_prefix_caching", False)
    llm = LLM(path, dtype="float32", skip_tokenizer_init=True, max_model_len=MAX_MODEL_LEN, **backend, **kw)
    assert isinstance(llm.engine.runner.decoder, GpuDecoder)
    return llm


def run(llm, prompts, params) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]


def assert_all_free(llm) -> None:
    eng = llm.engine
    assert not eng.has_unfinished_requests()
    assert eng.blocks.num_free == eng.blocks.num_blocks and eng.slots.num_free == eng.slots.num_slots
    assert eng.snapshots.num_pinned == 0


@pytest.fixture(scope="module")
def alone(path, backend):
    """Each prompt whole and alone, greedy and seeded: (greedy outputs, seeded outputs)."""
    llm = make_llm(path, backend, max_num_seqs=1)
    greedy = [run(llm, [p], [GREEDY])[0] for p in PROMPTS]
    seeded = [run(llm, [p], [sp])[0] for p, sp in zip(PROMPTS, SEEDED)]
    assert all(len(x) == MAX_TOKENS for x in greedy + seeded)
    assert greedy != seeded  # the seeded runs do sample
    assert_all_free(llm)
    return greedy, seeded


def test_pieces_and_strangers_equal_alone(path, backend, alone):
    """All prompts together (greedy and seeded ones in one batch), prefilled in pieces of at most 13 tokens (across
    block boundaries) beside other sequences' decode steps (the speculative test batches them in pieces of 64)."""
    llm = make_llm(path, backend, max_num_seqs=8, max_num_batched_tokens=13)
    assert run(llm, PROMPTS * 2, [GREEDY] * len(PROMPTS) + SEEDED) == alone[0] + alone[1]
    assert_all_free(llm)


def test_preempted_and_resumed_equal_alone(path, backend, alone):
    per_token = HybridCache.bytes_per_token(load_model(path, dtype="float32")[0].cache_spec(), torch.float32)
    # one request of max_model_len needs 8 blocks of 16, all the cache has: a few of these requests at a time
    llm = make_llm(path, backend, max_num_seqs=8, max_num_batched_tokens=96, kv_cache_bytes=8 * 16 * per_token)
    assert run(llm, PROMPTS * 2, [GREEDY] * len(PROMPTS) + SEEDED) == alone[0] + alone[1]
    assert llm.engine.scheduler_preemptions > 0
    assert_all_free(llm)


def test_prefix_cache_hits_equal_alone(path, backend, alone):
    """The extended prompts, after their prefixes ran, resume from cached KV blocks and state snapshots."""
    llm = make_llm(path, backend, max_num_seqs=8, enable_prefix_caching=True, state_snapshot_bytes=16 << 20)
    n = len(BASE)
    assert run(llm, BASE * 2, [GREEDY] * n + SEEDED[:n]) == alone[0][:n] + alone[1][:n]
    before = llm.engine.prefix_cache_stats.hits
    assert run(llm, PROMPTS[n:] * 2, [GREEDY] + SEEDED[n:]) == alone[0][n:] + alone[1][n:]
    assert llm.engine.prefix_cache_stats.hits - before == 2
    assert_all_free(llm)


def test_speculative_equals_alone(path, backend, alone):
    """MTP drafts of 2 tokens verified in chunks of 3: greedy tokens are those without speculation; seeded ones are
    those each request draws with speculation alone."""
    spec_alone = make_llm(path, backend, max_num_seqs=1, speculative_config=SPEC)
    seeded = [run(spec_alone, [p], [sp])[0] for p, sp in zip(PROMPTS, SEEDED)]
    llm = make_llm(path, backend, max_num_seqs=8, max_num_batched_tokens=64, speculative_config=SPEC)
    assert run(llm, PROMPTS * 2, [GREEDY] * len(PROMPTS) + SEEDED) == alone[0] + seeded
    assert llm.engine.spec_stats.num_drafts > 0
    assert_all_free(llm)
    assert_all_free(spec_alone)
