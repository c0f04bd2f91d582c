"""The text decoder of a loaded `Qwen3_5ForCausalLM` on a GPU: the model's own modules and maths, with the ops
between its projections swapped for GPU kernels, and decode steps replayed from CUDA graphs.

What runs where (`Kernels`, chosen once by `pick_kernels`, each with a fallback that is its reference or a plain
torch form of it):
  - causal conv: Triton (conv.py) | the reference (prompts) and a torch step (decode);
  - gated delta rule: flash-linear-attention (gdn.py; bf16 / fp16 models) | the reference and a torch step;
  - attention over the paged cache: Triton (attention.py), prompts and decode in one kernel | SDPA per sequence
    (prompts) and a gathered torch form (decode);
  - routed experts: one grouped matmul per projection (`torch._grouped_mm`) | the per-expert loop.
Everything else (projections, norms, rotary, router, shared expert, LM head) is the model's modules on the device.

CUDA graphs (`DecodeGraphs`): a decode step (one new token per sequence, text only, no state copies) is padded to
the next size of a ladder (1, 2, 4, 8, then multiples of 16, and max_num_seqs) and replayed from that size's graph.
The padding rows write only the cache's scratch slot and block, which no request owns. Every
op on that path reads its sizes from shapes, never values from the device, so the step can be captured at all. The
sizes are captured when the engine starts. A model whose step would sync (the per-expert loop, quantized experts,
the torch attention) decodes eagerly; a size whose capture fails anyway decodes eagerly and unpadded, with a
warning."""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass

import torch

from qwen35.backends.gpu import attention as triton_attention
from qwen35.backends.gpu import conv as triton_conv
from qwen35.backends.gpu.gdn import delta_rule_fla, fla_functions
from qwen35.layers.mlp import Experts, SparseMoeBlock
from qwen35.models.batch import ForwardBatch
from qwen35.ops.attention import varlen_attention
from qwen35.ops.conv import causal_conv1d
from qwen35.ops.gated_delta import gated_delta_rule, gated_delta_rule_step
from qwen35.ops.moe import experts_grouped_mm, grouped_mm_supported, route_logits
from qwen35.ops.rope import rope_cos_sin

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Kernels:
    """Which implementation each op takes: conv and attention "triton" | "torch", delta_rule "fla" | "torch",
    experts "grouped_mm" | "loop"."""

    conv: str = "torch"
    attention: str = "torch"
    delta_rule: str = "torch"
    experts: str = "loop"

    def describe(self) -> str:
        return f"conv {self.conv}, attention {self.attention}, delta rule {self.delta_rule}, experts {self.experts}"


def pick_kernels(device: torch.device, dtype: torch.dtype) -> Kernels:
    """The fastest implementations this device, dtype and environment have."""
    cuda = device.type == "cuda"
    triton = cuda and triton_conv.triton is not None and triton_attention.triton is not None
    fla = cuda and dtype in (torch.bfloat16, torch.float16) and fla_functions() is not None
    grouped = grouped_mm_supported(device, dtype)
    return Kernels(conv="triton" if triton else "torch", attention="triton" if triton else "torch",
                   delta_rule="fla" if fla else "torch", experts="grouped_mm" if grouped else "loop")


def on_device(device: torch.device):
    """Make `device` current: Triton launches on the current device and stream, and a graph captures on the current
    device's; cuda:1 tensors under a current cuda:0 would run, or be captured, elsewhere. (Per thread: the server
    steps the engine in its own thread.)"""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def graphs_worthwhile(model, kernels: Kernels) -> bool:
    """Whether a CUDA graph can capture this model's decode step: the Triton attention (the torch form gathers the
    whole table width) and no routed experts that sync (the per-expert loop reads counts; quantized experts)."""
    moe = [m for m in model.modules() if isinstance(m, SparseMoeBlock)]
    experts_ok = not moe or (kernels.experts == "grouped_mm" and all(type(m.experts) is Experts for m in moe))
    return kernels.attention == "triton" and experts_ok


def is_decode(batch: ForwardBatch) -> bool:
    """One new token per sequence (shapes only: every sequence has at least one)."""
    return batch.input_ids.shape[0] == batch.num_seqs


