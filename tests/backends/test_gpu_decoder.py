"""The GPU backend's decoder (backends/gpu/decoder.py), run on this CPU: with its plain-torch fallbacks, with the
Triton kernels in Triton's interpreter, and with a stand-in of flash-linear-attention that keeps fla's documented
contract (layouts [B, T, H, ·], varlen cu_seqlens, grouped values, l2-norm in the kernel, [N, Hv, K, V] states) on
our reference maths. What no CPU can show (speed, the real kernels' compiled code, graph capture itself) is checked
by tests/gpu/ on a CUDA machine.

Checked here: prompts in pieces and decode steps equal the reference model; decode steps padded to a graph size
write nothing but the scratch slot and block; a decode step needs no host sync (what capture requires); the engine
gives the reference's tokens through the backend; the backend is chosen only on CUDA unless asked; qwen35 imports
neither triton nor fla until the backend runs."""

import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from qwen35.backends.gpu import decoder_for
from qwen35.backends.gpu.decoder import GpuDecoder, Kernels, graph_sizes, pick_kernels
from qwen35.backends.gpu.gdn import delta_rule_fla
from qwen35.cache.hybrid import HybridCache
from qwen35.models.batch import ForwardBatch, SeqChunk
from qwen35.models.loader import load_model
from qwen35.ops.gated_delta import gated_delta_rule_chunked, gated_delta_rule_recurrent, gated_delta_rule_step
from tests.tiny_models import run_pieces

