"""The GPU backend's logits against the references, for the dense, MoE and Qwen3-Next tiny checkpoints: prompts
longer than a chunk of the delta rule (64) fed in pieces, then decode steps of two sequences and of one; which
kernels the backend picks on CUDA; decode steps replayed from CUDA graphs giving the eager steps' tokens.

Tolerances (scale: the largest |logit| of the fp32 reference):
  - fp32 on the device: within 1e-4 of the scale of our model in fp32 on the CPU, of transformers in fp32 on the
    CPU and of transformers in fp32 on the device (its torch path, see conftest): the project's exactness bound,
    the same as on the CPU (the Triton kernels multiply fp32 as fp32, never tf32);
  - bf16: bf16 keeps 8 significant bits, so no fixed bound says more than the dtype does. The bound is
    transformers' own bf16 error on the same device (both against transformers in fp32 on the CPU): ours may be
    at most 1.5x theirs, as RMS over every logit of every position (a stable statistic; a single max is one
    rounding's luck), and at most 1.5x theirs in the max too, with 10% of headroom for that luck."""

import copy

import pytest
import torch

from qwen35 import LLM, SamplingParams
from qwen35.backends.gpu import decoder_for
from qwen35.backends.gpu.decoder import GpuDecoder, Kernels
from qwen35.cache.hybrid import HybridCache
from qwen35.models.batch import ForwardBatch, SeqChunk
from qwen35.models.loader import load_model
from tests.tiny_models import run_pieces

pytestmark = pytest.mark.gpu

KINDS = ["dense", "moe", "next"]
FP32_TOL = 1e-4
BF16_RATIO = 1.5


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, 150, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


PROMPTS = [tokens(104, 1), tokens(39, 2)]
# steps: prefill 70 (> one 64-token chunk) | 33; then 30 | 1; then decode steps of both; then of the second alone
CUTS = [[70, 100, 101, 102, 103], [33, 34, 35, 36, 37, 38]]


