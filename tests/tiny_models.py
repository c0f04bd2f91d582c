"""Tiny random Qwen3.5 / Qwen3-Next checkpoints made with transformers (the numerical reference), for tests.

Weights are re-drawn so activations and logits are O(1): with HF's N(0, 0.02) init every logit is ~0 and a
1e-4 comparison would prove nothing."""

from __future__ import annotations

import math

import torch

BASE = dict(
    vocab_size=160, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=24,
    linear_conv_kernel_dim=4, rms_norm_eps=1e-6, max_position_embeddings=4096,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                     "mrope_section": [2, 1, 1], "mrope_interleaved": True},
)
MOE = dict(num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32, shared_expert_intermediate_size=48)


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith("A_log"):
            # Moderate decays: with |g| ~ 10 per token the in-chunk cumulative log-decay reaches ~-600 and both
            # HF's chunked kernel and ours lose ~1e-4 relative to fp32 rounding of exp(cumsum differences).
            p.copy_(torch.empty(p.shape).uniform_(0.05, 2.0, generator=g).log())
        elif name.endswith("dt_bias"):
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
        elif "linear_attn.norm" in name:
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
        elif "norm" in name:
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
        elif "conv1d" in name:
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
        elif leaf in ("gate_up_proj", "down_proj") and p.dim() == 3:
            p.copy_(0.6 * torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
        elif "embed_tokens" in name:
            scale = 0.1 if model.config.get_text_config().tie_word_embeddings else 0.3
            p.copy_(scale * torch.randn(p.shape, generator=g))
        elif name == "lm_head.weight":
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
        else:
            # Below the 1/sqrt(fan_in) scale each layer adds less than the residual holds, as in trained models;
            # at full scale the tiny random models amplify fp32 rounding past 1e-4 in transformers itself.
            p.copy_(0.6 * torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))


def random_mtp(model, seed: int = 0):
    """A fresh MTP head on our (fp32) model, its norms and routed experts non-trivial too; returns the head."""
    from qwen35.models.mtp import add_mtp

    g = torch.Generator().manual_seed(seed)
    mtp = add_mtp(model, std=0.1, generator=g)
    with torch.no_grad():
        for name, p in mtp.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif p.dim() == 3 or name.endswith("experts.down_proj"):
                p.copy_(0.6 * torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
    return mtp


def build(kind: str, out_dir, seed: int = 0, max_shard_size=None, **overrides):
    """kind: dense | moe | moe_vl | dense_vl | next. Saves with save_pretrained and returns the HF model (fp32)."""
    import transformers as tf

    torch.manual_seed(seed)
    if kind == "dense":
        cfg = tf.Qwen3_5TextConfig(**{**BASE, "intermediate_size": 96, "tie_word_embeddings": True, **overrides})
        model = tf.Qwen3_5ForCausalLM(cfg)
    elif kind == "moe":
        cfg = tf.Qwen3_5MoeTextConfig(**{**BASE, **MOE, **overrides})
        model = tf.Qwen3_5MoeForCausalLM(cfg)
    elif kind in ("moe_vl", "dense_vl"):
        text = {**BASE, **(MOE if kind == "moe_vl" else {"intermediate_size": 96}), **overrides}
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=text["hidden_size"],
                      patch_size=8, num_position_embeddings=64)
        Cfg, Model = ((tf.Qwen3_5MoeConfig, tf.Qwen3_5MoeForConditionalGeneration) if kind == "moe_vl"
                      else (tf.Qwen3_5Config, tf.Qwen3_5ForConditionalGeneration))
        # the real Qwen3.5 ids when the vocabulary is the real one (tests with the real tokenizer), else small ids
        ids = (dict(image_token_id=248056, video_token_id=248057, vision_start_token_id=248053,
                    vision_end_token_id=248054) if text["vocab_size"] > 248057 else
               dict(image_token_id=150, video_token_id=151, vision_start_token_id=152, vision_end_token_id=153))
        cfg = Cfg(text_config=text, vision_config=vision, **ids)
        model = Model(cfg)
    elif kind == "next":
        cfg = tf.Qwen3NextConfig(**{**BASE, **MOE, "intermediate_size": 80, "mlp_only_layers": [1],
                                    "norm_topk_prob": True, **overrides})
        model = tf.Qwen3NextForCausalLM(cfg)
    else:
        raise ValueError(kind)
    randomize(model, seed)
    model.eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kwargs)
    return model


