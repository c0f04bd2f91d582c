"""The text decoder of a loaded `Qwen3_5ForCausalLM`, run on the native CPU kernels.

`CpuDecoder(model)` packs the model's matrices (every format of weights.py: bf16, fp32, int8, int4) into the
layouts the kernels stream, then releases the model's copies (their parameters move to the meta device; the norms,
gates and other small parameters stay and are used from the model's modules). It offers the model's inference
surface: `embed(ids)`, `forward(input_ids, batch, cache, inputs_embeds)` -> final-normed hidden [N, H],
`compute_logits(hidden)`. Activations are float32 throughout (CPUs without bf16 arithmetic would convert at every
op); weights and caches keep their formats.

Two paths, both the maths of qwen35/models/qwen3_5.py (the reference, which the tests compare against):
  - decode steps (one new token per sequence, with a cache): each half of a layer is one native call on the
    layer's ctypes struct (layers.py, csrc/layers.c);
  - everything else (prompts, mixed steps): the model's forward step by step in PyTorch ops, with the packed
    matmuls, the routed-experts kernel and the native causal conv; from MANY_ROWS rows on, int8/int4 weights
    multiply inputs rounded to int8 per 32 columns (integer dot products: compute-bound prompts run faster than
    bf16; decode keeps fp32 inputs, so its results stay those of the dequantized weights up to fp32 rounding).
Projections that read the same input are packed together: [in_proj_qkv | in_proj_z], [in_proj_b | in_proj_a],
[q | k | v], [gate_proj | up_proj], [router | shared_expert_gate]; parts in different formats are brought to one.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from qwen35.backends.cpu import layers as L
from qwen35.backends.cpu.weights import PackedWeight, experts, linear
from qwen35.layers.quant import QuantLinear
from qwen35.models.batch import ForwardBatch
from qwen35.ops.moe import route_logits
from qwen35.ops.rope import rope_cos_sin
from qwen35.quant import QuantizedWeight

logger = logging.getLogger(__name__)
# From this many rows (prompts), quantized weights multiply int8-rounded inputs (weights.linear quantize_inputs):
# integer dot products, 1.1-1.3x bf16's speed where fp32 inputs run at 0.5-0.9x; decode steps keep fp32 inputs.
MANY_ROWS = 16


def _lin(x, w: PackedWeight, bias=None):
    return linear(x, w, bias, quantize_inputs=x.shape[0] >= MANY_ROWS)


def _source(module):
    """A linear module's weight as a float tensor or a QuantizedWeight (layers.quant.QuantLinear)."""
    return module.quantized if isinstance(module, QuantLinear) else module.weight.data


def _cat(parts: list, dtype: torch.dtype) -> torch.Tensor | QuantizedWeight:
    """Row-wise concatenation of weights of one input; mixed formats are brought to the model's dtype."""
    if len(parts) == 1:
        return parts[0]
    qs = [p for p in parts if isinstance(p, QuantizedWeight)]
    if len(qs) == len(parts) and len({(q.bits, q.group, q.zeros is None) for q in qs}) == 1:
        q0 = qs[0]
        return QuantizedWeight(q0.bits, q0.group, torch.cat([q.q for q in qs], -2),
                               torch.cat([q.scales for q in qs], -2),
                               None if q0.zeros is None else torch.cat([q.zeros for q in qs], -2))
    return torch.cat([p.dequantize(dtype) if isinstance(p, QuantizedWeight) else p.to(dtype) for p in parts], -2)


def _pack(parts: list, dtype: torch.dtype) -> PackedWeight:
    """The parts packed as one weight; a quantized one whose groups the kernels cannot take runs in `dtype`."""
    w = _cat(parts, dtype)
    if isinstance(w, QuantizedWeight):
        try:
            return PackedWeight.pack(w)
        except ValueError as e:
            logger.warning("qwen35: %s; this weight runs in %s instead", e, dtype)
            w = w.dequantize(dtype)
    return PackedWeight.pack(w)


def _release(*modules: nn.Module) -> None:
    """The packed copy replaces these modules' tensors: move them to the meta device."""
    for m in modules:
        m.to("meta")