class GpuDecoder:
    """The runner's face of the model on a GPU (as backends.cpu's CpuDecoder on a CPU): embed, forward ->
    final-normed hidden [N, H], compute_logits, mtp. `graphs`: replay decode steps from CUDA graphs (needs the
    cache's scratch slot and block); `max_num_seqs` and `max_blocks` size them. The model's weights stay where
    they are: the decoder holds no copy."""

    def __init__(self, model, kernels: Kernels, *, cache=None, graphs: bool = False, max_num_seqs: int = 1,
                 max_blocks: int = 1, fla=None):
        self.model, self.cfg, self.kernels = model, model.cfg, kernels
        self.fla = fla  # fla's (chunk, recurrent) functions (default: fla-core's; tests pass stand-ins)
        self.device = model.model.norm.weight.device
        self.graphs = DecodeGraphs(self, cache, max_num_seqs, max_blocks) if graphs else None

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def mtp(self):
        return self.model.mtp

    def cache_spec(self, mtp: bool = False):
        return self.model.cache_spec(mtp)

    def embed(self, input_ids):
        return self.model.embed(input_ids)

    def compute_logits(self, hidden, ids=None):
        return self.model.compute_logits(hidden, ids)

    @torch.inference_mode()
    def forward(self, input_ids, batch: ForwardBatch, cache=None, inputs_embeds=None) -> torch.Tensor:
        with on_device(self.device):
            if self.graphs is not None and inputs_embeds is None and self.graphs.fits(batch, cache):
                return self.graphs.run(batch)
            return self.step(input_ids, batch, cache, inputs_embeds)

    __call__ = forward

    def step(self, input_ids, batch: ForwardBatch, cache=None, inputs_embeds=None, max_query_len=None):
        """The model's forward with this backend's ops. max_query_len: a host int (a graph passes 1; else the
        batch's host lengths give it)."""
        text = self.model.model
        h = text.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        cos, sin = rope_cos_sin(batch.positions, text.inv_freq, self.cfg.mrope_section, h.dtype, text.rope_scale)
        if max_query_len is None:
            max_query_len = batch.max_query_len
        ops = self._ops(batch, max_query_len)
        for layer in text.layers:
            a = layer.input_layernorm(h)
            if layer.layer_type == "linear_attention":
                m, N = layer.linear_attn, a.shape[0]
                z = m.in_proj_z(a).reshape(N, m.num_v_heads, m.v_head_dim)
                o = m.mix(m.in_proj_qkv(a), m.in_proj_a(a), m.in_proj_b(a), batch, cache, conv=ops["conv"],
                          delta_rule=ops["delta_rule"])
                h = h + m.out_proj(m.norm(o, z).reshape(N, m.value_dim))
            else:
                m = layer.self_attn
                h = h + m.o_proj(m.attend(m.q_proj(a), m.k_proj(a), m.v_proj(a), cos, sin, batch, cache,
                                          attention=ops["attention"]))
            h = h + self._ffn(layer.mlp, layer.post_attention_layernorm(h))
        return text.norm(h)

    def _ffn(self, mlp, x):
        if self.kernels.experts == "loop" or not isinstance(mlp, SparseMoeBlock) \
                or type(mlp.experts) is not Experts:  # quantized experts keep their own forward
            return mlp(x)
        e = mlp.experts
        weights, ids = route_logits(mlp.gate(x), mlp.top_k, mlp.renormalize)
        routed = experts_grouped_mm(x, weights, ids, e.gate_up_proj, e.down_proj, e.first_expert)
        return routed + torch.sigmoid(mlp.shared_expert_gate(x)) * mlp.shared_expert(x)

    def _ops(self, batch: ForwardBatch, max_query_len: int) -> dict:
        """This step's conv, delta rule and attention, each of its reference's contract (the mix / attend hooks)."""
        k, decode = self.kernels, is_decode(batch)
        lengths = [1] * batch.num_seqs if decode else batch.lengths()  # host lengths (built here, no sync)

        def conv(x, weight, cu_seqlens, state):
            if decode and state is not None:
                update = triton_conv.causal_conv1d_update if k.conv == "triton" else \
                    triton_conv.causal_conv1d_update_torch
                return update(x, weight, state)
            if k.conv == "triton":
                return triton_conv.causal_conv1d(x, weight, cu_seqlens, state, max_query_len=max_query_len)
            return causal_conv1d(x, weight, cu_seqlens, state)

        def delta_rule(q, kk, v, g, beta, cu_seqlens, state, capture=None):
            if k.delta_rule == "fla":
                return delta_rule_fla(q, kk, v, g, beta, cu_seqlens, state, capture=capture, fla=self.fla,
                                      lengths=lengths)
            if decode and state is not None and not capture:
                return gated_delta_rule_step(q, kk, v, g, beta, state)
            return gated_delta_rule(q, kk, v, g, beta, cu_seqlens, state, capture=capture)

        def attention(q, kk, v, cu_seqlens, scale, k_cache=None, v_cache=None, block_tables=None,
                      context_lens=None):
            if k_cache is None:
                return varlen_attention(q, kk, v, cu_seqlens, scale)
            if k.attention == "triton":
                return triton_attention.paged_attention(q, k_cache, v_cache, cu_seqlens, context_lens, block_tables,
                                                        scale, max_query_len)
            if decode:
                return paged_decode_attention_torch(q, k_cache, v_cache, context_lens, block_tables, scale)
            return varlen_attention(q, kk, v, cu_seqlens, scale, k_cache=k_cache, v_cache=v_cache,
                                    block_tables=block_tables, context_lens=context_lens)

        return {"conv": conv, "delta_rule": delta_rule, "attention": attention}


