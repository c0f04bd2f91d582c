"""Inter-token latency of a running text stream while an image is encoded, on the embedded demo model.

    python benchmarks/mm_latency.py [--size 2048] [--budgets 0,2048] [--out benchmarks/results/mm_latency.json]

A greedy text stream decodes; after it has produced 8 tokens a request with a size x size image arrives. For each
encoder budget (vision-tower patches per engine step; 0 = no limit: the whole image in one step, as before
encoding was spread over steps) it prints the stream's median inter-token gap before the image, its longest gap
while the image is encoded and while its prompt is prefilled (chunks of max_num_batched_tokens), and the image
request's time to first token.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np
import torch
from PIL import Image

from qwen35 import LLM, SamplingParams


def run(llm: LLM, image: Image.Image, budget: int, max_tokens: int) -> dict:
    engine = llm.engine
    engine.scheduler.encoder_budget = budget or 1 << 40
    text = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    engine.add_request("text", llm.tokenizer.encode("Tell me a long story."), text)
    prompt = llm._prompts({"prompt": "<|vision_start|><|image_pad|><|vision_end|>Describe it.",
                           "multi_modal_data": {"image": image}})[0]
    last = time.perf_counter()
    gaps = {"before": [], "encoding": [], "prefill": []}
    arrived = first_image_token = mm = None
    while engine.has_unfinished_requests():
        encoding = mm is not None and mm.encoded_items < len(mm.grids)
        outs = {o.request_id: o for o in engine.step()}
        now = time.perf_counter()
        if "image" in outs and first_image_token is None:
            first_image_token = now - arrived
        if "text" in outs:
            phase = "before" if arrived is None else "encoding" if encoding else "prefill"
            gaps[phase].append(now - last)
            last = now
            if arrived is None and len(outs["text"].outputs[0].token_ids) == 8:
                engine.add_request("image", prompt["prompt_token_ids"], SamplingParams(temperature=0, max_tokens=1),
                                   mm=prompt["mm"])
                mm, arrived = prompt["mm"], time.perf_counter()
            if outs["text"].finished and first_image_token is None:
                raise SystemExit("the text stream ended before the image was encoded: raise --max-tokens")
        if first_image_token is not None:
            engine.abort("text")
            engine.abort("image")
            break
    return {"budget": budget, "steady_itl_ms": 1000 * statistics.median(gaps["before"][1:]),
            "max_gap_while_encoding_ms": 1000 * max(gaps["encoding"], default=0),
            "max_gap_while_prefilling_ms": 1000 * max(gaps["prefill"], default=0),
            "image_ttft_s": first_image_token, "text_tokens_meanwhile": len(gaps["encoding"]) + len(gaps["prefill"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2048, help="image side in pixels")
    ap.add_argument("--budgets", default="0,2048", help="encoder budgets to compare, patches per step (0: no limit)")
    ap.add_argument("--max-tokens", type=int, default=4000, help="length of the text stream (must outlast the image)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    llm = LLM(max_model_len=16384, max_num_seqs=4)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (args.size // 8, args.size // 8, 3), dtype=np.uint8)).resize(
        (args.size, args.size), Image.Resampling.BILINEAR)
    rows = [run(llm, image, int(b), args.max_tokens) for b in args.budgets.split(",")]
    print(f"{args.size}x{args.size} image ({(args.size // 16) ** 2} patches) arriving while a text stream decodes "
          f"(demo model, {torch.get_num_threads()} threads)")
    print(f"{'encoder budget':>16} {'steady ITL ms':>14} {'max gap encoding ms':>20} {'max gap prefill ms':>19} "
          f"{'image TTFT s':>13} {'tokens meanwhile':>17}")
    for r in rows:
        label = "unlimited" if r["budget"] == 0 else f"{r['budget']} patches"
        print(f"{label:>16} {r['steady_itl_ms']:>14.1f} {r['max_gap_while_encoding_ms']:>20.0f} "
              f"{r['max_gap_while_prefilling_ms']:>19.0f} {r['image_ttft_s']:>13.1f} {r['text_tokens_meanwhile']:>17}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"size": args.size, "threads": torch.get_num_threads(), "machine": platform.processor(),
                       "torch": torch.__version__, "runs": rows}, f, indent=2)


if __name__ == "__main__":
    main()