PROMPTS = [torch.randint(0, 150, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (40, 5, 23)]
CUTS = [[17, 30, 31, 32, 33], [1, 2, 3, 4], [20, 21, 22]]  # prefill pieces, then decode steps, lengths mixed
P20 = [PROMPTS[0][:20], PROMPTS[0][20:], PROMPTS[2][:20]]  # three prompts of 20 tokens


def fla_stand_in(calls: list):
    """fla's two functions as documented (fla-core 0.6.0), computed by our reference; records each call's form."""

    def unpack(q, k, v, g, beta, cu_seqlens):
        B, T = q.shape[:2]
        assert q.shape[2] == k.shape[2] and v.shape[2] % q.shape[2] == 0 and g.shape == beta.shape == v.shape[:3]
        if cu_seqlens is None:  # B sequences of T tokens
            cu = torch.arange(0, (B + 1) * T, T)
        else:
            assert B == 1 and cu_seqlens[-1] == T
            cu = cu_seqlens
        return [x.reshape(B * T, *x.shape[2:]) for x in (q, k, v, g, beta)], cu, (B, T)

    def run(reference, q, k, v, g=None, beta=None, scale=None, initial_state=None, output_final_state=False,
            use_qk_l2norm_in_kernel=False, cu_seqlens=None, **rest):
        assert scale is None and use_qk_l2norm_in_kernel and output_final_state and g.dtype == torch.float32
        (q, k, v, g, beta), cu, (B, T) = unpack(q, k, v, g, beta, cu_seqlens)
        assert initial_state.shape == (cu.numel() - 1, v.shape[1], q.shape[2], v.shape[2])
        assert initial_state.dtype == torch.float32
        o, state = reference(q, k, v, g, beta.float(), cu, initial_state)
        return o.reshape(B, T, *o.shape[1:]), state

    def chunk(*args, cu_seqlens_cpu=None, **kw):
        assert torch.equal(cu_seqlens_cpu, kw["cu_seqlens"].cpu())  # host copy given: fla needs no sync for it
        calls.append("chunk")
        return run(gated_delta_rule_chunked, *args, **kw)

    def recurrent(*args, **kw):
        calls.append("recurrent")
        return run(gated_delta_rule_recurrent, *args, **kw)

    return chunk, recurrent


@pytest.fixture(scope="module")
def moe(checkpoint):
    return load_model(checkpoint("moe")[0], dtype="float32")[0]


def scratch_cache(model, num_blocks=12, num_slots=5, block_size=16):
    cache = HybridCache(model.cache_spec(), num_blocks, block_size, num_slots, model.dtype, scratch=True)
    for pool in (cache.k, cache.v, cache.conv, cache.ssm):
        for t in pool.values():
            t.fill_(float("nan"))  # what no step wrote must not be read
    return cache


def close(a, b, tol=2e-5):
    return (a - b).abs().max() <= tol * b.abs().max()


@pytest.mark.parametrize("kernels", [Kernels(), Kernels(experts="grouped_mm")], ids=["torch", "grouped_mm"])
def test_pieces_and_decode_equal_the_reference(moe, kernels):
    ref = run_pieces(moe, PROMPTS, CUTS)
    got = run_pieces(GpuDecoder(moe, kernels), PROMPTS, CUTS)
    for r, g in zip(ref, got):
        assert close(g, r), (g - r).abs().max()


INTERPRETER = pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's run; tests/gpu run on CUDA")


@INTERPRETER
def test_triton_kernels_in_the_interpreter_equal_the_reference(checkpoint):
    """The Triton conv and attention kernels (Triton's interpreter here) inside the whole decoder."""
    pytest.importorskip("triton")
    model = load_model(checkpoint("dense")[0], dtype="float32")[0]
    prompts, cuts = [p[:20] for p in PROMPTS], [[9, 10], [1, 2], [13, 14]]
    ref = run_pieces(model, prompts, cuts, block_size=4)
    got = run_pieces(GpuDecoder(model, Kernels(conv="triton", attention="triton")), prompts, cuts, block_size=4)
    for r, g in zip(ref, got):
        assert close(g, r), (g - r).abs().max()


def test_fla_plumbing_equals_the_reference(moe):
    """The decoder on fla's contract: prompts through the chunked form with cu_seqlens (and its host copy), decode
    steps through the recurrent form in batch layout."""
    calls = []
    got = run_pieces(GpuDecoder(moe, Kernels(delta_rule="fla"), fla=fla_stand_in(calls)), PROMPTS, CUTS)
    for r, g in zip(run_pieces(moe, PROMPTS, CUTS), got):
        assert close(g, r), (g - r).abs().max()
    assert "chunk" in calls and "recurrent" in calls


def test_fla_captures_run_in_rounds():
    """States after t tokens (prefix snapshots, speculative rings): the sequences cut at those points and run in
    rounds give the reference's outputs, final states and captured states."""
    g = torch.Generator().manual_seed(0)
    lengths, Hk, Hv, K, V = [9, 3, 6], 2, 4, 8, 5
    N = sum(lengths)
    q, k = torch.randn(N, Hk, K, generator=g), torch.randn(N, Hk, K, generator=g)
    v = torch.randn(N, Hv, V, generator=g)
    gate, beta = -torch.rand(N, Hv, generator=g), torch.rand(N, Hv, generator=g)
    state = torch.randn(3, Hv, K, V, generator=g)
    cu = torch.tensor([0, 9, 12, 18])
    capture = [(0, 4), (2, 1), (0, 8), (2, 5), (0, 2)]
    ref = gated_delta_rule_chunked(q, k, v, gate, beta, cu, state, capture=capture)
    calls = []
    got = delta_rule_fla(q, k, v, gate, beta, cu, state, lengths=lengths, capture=capture, fla=fla_stand_in(calls))
    for r, x in zip(ref, got):
        assert torch.allclose(x, r, atol=1e-5), (x - r).abs().max()
    assert len(calls) == 4  # the longest sequence has 3 cuts: 4 rounds


def test_the_graphable_step_equals_the_recurrence():
    g = torch.Generator().manual_seed(1)
    S, Hk, Hv, K, V = 5, 2, 6, 8, 4
    q, k, v = torch.randn(S, Hk, K, generator=g), torch.randn(S, Hk, K, generator=g), torch.randn(S, Hv, V, generator=g)
    gate, beta, state = -torch.rand(S, Hv, generator=g), torch.rand(S, Hv, generator=g), torch.randn(S, Hv, K, V)
    ref = gated_delta_rule_recurrent(q, k, v, gate, beta, torch.arange(S + 1), state)
    got = gated_delta_rule_step(q, k, v, gate, beta, state)
    for r, x in zip(ref, got):
        assert torch.allclose(x, r, atol=1e-6)


def decode_batch(lengths, slots, block_ids, block_size=16):
    """One decode step: each sequence's next token after `lengths[i]` cached tokens."""
    return ForwardBatch.build([SeqChunk([(7 * n) % 150], num_past=n, state_slot=s, block_ids=b)
                               for n, s, b in zip(lengths, slots, block_ids)], block_size)


def prefill(decoder, cache, prompts, slots, block_ids):
    chunks = [SeqChunk(p, state_slot=s, block_ids=b) for p, s, b in zip(prompts, slots, block_ids)]
    batch = ForwardBatch.build(chunks, cache.block_size)
    with torch.no_grad():
        decoder(batch.input_ids, batch, cache)


def test_padded_graph_steps_equal_eager_and_write_only_scratch(moe):
    """Decode steps of 3 sequences padded to the graph size 4 (eager here: no CUDA): the same logits as the
    unpadded step, and every slot and block outside the sequences' own and the scratch ones is never written."""
    assert graph_sizes(3) == [1, 2, 3] and graph_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
    assert graph_sizes(16) == [1, 2, 4, 8, 16] and graph_sizes(1) == [1]
    slots, blocks = [1, 3, 4], [[2, 5], [7, 8], [9, 10]]
    results = []
    for graphs in (False, True):
        cache = scratch_cache(moe)
        decoder = GpuDecoder(moe, Kernels(), cache=cache, graphs=graphs, max_num_seqs=4, max_blocks=4)
        prefill(decoder, cache, P20, slots, blocks)
        logits = []
        for step in range(3):
            batch = decode_batch([20 + step] * 3, slots, blocks)
            with torch.no_grad():
                logits.append(moe.compute_logits(decoder(batch.input_ids, batch, cache)))
        results.append((torch.stack(logits), cache))
    (eager, _), (padded, cache) = results
    assert torch.allclose(padded, eager, atol=1e-5, rtol=1e-5)
    untouched_slots = [s for s in range(cache.num_slots) if s not in slots]
    used = {b for bs in blocks for b in bs}
    untouched_blocks = [b for b in range(cache.num_blocks) if b not in used]
    for i in cache.conv:
        assert cache.ssm[i][untouched_slots].isnan().all() and cache.conv[i][untouched_slots].isnan().all()
        assert not cache.ssm[i][cache.scratch_slot].isnan().any()  # the padding row wrote there
    for i in cache.k:
        assert cache.k[i][untouched_blocks].isnan().all() and cache.v[i][untouched_blocks].isnan().all()


FORBIDDEN = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.bincount.default",
             "aten.repeat_interleave.Tensor", "aten.masked_select.default", "aten._unique2.default"}