def _fits_in(w: PackedWeight) -> bool:
    """A weight a fused layer can read its input with: no padding of the input dimension."""
    return w.face.k == w.k


def _fits_out(w: PackedWeight, H: int) -> bool:
    """An output projection that writes exactly H columns."""
    return _fits_in(w) and w.face.n == w.n == H


def _w1(norm) -> torch.Tensor:
    return (1.0 + norm.weight.float()).contiguous()


class _GatedDeltaNet:
    kernel = staticmethod(L.gdn_layer)

    def __init__(self, m, norm):
        self.m, self.norm = m, norm
        self.in_qkvz = _pack([_source(m.in_proj_qkv), _source(m.in_proj_z)], norm.weight.dtype)
        self.in_ba = _pack([_source(m.in_proj_b), _source(m.in_proj_a)], norm.weight.dtype)
        self.out = _pack([_source(m.out_proj)], norm.weight.dtype)
        _release(m.in_proj_qkv, m.in_proj_z, m.in_proj_b, m.in_proj_a, m.out_proj)
        self.conv_w = m.conv1d.weight[:, 0, :].float().contiguous()
        self.small = dict(A_log=m.A_log.float().contiguous(), dt_bias=m.dt_bias.float().contiguous(),
                          gnorm_w=m.norm.weight.float().contiguous(), norm_w1=_w1(norm))

    def fused(self, H: int) -> bool:
        return _fits_in(self.in_qkvz) and _fits_in(self.in_ba) and _fits_out(self.out, H)

    def struct(self, cache) -> L.GdnLayer:
        m, s = self.m, self.small
        conv, ssm = cache.conv[m.layer_idx], cache.ssm[m.layer_idx]
        if conv.dtype not in (torch.bfloat16, torch.float32) or ssm.dtype != torch.float32 \
                or not conv.is_contiguous() or not ssm.is_contiguous():
            raise ValueError("Gated DeltaNet cache pools of unexpected dtype or layout")
        return L.GdnLayer(norm_w1=s["norm_w1"].data_ptr(), norm_eps=self.norm.eps, in_qkvz=self.in_qkvz.face,
                          in_ba=self.in_ba.face, out=self.out.face, conv_w=self.conv_w.data_ptr(),
                          A_log=s["A_log"].data_ptr(), dt_bias=s["dt_bias"].data_ptr(),
                          gnorm_w=s["gnorm_w"].data_ptr(), gnorm_eps=m.norm.eps, Hk=m.num_k_heads, Hv=m.num_v_heads,
                          K=m.k_head_dim, V=m.v_head_dim, Kw=self.conv_w.shape[1], conv_pool=conv.data_ptr(),
                          conv_bf16=conv.dtype == torch.bfloat16, ssm_pool=ssm.data_ptr())

    def __call__(self, x, cos, sin, batch: ForwardBatch, cache=None):
        """GatedDeltaNet.forward on packed weights."""
        m, N = self.m, x.shape[0]
        mixed, z = _lin(x, self.in_qkvz).split([2 * m.key_dim + m.value_dim, m.value_dim], dim=-1)
        b, a = _lin(x, self.in_ba).split([m.num_v_heads, m.num_v_heads], dim=-1)
        z = z.reshape(N, m.num_v_heads, m.v_head_dim)
        o = m.mix(mixed, a, b, batch, cache, conv=L.causal_conv1d, conv_weight=self.conv_w)
        return _lin(m.norm(o, z).reshape(N, m.value_dim), self.out)


