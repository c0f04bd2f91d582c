"""Images and videos through the whole stack (chat template, processors, placeholder expansion, engine) against
transformers 5.23 on tiny random multimodal checkpoints carrying the real Qwen3.5 tokenizer: prompt ids equal to
transformers' Qwen3VLProcessor, greedy generations identical, and a batch mixing image, video and text requests
(with chunked prefill cutting through images and preemption) equal to each request alone."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from qwen35 import LLM, SamplingParams
from qwen35.multimodal.items import MediaError
from tests.tiny_models import build
from tests.tokenizer_fixtures import CHAT_TEMPLATE_PATH, add_qwen35_tokenizer

# patch 8 x merge 2: one merged token per 16x16 pixels; 4..64 tokens per image, <= ~48 per video
PREPROCESSOR = {"size": {"shortest_edge": 1024, "longest_edge": 16384}, "patch_size": 8, "temporal_patch_size": 2,
                "merge_size": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
VIDEO_PREPROCESSOR = {**PREPROCESSOR, "size": {"shortest_edge": 1024, "longest_edge": 24576}, "fps": 2,
                      "min_frames": 4, "max_frames": 16}
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def picture(h, w, seed):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)  # some structure, not only noise
    return Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR)


def clip(n, h, w, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module", params=["dense_vl", "moe_vl"])
def ckpt(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"mm-{request.param}")
    hf = build(request.param, path, seed=7, vocab_size=248320)
    add_qwen35_tokenizer(path, preprocessor_config=PREPROCESSOR, video_preprocessor_config=VIDEO_PREPROCESSOR)
    return path, hf


@pytest.fixture(scope="module")
def llm(ckpt):
    return LLM(ckpt[0], dtype="float32", max_model_len=1024)


@pytest.fixture(scope="module")
def hf_processor(ckpt):
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    class Processor(Qwen3VLProcessor):
        # The class check looks the video processor up in a registry that needs torchvision; images don't.
        def check_argument_for_proper_class(self, name, arg):
            return None

    tok = PreTrainedTokenizerFast(tokenizer_file=str(ckpt[0] / "tokenizer.json"))
    image = Qwen2VLImageProcessorPil(**PREPROCESSOR)
    video = Qwen3VLVideoProcessor(**VIDEO_PREPROCESSOR)
    return Processor(image_processor=image, tokenizer=tok, video_processor=video,
                     chat_template=CHAT_TEMPLATE_PATH.read_text())


def hf_generate(hf, inputs, n):
    inputs = {k: v for k, v in inputs.items() if k != "attention_mask"}
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=n, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


IMAGE_CHATS = {
    "one_image": lambda: [{"type": "image", "image": picture(50, 70, 1)}, {"type": "text", "text": "What is it?"}],
    "two_images": lambda: [{"type": "text", "text": "Compare"}, {"type": "image", "image": picture(30, 100, 2)},
                           {"type": "text", "text": "with"}, {"type": "image", "image": picture(64, 64, 3)}],
    "large_and_tiny": lambda: [{"type": "image", "image": picture(300, 180, 4)},
                               {"type": "image", "image": picture(12, 20, 5)}, {"type": "text", "text": "?"}],
}


@pytest.mark.parametrize("case", list(IMAGE_CHATS))
def test_image_chat_matches_transformers(llm, ckpt, hf_processor, case):
    content = IMAGE_CHATS[case]()
    messages = [{"role": "user", "content": content}]
    ref = hf_processor.apply_chat_template(messages, tokenize=True, return_dict=True, add_generation_prompt=True,
                                           return_tensors="pt")
    out = llm.chat(messages, GREEDY)[0]
    assert out.prompt_token_ids == ref["input_ids"][0].tolist()
    assert out.outputs[0].token_ids == hf_generate(ckpt[1], ref, GREEDY.max_tokens)


def test_image_as_data_url_path_and_bytes_give_the_same_answer(llm, tmp_path):
    img = picture(40, 60, 9)
    path = tmp_path / "x.png"
    img.save(path)
    import base64

    url = "data:image/png;base64," + base64.b64encode(png_bytes(img)).decode()
    prompt = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n<|im_start|>assistant\n"
    answers = [llm.generate({"prompt": prompt, "multi_modal_data": {"image": src}}, GREEDY)[0].outputs[0].token_ids
               for src in (img, str(path), png_bytes(img), url, np.asarray(img))]
    assert all(a == answers[0] for a in answers)
    chats = [llm.chat([{"role": "user", "content": [part, {"type": "text", "text": "Hi"}]}], GREEDY)[0]
             for part in ({"type": "image_url", "image_url": {"url": url}}, {"type": "image", "image": img})]
    assert chats[0].prompt_token_ids == chats[1].prompt_token_ids
    assert chats[0].outputs[0].token_ids == chats[1].outputs[0].token_ids


def test_video_matches_transformers(llm, ckpt):
    """transformers' video processor needs torchvision to resize (not installable beside CPU torch), so it gets our
    processed pixels and expanded ids; the processing itself is compared with its functions in
    test_mm_processing.py. Positions, fusion and generation here are transformers' own."""
    from qwen35.multimodal.inputs import prepare_prompt

    frames, fps = clip(9, 40, 56, 11), 3.0
    prompt = "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>Describe.<|im_end|>\n<|im_start|>assistant\n"
    ids = llm.tokenizer.encode(prompt)
    expanded, mm = prepare_prompt(ids, [], [(frames, fps)], llm.model_config, llm.processor_config,
                                  llm.tokenizer.encode, llm.media_limits, llm.media_policy)
    (item,) = mm.items
    assert item.grid_thw[0] == 3 and len(item.timestamps) == 3  # 9 frames at 3 fps, 2 fps sampled -> 6 -> 3 pairs
    inputs = {"input_ids": torch.tensor([expanded]), "pixel_values_videos": item.pixel_values,
              "video_grid_thw": torch.tensor([item.grid_thw]),
              "mm_token_type_ids": torch.tensor([[2 if t == 248057 else 0 for t in expanded]])}
    out = llm.generate({"prompt": prompt, "multi_modal_data": {"video": (frames, fps)}}, GREEDY)[0]
    assert out.prompt_token_ids == expanded
    assert out.outputs[0].token_ids == hf_generate(ckpt[1], inputs, GREEDY.max_tokens)