def run_pieces_on(decoder, device, block_size: int = 16) -> list[torch.Tensor]:
    """tests.tiny_models.run_pieces on `device` (cache and batches there; poisoned with NaN: a read of anything no
    step wrote shows). Returns every position's fp32 logits per prompt, on the CPU."""
    nblocks = [-(-len(p) // block_size) for p in PROMPTS]
    cache = HybridCache(decoder.cache_spec(), sum(nblocks) + 1, block_size, len(PROMPTS) + 1, decoder.dtype, device)
    for pool in (cache.k, cache.v, cache.conv, cache.ssm):
        for t in pool.values():
            t.fill_(float("nan"))
    first = [1 + sum(nblocks[:i]) for i in range(len(PROMPTS))]
    pieces = [list(zip([0] + c, c + [len(p)])) for p, c in zip(PROMPTS, CUTS)]
    out = [[] for _ in PROMPTS]
    for step in range(max(len(x) for x in pieces)):
        owners = [i for i in range(len(PROMPTS)) if step < len(pieces[i])]
        chunks = [SeqChunk(PROMPTS[i][slice(*pieces[i][step])], num_past=pieces[i][step][0], state_slot=i + 1,
                           block_ids=list(range(first[i], first[i] + nblocks[i])), want_logits="all") for i in owners]
        batch = ForwardBatch.build(chunks, block_size, device)
        with torch.no_grad():
            logits = decoder.compute_logits(decoder(batch.input_ids, batch, cache)[batch.logits_indices])
        for i, rows in zip(owners, logits.float().cpu().split([len(c.token_ids) for c in chunks])):
            out[i].append(rows)
    return [torch.cat(x) for x in out]


def hf_logits(hf, device=None, dtype=None) -> list[torch.Tensor]:
    if device is not None:
        hf = copy.deepcopy(hf).to(device=device, dtype=dtype)
    with torch.no_grad():
        return [hf(torch.tensor([p], device=device)).logits[0].float().cpu() for p in PROMPTS]


def ours(path, device, dtype) -> list[torch.Tensor]:
    model = load_model(path, dtype=dtype, device=device)[0]
    decoder = decoder_for(model, device, None, gpu_backend=True, graphs=False)
    assert isinstance(decoder, GpuDecoder)
    return run_pieces_on(decoder, device)


@pytest.fixture(scope="module")
def refs(checkpoint):
    """kind -> (path, hf model, transformers fp32 on the CPU, our model fp32 on the CPU)."""
    made = {}

    def get(kind):
        if kind not in made:
            path, hf = checkpoint(kind)
            cpu = load_model(path, dtype="float32")[0]
            made[kind] = path, hf, torch.cat(hf_logits(hf)), torch.cat(run_pieces(cpu, PROMPTS, CUTS))
        return made[kind]

    return get


def max_err(x, ref) -> float:
    return (x - ref).abs().max().item()


def rms_err(x, ref) -> float:
    return (x - ref).pow(2).mean().sqrt().item()


@pytest.mark.parametrize("kind", KINDS)
def test_fp32_logits_equal_the_references(refs, device, kind):
    path, hf, hf_cpu, ours_cpu = refs(kind)
    scale = hf_cpu.abs().max().item()
    got = torch.cat(ours(path, device, "float32"))
    hf_dev = torch.cat(hf_logits(hf, device, torch.float32))
    errors = {"ours on the CPU": max_err(got, ours_cpu), "transformers on the CPU": max_err(got, hf_cpu),
              "transformers on the device": max_err(got, hf_dev)}
    assert all(e <= FP32_TOL * scale for e in errors.values()), (scale, errors)


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_error_no_worse_than_transformers_own(refs, device, kind):
    path, hf, hf_cpu, _ = refs(kind)
    got = torch.cat(ours(path, device, "bfloat16"))
    theirs = torch.cat(hf_logits(hf, device, torch.bfloat16))
    assert got.isfinite().all()
    ours_rms, theirs_rms = rms_err(got, hf_cpu), rms_err(theirs, hf_cpu)
    ours_max, theirs_max = max_err(got, hf_cpu), max_err(theirs, hf_cpu)
    assert ours_rms <= BF16_RATIO * theirs_rms, (ours_rms, theirs_rms)
    assert ours_max <= 1.1 * BF16_RATIO * theirs_max, (ours_max, theirs_max)


def fla_imports() -> bool:
    try:
        import fla  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_kernels_picked(checkpoint, backend, device, dtype):
    """On CUDA: the Triton conv and attention; fla's delta rule for bf16 when fla imports; grouped-GEMM experts
    for bf16 on Hopper or later. On the CPU (forced): every op's torch fallback."""
    llm = LLM(str(checkpoint("moe")[0]), dtype=dtype, skip_tokenizer_init=True, max_model_len=128, **backend)
    decoder = llm.engine.runner.decoder
    assert isinstance(decoder, GpuDecoder) and decoder.graphs is not None
    k = decoder.kernels
    if device != "cuda":
        assert k == Kernels()
        return
    assert (k.conv, k.attention) == ("triton", "triton")
    half = dtype == "bfloat16"
    assert k.delta_rule == ("fla" if half and fla_imports() else "torch")
    hopper = torch.cuda.get_device_capability() >= (9, 0)
    assert k.experts == ("grouped_mm" if half and hopper else "loop")


@pytest.mark.parametrize("kind,dtype,num_prompts", [("dense", "float32", 3), ("dense", "bfloat16", 4),
                                                     ("moe", "bfloat16", 4)])
def test_graph_decode_steps_give_the_eager_tokens(checkpoint, backend, device, kind, dtype, num_prompts):
    """Greedy and seeded tokens from decode steps replayed from CUDA graphs equal those of enforce_eager=True.
    Every prompt is prefilled in the first step, so every decode step holds all the sequences: fp32, 6 of them
    padded to the graph of 8 (padded shapes round differently by ~1e-7, far below any gap between tokens); bf16, 8
    of them, a graph size, so the graph replays the very kernels eager runs (bf16 rounding of other shapes could
    flip a near tie). MoE steps are captured only with the grouped-GEMM experts (bf16 on Hopper): the per-expert
    loop reads its counts on the host. Graphs are captured when the engine starts, every size. Off CUDA the padded
    step runs eagerly: that it ran is checked."""
    if device == "cuda" and kind == "moe" and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("the grouped-GEMM experts (and so MoE decode graphs) need Hopper")
    path = str(checkpoint(kind)[0])
    prompts = [{"prompt_token_ids": tokens(n, 30 + n)} for n in (70, 9, 33, 20)[:num_prompts]]
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)] * num_prompts + \
        [SamplingParams(temperature=0.8, top_p=0.9, seed=7 + i, max_tokens=12, ignore_eos=True)
         for i in range(num_prompts)]
    outs = []
    for eager in (True, False):
        llm = LLM(path, dtype=dtype, skip_tokenizer_init=True, max_model_len=128, max_num_seqs=8,
                  max_num_batched_tokens=512, enable_prefix_caching=False, enforce_eager=eager, **backend)
        graphs = llm.engine.runner.decoder.graphs
        assert (graphs is None) == eager
        sizes = []
        if not eager:
            run = graphs.run
            graphs.run = lambda batch: sizes.append(batch.num_seqs) or run(batch)
        outs.append([o.outputs[0].token_ids for o in llm.generate(prompts * 2, params)])
    assert outs[0] == outs[1]
    assert sizes == [2 * num_prompts] * 11  # every decode step, all sequences in it, went through the graphs
    if device == "cuda":
        assert graphs.capture and set(graphs.graphs) == set(graphs.sizes) == {1, 2, 4, 8} and not graphs.failed
    else:
        assert not graphs.capture and not graphs.graphs
