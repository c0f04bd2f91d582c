"""Preprocessing configuration: `ProcessorConfig` from a checkpoint's `preprocessor_config.json` and
`video_preprocessor_config.json`, and `MediaLimits`, the request-level safety
limits a server sets for images and videos it is sent."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwen35.config import ConfigError
from qwen35.multimodal.items import MediaError

IMAGE_FILE = "preprocessor_config.json"
VIDEO_FILE = "video_preprocessor_config.json"
MiB = 1 << 20


@dataclass(frozen=True)
class ProcessorConfig:
    """How images and videos become patches. Defaults are the released Qwen3.5 values (not transformers' class
    defaults, which are Qwen2-VL's)."""

    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_min_pixels: int = 65536  # pixel-AREA bounds after resizing (json: size.shortest_edge / longest_edge)
    image_max_pixels: int = 16777216
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    video_min_pixels: int = 4096  # bounds on frames * H * W of the whole resized clip
    video_max_pixels: int = 25165824
    video_fps: float = 2.0  # frames sampled per second of source video
    video_min_frames: int = 4
    video_max_frames: int = 768
    video_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    video_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    video_rescale_factor: float = 1 / 255
    # qwen-vl-utils' per-frame pixel cap (spec §3.5). Off by default, as in transformers 5.23 with the released json.
    video_cap_pixels_per_frame: bool = False
    video_max_tokens_per_frame: int = 768

    @property
    def factor(self) -> int:
        """Resized sides are multiples of this: one merged token covers factor x factor pixels."""
        return self.patch_size * self.merge_size

    @staticmethod
    def from_dir(path: str | Path, vision: Any = None) -> "ProcessorConfig":
        """Read the processor json files of a checkpoint directory; either may be absent.

        `vision` is the model's VisionConfig (anything with patch_size, temporal_patch_size, spatial_merge_size):
        without json it supplies the patch geometry; with json it must agree with it."""
        path = Path(path)
        kw: dict[str, Any] = {}
        geometry: dict[str, tuple[int, str]] = {}  # field -> (value, where it came from)
        for name, prefix in ((IMAGE_FILE, "image"), (VIDEO_FILE, "video")):
            file = path / name
            if not file.is_file():
                continue
            try:
                d = json.loads(file.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ConfigError(f"{file}: not valid JSON ({e})") from None
            if not isinstance(d, dict):
                raise ConfigError(f"{file}: expected a JSON object")
            _parse(d, str(file), prefix, kw, geometry)
        if vision is not None:
            for f, attr in (("patch_size", "patch_size"), ("temporal_patch_size", "temporal_patch_size"),
                            ("merge_size", "spatial_merge_size")):
                model_value = getattr(vision, attr)
                if f not in geometry:
                    kw[f] = model_value
                elif geometry[f][0] != model_value:
                    value, where = geometry[f]
                    raise ConfigError(f"{where} ({value}) disagrees with the model's vision_config.{attr} "
                                      f"({model_value})")
        cfg = ProcessorConfig(**kw)
        for lo, hi in (("image_min_pixels", "image_max_pixels"), ("video_min_pixels", "video_max_pixels"),
                       ("video_min_frames", "video_max_frames")):
            if getattr(cfg, lo) > getattr(cfg, hi):
                raise ConfigError(f"{path}: processor {lo} ({getattr(cfg, lo)}) is larger than {hi} "
                                  f"({getattr(cfg, hi)})")
        return cfg


def _parse(d: dict, file: str, prefix: str, kw: dict, geometry: dict) -> None:
    """Copy the keys qwen35 uses from one json object into `kw` (ProcessorConfig fields), validating each."""

    def number(key: str, value: Any, kind: type, positive: bool = True):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if ok and kind is int:
            ok = float(value).is_integer()
        if not ok or (positive and value <= 0):
            want = ("a positive " if positive else "a ") + ("integer" if kind is int else "number")
            raise ConfigError(f"{file}: key '{key}' must be {want}, got {value!r}")
        return kind(value)

    for key in ("patch_size", "temporal_patch_size", "merge_size"):
        if d.get(key) is not None:
            value = number(key, d[key], int)
            if key in geometry and geometry[key][0] != value:
                raise ConfigError(f"{file}: key '{key}' ({value}) disagrees with {geometry[key][1]} "
                                  f"({geometry[key][0]})")
            geometry[key] = (value, f"{file}: key '{key}'")
            kw[key] = value

    size = d.get("size")
    if size is not None and not isinstance(size, dict):
        raise ConfigError(f"{file}: key 'size' must be an object with shortest_edge/longest_edge, got {size!r}")
    size = size or {}
    # Legacy min_pixels / max_pixels win over size, as in transformers' Qwen2VLImageProcessor.__init__.
    for legacy, key, field in (("min_pixels", "shortest_edge", "min_pixels"),
                               ("max_pixels", "longest_edge", "max_pixels")):
        if d.get(legacy) is not None:
            kw[f"{prefix}_{field}"] = number(legacy, d[legacy], int)
        elif size.get(key) is not None:
            kw[f"{prefix}_{field}"] = number(f"size.{key}", size[key], int)

    for key, field in (("image_mean", "mean"), ("image_std", "std")):
        value = d.get(key)
        if value is None:
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value] * 3
        if not isinstance(value, list) or len(value) != 3:
            raise ConfigError(f"{file}: key '{key}' must be a list of 3 numbers, got {value!r}")
        kw[f"{prefix}_{field}"] = tuple(float(number(key, v, float, positive=field == "std")) for v in value)

    if d.get("rescale_factor") is not None:
        kw["rescale_factor" if prefix == "image" else "video_rescale_factor"] = number(
            "rescale_factor", d["rescale_factor"], float)

    if prefix == "video":
        if d.get("fps") is not None:
            kw["video_fps"] = number("fps", d["fps"], float)
        for key in ("min_frames", "max_frames"):
            if d.get(key) is not None:
                kw[f"video_{key}"] = number(key, d[key], int)
        if d.get("max_video_tokens") is not None:
            kw["video_max_tokens_per_frame"] = number("max_video_tokens", d["max_video_tokens"], int)
        cap = d.get("cap_pixels_per_frame")
        if cap is not None:
            if not isinstance(cap, bool):
                raise ConfigError(f"{file}: key 'cap_pixels_per_frame' must be true or false, got {cap!r}")
            kw["video_cap_pixels_per_frame"] = cap


@dataclass(frozen=True)
class MediaLimits:
    """Safety limits on what one request may send; a violation is a MediaError naming the limit.

    The per-prompt counts are for the caller (server/engine) to enforce with `check_counts`; the rest are enforced
    by load_image / load_video. A hostile file costs at most about max_video_decoded_frames decoded frames."""

    max_image_bytes: int = 64 * MiB  # encoded size of one image
    max_image_pixels: int = 8192 * 8192  # decoded source pixels of one image or of one video frame
    max_images_per_prompt: int = 16
    max_video_bytes: int = 512 * MiB  # encoded size of one video
    max_videos_per_prompt: int = 4
    max_video_frames: int = 768  # frames sampled from one video (also bounded by ProcessorConfig.video_max_frames)
    max_video_decoded_frames: int = 108_000  # frames decoded to sample them: 1 hour at 30 fps
    max_video_pixels: int = 1 << 30  # sum of H*W over the sampled frames at source resolution (3 GiB as uint8)

    def check_counts(self, num_images: int, num_videos: int) -> None:
        if num_images > self.max_images_per_prompt:
            raise MediaError(f"too many images in one prompt: {num_images} (limit {self.max_images_per_prompt})")
        if num_videos > self.max_videos_per_prompt:
            raise MediaError(f"too many videos in one prompt: {num_videos} (limit {self.max_videos_per_prompt})")