class _Attention:
    kernel = staticmethod(L.attn_layer)

    def __init__(self, m, norm):
        self.m, self.norm = m, norm
        self.qkv = _pack([_source(m.q_proj), _source(m.k_proj), _source(m.v_proj)], norm.weight.dtype)
        self.out = _pack([_source(m.o_proj)], norm.weight.dtype)
        self.bias = None
        if getattr(m.q_proj, "bias", None) is not None:
            self.bias = torch.cat([m.q_proj.bias, m.k_proj.bias, m.v_proj.bias]).float()
            self.out_bias = m.o_proj.bias.float()
        _release(m.q_proj, m.k_proj, m.v_proj, m.o_proj)
        self.small = dict(norm_w1=_w1(norm), qn1=_w1(m.q_norm), kn1=_w1(m.k_norm))

    def fused(self, H: int) -> bool:
        return self.bias is None and _fits_in(self.qkv) and _fits_out(self.out, H)

    def struct(self, cache) -> L.AttnLayer:
        m, s = self.m, self.small
        k_cache, v_cache = cache.k[m.layer_idx], cache.v[m.layer_idx]
        if k_cache.dtype not in (torch.bfloat16, torch.float32) or v_cache.dtype != k_cache.dtype \
                or not k_cache.is_contiguous() or not v_cache.is_contiguous():
            raise ValueError("K/V cache of unexpected dtype or layout")
        return L.AttnLayer(norm_w1=s["norm_w1"].data_ptr(), norm_eps=self.norm.eps, qkv=self.qkv.face,
                           out=self.out.face, qn1=s["qn1"].data_ptr(), kn1=s["kn1"].data_ptr(), qk_eps=m.q_norm.eps,
                           Hq=m.num_heads, Hkv=m.num_kv_heads, D=m.head_dim, scale=m.scale,
                           k_cache=k_cache.data_ptr(), v_cache=v_cache.data_ptr(),
                           cache_bf16=k_cache.dtype == torch.bfloat16)

    def __call__(self, x, cos, sin, batch: ForwardBatch, cache=None):
        """Attention.forward on packed weights."""
        m, D = self.m, self.m.head_dim
        q, k, v = _lin(x, self.qkv, self.bias).split([2 * m.num_heads * D, m.num_kv_heads * D,
                                                        m.num_kv_heads * D], dim=-1)
        o = m.attend(q, k, v, cos, sin, batch, cache)
        return _lin(o, self.out, None if self.bias is None else self.out_bias)


class _SparseMoe:
    kernel = staticmethod(L.moe_layer)

    def __init__(self, m, norm):
        self.m, self.norm = m, norm
        self.router = _pack([_source(m.gate), _source(m.shared_expert_gate)], norm.weight.dtype)
        se = m.shared_expert
        self.shared_gate_up = _pack([_source(se.gate_proj), _source(se.up_proj)], norm.weight.dtype)
        self.shared_down = _pack([_source(se.down_proj)], norm.weight.dtype)
        gu, down = _expert_sources(m.experts)
        self.gate_up, self.down = _pack([gu], norm.weight.dtype), _pack([down], norm.weight.dtype)
        _release(m.gate, m.shared_expert_gate, se, m.experts)
        self.E = gu.shape[0]
        self.small = dict(norm_w1=_w1(norm))

    def fused(self, H: int) -> bool:
        return (_fits_in(self.router) and _fits_in(self.shared_gate_up) and _fits_out(self.shared_down, H)
                and self.shared_gate_up.face.n == self.shared_gate_up.n and self._native_experts())

    def _native_experts(self) -> bool:
        """The experts kernel reads [gate | up] rows and the activation at their packed sizes: no padding."""
        gu, down = self.gate_up, self.down
        return gu.face.n == gu.n and gu.face.k == gu.k and down.face.n == down.n and down.face.k == down.k

    def struct(self, cache) -> L.MoeLayer:
        m = self.m
        return L.MoeLayer(norm_w1=self.small["norm_w1"].data_ptr(), norm_eps=self.norm.eps, router=self.router.face,
                          shared_gate_up=self.shared_gate_up.face, shared_down=self.shared_down.face,
                          gate_up=self.gate_up.face, down=self.down.face, E=self.E, top_k=m.top_k,
                          renorm=m.renormalize)

    def __call__(self, x):
        """SparseMoeBlock.forward on packed weights."""
        m = self.m
        logits = _lin(x, self.router)
        weights, ids = route_logits(logits[:, :self.E], m.top_k, m.renormalize)
        gate, up = _lin(x, self.shared_gate_up).chunk(2, dim=-1)
        shared = _lin(F.silu(gate) * up, self.shared_down)
        if self._native_experts():
            routed = experts(x, weights, ids, self.gate_up, self.down, quantize_inputs=x.shape[0] >= MANY_ROWS)
        else:  # the grouped reference dispatch, expert by expert on the packed weights
            routed = torch.zeros_like(x)
            for e in ids.unique().tolist():
                tok, j = (ids == e).nonzero(as_tuple=True)
                g, u = _lin(x[tok], self.gate_up[e]).chunk(2, dim=-1)
                routed.index_add_(0, tok, _lin(F.silu(g) * u, self.down[e]) * weights[tok, j, None])
        return routed + torch.sigmoid(logits[:, self.E:self.E + 1]) * shared