def paged_decode_attention_torch(q, k_cache, v_cache, context_lens, block_tables, scale: float) -> torch.Tensor:
    """One query per sequence over its paged K/V, in plain torch with no host sync: q [S, Hq, D], caches
    [blocks, block_size, Hkv, D], block_tables [S, W] (W blocks gathered for every sequence, masked past its
    context)."""
    S, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    k = k_cache[block_tables].flatten(1, 2).to(q.dtype)  # [S, W*bs, Hkv, D]
    v = v_cache[block_tables].flatten(1, 2).to(q.dtype)
    G = Hq // Hkv
    scores = torch.einsum("skgd,slkd->skgl", q.view(S, Hkv, G, D).float(), k.float()) * scale
    beyond = torch.arange(k.shape[1], device=q.device)[None, :] >= context_lens[:, None]  # [S, L]
    scores = scores.masked_fill(beyond[:, None, None, :], float("-inf"))
    v = v.float().masked_fill(beyond[:, :, None, None], 0)  # never-written positions may hold NaN: 0 * NaN = NaN
    return torch.einsum("skgl,slkd->skgd", torch.softmax(scores, dim=-1), v).reshape(S, Hq, D).to(q.dtype)


def graph_sizes(max_num_seqs: int) -> list[int]:
    """The batch sizes decode graphs are captured for: 1, 2, 4, 8, then every 16, then max_num_seqs itself."""
    ladder = [1, 2, 4, 8, *range(16, max_num_seqs, 16)]
    return [s for s in ladder if s < max_num_seqs] + [max_num_seqs]


