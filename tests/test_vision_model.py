"""The vision tower, placeholder expansion, 3D positions and embedding fusion against transformers 5.23 on tiny
random Qwen3_5ForConditionalGeneration / Qwen3_5MoeForConditionalGeneration checkpoints (processed pixels given
directly; the processors have their own tests)."""

import pytest
import torch

from qwen35.models.loader import load_model
from qwen35.multimodal.items import VisualItem
from qwen35.multimodal.prompt import VisionTokens, expand_prompt
from tests.tiny_models import run_pieces

TOL = 1e-4
TOKENS = VisionTokens(image=150, video=151, vision_start=152, vision_end=153)  # tiny_models' ids


def encode(s: str) -> list[int]:  # a stand-in tokenizer for timestamp text on the 160-id vocabulary
    return [ord(c) % 140 for c in s]


def image(h, w, seed=0, patch_dim=384):
    g = torch.Generator().manual_seed(seed)
    return VisualItem("image", torch.randn(h * w, patch_dim, generator=g), (1, h, w))


def video(t, h, w, seed=0, patch_dim=384):
    g = torch.Generator().manual_seed(seed)
    return VisualItem("video", torch.randn(t * h * w, patch_dim, generator=g), (t, h, w),
                      timestamps=[0.25 + 1.5 * i for i in range(t)])


def text(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 140, (n,), generator=g).tolist()


S, E, IMG, V = TOKENS.vision_start, TOKENS.vision_end, TOKENS.image, TOKENS.video
CASES = {
    "one_image": (text(5, 1) + [S, IMG, E] + text(7, 2), [image(4, 6, 1)], []),
    "two_images": (text(3, 3) + [S, IMG, E] + text(4, 4) + [S, IMG, E] + text(2, 5),
                   [image(2, 8, 2), image(6, 4, 3)], []),
    "video": (text(4, 6) + [S, V, E] + text(6, 7), [], [video(3, 4, 4, 4)]),
    "bare_video_and_image": (text(2, 8) + [V] + text(3, 9) + [S, IMG, E] + text(3, 10),
                             [image(2, 2, 5)], [video(2, 2, 6, 6)]),
}


@pytest.fixture(scope="module", params=["dense_vl", "moe_vl"])
def models(request, checkpoint):
    path, hf = checkpoint(request.param)
    return load_model(path, dtype="float32")[0], hf


def hf_inputs(ids, images, videos):
    kw = {"input_ids": torch.tensor([ids])}
    kw["mm_token_type_ids"] = torch.tensor([[1 if t == IMG else 2 if t == V else 0 for t in ids]])
    if images:
        kw["pixel_values"] = torch.cat([x.pixel_values for x in images])
        kw["image_grid_thw"] = torch.tensor([x.grid_thw for x in images])
    if videos:
        kw["pixel_values_videos"] = torch.cat([x.pixel_values for x in videos])
        kw["video_grid_thw"] = torch.tensor([x.grid_thw for x in videos])
    return kw