class HostSyncs(TorchDispatchMode):
    """Records ops that read device values on the host or size outputs by them (a CUDA graph cannot capture them);
    .tolist() and .numpy() bypass the dispatcher, so they are patched to record too."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in FORBIDDEN:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._tolist, self._numpy = torch.Tensor.tolist, torch.Tensor.numpy
        seen = self.seen
        torch.Tensor.tolist = lambda t, _f=self._tolist: seen.append("tolist") or _f(t)
        torch.Tensor.numpy = lambda t, *a, _f=self._numpy, **k: seen.append("numpy") or _f(t, *a, **k)
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist, torch.Tensor.numpy = self._tolist, self._numpy
        return super().__exit__(*exc)


@pytest.mark.parametrize("kernels", [Kernels(experts="grouped_mm"), Kernels(conv="triton", attention="triton",
                                                                            experts="grouped_mm")],
                         ids=["torch", "triton"])
def test_a_graph_decode_step_needs_no_host_sync(moe, kernels):
    """The padded decode step a graph captures, with the ops the GPU runs there (the torch fallbacks, or the Triton
    kernels' wrappers): no op reads a device value on the host."""
    if kernels.conv == "triton":
        pytest.importorskip("triton")
        if torch.cuda.is_available():
            pytest.skip("the interpreter's run; tests/gpu run on CUDA")
    cache = scratch_cache(moe)
    decoder = GpuDecoder(moe, kernels, cache=cache, graphs=True, max_num_seqs=3, max_blocks=4)
    slots, blocks = [1, 3], [[2, 5], [7, 8]]
    prefill(decoder, cache, P20[:2], slots, blocks)
    batch = decode_batch([20, 20], slots, blocks)
    graphs = decoder.graphs
    graphs._fill(batch, 2, 2)
    with HostSyncs() as mode, torch.no_grad():
        decoder.step(graphs.ids[:2], graphs._batch(2), cache, max_query_len=1)
    assert mode.seen == []
    with HostSyncs() as mode, torch.no_grad():  # the check can fail: the reference's decode reads lengths
        moe(batch.input_ids, batch, cache)
    assert mode.seen


def test_engine_through_the_backend_gives_the_reference_tokens(checkpoint):
    """LLM with the GPU backend forced on this CPU (torch fallbacks, padded decode steps): the same greedy and
    seeded tokens as the reference model for prompts that batch, chunk, share a prefix (a cache hit resumes from a
    state snapshot) and are preempted for want of KV blocks."""
    from qwen35 import LLM, SamplingParams

    path = checkpoint("moe")[0]
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[0][:33] + [3, 4], PROMPTS[2] + PROMPTS[0]]
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    seeded = SamplingParams(max_tokens=12, temperature=0.8, seed=5, ignore_eos=True)
    per_token = HybridCache.bytes_per_token(load_model(path, dtype="float32")[0].cache_spec(), torch.float32)
    outs, stats = [], []
    for kw in ({"native_kernels": False}, {"gpu_backend": True}):
        llm = LLM(str(path), dtype="float32", skip_tokenizer_init=True, max_model_len=96, max_num_seqs=5,
                  max_num_batched_tokens=32, kv_cache_bytes=9 * 16 * per_token, **kw)
        padded = []
        if kw.get("gpu_backend"):
            graphs = llm.engine.runner.decoder.graphs
            assert graphs.sizes == [1, 2, 4, 5]
            assert llm.engine.runner.describe() == ("GPU (conv torch, attention torch, delta rule torch, experts "
                                                    "loop; decode steps from CUDA graphs)")
            run = graphs.run
            graphs.run = lambda batch: padded.append(batch.num_seqs) or run(batch)
        got = llm.generate([{"prompt_token_ids": p} for p in prompts * 2], [greedy] * 5 + [seeded] * 5)
        outs.append([o.outputs[0].token_ids for o in got])
        stats.append((llm.engine.scheduler_preemptions, llm.engine.prefix_cache_stats.hits))
        assert not kw.get("gpu_backend") or 3 in padded  # decode steps of 3 ran padded to 4
    assert outs[0] == outs[1]
    assert stats[0] == stats[1] and stats[1][0] > 0 and stats[1][1] > 0, stats