def run_pieces(model, prompts: list[list[int]], cuts: list[list[int]], block_size: int = 16, poison: bool = False,
               mm=None):
    """Feed each prompt to `model` in pieces (prompt i split at cuts[i]), all sequences together in each step,
    carrying conv, recurrent and K/V state in a HybridCache. Returns every position's logits per prompt.
    mm: per prompt None or (MultimodalPrompt, visual embeddings) whose rows replace the placeholder embeddings."""
    from qwen35.models.batch import ForwardBatch, SeqChunk

    blocks_per_seq = [-(-len(p) // block_size) for p in prompts]
    cache = _cache(model, sum(blocks_per_seq) + 1, block_size, len(prompts) + 1)
    if poison:  # NaN everywhere: any read of a position or state not written by this sequence shows up
        for pool in (cache.k, cache.v, cache.conv, cache.ssm):
            for t in pool.values():
                t.fill_(float("nan"))
    first_block = [1 + sum(blocks_per_seq[:i]) for i in range(len(prompts))]  # block 0 stays unused on purpose
    pieces = [list(zip([0] + c, c + [len(p)])) for p, c in zip(prompts, cuts)]
    out = [[] for _ in prompts]
    for step in range(max(len(x) for x in pieces)):
        chunks, owners = [], []
        for i, p in enumerate(prompts):
            if step < len(pieces[i]):
                a, b = pieces[i][step]
                blocks = list(range(first_block[i], first_block[i] + blocks_per_seq[i]))
                pos = mm[i][0].positions_for(a, b) if mm and mm[i] else None
                chunks.append(SeqChunk(p[a:b], num_past=a, state_slot=i + 1, block_ids=blocks, positions=pos,
                                       want_logits="all"))
                owners.append(i)
        batch = ForwardBatch.build(chunks, block_size)
        embeds = None
        if mm:
            embeds = model.embed(batch.input_ids)
            at = 0
            for i, c in zip(owners, chunks):
                if mm[i]:
                    rows = mm[i][0].feature_rows[c.num_past:c.num_past + len(c.token_ids)]
                    sel = rows >= 0
                    embeds[at:at + len(c.token_ids)][sel] = mm[i][1][rows[sel]]
                at += len(c.token_ids)
        with torch.no_grad():
            logits = model.compute_logits(model(batch.input_ids, batch, cache, embeds)[batch.logits_indices])
        for i, rows in zip(owners, logits.split([len(c.token_ids) for c in chunks])):
            out[i].append(rows)
    return [torch.cat(x) for x in out]


def greedy(model, prompts: list[list[int]], max_new_tokens: int, block_size: int = 16) -> list[list[int]]:
    """Greedy continuation of several prompts decoded together (prefill, then one token per step)."""
    from qwen35.models.batch import ForwardBatch, SeqChunk

    total = [len(p) + max_new_tokens for p in prompts]
    nblocks = [-(-t // block_size) for t in total]
    cache = _cache(model, sum(nblocks), block_size, len(prompts))
    tables = [list(range(sum(nblocks[:i]), sum(nblocks[: i + 1]))) for i in range(len(prompts))]
    seqs = [list(p) for p in prompts]
    new = [list(p) for p in prompts]
    for _ in range(max_new_tokens):
        chunks = [SeqChunk(n, num_past=len(s) - len(n), state_slot=i, block_ids=tables[i])
                  for i, (s, n) in enumerate(zip(seqs, new))]
        batch = ForwardBatch.build(chunks, block_size)
        with torch.no_grad():
            logits = model.compute_logits(model(batch.input_ids, batch, cache)[batch.logits_indices])
        nxt = logits.argmax(-1).tolist()
        for s, t in zip(seqs, nxt):
            s.append(t)
        new = [[t] for t in nxt]
    return [s[len(p):] for s, p in zip(seqs, prompts)]


def _cache(model, num_blocks: int, block_size: int, num_slots: int):
    from qwen35.cache.hybrid import HybridCache

    return HybridCache(model.cache_spec(), num_blocks, block_size, num_slots, model.dtype)
