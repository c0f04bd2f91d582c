"""The Qwen3.5 text decoder (dense and MoE; Qwen3-Next shares it through its checkpoint mapping).

Layers follow `config.layer_types`: Gated DeltaNet ("linear_attention") or gated full attention, each followed by
a dense SwiGLU or sparse-MoE FFN. The forward works on packed sequences: input ids [N] with a `ForwardBatch`
saying where each sequence starts, and an optional hybrid cache (paged K/V for attention layers, one conv +
recurrent state slot per sequence for Gated DeltaNet layers). Parameter names match the HF text checkpoint;
the maths is transformers' `modeling_qwen3_5.py`, which the tests compare against.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from qwen35.cache.spec import AttentionCacheSpec, LinearCacheSpec
from qwen35.config import TextConfig, VisionConfig
from qwen35.layers.mlp import MLP, SparseMoeBlock
from qwen35.layers.norm import GatedRMSNorm, RMSNorm
from qwen35.models.batch import ForwardBatch
from qwen35.models.vision import VisionTower
from qwen35.ops.attention import varlen_attention, write_kv
from qwen35.ops.conv import causal_conv1d
from qwen35.ops.gated_delta import gated_delta_rule
from qwen35.ops.rope import apply_rotary, inv_freq, rope_cos_sin, yarn_attention_factor, yarn_inv_freq


class GatedDeltaNet(nn.Module):
    """Linear attention with the gated delta rule; state per sequence = conv history + fp32 [Hv, K, V] matrix."""

    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_k_heads, self.num_v_heads = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        self.k_head_dim, self.v_head_dim = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        self.key_dim, self.value_dim = cfg.key_dim, cfg.value_dim
        H = cfg.hidden_size
        self.in_proj_qkv = nn.Linear(H, cfg.conv_dim, bias=False)  # rows [q | k | v], head-major
        self.in_proj_z = nn.Linear(H, cfg.value_dim, bias=False)
        self.in_proj_b = nn.Linear(H, cfg.linear_num_value_heads, bias=False)
        self.in_proj_a = nn.Linear(H, cfg.linear_num_value_heads, bias=False)
        self.conv1d = nn.Conv1d(cfg.conv_dim, cfg.conv_dim, cfg.linear_conv_kernel_dim, groups=cfg.conv_dim, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(cfg.linear_num_value_heads))
        self.A_log = nn.Parameter(torch.zeros(cfg.linear_num_value_heads))
        self.norm = GatedRMSNorm(cfg.linear_value_head_dim, cfg.rms_norm_eps)
        self.out_proj = nn.Linear(cfg.value_dim, H, bias=False)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, cache=None) -> torch.Tensor:
        N = x.shape[0]
        mixed, z, b, a = self.in_proj_qkv(x), self.in_proj_z(x), self.in_proj_b(x), self.in_proj_a(x)
        z = z.reshape(N, self.num_v_heads, self.v_head_dim)
        o = self.mix(mixed, a, b, batch, cache)
        o = self.norm(o, z)
        return self.out_proj(o.reshape(N, self.value_dim))

    def mix(self, mixed, a, b, batch: ForwardBatch, cache=None, conv=causal_conv1d, conv_weight=None,
            delta_rule=gated_delta_rule):
        """Everything between the projections: the causal conv and the delta rule over the cache's states, which
        are read and written back, and copied to other slots after some of a sequence's tokens where the batch asks
        (`batch.state_copies`: the delta rule reads those states off inside its chunks, the conv history is the
        inputs before that point). A backend passes its own conv and delta rule, of the same contracts."""
        weight = self.conv1d.weight[:, 0, :] if conv_weight is None else conv_weight
        g, beta = self._gates(a, b)
        if cache is None:
            mixed, _ = conv(mixed, weight, batch.cu_seqlens, None)
            return delta_rule(*self._split(mixed), g, beta, batch.cu_seqlens, None)[0]
        conv_pool, ssm_pool = cache.conv[self.layer_idx], cache.ssm[self.layer_idx]
        has = batch.has_initial_state[:, None, None]
        conv_state = torch.where(has, conv_pool[batch.state_slots], 0)  # where, not *: a stale slot may hold NaN
        ssm_state = torch.where(has[..., None], ssm_pool[batch.state_slots], 0)
        # conv inputs at the cache's precision, so a prompt fed whole or in pieces sees the same history
        x = mixed = mixed.to(conv_pool.dtype).to(mixed.dtype)
        mixed, new_conv_state = conv(mixed, weight, batch.cu_seqlens, conv_state)
        copies = batch.state_copies or []
        lengths = batch.lengths() if copies else []
        inside = [(s, k) for s, k, _ in copies if k < lengths[s]]
        o, new_ssm_state, *captured = delta_rule(*self._split(mixed), g, beta, batch.cu_seqlens, ssm_state,
                                                 capture=inside)
        at = {c: i for i, c in enumerate(inside)}
        for s, k, to in copies:
            if k == lengths[s]:
                conv_pool[to], ssm_pool[to] = new_conv_state[s].to(conv_pool.dtype), new_ssm_state[s]
            else:  # the history after k tokens: the last Kw - 1 conv inputs up to there, the older state first
                start = int(batch.cu_seqlens[s])
                hist = torch.cat([conv_state[s].to(x.dtype), x[start:start + k].T], dim=1)
                conv_pool[to] = hist[:, -conv_state.shape[2]:].to(conv_pool.dtype)
                ssm_pool[to] = captured[0][at[s, k]]
        conv_pool[batch.state_slots] = new_conv_state.to(conv_pool.dtype)
        ssm_pool[batch.state_slots] = new_ssm_state
        return o

    def _split(self, mixed):
        N = mixed.shape[0]
        q, k, v = mixed.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        return (q.view(N, self.num_k_heads, self.k_head_dim), k.view(N, self.num_k_heads, self.k_head_dim),
                v.view(N, self.num_v_heads, self.v_head_dim))

    def _gates(self, a, b):
        # Decay in fp32: in half precision exp(A_log) can overflow (HF's comment).
        return -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias.float()), b.sigmoid()

class Attention(nn.Module):
    """Gated full attention: per-head [query | gate] packing in q_proj, q/k norms, partial M-RoPE, GQA, sigmoid gate."""

    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        H, D, bias = cfg.hidden_size, cfg.head_dim, cfg.attention_bias
        self.q_proj = nn.Linear(H, 2 * self.num_heads * D, bias=bias)
        self.k_proj = nn.Linear(H, self.num_kv_heads * D, bias=bias)
        self.v_proj = nn.Linear(H, self.num_kv_heads * D, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * D, H, bias=bias)
        self.q_norm = RMSNorm(D, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(D, cfg.rms_norm_eps)
        self.scale = D**-0.5

    def forward(self, x, cos, sin, batch: ForwardBatch, cache=None):
        return self.o_proj(self.attend(self.q_proj(x), self.k_proj(x), self.v_proj(x), cos, sin, batch, cache))

    def attend(self, q, k, v, cos, sin, batch: ForwardBatch, cache=None, attention=varlen_attention):
        """Everything between the projections: q/k norms, rotary, the cache, attention, the gate (o_proj's input).
        A backend passes its own attention, of varlen_attention's contract."""
        N, D = q.shape[0], self.head_dim
        # Each head's q_proj rows are [query_h | gate_h]; splitting the flat output in half would be wrong.
        q, gate = q.reshape(N, self.num_heads, 2 * D).chunk(2, dim=-1)
        q = apply_rotary(self.q_norm(q), cos, sin)
        k = apply_rotary(self.k_norm(k.reshape(N, self.num_kv_heads, D)), cos, sin)
        v = v.reshape(N, self.num_kv_heads, D)
        if cache is None:
            o = attention(q, k, v, batch.cu_seqlens, self.scale)
        else:
            k_cache, v_cache = cache.k[self.layer_idx], cache.v[self.layer_idx]
            write_kv(k_cache, v_cache, batch.slot_mapping, k, v)
            o = attention(q, k, v, batch.cu_seqlens, self.scale, k_cache=k_cache, v_cache=v_cache,
                          block_tables=batch.block_tables, context_lens=batch.context_lens)
        return o.reshape(N, self.num_heads * D) * torch.sigmoid(gate.reshape(N, self.num_heads * D))

class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.layer_type = cfg.layer_types[layer_idx]
        if self.layer_type == "linear_attention":
            self.linear_attn = GatedDeltaNet(cfg, layer_idx)
        else:
            self.self_attn = Attention(cfg, layer_idx)
        if cfg.moe_layers[layer_idx]:
            self.mlp = SparseMoeBlock(cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok,
                                      cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size,
                                      renormalize=cfg.norm_topk_prob)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, cos, sin, batch, cache=None):
        a = self.input_layernorm(h)
        if self.layer_type == "linear_attention":
            h = h + self.linear_attn(a, batch, cache)
        else:
            h = h + self.self_attn(a, cos, sin, batch, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


def rope_frequencies(cfg: TextConfig) -> tuple[torch.Tensor, float]:
    """The text rotary's inverse frequencies and cos/sin scale (YaRN's attention factor; 1 without rope scaling)."""
    if cfg.rope_scaling is None:
        return inv_freq(cfg.rotary_dim, cfg.rope_theta), 1.0
    yarn = dataclasses.asdict(cfg.rope_scaling)
    return yarn_inv_freq(cfg.rotary_dim, cfg.rope_theta, **yarn), yarn_attention_factor(**yarn)


class TextModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        freqs, self.rope_scale = rope_frequencies(cfg)
        self.register_buffer("inv_freq", freqs, persistent=False)
        self.gradient_checkpointing = False  # training: recompute each layer in the backward instead of keeping it

    def forward(self, input_ids, batch: ForwardBatch, cache=None, inputs_embeds=None):
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        cos, sin = rope_cos_sin(batch.positions, self.inv_freq, self.cfg.mrope_section, h.dtype, self.rope_scale)
        checkpoint = self.gradient_checkpointing and self.training and cache is None and torch.is_grad_enabled()
        for layer in self.layers:
            if checkpoint:
                h = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, batch, use_reentrant=False)
            else:
                h = layer(h, cos, sin, batch, cache)
        return self.norm(h)

