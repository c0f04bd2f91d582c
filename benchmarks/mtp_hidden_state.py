"""Which trunk hidden state should feed the MTP head: the final-normed one (vLLM, SGLang, LightLLM) or the one before
the final norm (mlx-lm's open MTP PR)? Measured on the demo model, whose head was trained on the final-normed state:
the head's top-1 on the token after next, teacher-forced over

  - the held-out chats of its corpus (human text), and
  - the model's own greedy answers to those chats' first questions: top-1 there is the acceptance rate of one-token
    drafts in greedy decoding (a draft at position t is accepted iff it equals the greedy token at t + 2),

with each hidden state. Usage: python benchmarks/mtp_hidden_state.py [--chats N] [--tokens N]
"""

from __future__ import annotations

import argparse
import json

import torch

from qwen35 import LLM, SamplingParams
from qwen35.demo import DEMO_DIR
from qwen35.models.loader import load_model
from qwen35.tokenizer import Tokenizer
from qwen35.train.corpus import build_corpus, encode_samples
from qwen35.train.loss import training_batch


@torch.no_grad()
def top1(model, sequences: list[list[int]], first_scored: list[int]) -> dict[str, float]:
    """MTP top-1 on the token after next, for the targets from position first_scored[i] + 1 on, per hidden state."""
    out = {}
    for name in ("final-normed", "pre-norm"):
        hits = total = 0
        for ids, start in zip(sequences, first_scored):
            batch = training_batch([ids])
            seen = {}
            hook = model.model.norm.register_forward_hook(lambda m, args, y: seen.update(pre=args[0]))  # -> None
            normed = model(batch.input_ids, batch)
            hook.remove()
            hidden = normed if name == "final-normed" else seen["pre"]
            t = torch.tensor(ids)
            u = model.mtp(hidden[:-1], t[1:], training_batch([ids[:-1]]))  # row p: h_p and ids[p + 1]
            pred = model.compute_logits(u).argmax(-1)  # row p predicts ids[p + 2]
            # decoding drafts first from the prompt's last position (with the first answer token)
            rows = torch.arange(max(0, start - 1), len(ids) - 2)
            hits += int((pred[rows] == t[rows + 2]).sum())
            total += rows.numel()
        out[name] = hits / max(total, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chats", type=int, default=81, help="held-out chats to use (default: all 81)")
    ap.add_argument("--tokens", type=int, default=128, help="greedy answer length")
    args = ap.parse_args()
    tok = Tokenizer.from_dir(DEMO_DIR)
    heldout = build_corpus(seed=0).heldout[:args.chats]
    model, _, _ = load_model(DEMO_DIR, dtype="float32", mtp=True)
    chats = [ids for ids, _ in encode_samples(tok, heldout)]
    human = top1(model, chats, [0] * len(chats))
    prompts = [tok.encode(s.text[:s.assistant_spans[0][0]]) for s in heldout]
    llm = LLM(enable_prefix_caching=False)
    outs = llm.generate(prompts, SamplingParams(max_tokens=args.tokens, temperature=0), use_tqdm=False)
    own = top1(model, [p + list(o.outputs[0].token_ids) for p, o in zip(prompts, outs)], [len(p) for p in prompts])
    result = {"held_out_chats": human, "own_greedy_answers": own, "chats": len(heldout), "tokens": args.tokens}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