def test_backend_only_on_cuda_unless_asked(moe):
    assert pick_kernels(torch.device("cpu"), torch.bfloat16) == Kernels()
    assert decoder_for(moe, "cpu", None) is None
    assert isinstance(decoder_for(moe, "cpu", None, gpu_backend=True), GpuDecoder)


def test_qwen35_imports_no_kernel_package_until_the_backend_runs():
    code = ("import sys, qwen35, qwen35.engine.llm_engine, qwen35.backends.gpu; "
            "print(sorted(m for m in ('triton', 'fla') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_step_uploads_as_one_buffer_with_the_same_fields():
    """To a GPU, ForwardBatch.build packs every field into one int64 buffer (one pinned, non-blocking copy per step)
    and views it back: the same values, shapes and dtypes (M-RoPE positions [3, N], the bool flags)."""
    from qwen35.models.batch import _pack, _unpack

    pos = torch.arange(12).view(3, 4)
    batch = ForwardBatch.build([SeqChunk([1, 2, 3], num_past=2, state_slot=1, block_ids=[4, 5], positions=pos[:, :3]),
                                SeqChunk([9], state_slot=2, block_ids=[6, 7], positions=pos[:, 3:])], 4)
    host = {k: getattr(batch, k) for k in ("input_ids", "positions", "cu_seqlens", "context_lens",
                                            "has_initial_state", "logits_indices", "state_slots", "block_tables",
                                            "slot_mapping")}
    flat = _pack(host)
    assert flat.dtype == torch.int64 and flat.dim() == 1
    for k, v in _unpack(flat, host).items():
        assert v.dtype == host[k].dtype and torch.equal(v, host[k]), k


def test_a_size_whose_capture_fails_decodes_eagerly_and_unpadded(moe):
    """Where a capture fails (here forced: this CPU captures nothing), that size's steps run eagerly, unpadded, with
    the same logits; the other sizes are untouched."""
    cache = scratch_cache(moe)
    decoder = GpuDecoder(moe, Kernels(), cache=cache, graphs=True, max_num_seqs=4, max_blocks=4)
    graphs = decoder.graphs
    graphs.capture = True  # as on CUDA

    def fail(B):
        raise RuntimeError("operation not permitted when stream is capturing")

    graphs._capture = fail
    slots, blocks = [1, 3, 4], [[2, 5], [7, 8], [9, 10]]
    prefill(decoder, cache, P20, slots, blocks)
    batch = decode_batch([20] * 3, slots, blocks)
    assert graphs.fits(batch, cache)
    with torch.no_grad():
        got = decoder(batch.input_ids, batch, cache)
    assert graphs.failed == {4} and not graphs.fits(batch, cache)
    assert graphs.fits(decode_batch([21], slots[:1], blocks[:1]), cache)  # size 1 never failed
    eager = GpuDecoder(moe, Kernels())
    cache2 = scratch_cache(moe)
    prefill(eager, cache2, P20, slots, blocks)
    with torch.no_grad():
        assert torch.allclose(got, eager(batch.input_ids, batch, cache2), atol=1e-5, rtol=1e-5)


def test_graphs_only_where_the_step_can_be_captured(moe, checkpoint):
    from qwen35.backends.gpu.decoder import graphs_worthwhile

    dense = load_model(checkpoint("dense")[0], dtype="float32")[0]
    fast = Kernels(conv="triton", attention="triton", delta_rule="fla", experts="grouped_mm")
    assert graphs_worthwhile(moe, fast) and graphs_worthwhile(dense, fast)
    assert not graphs_worthwhile(moe, Kernels(attention="triton"))  # the per-expert loop reads counts
    assert graphs_worthwhile(dense, Kernels(attention="triton"))
    assert not graphs_worthwhile(dense, Kernels())  # the torch attention gathers the whole table width


def test_a_decoding_request_with_images_needs_no_embeddings():
    """Past its prompt, a request with images decodes from token ids like any other (so a step of such requests
    can replay a CUDA graph, which takes ids only); a step that still covers placeholder rows gets embeddings."""
    from types import SimpleNamespace

    from qwen35.engine.runner import ModelRunner

    runner = ModelRunner.__new__(ModelRunner)
    runner.decoder = SimpleNamespace(embed=lambda ids: torch.zeros(len(ids), 4))

    def chunk(computed, prompt, mm=True):
        mm = SimpleNamespace(num_prompt_tokens=prompt, feature_rows=torch.full((prompt,), -1)) if mm else None
        return SimpleNamespace(request=SimpleNamespace(mm=mm, num_computed_tokens=computed), num_tokens=1)

    batch = SimpleNamespace(input_ids=torch.tensor([1, 2]))
    assert runner._embeds([chunk(30, 30), chunk(5, 9, mm=False)], batch) is None
    assert runner._embeds([chunk(29, 30), chunk(5, 9, mm=False)], batch) is not None