class _Mlp:
    kernel = staticmethod(L.mlp_layer)

    def __init__(self, m, norm):
        self.m, self.norm = m, norm
        self.gate_up = _pack([_source(m.gate_proj), _source(m.up_proj)], norm.weight.dtype)
        self.down = _pack([_source(m.down_proj)], norm.weight.dtype)
        _release(m)
        self.small = dict(norm_w1=_w1(norm))

    def fused(self, H: int) -> bool:
        return _fits_in(self.gate_up) and self.gate_up.face.n == self.gate_up.n and _fits_out(self.down, H)

    def struct(self, cache) -> L.MlpLayer:
        return L.MlpLayer(norm_w1=self.small["norm_w1"].data_ptr(), norm_eps=self.norm.eps, gate_up=self.gate_up.face,
                          down=self.down.face)

    def __call__(self, x):
        gate, up = _lin(x, self.gate_up).chunk(2, dim=-1)
        return _lin(F.silu(gate) * up, self.down)


def _expert_sources(experts_module):
    """(gate_up [E, 2I, H], down [E, H, I]) of an Experts or layers.quant.QuantExperts module (float tensors or
    QuantizedWeights)."""
    gu, down = experts_module.gate_up_proj, experts_module.down_proj
    return (gu, down) if isinstance(gu, QuantizedWeight) else (gu.data, down.data)