class DecodeGraphs:
    """Decode steps padded to a ladder of batch sizes and replayed from CUDA graphs. Off CUDA, or once a capture
    has failed, the same padded step runs eagerly (what the CPU tests check)."""

    def __init__(self, decoder: GpuDecoder, cache, max_num_seqs: int, max_blocks: int):
        if cache is None or getattr(cache, "scratch_slot", None) is None:
            raise ValueError("decode graphs need a cache with a scratch slot and block (HybridCache(scratch=True))")
        self.decoder, self.cache = decoder, cache
        self.sizes = graph_sizes(max_num_seqs)
        self.max_blocks = max_blocks
        self.capture = cache.device.type == "cuda"  # off CUDA the padded step runs eagerly (what the tests check)
        M, dev = self.sizes[-1], cache.device
        i64 = dict(dtype=torch.int64, device=dev)
        self.ids = torch.zeros(M, **i64)
        self.positions = torch.zeros(3, M, **i64)
        self.cu_seqlens = torch.arange(M + 1, **i64)
        self.context_lens = torch.ones(M, **i64)
        self.has_state = torch.zeros(M, dtype=torch.bool, device=dev)
        self.slots = torch.full((M,), cache.scratch_slot, **i64)
        self.tables = torch.full((M, max_blocks), cache.scratch_block, **i64)
        self.slot_mapping = torch.full((M,), cache.scratch_block * cache.block_size, **i64)
        self.graphs: dict[int, tuple] = {}  # size -> (graph, output)
        self.failed: set[int] = set()  # sizes whose capture failed: their steps run eagerly, unpadded
        self.pool = None

    def size_for(self, num_seqs: int) -> int:
        return next(s for s in self.sizes if s >= num_seqs)

    def fits(self, batch: ForwardBatch, cache) -> bool:
        return (cache is self.cache and is_decode(batch) and not batch.state_copies
                and batch.num_seqs <= self.sizes[-1] and batch.block_tables is not None
                and batch.block_tables.shape[1] <= self.max_blocks
                and self.size_for(batch.num_seqs) not in self.failed)

    def capture_all(self) -> None:
        """Capture every size now (largest first, so the smaller ones reuse its memory pool), not mid-serving."""
        for B in reversed(self.sizes):
            self._try_capture(B)

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        S = batch.num_seqs
        B = self.size_for(S)
        if self.capture and B not in self.graphs and not self._try_capture(B):
            return self.decoder.step(batch.input_ids, batch, self.cache)
        self._fill(batch, S, B)
        if not self.capture:
            return self.decoder.step(self.ids[:B], self._batch(B), self.cache, max_query_len=1)[:S]
        graph, out = self.graphs[B]
        graph.replay()
        return out[:S].clone()  # the graph's output is overwritten by the next replay

    def _try_capture(self, B: int) -> bool:
        if B in self.graphs or B in self.failed:
            return B in self.graphs
        self._pad(0, B)  # warm-up and capture run over padding rows only: no request's state moves
        try:
            self.graphs[B] = self._capture(B)
            return True
        except Exception as e:  # noqa: BLE001 - any op that cannot be captured
            logger.warning("qwen35: CUDA graph capture of decode steps of %d sequences failed (%s); they run "
                           "eagerly", B, e)
            self.failed.add(B)
            return False

    def _fill(self, batch: ForwardBatch, S: int, B: int) -> None:
        """The step's rows, then padding rows up to B that read nothing and write only the scratch slot/block."""
        self.ids[:S] = batch.input_ids
        self.positions[:, :S] = batch.positions  # [N] broadcasts to all three M-RoPE axes: the same angles
        self.context_lens[:S] = batch.context_lens
        self.has_state[:S] = batch.has_initial_state
        self.slots[:S] = batch.state_slots
        # entries past a row's own blocks keep earlier steps' block ids: valid, and never read past context_lens
        self.tables[:S, :batch.block_tables.shape[1]] = batch.block_tables
        self.slot_mapping[:S] = batch.slot_mapping
        self._pad(S, B)

    def _pad(self, S: int, B: int) -> None:
        self.ids[S:B] = 0
        self.positions[:, S:B] = 0
        self.context_lens[S:B] = 1
        self.has_state[S:B] = False
        self.slots[S:B] = self.cache.scratch_slot
        self.tables[S:B] = self.cache.scratch_block
        self.slot_mapping[S:B] = self.cache.scratch_block * self.cache.block_size

    def _batch(self, B: int) -> ForwardBatch:
        return ForwardBatch(input_ids=self.ids[:B], positions=self.positions[:, :B],
                            cu_seqlens=self.cu_seqlens[:B + 1], context_lens=self.context_lens[:B],
                            has_initial_state=self.has_state[:B], state_slots=self.slots[:B],
                            block_tables=self.tables[:B], slot_mapping=self.slot_mapping[:B])

    def _capture(self, B: int):
        batch = self._batch(B)
        step = functools.partial(self.decoder.step, self.ids[:B], batch, self.cache, max_query_len=1)
        stream = torch.cuda.Stream(self.cache.device)
        stream.wait_stream(torch.cuda.current_stream(self.cache.device))
        with torch.cuda.stream(stream):  # warm-up off the capture: autotuning, lazy initialisation, workspaces
            for _ in range(2):
                step()
        torch.cuda.current_stream(self.cache.device).wait_stream(stream)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA calls of the server's other threads (none today) cannot invalidate the capture
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = step()
        return graph, out