def mixed_requests():
    user = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
    img, vid = "<|vision_start|><|image_pad|><|vision_end|>", "<|vision_start|><|video_pad|><|vision_end|>"
    return [
        {"prompt": user.format(img + "Describe the picture in detail."),
         "multi_modal_data": {"image": picture(70, 50, 21)}},
        {"prompt": user.format("Just text, no pictures at all, a longer prompt than the others " * 3)},
        {"prompt": user.format(vid + "What happens?"), "multi_modal_data": {"video": (clip(10, 36, 48, 22), 2.0)}},
        {"prompt": user.format(img + " and " + img + " differ how?"),
         "multi_modal_data": {"image": [picture(33, 90, 23), picture(48, 48, 24)]}},
        {"prompt": user.format(img + vid + "Both."),
         "multi_modal_data": {"image": picture(20, 20, 25), "video": (clip(5, 32, 32, 26), 1.0)}},
    ]


@pytest.mark.parametrize("budget", ["default", "small_chunks", "preempting", "encoding_in_pieces"])
def test_mixed_batch_equals_each_alone(ckpt, llm, budget):
    reqs = mixed_requests()
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = [llm.generate(r, params)[0].outputs[0].token_ids for r in reqs]
    # 17 blocks of 16 tokens x 512 bytes (1 attention layer x K,V x 2 heads x 32 x fp32): one 256-token
    # request fits, the five together (~450 tokens) do not
    preempting = {"max_num_batched_tokens": 32, "kv_cache_bytes": 17 * 16 * 512}
    kw = {"default": {}, "small_chunks": {"max_num_batched_tokens": 24}, "preempting": preempting,
          "encoding_in_pieces": {"max_num_batched_tokens": 32}}[budget]
    other = LLM(ckpt[0], dtype="float32", max_model_len=256, **kw)
    if budget == "encoding_in_pieces":  # 7 patches of tower work per step: every item takes several steps
        other.engine.scheduler.encoder_budget = 7
    together = [o.outputs[0].token_ids for o in other.generate(reqs, params)]
    assert together == alone
    if budget == "preempting":
        assert other.engine.scheduler_preemptions > 0
    assert other.engine.blocks.num_free == other.engine.blocks.num_blocks


