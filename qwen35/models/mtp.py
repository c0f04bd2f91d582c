"""The multi-token-prediction (MTP) head of the released Qwen3.5 checkpoints: one extra full-attention decoder layer
that predicts the token after next.

Slot t takes the trunk's final-normed hidden state h_t and the embedding of the next token x_{t+1}:
    u = fc(cat[pre_fc_norm_embedding(embed(x_{t+1})), pre_fc_norm_hidden(h_t)])      # embedding first
    u = layers.0(u) at RoPE position t, causal full attention within each packed sequence
    norm(u) -> the trunk's lm_head -> logits for x_{t+2}
The head shares the trunk's embedding and LM head, so its own parameters are exactly the checkpoint's `mtp.*`
tensors once attached as `model.mtp`. The layer runs on packed sequences without a cache (training and scoring), or
with its own K/V in the engine's cache when it drafts for speculative decoding (engine/speculative.py).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from qwen35.config import TextConfig
from qwen35.layers.norm import RMSNorm
from qwen35.models.batch import ForwardBatch
from qwen35.models.qwen3_5 import DecoderLayer, Qwen3_5ForCausalLM, rope_frequencies
from qwen35.ops.rope import rope_cos_sin


class MTP(nn.Module):
    """`mtp.*` of a checkpoint. `text_model` is the trunk (`model.model`), held without registering it, so the state
    dict and `parameters()` list only the head's own tensors; its `embed_tokens` is looked up at each call, so a
    trunk whose embedding is replaced (packed weights) is followed."""

    def __init__(self, cfg: TextConfig, text_model: nn.Module):
        super().__init__()
        if cfg.mtp_use_dedicated_embeddings:
            raise ValueError("config field 'mtp_use_dedicated_embeddings' is true: only MTP heads that share the "
                             "trunk's embedding (the released layout) are supported")
        H, L = cfg.hidden_size, cfg.num_hidden_layers
        self.__dict__["text_model"] = text_model
        self.pre_fc_norm_embedding = RMSNorm(H, cfg.rms_norm_eps)
        self.pre_fc_norm_hidden = RMSNorm(H, cfg.rms_norm_eps)
        self.fc = nn.Linear(2 * H, H, bias=False)
        # The layer is layer L of the trunk's pattern extended by one always-full-attention layer with the trunk's
        # FFN kind, so a cache keyed by layer index would keep its K/V apart from the trunk's.
        ext = dataclasses.replace(cfg, num_hidden_layers=L + 1, layer_types=cfg.layer_types + ("full_attention",),
                                  moe_layers=cfg.moe_layers + (cfg.is_moe,))
        self.layers = nn.ModuleList([DecoderLayer(ext, L)])
        self.norm = RMSNorm(H, cfg.rms_norm_eps)
        self.mrope_section = cfg.mrope_section
        freqs, self.rope_scale = rope_frequencies(cfg)
        self.register_buffer("inv_freq", freqs, persistent=False)

    def forward(self, hidden: torch.Tensor, next_ids: torch.Tensor, batch: ForwardBatch, cache=None,
                next_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [N, H]: the trunk's output for the packed batch; next_ids [N]: x_{t+1} of each row (any valid id
        where unknown: a row only influences its own and later rows of its sequence), or their embeddings
        `next_embeds`. With a cache (speculative decoding) the layer keeps its K/V at its own layer index, in the
        trunk's blocks. Returns normed [N, H]."""
        if next_embeds is None:
            next_embeds = self.text_model.embed_tokens(next_ids)
        e = self.pre_fc_norm_embedding(next_embeds.to(hidden.dtype))
        u = self.fc(torch.cat([e, self.pre_fc_norm_hidden(hidden)], dim=-1))
        cos, sin = rope_cos_sin(batch.positions, self.inv_freq, self.mrope_section, u.dtype, self.rope_scale)
        for layer in self.layers:
            u = layer(u, cos, sin, batch, cache)
        return self.norm(u)


@torch.no_grad()
def add_mtp(model: Qwen3_5ForCausalLM, std: float = 0.02, generator: torch.Generator | None = None) -> MTP:
    """Attach a freshly initialised MTP head to a model whose checkpoint has none (matrices ~ N(0, std), as HF
    initialises Qwen3.5; norms at zero, i.e. scale 1), on the trunk's device and dtype, for training or scoring an
    unpacked model. Returns it."""
    ref = model.model.norm.weight
    mtp = MTP(model.cfg, model.model)
    for name, p in mtp.named_parameters():
        init = torch.zeros(p.shape) if name.endswith("norm.weight") else torch.randn(p.shape, generator=generator) * std
        p.data = init.to(device=ref.device, dtype=ref.dtype)
    mtp.inv_freq = mtp.inv_freq.to(ref.device)  # stays fp32
    # the config now describes the head, for whoever writes it back to config.json
    model.cfg = model.model.cfg = dataclasses.replace(model.cfg, mtp_num_hidden_layers=1)
    model.mtp = mtp
    return mtp