class Qwen3_5ForCausalLM(nn.Module):
    """Text decoder + LM head (+ the vision tower of multimodal checkpoints, whose merged patches replace the
    placeholder rows of `inputs_embeds`). `forward` returns final-normed hidden states [N, H]; `compute_logits`
    projects the rows that need them over the whole vocabulary, as the reference does: ids the tokenizer lacks (the
    padding rows of the embedding) keep their logits, and the sampler never draws them."""

    def __init__(self, cfg: TextConfig, vision: VisionConfig | None = None):
        super().__init__()
        self.cfg = cfg
        self.model = TextModel(cfg)
        self.visual = VisionTower(vision) if vision is not None else None
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.mtp = None  # the multi-token-prediction head (models/mtp.py), attached on request

    def forward(self, input_ids, batch: ForwardBatch, cache=None, inputs_embeds=None):
        return self.model(input_ids, batch, cache, inputs_embeds)

    @property
    def dtype(self) -> torch.dtype:
        """The model's float dtype (its matrices may be quantized or packed elsewhere)."""
        return self.model.norm.weight.dtype

    def embed(self, input_ids) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def encode_visual(self, pixel_values: list[torch.Tensor], grids: list[tuple[int, int, int]]) -> list[torch.Tensor]:
        """One vision-tower pass over several images / videos: each item's merged-token embeddings [n_i, H]."""
        if self.visual is None:
            raise ValueError("this model has no vision tower (a text-only checkpoint, or loaded without vision)")
        out = self.visual(torch.cat(pixel_values), grids)
        m2 = self.visual.cfg.spatial_merge_size ** 2
        return list(out.to(self.dtype).split([t * h * w // m2 for t, h, w in grids]))

    def compute_logits(self, hidden: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits over the whole vocabulary, or over `ids` only (a draft vocabulary: [M] ids, [N, M] logits)."""
        if ids is None:
            return self.lm_head(hidden)
        if isinstance(self.lm_head, nn.Linear) and self.lm_head.out_features == self.cfg.vocab_size:
            return F.linear(hidden, self.lm_head.weight[ids])
        return self.lm_head(hidden)[:, ids]  # a quantized head or a rank's rows: all logits, then the columns

    def cache_spec(self, mtp: bool = False) -> dict[int, AttentionCacheSpec | LinearCacheSpec]:
        """What each layer keeps between steps: the model declares its cache, the cache manager allocates it. With
        mtp, the MTP head's attention layer too (its index is num_hidden_layers: models/mtp.py)."""
        c = self.cfg
        spec = {}
        if mtp:
            if self.mtp is None:
                raise ValueError("this model has no MTP head (the checkpoint has no mtp.* tensors)")
            spec[c.num_hidden_layers] = AttentionCacheSpec(c.num_key_value_heads, c.head_dim)
        for i, t in enumerate(c.layer_types):
            if t == "full_attention":
                spec[i] = AttentionCacheSpec(c.num_key_value_heads, c.head_dim)
            else:
                spec[i] = LinearCacheSpec(c.conv_dim, c.linear_conv_kernel_dim - 1, c.linear_num_value_heads,
                                          c.linear_key_head_dim, c.linear_value_head_dim)
        return spec
