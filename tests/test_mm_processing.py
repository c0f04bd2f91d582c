"""Image/video preprocessing against transformers 5.23 (the reference) and against hostile input."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from qwen35.config import ConfigError
from qwen35.multimodal import (MediaError, MediaLimits, ProcessorConfig, VideoFrames, calculate_timestamps,
                               load_image, load_video, process_image, process_video, sample_indices, smart_resize,
                               smart_resize_video)

RELEASED_IMAGE_JSON = {
    "image_processor_type": "Qwen2VLImageProcessorFast", "processor_class": "Qwen3VLProcessor",
    "size": {"shortest_edge": 65536, "longest_edge": 16777216}, "patch_size": 16, "temporal_patch_size": 2,
    "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 3,
    "rescale_factor": 0.00392156862745098, "do_convert_rgb": True,
}
RELEASED_VIDEO_JSON = {
    "video_processor_type": "Qwen3VLVideoProcessor", "size": {"shortest_edge": 4096, "longest_edge": 25165824},
    "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
}
TINY = ProcessorConfig(patch_size=8, image_min_pixels=32 * 32, image_max_pixels=96 * 96, video_min_pixels=1024,
                       video_max_pixels=4 * 64 * 64, video_min_frames=2, video_max_frames=12, video_fps=1.0,
                       image_mean=(0.48145466, 0.4578275, 0.40821073),
                       image_std=(0.26862954, 0.26130258, 0.27577711),
                       video_mean=(0.48145466, 0.4578275, 0.40821073),
                       video_std=(0.26862954, 0.26130258, 0.27577711))
CONFIGS = {"released": ProcessorConfig(), "tiny": TINY}


def hf_image_processor(cfg: ProcessorConfig):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        size={"shortest_edge": cfg.image_min_pixels, "longest_edge": cfg.image_max_pixels},
        patch_size=cfg.patch_size, temporal_patch_size=cfg.temporal_patch_size, merge_size=cfg.merge_size,
        image_mean=list(cfg.image_mean), image_std=list(cfg.image_std), rescale_factor=cfg.rescale_factor)


def hf_video_processor(cfg: ProcessorConfig, **kw):
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    return Qwen3VLVideoProcessor(
        size={"shortest_edge": cfg.video_min_pixels, "longest_edge": cfg.video_max_pixels},
        patch_size=cfg.patch_size, temporal_patch_size=cfg.temporal_patch_size, merge_size=cfg.merge_size,
        image_mean=list(cfg.video_mean), image_std=list(cfg.video_std), fps=cfg.video_fps,
        min_frames=cfg.video_min_frames, max_frames=cfg.video_max_frames, **kw)


def make_image(h: int, w: int, mode: str, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "RGBA":
        a = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
        a[: h // 2, :, 3] = 0  # fully transparent top half, partial alpha elsewhere
        return Image.fromarray(a)
    image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    if mode == "P":
        image = image.convert("P")
        image.info["transparency"] = 7
    return image.convert(mode) if mode in ("L", "CMYK") else image


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


# ---- config -------------------------------------------------------------------------------------------------------

def test_config_defaults_are_the_released_values():
    cfg = ProcessorConfig()
    assert (cfg.patch_size, cfg.temporal_patch_size, cfg.merge_size, cfg.factor) == (16, 2, 2, 32)
    assert (cfg.image_min_pixels, cfg.image_max_pixels) == (65536, 16777216)
    assert (cfg.video_min_pixels, cfg.video_max_pixels) == (4096, 25165824)
    assert (cfg.video_fps, cfg.video_min_frames, cfg.video_max_frames) == (2, 4, 768)
    assert cfg.image_mean == cfg.image_std == cfg.video_mean == cfg.video_std == (0.5, 0.5, 0.5)


def test_config_from_released_json(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(RELEASED_IMAGE_JSON))
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(RELEASED_VIDEO_JSON))
    vision = SimpleNamespace(patch_size=16, temporal_patch_size=2, spatial_merge_size=2)
    assert ProcessorConfig.from_dir(tmp_path, vision) == ProcessorConfig()
    assert ProcessorConfig.from_dir(tmp_path / "missing") == ProcessorConfig()


def test_config_geometry_from_vision_without_json(tmp_path):
    cfg = ProcessorConfig.from_dir(tmp_path, SimpleNamespace(patch_size=14, temporal_patch_size=2,
                                                             spatial_merge_size=2))
    assert (cfg.patch_size, cfg.factor, cfg.image_max_pixels) == (14, 28, 16777216)


def test_config_disagreeing_with_the_model_names_both_values(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(RELEASED_IMAGE_JSON))
    with pytest.raises(ConfigError, match=r"patch_size.*\(16\).*vision_config.patch_size \(14\)"):
        ProcessorConfig.from_dir(tmp_path, SimpleNamespace(patch_size=14, temporal_patch_size=2,
                                                           spatial_merge_size=2))


def test_config_legacy_min_max_pixels_win_and_unknown_keys_are_ignored(tmp_path):
    d = dict(RELEASED_IMAGE_JSON, min_pixels=1024, max_pixels=4096, some_future_key={"x": 1})
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(d))
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(
        dict(RELEASED_VIDEO_JSON, fps=1, max_frames=64, cap_pixels_per_frame=True)))
    cfg = ProcessorConfig.from_dir(tmp_path)
    assert (cfg.image_min_pixels, cfg.image_max_pixels) == (1024, 4096)
    assert (cfg.video_fps, cfg.video_max_frames, cfg.video_cap_pixels_per_frame) == (1.0, 64, True)


@pytest.mark.parametrize("file,text,match", [
    ("preprocessor_config.json", "{not json", "not valid JSON"),
    ("preprocessor_config.json", "[1, 2]", "expected a JSON object"),
    ("preprocessor_config.json", json.dumps({"size": {"longest_edge": "big"}}), "'size.longest_edge'"),
    ("preprocessor_config.json", json.dumps({"patch_size": 0}), "'patch_size' must be a positive integer"),
    ("preprocessor_config.json", json.dumps({"image_std": [0.5, 0, 0.5]}), "'image_std'"),
    ("preprocessor_config.json", json.dumps({"image_mean": [0.5, 0.5]}), "'image_mean' must be a list of 3"),
    ("video_preprocessor_config.json", json.dumps({"fps": -2}), "'fps'"),
    ("video_preprocessor_config.json", json.dumps({"patch_size": 14}), "'patch_size' \\(14\\) disagrees"),
    ("video_preprocessor_config.json", json.dumps({"min_frames": 9, "max_frames": 8}), "video_min_frames"),
], ids=["bad-json", "not-object", "size-str", "patch-0", "std-0", "mean-2", "fps-neg", "video-vs-image-patch",
        "frames-min-gt-max"])
def test_config_bad_values_name_file_and_key(tmp_path, file, text, match):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(RELEASED_IMAGE_JSON))
    (tmp_path / file).write_text(text)
    with pytest.raises(ConfigError, match=match) as e:
        ProcessorConfig.from_dir(tmp_path)
    assert str(tmp_path) in str(e.value)


# ---- images against transformers ----------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg_name", list(CONFIGS))
@pytest.mark.parametrize("h,w,mode", [
    (100, 100, "RGB"), (480, 640, "RGB"), (33, 517, "RGB"), (517, 33, "RGB"), (31, 31, "RGB"), (60, 50, "L"),
    (70, 90, "RGBA"), (64, 64, "P"), (96, 96, "RGB"), (45, 80, "CMYK"),
])
def test_image_bit_identical_to_transformers(cfg_name, h, w, mode):
    cfg = CONFIGS[cfg_name]
    image = make_image(h, w, mode)
    ref = hf_image_processor(cfg)(images=image, return_tensors="pt")
    item = process_image(image, cfg)
    assert item.kind == "image" and item.timestamps is None
    assert item.pixel_values.dtype == torch.float32
    assert torch.equal(item.pixel_values, ref["pixel_values"])
    assert [list(item.grid_thw)] == ref["image_grid_thw"].tolist()
    assert item.num_tokens(cfg.merge_size) == item.pixel_values.shape[0] // cfg.merge_size**2


def test_large_image_bit_identical_with_scaled_down_budget():
    cfg = ProcessorConfig(image_max_pixels=256 * 256 * 2)
    image = make_image(1080, 1920, "RGB", seed=1)
    ref = hf_image_processor(cfg)(images=image, return_tensors="pt")
    item = process_image(image, cfg)
    assert torch.equal(item.pixel_values, ref["pixel_values"])
    assert [list(item.grid_thw)] == ref["image_grid_thw"].tolist()


@pytest.mark.parametrize("hw,resized,tokens", [
    ((768, 1024), (768, 1024), 768), ((480, 640), (480, 640), 300), ((1080, 1920), (1088, 1920), 2040),
    ((100, 100), (256, 256), 64), ((2160, 3840), (2176, 3840), 8160), ((4000, 6000), (3328, 4992), 16224),
])
def test_token_counts_of_spec_table(hw, resized, tokens):
    cfg = ProcessorConfig()
    assert smart_resize(*hw, cfg.factor, cfg.image_min_pixels, cfg.image_max_pixels) == resized
    assert resized[0] * resized[1] // cfg.factor**2 == tokens


def test_smart_resize_matches_transformers_on_a_grid():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    rng = np.random.default_rng(0)
    sizes = [(int(a), int(b)) for a, b in rng.integers(1, 9000, (300, 2))] + [(1, 150), (16, 16), (48, 80)]
    for h, w in sizes:
        for lo, hi, factor in ((65536, 16777216, 32), (1024, 9216, 16), (56 * 56, 28 * 28 * 1280, 28)):
            try:
                want = hf_smart_resize(h, w, factor, lo, hi)
            except ValueError:
                with pytest.raises(MediaError, match="aspect ratio"):
                    smart_resize(h, w, factor, lo, hi)
                continue
            assert smart_resize(h, w, factor, lo, hi) == want, (h, w, lo, hi, factor)


def test_load_image_from_path_bytes_data_url_and_array(tmp_path):
    image = make_image(40, 70, "RGB")
    png = encode(image, "PNG")
    (tmp_path / "x.png").write_bytes(png)
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    for src in (tmp_path / "x.png", str(tmp_path / "x.png"), png, url, np.asarray(image), image):
        loaded = load_image(src)
        assert loaded.mode == "RGB" and np.array_equal(np.asarray(loaded), np.asarray(image))
    grey = np.asarray(image.convert("L"))
    assert np.array_equal(np.asarray(load_image(grey)), np.asarray(image.convert("L").convert("RGB")))


def test_transparency_composited_on_white_as_transformers():
    from transformers.image_transforms import convert_to_rgb

    rgba = make_image(20, 30, "RGBA")
    loaded = np.asarray(load_image(encode(rgba, "PNG")))
    assert (loaded[:10] == 255).all()  # the fully transparent half
    assert np.array_equal(loaded, convert_to_rgb(rgba, return_numpy=True))
    arr = np.asarray(rgba)
    assert np.array_equal(np.asarray(load_image(arr)), convert_to_rgb(arr, return_numpy=True))


def test_exif_orientation_applied_to_files_not_to_pil_images():
    image = make_image(20, 40, "RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    jpeg = encode(image, "JPEG", exif=exif.tobytes())
    assert load_image(jpeg).size == (20, 40)
    assert load_image(Image.open(io.BytesIO(jpeg))).size == (40, 20)


# ---- hostile images -----------------------------------------------------------------------------------------------

def png_declaring(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR claims width x height (CRC fixed up)."""
    data = bytearray(encode(Image.new("1", (1, 1)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@pytest.mark.parametrize("case,match", [
    ("truncated-png", "corrupt or truncated"), ("truncated-jpeg", "corrupt or truncated"),
    ("text-as-png", "not an image in a supported format"), ("empty", "empty"), ("missing", "cannot read"),
    ("eps", "not an image in a supported format"), ("bomb-30000", "too large to decode safely"),
    ("bomb-9000", "above the limit of 67108864"), ("bomb-10000", "above the limit of 67108864"),
    ("bad-base64", "not valid base64"),
    ("plain-data-url", "only base64 data URLs"), ("http", "must be fetched by the caller"),
    ("float-array", "expected a uint8 array"), ("too-many-bytes", "above the limit of 100"),
    ("dir", "not a regular file"), ("garbage-jpeg", "corrupt or truncated"),
])
def test_bad_images_raise_media_error(tmp_path, case, match):
    png, jpeg = encode(make_image(64, 64, "RGB"), "PNG"), encode(make_image(64, 64, "RGB"), "JPEG")
    limits = MediaLimits(max_image_bytes=100) if case == "too-many-bytes" else MediaLimits()
    files = {
        "truncated-png": png[: len(png) // 2], "truncated-jpeg": jpeg[: len(jpeg) // 2],
        "text-as-png": b"this is not a png\n", "empty": b"", "bomb-30000": png_declaring(30000, 30000),
        "bomb-9000": png_declaring(9000, 9000), "too-many-bytes": png,
        "bomb-10000": png_declaring(10000, 10000),  # over PIL's warning threshold, under its error threshold
        "eps": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",
        "garbage-jpeg": jpeg[:200] + bytes(range(256)) * 4 + jpeg[-2:],
    }
    src = {"missing": str(tmp_path / "nope.png"), "bad-base64": "data:image/png;base64,@@not*base64@@",
           "plain-data-url": "data:image/png,abc", "http": "https://example.com/cat.png",
           "float-array": np.zeros((4, 4, 3), np.float32), "dir": tmp_path}.get(case)
    if case in files:
        src = tmp_path / "x.png"
        src.write_bytes(files[case])
    with pytest.raises(MediaError, match=match) as e:
        load_image(src, limits)
    if isinstance(src, type(tmp_path)) and case != "dir":
        assert "x.png" in str(e.value)


def test_image_names_itself_in_errors():
    with pytest.raises(MediaError, match=r"^image 2: .*not an image"):
        load_image(b"junk bytes", name="image 2")
    with pytest.raises(MediaError, match=r"^data URL: "):
        load_image("data:image/png;base64," + base64.b64encode(b"junk").decode())


def test_broken_pil_inputs_raise_media_error():
    png = encode(make_image(64, 64, "RGB"), "PNG")
    with pytest.raises(MediaError, match="image file is truncated"):
        load_image(Image.open(io.BytesIO(png[: len(png) // 2])))  # lazily opened: decoded by load_image
    with pytest.raises(MediaError, match="La image"):
        load_image(Image.new("La", (4, 4)))


def test_pixel_limit_applies_to_pil_and_array_inputs():
    limits = MediaLimits(max_image_pixels=100)
    for src in (make_image(20, 20, "RGB"), np.zeros((20, 20, 3), np.uint8)):
        with pytest.raises(MediaError, match="max_image_pixels"):
            load_image(src, limits)


def test_extreme_aspect_ratio_is_a_media_error():
    with pytest.raises(MediaError, match=r"^image 3: image aspect ratio 300.0"):
        process_image(load_image(np.zeros((1, 300, 3), np.uint8)), ProcessorConfig(), name="image 3")
    process_image(load_image(np.zeros((1, 150, 3), np.uint8)), ProcessorConfig())  # 150 is fine (scaled up)


# ---- video against transformers -----------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg_name", list(CONFIGS))
def test_sample_indices_match_transformers(cfg_name):
    from transformers.video_utils import VideoMetadata

    cfg = CONFIGS[cfg_name]
    hf = hf_video_processor(cfg)
    for total in (1, 2, 3, 4, 5, 7, 30, 31, 100, 241, 1000, 5000, 100000):
        for fps in (1.0, 7.5, 10.0, 23.976, 24.0, 29.97, 30.0, 60.0, 120.0):
            want = hf.sample_frames(VideoMetadata(total_num_frames=total, fps=fps)).tolist()
            assert sample_indices(total, fps, cfg) == want, (total, fps)


def test_sample_indices_respect_the_frame_limit():
    assert len(sample_indices(100000, 30.0, ProcessorConfig(), MediaLimits(max_video_frames=10))) == 10


def test_smart_resize_video_matches_transformers():
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as hf_smart_resize

    rng = np.random.default_rng(0)
    cases = [(int(t), int(h), int(w)) for t, h, w in zip(rng.integers(2, 800, 200), rng.integers(1, 4000, 200),
                                                          rng.integers(1, 4000, 200))]
    cases += [(20, 720, 1280), (120, 720, 1280), (2, 10, 10), (4, 1, 100), (3, 31, 33), (768, 2160, 3840)]
    for t, h, w in cases:
        for lo, hi in ((4096, 25165824), (128 * 32 * 32, 768 * 32 * 32)):
            try:
                want = hf_smart_resize(t, h, w, 2, 32, lo, hi)
            except ValueError:
                with pytest.raises(MediaError):
                    smart_resize_video(t, h, w, 2, 32, lo, hi)
                continue
            assert smart_resize_video(t, h, w, 2, 32, lo, hi) == want, (t, h, w)
    assert smart_resize_video(20, 720, 1280) == (704, 1280)  # spec §3.5 table
    assert smart_resize_video(120, 720, 1280) == (320, 608)


def test_timestamps_match_transformers():
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    for indices in ([0], [0, 6, 12, 17, 23, 29], [0, 5, 9], list(range(0, 300, 7)), [3, 3, 4]):
        for fps in (10.0, 29.97, 24.0, 1.0):
            for tp in (1, 2, 3):
                want = Qwen3VLProcessor._calculate_timestamps(None, list(indices), fps, tp)
                assert calculate_timestamps(indices, fps, tp) == want


def hf_normalize_and_patchify(frames: np.ndarray, cfg: ProcessorConfig):
    """transformers' video path after its (torchvision) resize: fused rescale+normalize, then patchify."""
    hf = hf_video_processor(cfg)
    mean, std, _ = hf._fuse_mean_std_and_rescale_factor(True, tuple(cfg.video_mean), tuple(cfg.video_std), True,
                                                        cfg.video_rescale_factor, torch.device("cpu"))
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).to(torch.float32)
    x = x.sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))  # torchvision's normalize
    patches, gt, gh, gw = hf.patchify(x[None], cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size)
    return patches[0], (gt, gh, gw)


@pytest.mark.parametrize("cfg_name", list(CONFIGS))
@pytest.mark.parametrize("n,h,w", [(5, 64, 64), (6, 48, 80), (1, 40, 40), (9, 100, 30)])
def test_video_patches_match_transformers_patchify(cfg_name, n, h, w):
    cfg = CONFIGS[cfg_name]
    frames = np.random.default_rng(n).integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    item = process_video(VideoFrames(frames, list(range(n)), 10.0, n), cfg)
    rh, rw = smart_resize_video(max(n, 2), h, w, 2, cfg.factor, cfg.video_min_pixels, cfg.video_max_pixels)
    resized = np.stack([np.asarray(Image.fromarray(f).resize((rw, rh), Image.Resampling.BICUBIC)) for f in frames])
    want, grid = hf_normalize_and_patchify(resized, cfg)
    assert item.kind == "video" and item.grid_thw == grid
    assert torch.equal(item.pixel_values, want)
    assert len(item.timestamps) == grid[0]
    hf = hf_video_processor(cfg, cap_pixels_per_frame=False)
    assert hf.get_num_of_video_patches(max(n, 2), h, w) == grid[0] * grid[1] * grid[2]


def test_video_pixel_cap_matches_transformers_patch_count():
    cfg = ProcessorConfig(video_cap_pixels_per_frame=True)
    frames = np.zeros((4, 720, 1280, 3), np.uint8)
    item = process_video(VideoFrames(frames, [0, 1, 2, 3], 2.0, 4), cfg)
    hf = hf_video_processor(cfg, cap_pixels_per_frame=True)
    assert hf.get_num_of_video_patches(4, 720, 1280) == item.pixel_values.shape[0]
    uncapped = process_video(VideoFrames(frames, [0, 1, 2, 3], 2.0, 4), ProcessorConfig())
    assert uncapped.pixel_values.shape[0] > item.pixel_values.shape[0]


# ---- video files --------------------------------------------------------------------------------------------------

def write_video(path, fmt="mp4", codec="mpeg4", n=30, fps=10, w=64, h=48, **options):
    """n frames whose red channel is 8 * frame index (green the reverse), so sampled indices can be read back."""
    import av

    with av.open(str(path), "w", format=fmt, options=options) as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt, s.bit_rate = w, h, "yuv420p", 2_000_000
        for i in range(n):
            a = np.zeros((h, w, 3), np.uint8)
            a[..., 0], a[..., 1] = 8 * i, 255 - 8 * i
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    return {"mp4": write_video(d / "clip.mp4"), "mkv": write_video(d / "clip.mkv", fmt="matroska"),
            "faststart": write_video(d / "fs.mp4", movflags="faststart")}


@pytest.mark.parametrize("kind", ["mp4", "mkv"])  # the mkv stream declares no frame count: counted by decoding
def test_load_video_samples_the_right_frames(videos, kind):
    from transformers.video_utils import VideoMetadata

    video = load_video(videos[kind])
    want = hf_video_processor(ProcessorConfig()).sample_frames(VideoMetadata(total_num_frames=30, fps=10.0))
    assert video.indices == want.tolist() == [0, 6, 12, 17, 23, 29]
    # frames are resized while decoding (only one is ever held at source size): 48x64 -> 64x64 for 6 frames
    assert (video.fps, video.total_num_frames, video.source_hw, video.frames.shape) == (10.0, 30, (48, 64),
                                                                                         (6, 64, 64, 3))
    red = video.frames[:, 8:-8, 8:-8, 0].reshape(6, -1).mean(axis=1)
    assert np.abs(red - 8 * np.array(video.indices)).max() < 6, red  # lossy codec: approximate colour
    item = process_video(video, ProcessorConfig())
    assert item.grid_thw == (3, 4, 4) and item.num_tokens(2) == 12
    assert item.timestamps == pytest.approx([0.3, 1.45, 2.6])


def test_load_video_from_bytes_data_url_and_arrays(videos):
    data = videos["mp4"].read_bytes()
    url = "data:video/mp4;base64," + base64.b64encode(data).decode()
    ref = load_video(videos["mp4"])
    for src in (data, url, str(videos["mp4"])):
        v = load_video(src)
        assert v.indices == ref.indices and np.array_equal(v.frames, ref.frames)
    frames = np.random.default_rng(0).integers(0, 256, (30, 16, 24, 3), dtype=np.uint8)
    for src in ((frames, 10), {"frames": frames, "fps": np.float32(10.0)}):
        v = load_video(src)
        assert v.indices == [0, 6, 12, 17, 23, 29] and np.array_equal(v.frames, frames[v.indices])
    v = load_video([Image.fromarray(f) for f in frames])  # no fps: 24 assumed, as transformers does
    assert v.fps == 24.0 and v.indices == [0, 10, 19, 29]


def test_slightly_wrong_frame_count_is_resampled(videos):
    data = videos["faststart"].read_bytes()
    v = load_video(data[: int(len(data) * 0.95)])  # header still says 30 frames; 28 decode
    assert v.total_num_frames < 30 and v.indices == sample_indices(v.total_num_frames, 10.0, ProcessorConfig())


@pytest.mark.parametrize("case,match", [
    ("truncated", "corrupt, truncated"), ("half-faststart", "truncated or corrupt: its header declares 30"),
    ("png", "this is an image"), ("text", "corrupt, truncated or unsupported"), ("empty", "empty"),
    ("too-many-frames-mp4", "max_video_decoded_frames"), ("too-many-frames-mkv", "max_video_decoded_frames"),
    ("too-many-pixels", "max_video_pixels"), ("float-frames", "expected a uint8 array"),
    ("no-frames", "no frames"), ("fps-with-file", "fps can only be given"), ("bad-fps", "fps must be a positive"),
    ("mixed-sizes", "different sizes"), ("too-many-bytes", "above the limit of 1000"),
])
def test_bad_videos_raise_media_error(tmp_path, videos, case, match):
    limits = MediaLimits()
    mp4 = videos["mp4"].read_bytes()
    fs = videos["faststart"].read_bytes()
    src = {
        "truncated": mp4[: len(mp4) // 2], "half-faststart": fs[: len(fs) // 2],
        "png": encode(make_image(32, 32, "RGB"), "PNG"), "text": b"not a video at all " * 10, "empty": b"",
        "too-many-frames-mp4": videos["mp4"], "too-many-frames-mkv": videos["mkv"], "too-many-pixels": videos["mp4"],
        "float-frames": np.zeros((4, 8, 8, 3), np.float32), "no-frames": np.zeros((0, 8, 8, 3), np.uint8),
        "fps-with-file": (videos["mp4"], 10), "bad-fps": (np.zeros((4, 8, 8, 3), np.uint8), 0),
        "mixed-sizes": [Image.new("RGB", (8, 8)), Image.new("RGB", (8, 9))], "too-many-bytes": videos["mp4"],
    }[case]
    if case.startswith("too-many-frames"):
        limits = MediaLimits(max_video_decoded_frames=10)
    elif case == "too-many-pixels":
        limits = MediaLimits(max_video_pixels=5 * 48 * 64)
    elif case == "too-many-bytes":
        limits = MediaLimits(max_video_bytes=1000)
    if isinstance(src, bytes):
        src, _ = tmp_path / "clip.mp4", (tmp_path / "clip.mp4").write_bytes(src)
    with pytest.raises(MediaError, match=match) as e:
        load_video(src, ProcessorConfig(), limits)
    if isinstance(src, type(tmp_path)):
        assert str(src) in str(e.value)


def test_media_limits_counts():
    MediaLimits().check_counts(16, 4)
    with pytest.raises(MediaError, match="too many images"):
        MediaLimits(max_images_per_prompt=2).check_counts(3, 0)
    with pytest.raises(MediaError, match="too many videos"):
        MediaLimits().check_counts(0, 5)
