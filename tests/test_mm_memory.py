"""A 12-megapixel photo through `LLM.generate` within a stated memory bound, and images encoded in pieces between
decode steps (same tokens whatever the encoder budget; a running stream is not held up)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from qwen35 import LLM, SamplingParams
from qwen35.demo import write_random_checkpoint
from qwen35.multimodal import ProcessorConfig, smart_resize

# The released processor limits (up to 16,777,216 pixels per image) take a 4000 x 3000 photo at 4000 x 3008:
# 47,000 patches in one attention segment. A full [N, N] fp32 score matrix alone would be 8.8 GB.
PEAK_GROWTH_BOUND = 1 << 30  # bytes of peak RSS over the resident size before the request
IMAGE, VISION_START, VISION_END = 150, 152, 153
TEXT = {"vocab_size": 160, "hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 16, "intermediate_size": 64, "linear_num_key_heads": 2,
        "linear_num_value_heads": 2, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
        "linear_conv_kernel_dim": 4, "full_attention_interval": 4, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 16384, "eos_token_id": 0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                            "mrope_section": [2, 1, 1], "mrope_interleaved": True}}
VISION = {"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 1, "patch_size": 16,
          "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 2304, "out_hidden_size": 32,
          "hidden_act": "gelu_pytorch_tanh", "deepstack_visual_indexes": []}
CONFIG = {"architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5", "dtype": "float32",
          "text_config": TEXT, "vision_config": VISION, "image_token_id": IMAGE, "video_token_id": 151,
          "vision_start_token_id": VISION_START, "vision_end_token_id": VISION_END}

SCRIPT = r"""
import json, sys
import numpy as np
from PIL import Image
from qwen35 import LLM, SamplingParams

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

llm = LLM(sys.argv[1], dtype="float32", skip_tokenizer_init=True, max_model_len=16384, max_num_seqs=2,
          kv_cache_bytes=64 << 20)
photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (3000, 4000, 3), dtype=np.uint8))
params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
prompt = lambda image: {"prompt_token_ids": [1, 2, %d, %d, %d, 3], "multi_modal_data": {"image": image}}
llm.generate(prompt(photo.resize((640, 480))), params)  # warm-up: lazy imports and first allocations
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the current resident size
before = status("VmRSS:")
out = llm.generate(prompt(photo), params)[0]
print(json.dumps({"growth": status("VmHWM:") - before, "prompt_len": len(out.prompt_token_ids),
                  "tokens": out.outputs[0].token_ids}))
""" % (VISION_START, IMAGE, VISION_END)


def checkpoint(path, max_pixels=None):
    write_random_checkpoint(path, CONFIG, seed=1, dtype=torch.float32)
    if max_pixels:
        (path / "preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": 65536,
                                                                            "longest_edge": max_pixels}}))
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return checkpoint(tmp_path_factory.mktemp("mm-memory"))


@pytest.mark.parametrize("max_pixels", [pytest.param(None, marks=pytest.mark.slow, id="released_limit"),
                                        pytest.param(1 << 22, id="4_megapixel_limit")])
def test_a_12_megapixel_photo_fits_the_memory_bound(tmp_path, max_pixels):
    """Released limit: 47,000 patches in one segment (about 40 s of CPU). A 4-megapixel limit: 16,060 patches,
    whose full score matrix would still be 1 GiB."""
    path = checkpoint(tmp_path, max_pixels)
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    h, w = smart_resize(3000, 4000, 32, 65536, max_pixels or ProcessorConfig().image_max_pixels)
    assert (h, w) == ((3008, 4000) if max_pixels is None else (1760, 2336))
    assert res["prompt_len"] == 5 + h * w // 32**2 and len(res["tokens"]) == 2
    assert res["growth"] < PEAK_GROWTH_BOUND, f"peak RSS grew by {res['growth'] / 2**20:.0f} MiB"


def request(image, n_text=3):
    return {"prompt_token_ids": [1, 2, VISION_START, IMAGE, VISION_END] + list(range(3, 3 + n_text)),
            "multi_modal_data": {"image": image}}


def test_a_stream_keeps_going_while_an_image_is_encoded(ckpt, monkeypatch):
    """With 16 patches of tower work per step a 1024-patch image takes 64 steps; a text stream running beside it
    finishes first, and both give the tokens they give alone."""
    from qwen35.models import vision

    monkeypatch.setattr(vision, "ROW_BLOCK", 64)
    llm = LLM(ckpt, dtype="float32", skip_tokenizer_init=True, max_model_len=2048, max_num_seqs=4,
              kv_cache_bytes=8 << 20)
    photo = Image.fromarray(np.random.default_rng(1).integers(0, 256, (512, 512, 3), dtype=np.uint8))
    text = {"prompt_token_ids": list(range(1, 40))}
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    alone = [llm.generate(r, params)[0].outputs[0].token_ids for r in (text, request(photo))]
    llm.engine.scheduler.encoder_budget = 16
    assert llm.generate(request(photo), params)[0].outputs[0].token_ids == alone[1]
    events = [(int(o.request_id), o.finished, list(o.outputs[0].token_ids))
              for o in llm.stream([text, request(photo)], params)]
    text_id = min(rid for rid, _, _ in events)  # submitted first
    first_image_token = next(i for i, (rid, _, toks) in enumerate(events) if rid != text_id and toks)
    text_done = next(i for i, (rid, done, _) in enumerate(events) if rid == text_id and done)
    assert text_done < first_image_token
    assert [toks for _, done, toks in events if done] == alone


def test_scheduler_grants_the_encoder_budget_and_prefills_only_encoded_items():
    import torch

    from qwen35.cache.manager import BlockManager, SlotPool
    from qwen35.engine.request import Request
    from qwen35.engine.scheduler import Scheduler
    from qwen35.multimodal.items import VisualItem
    from qwen35.multimodal.prompt import VisionTokens, expand_prompt

    items = [VisualItem("image", torch.zeros(64, 4), (1, 8, 8)), VisualItem("image", torch.zeros(16, 4), (1, 4, 4))]
    ids, mm = expand_prompt([1, 2, VISION_START, IMAGE, VISION_END, 3, VISION_START, IMAGE, VISION_END, 4], items,
                            [], VisionTokens(IMAGE, 151, VISION_START, VISION_END), 2, None)
    assert mm.item_starts == [3, 22]  # 16 + 4 merged tokens
    sched = Scheduler(BlockManager(64, 16), SlotPool(2), 2, 100, encoder_budget=30)
    req = Request("r", ids, SamplingParams(max_tokens=1), mm=mm)
    sched.add(req)
    steps = []
    while req.num_computed_tokens < len(ids):
        (chunk,) = sched.schedule()
        steps.append((chunk.num_tokens, mm.granted))
        req.num_computed_tokens += chunk.num_tokens
    # the text before the first image; a step that only encodes; then the rest once both images are granted
    assert steps == [(3, 30), (0, 60), (len(ids) - 3, 80)]