def test_tower_matches_transformers(models):
    model, hf = models
    grids = [(1, 4, 6), (2, 8, 4), (1, 2, 2), (1, 16, 2), (3, 2, 10)]
    pv = torch.randn(sum(t * h * w for t, h, w in grids), 384, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf.model.visual(pv, grid_thw=torch.tensor(grids)).pooler_output
        ours = model.visual(pv, grids)
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(ours, ref, atol=TOL, rtol=0)


def test_items_do_not_see_each_other(models):
    """Packed items (and a video's temporal patches) attend only within themselves."""
    model, _ = models
    a, b = image(4, 4, 1), video(2, 4, 2, 2)
    with torch.no_grad():
        together = model.encode_visual([a.pixel_values, b.pixel_values], [a.grid_thw, b.grid_thw])
        alone = model.encode_visual([a.pixel_values], [a.grid_thw])[0]
        frame = model.encode_visual([b.pixel_values[:8]], [(1, 4, 2)])[0]
    torch.testing.assert_close(together[0], alone, atol=1e-6, rtol=0)
    torch.testing.assert_close(together[1][:2], frame, atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_positions_match_get_rope_index(models, case):
    _, hf = models
    ids, images, videos = CASES[case]
    expanded, mm = expand_prompt(ids, images, videos, TOKENS, 2, encode)
    kw = hf_inputs(expanded, images, videos)
    ref_pos, ref_delta = hf.model.get_rope_index(kw["input_ids"], kw["mm_token_type_ids"], kw.get("image_grid_thw"),
                                                 kw.get("video_grid_thw"))
    assert torch.equal(mm.positions, ref_pos[:, 0])
    assert mm.rope_delta == int(ref_delta)
    # decode positions continue where transformers' cached delta puts them: index + delta on all three axes
    L = len(expanded)
    want = torch.cat([mm.positions[:, -2:], torch.arange(L, L + 3).add(int(ref_delta)).expand(3, -1)], dim=1)
    assert torch.equal(mm.positions_for(L - 2, L + 3), want)


def test_expansion_layout():
    ids, images, videos = CASES["video"]
    expanded, mm = expand_prompt(ids, images, videos, TOKENS, 2, encode)
    stamps = [encode(f"<{t:.1f} seconds>") for t in videos[0].timestamps]
    block = lambda k: stamps[k] + [S] + [V] * 4 + [E]  # noqa: E731  (4x4 patches -> 2x2 merged)
    assert expanded == ids[:4] + block(0) + block(1) + block(2) + ids[7:]
    assert mm.feature_rows.max().item() == 11 and (mm.feature_rows >= 0).sum().item() == 12


def test_placeholder_count_mismatch_is_an_error():
    ids, images, _ = CASES["two_images"]
    with pytest.raises(ValueError, match="2 image and 0 video placeholders but 1 images"):
        expand_prompt(ids, images[:1], [], TOKENS, 2, encode)


def embeds_and_positions(model, ids, images, videos):
    expanded, mm = expand_prompt(ids, images, videos, TOKENS, 2, encode)
    feats = model.encode_visual([x.pixel_values for x in mm.items], mm.grids)
    return expanded, mm, torch.cat(feats)


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers_whole_and_in_pieces(models, case):
    """Full prefill and prefill in pieces cut inside the vision blocks both equal transformers' forward."""
    model, hf = models
    ids, images, videos = CASES[case]
    expanded, mm, feats = embeds_and_positions(model, ids, images, videos)
    with torch.no_grad():
        ref = hf(**hf_inputs(expanded, images, videos)).logits[0]
    assert ref.abs().max() > 1.0
    L = len(expanded)
    for cuts in ([], [1, 9, 10, L - 1], list(range(3, L, 7))):
        (ours,) = run_pieces(model, [expanded], [cuts], poison=True, mm=[(mm, feats)])
        torch.testing.assert_close(ours, ref, atol=TOL, rtol=0)


def test_long_segment_in_query_blocks_matches_eager_transformers(models, monkeypatch):
    """A 4096-patch image in query blocks of 64 rows (as a huge photo is split) equals transformers' eager attention,
    which builds the full [N, N] score matrix."""
    from qwen35.models import vision

    model, hf = models
    cfg = model.visual.cfg
    monkeypatch.setattr(vision, "SCORE_ELEMENTS", cfg.num_heads * 4096 * 64)
    monkeypatch.setattr(vision, "ROW_BLOCK", 512)
    pv = torch.randn(4096, 384, generator=torch.Generator().manual_seed(3))
    job = vision.EncodeJob(model.visual, pv, (1, 64, 64))
    assert sum(kind == "out" for kind, *_ in job.pieces) == 64 * cfg.depth
    hf_vision = hf.model.visual
    monkeypatch.setattr(hf_vision.config, "_attn_implementation", "eager")
    with torch.no_grad():
        job.run_to(1, 1)
        ref = hf_vision(pv, grid_thw=torch.tensor([(1, 64, 64)])).pooler_output
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(job.result, ref, atol=TOL, rtol=0)


def test_encoding_in_many_steps_equals_one_pass(models, monkeypatch):
    """However the engine spreads an item's pieces over steps, the embeddings are the same bits."""
    from qwen35.models import vision

    model, _ = models
    monkeypatch.setattr(vision, "ROW_BLOCK", 64)
    monkeypatch.setattr(vision, "SCORE_ELEMENTS", model.visual.cfg.num_heads * 96 * 32)
    item = video(3, 8, 12, 8)
    with torch.no_grad():
        whole = model.visual(item.pixel_values, [item.grid_thw])
        job = vision.EncodeJob(model.visual, item.pixel_values, item.grid_thw)
        for k in range(1, 41):
            job.run_to(k, 40)
            assert job.finished == (k == 40)
        assert len(job.pieces) > 20
    assert torch.equal(job.result, whole)