class CpuDecoder:
    def __init__(self, model):
        self.model, self.cfg = model, model.cfg
        text = model.model
        self.layers = []
        for layer in text.layers:
            if layer.layer_type == "linear_attention":
                mixer = _GatedDeltaNet(layer.linear_attn, layer.input_layernorm)
            else:
                mixer = _Attention(layer.self_attn, layer.input_layernorm)
            if hasattr(layer.mlp, "experts"):
                ffn = _SparseMoe(layer.mlp, layer.post_attention_layernorm)
            else:
                ffn = _Mlp(layer.mlp, layer.post_attention_layernorm)
            self.layers.append((layer, mixer, ffn))
        self.head = _pack([_source(model.lm_head)], model.dtype)
        self.tied = self.cfg.tie_word_embeddings and not isinstance(model.lm_head, QuantLinear)
        if self.tied:  # the embedding reads its rows from the packed head
            _release(text.embed_tokens)
        _release(model.lm_head)
        self.norm_w1 = _w1(text.norm)
        H = self.cfg.hidden_size
        self.mtp_layer = None
        if getattr(model, "mtp", None) is not None:  # the MTP head's layer runs as the trunk's do
            m = model.mtp
            layer = m.layers[0]
            ffn = _SparseMoe if hasattr(layer.mlp, "experts") else _Mlp
            self.mtp_layer = (layer, _Attention(layer.self_attn, layer.input_layernorm),
                              ffn(layer.mlp, layer.post_attention_layernorm))
            self.mtp_fc = _pack([_source(m.fc)], model.dtype)
            _release(m.fc)
        self.fused = all(mixer.fused(H) and ffn.fused(H) for _, mixer, ffn in self.layers)
        if not self.fused:
            logger.info("qwen35: some layers' sizes do not fit the fused decode kernels; decode steps run layer "
                        "by layer")
        self.mtp_fused = self.mtp_layer is not None and self.mtp_layer[1].fused(H) and self.mtp_layer[2].fused(H)
        if self.mtp_layer is not None:
            self.mtp_norm_w1 = _w1(model.mtp.norm)
        self._cache, self._halves = None, None  # the layer halves' (kernel, struct), bound to one cache
        self._head_rows = None  # (key, PackedWeight) of a draft vocabulary's head rows

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def cache_spec(self):
        return self.model.cache_spec()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tied:
            return self.head.rows(input_ids).float()
        return self.model.model.embed_tokens(input_ids).float()

    def compute_logits(self, hidden: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits over the whole vocabulary, or over `ids` only (a draft vocabulary, whose rows are packed apart on
        first use, in the model's dtype)."""
        if ids is None:
            return linear(hidden, self.head)
        key = (ids.data_ptr(), ids.numel())
        if self._head_rows is None or self._head_rows[0] != key:
            self._head_rows = (key, PackedWeight.pack(self.head.rows(ids).to(self.model.dtype)))
        return linear(hidden, self._head_rows[1])

    @torch.inference_mode()
    def forward(self, input_ids, batch: ForwardBatch, cache=None, inputs_embeds=None) -> torch.Tensor:
        h = (self.embed(input_ids) if inputs_embeds is None else inputs_embeds).float()
        text = self.model.model
        cos, sin = rope_cos_sin(batch.positions, text.inv_freq, self.cfg.mrope_section, h.dtype, text.rope_scale)
        if self.fused and cache is not None and L.fits_step(batch):
            return self._decode(h, cos, sin, batch, cache)
        for layer, mixer, ffn in self.layers:
            h = h + mixer(layer.input_layernorm(h), cos, sin, batch, cache)
            h = h + ffn(layer.post_attention_layernorm(h))
        return text.norm(h)

    __call__ = forward

    @torch.inference_mode()
    def mtp(self, hidden, batch: ForwardBatch, cache, next_embeds) -> torch.Tensor:
        """models.mtp.MTP.forward on packed weights, the layer fused where the trunk's would be: normed [N, H]."""
        m = self.model.mtp
        e = m.pre_fc_norm_embedding(next_embeds.float())
        u = _lin(torch.cat([e, m.pre_fc_norm_hidden(hidden.float())], dim=-1), self.mtp_fc)
        cos, sin = rope_cos_sin(batch.positions, m.inv_freq, m.mrope_section, u.dtype, m.rope_scale)
        layer, mixer, ffn = self.mtp_layer
        if self.mtp_fused and L.fits_step(batch):
            return self._decode(u, cos, sin, batch, cache, mtp=True)
        u = u + mixer(layer.input_layernorm(u), cos, sin, batch, cache)
        u = u + ffn(layer.post_attention_layernorm(u))
        return m.norm(u)

    def _decode(self, h, cos, sin, batch, cache, mtp: bool = False):
        """One native call per layer half; each half's output is added to h by the next (with its norm)."""
        if self._cache is not cache:
            self._halves = [(half.kernel(), half.struct(cache)) for _, mixer, ffn in self.layers
                            for half in (mixer, ffn)]
            if self.mtp_fused:
                self._mtp_halves = [(half.kernel(), half.struct(cache)) for half in self.mtp_layer[1:]]
            self._cache = cache
        st, keep = L.step(batch, cache.block_size, cos, sin)
        h = h.clone()  # the layers add each residual into it in place
        y = None
        for kernel, struct in self._mtp_halves if mtp else self._halves:
            y = L.run(kernel, struct, st, h, y)
        del keep
        norm = self.model.mtp.norm if mtp else self.model.model.norm
        return L.add_rms_norm(h, y, self.mtp_norm_w1 if mtp else self.norm_w1, norm.eps)[1]


class PackedLinear(nn.Module):
    """An nn.Linear on a packed weight (for the vision tower, whose forward stays the model's)."""

    def __init__(self, lin: nn.Module):
        super().__init__()
        self.weight, self.bias = PackedWeight.pack(_source(lin)), lin.bias
        self.in_features, self.out_features = lin.in_features, lin.out_features

    def forward(self, x):
        return linear(x, self.weight, self.bias)


def pack_linears(module: nn.Module) -> None:
    """Replace every nn.Linear under module by a PackedLinear."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, PackedLinear(child))