def test_bad_media_is_a_clear_error_and_the_engine_keeps_working(llm, tmp_path):
    prompt = "<|vision_start|><|image_pad|><|vision_end|>Hi"
    broken = png_bytes(picture(40, 40, 3))[:200]
    with pytest.raises(MediaError, match="truncated|corrupt"):
        llm.generate({"prompt": prompt, "multi_modal_data": {"image": broken}}, GREEDY)
    (tmp_path / "notes.png").write_text("not an image at all")
    with pytest.raises(MediaError, match="notes.png"):
        llm.generate({"prompt": prompt, "multi_modal_data": {"image": str(tmp_path / "notes.png")}}, GREEDY)
    with pytest.raises(ValueError, match="1 image and 0 video placeholders but 2 images"):
        llm.generate({"prompt": prompt, "multi_modal_data": {"image": [picture(20, 20, 1)] * 2}}, GREEDY)
    with pytest.raises(ValueError, match="placeholders but no image"):
        llm.generate(prompt, GREEDY)
    with pytest.raises(MediaError, match="local files are not allowed"):
        llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}], GREEDY)
    with pytest.raises(MediaError, match="http"):
        llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x.y/z.png"}}]}],
                 GREEDY)
    assert llm.generate({"prompt": prompt, "multi_modal_data": {"image": picture(20, 20, 1)}}, GREEDY)[0].finished
    assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks


def test_local_media_folder_policy(ckpt, tmp_path):
    inside = tmp_path / "media"
    inside.mkdir()
    picture(30, 30, 1).save(inside / "a.png")
    picture(30, 30, 1).save(tmp_path / "outside.png")
    llm = LLM(ckpt[0], dtype="float32", max_model_len=256, allowed_local_media_path=inside)

    def ask(url):
        return llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}], GREEDY)

    assert ask(str(inside / "a.png"))[0].finished
    assert ask((inside / "a.png").as_uri())[0].finished
    with pytest.raises(MediaError, match="outside the allowed"):
        ask(str(inside / ".." / "outside.png"))


def test_language_model_only(ckpt):
    llm = LLM(ckpt[0], dtype="float32", max_model_len=256, language_model_only=True)
    assert llm.model.visual is None and "model.visual." in llm.load_report.set_aside
    with pytest.raises(ValueError, match="text only"):
        llm.generate({"prompt": "<|vision_start|><|image_pad|><|vision_end|>",
                      "multi_modal_data": {"image": picture(20, 20, 1)}}, GREEDY)
    assert llm.generate("Hello", GREEDY)[0].finished


def test_cli_generate_and_chat_with_an_image(llm, ckpt, tmp_path):
    from tests.test_llm_api import run_cli

    picture(40, 64, 8).save(tmp_path / "p.png")
    common = ["--model", str(ckpt[0]), "--dtype", "float32", "--max-model-len", "512", "--temperature", "0",
              "--max-tokens", "5", "--ignore-eos", "--image", str(tmp_path / "p.png")]
    r = run_cli("generate", *common, "--json", "Describe:")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    ref = llm.generate({"prompt": "<|vision_start|><|image_pad|><|vision_end|>Describe:",
                        "multi_modal_data": {"image": str(tmp_path / "p.png")}},
                       SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    # 40x64 px -> 32x64 (round(2.5) = 2) -> 2x4 merged tokens
    assert got["prompt_token_ids"] == ref.prompt_token_ids and got["prompt_token_ids"].count(248056) == 8
    assert got["outputs"][0]["token_ids"] == ref.outputs[0].token_ids
    r = run_cli("chat", *common, "--hide-reasoning", "--no-think", stdin="Describe:\n")
    assert r.returncode == 0, r.stderr
    ref = llm.chat([{"role": "user", "content": [{"type": "image", "image": str(tmp_path / "p.png")},
                                                 {"type": "text", "text": "Describe:"}]}],
                   SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
                   chat_template_kwargs={"enable_thinking": False})[0]
    assert ref.messages[0]["content"] and ref.messages[0]["content"] in r.stdout
