"""Videos: decode with PyAV and sample frames as transformers' `Qwen3VLVideoProcessor` does, then resize,
normalise and patchify them into one VisualItem with one timestamp per temporal patch (spec §3.5).

PyAV is imported only when a video file arrives."""

from __future__ import annotations

import io
import math
import numbers
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from qwen35.multimodal.config import MediaLimits, ProcessorConfig
from qwen35.multimodal.image import MAX_ASPECT_RATIO, check_pixels, load_image, patchify, read_source
from qwen35.multimodal.items import MediaError, VideoFrames, VisualItem

DEFAULT_FPS = 24.0  # what transformers assumes when a video's frame rate is unknown
# A stream that decodes to fewer frames than this share of its declared count is refused as truncated; smaller
# shortfalls (sloppy muxers) are resampled over the frames that are really there.
TRUNCATED_FRACTION = 0.9


def load_video(src, cfg: ProcessorConfig = ProcessorConfig(), limits: MediaLimits = MediaLimits(),
               name: str | None = None) -> VideoFrames:
    """Decode `src` and sample its frames, or raise MediaError naming `name` (default: the path, "data URL", ...).

    `src` is a path, raw bytes, a `data:` URL, a uint8 array [T, H, W, 3], a list of PIL images, or either of the
    last two with their frame rate: `(frames, fps)` or `{"frames": frames, "fps": fps}`. Decoded frames without a
    frame rate are taken as 24 fps, as transformers does (timestamps are then only as right as that guess).
    Sampling is `Qwen3VLVideoProcessor.sample_frames`; at most `limits.max_video_frames` frames are kept."""
    fps = None
    if isinstance(src, dict):
        if "frames" not in src:
            raise MediaError(f"{name or 'video'}: a video given as a dict needs a 'frames' entry")
        src, fps = src["frames"], src.get("fps")
    elif isinstance(src, tuple) and len(src) == 2:
        src, fps = src
    if isinstance(src, (np.ndarray, list)):
        name = name or "video frames"
        frames = _frames_array(src, limits, name)
        fps = _check_fps(fps, name) or DEFAULT_FPS
        indices = sample_indices(len(frames), fps, cfg, limits)
        _check_volume(len(indices), frames.shape[1], frames.shape[2], limits, name)
        return VideoFrames(frames[indices], indices, fps, len(frames))
    if fps is not None:
        raise MediaError(f"{name or 'video'}: fps can only be given with decoded frames; files carry their own")
    data, name = read_source(src, limits.max_video_bytes, "video", name)
    return _decode(data, name, cfg, limits)


def sample_indices(total_num_frames: int, fps: float, cfg: ProcessorConfig,
                   limits: MediaLimits = MediaLimits()) -> list[int]:
    """`Qwen3VLVideoProcessor.sample_frames`: cfg.video_fps frames per second, clamped to
    [min_frames, max_frames] and to the frames there are, spread evenly (numpy's half-to-even rounding)."""
    n = int(total_num_frames / fps * cfg.video_fps)
    n = min(max(n, cfg.video_min_frames), cfg.video_max_frames, limits.max_video_frames, total_num_frames)
    return np.linspace(0, total_num_frames - 1, n).round().astype(int).tolist()


def smart_resize_video(num_frames: int, height: int, width: int, temporal_factor: int = 2, factor: int = 32,
                       min_pixels: int = 4096, max_pixels: int = 25165824) -> tuple[int, int]:
    """transformers' qwen3_vl `smart_resize`: like the image one, but the pixel bounds apply to the whole clip
    (frames x H x W), and sides shorter than `factor` are first scaled up."""
    if num_frames < temporal_factor:
        raise MediaError(f"video has {num_frames} frames, fewer than temporal_patch_size {temporal_factor}")
    if min(height, width) <= 0:
        raise MediaError(f"video has no pixels ({height}x{width})")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height = int(height * scale)
        width = int(width * scale)
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise MediaError(f"video aspect ratio {max(height, width) / min(height, width):.1f} ({width}x{height}) is "
                         f"above the limit of {MAX_ASPECT_RATIO}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def calculate_timestamps(indices: list[int], fps: float, temporal_patch_size: int) -> list[float]:
    """`Qwen3VLProcessor._calculate_timestamps`: seconds of each temporal patch, the mean of the times of its first
    and last frame (indices padded with the last one, as the frames are)."""
    indices = list(indices)
    if pad := -len(indices) % temporal_patch_size:
        indices += [indices[-1]] * pad
    seconds = [i / fps for i in indices]
    return [(seconds[i] + seconds[i + temporal_patch_size - 1]) / 2
            for i in range(0, len(seconds), temporal_patch_size)]


def process_video(video: VideoFrames, cfg: ProcessorConfig, name: str = "video") -> VisualItem:
    """Resize every frame to one size, normalise, pad to a multiple of temporal_patch_size and patchify.

    transformers resizes videos with torchvision (antialiased bicubic on uint8 tensors), which is not installable
    beside CPU torch; we resize with PIL bicubic like the image path, so pixels may differ from transformers by a
    rounding step. Sizes, frame padding, patch order and the normalisation arithmetic (transformers' fused
    (x - 255*mean) / (255*std) in float32) match it. A one-frame clip is sized as two frames (transformers
    refuses it); it is padded to two anyway."""
    frames, tp = video.frames, cfg.temporal_patch_size
    n = len(frames)
    h, w = target_size(n, *(video.source_hw or frames.shape[1:3]), cfg, name)
    if frames.shape[1:3] != (h, w):
        frames = np.stack([_resize(f, h, w) for f in frames])
    P = cfg.patch_size
    grid = (-(-n // tp), h // P, w // P)
    return VisualItem("video", lambda: _video_patches(frames, cfg), grid,
                      calculate_timestamps(video.indices, video.fps, tp), content=frames)


def _video_patches(frames: np.ndarray, cfg: ProcessorConfig) -> torch.Tensor:
    mean = torch.tensor(cfg.video_mean) * (1.0 / cfg.video_rescale_factor)  # float32, as transformers fuses them
    std = torch.tensor(cfg.video_std) * (1.0 / cfg.video_rescale_factor)
    x = torch.from_numpy(np.ascontiguousarray(frames)).to(torch.float32).sub_(mean).div_(std)  # [n, h, w, C]
    return patchify(x.permute(0, 3, 1, 2), cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size)[0]


def target_size(n: int, height: int, width: int, cfg: ProcessorConfig, name: str = "video") -> tuple[int, int]:
    """The (h, w) every frame of an n-frame clip of height x width source frames is resized to."""
    tp, factor = cfg.temporal_patch_size, cfg.factor
    max_pixels = cfg.video_max_pixels
    if cfg.video_cap_pixels_per_frame:  # qwen-vl-utils' cap, as transformers' cap_pixels_per_frame=True
        per_frame = max(min(cfg.video_max_tokens_per_frame * factor * factor, cfg.video_max_pixels // n),
                        int(cfg.video_min_pixels * 1.05))
        max_pixels = per_frame * n
    try:
        return smart_resize_video(max(n, tp), height, width, tp, factor, cfg.video_min_pixels, max_pixels)
    except MediaError as e:
        raise MediaError(f"{name}: {e}") from None


def _resize(frame: np.ndarray, h: int, w: int) -> np.ndarray:
    return np.asarray(Image.fromarray(frame).resize((w, h), Image.Resampling.BICUBIC))


def _frames_array(src, limits: MediaLimits, name: str) -> np.ndarray:
    """A uint8 [T, H, W, 3] array or a list of PIL images -> [T, H, W, 3] uint8, within limits."""
    if isinstance(src, list):
        if not all(isinstance(f, Image.Image) for f in src):
            raise MediaError(f"{name}: a video given as a list must be a list of PIL images")
        if len({f.size for f in src}) > 1:
            raise MediaError(f"{name}: frames have different sizes: {sorted({f.size for f in src})}")
        if len(src) > limits.max_video_decoded_frames:
            raise MediaError(f"{name}: {len(src)} frames, above the limit of {limits.max_video_decoded_frames}")
        src = (np.stack([np.asarray(load_image(f, limits, f"{name} frame {k}")) for k, f in enumerate(src)])
               if src else np.zeros((0, 0, 0, 3), np.uint8))
    if src.dtype != np.uint8 or src.ndim != 4 or src.shape[-1] != 3:
        raise MediaError(f"{name}: expected a uint8 array [T, H, W, 3], got {src.dtype} {tuple(src.shape)}")
    if len(src) == 0:
        raise MediaError(f"{name}: video has no frames")
    if len(src) > limits.max_video_decoded_frames:
        raise MediaError(f"{name}: {len(src)} frames, above the limit of {limits.max_video_decoded_frames}")
    check_pixels(src.shape[2], src.shape[1], limits, name, "video frame")
    return src


def _check_fps(fps, name: str) -> float | None:
    if fps is None:
        return None
    if isinstance(fps, bool) or not isinstance(fps, numbers.Real) or not math.isfinite(fps) or fps <= 0:
        raise MediaError(f"{name}: fps must be a positive number, got {fps!r}")
    return float(fps)


def _check_volume(num_frames: int, height: int, width: int, limits: MediaLimits, name: str) -> None:
    if num_frames * height * width > limits.max_video_pixels:
        raise MediaError(f"{name}: {num_frames} sampled {width}x{height} frames hold {num_frames * height * width} "
                         f"pixels, above the limit of {limits.max_video_pixels} (MediaLimits.max_video_pixels)")


def _decode(source: bytes | Path, name: str, cfg: ProcessorConfig, limits: MediaLimits) -> VideoFrames:
    """Decode a video file under limits; PyAV's errors become MediaError."""
    try:
        import av
    except ImportError:
        raise MediaError(f"{name}: decoding video files needs PyAV (pip install av)") from None

    def open_container():
        return av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source), metadata_errors="ignore")

    try:
        with open_container() as container:
            stream = _video_stream(container, name)
            rate = stream.average_rate or stream.guessed_rate  # transformers reads average_rate
            fps = float(rate) if rate else DEFAULT_FPS
            total = stream.frames
            if total > limits.max_video_decoded_frames:
                raise MediaError(f"{name}: video declares {total} frames, above the limit of "
                                 f"{limits.max_video_decoded_frames} (MediaLimits.max_video_decoded_frames)")
            if total <= 0:  # no frame count in the container (e.g. Matroska/WebM): count by decoding
                total = sum(1 for _ in _decoded(container, name, limits))
        if total == 0:
            raise MediaError(f"{name}: video has no decodable frames")
        indices = sample_indices(total, fps, cfg, limits)
        with open_container() as container:
            (frames, source_hw), seen = _grab(container, indices, name, cfg, limits)
        if len(frames) < len(indices):  # the header promised more frames than the stream holds
            if seen < TRUNCATED_FRACTION * total:
                raise MediaError(f"{name}: video is truncated or corrupt: its header declares {total} frames but "
                                 f"only {seen} decode")
            total, indices = seen, sample_indices(seen, fps, cfg, limits)  # slightly wrong metadata: resample
            with open_container() as container:
                (frames, source_hw), _ = _grab(container, indices, name, cfg, limits)
    except MediaError:
        raise
    except MemoryError:
        raise
    except Exception as e:  # av.FFmpegError (a ValueError/OSError), or anything a hostile file provokes
        raise MediaError(f"{name}: corrupt, truncated or unsupported video ({type(e).__name__}: {e})") from None
    if len(frames) < len(indices):
        raise MediaError(f"{name}: video decodes differently on a second pass; refusing it")
    return VideoFrames(np.stack(frames), indices, fps, total, source_hw)


def _video_stream(container, name: str):
    fmt = container.format.name
    if fmt.endswith("_pipe") or fmt.startswith("image2"):
        raise MediaError(f"{name}: this is an image ({fmt.removesuffix('_pipe')}), not a video")
    if not container.streams.video:
        raise MediaError(f"{name}: no video stream in this {fmt} file")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return stream


def _decoded(container, name: str, limits: MediaLimits):
    """Decoded frames of the first video stream, refusing to decode more than the limit."""
    for i, frame in enumerate(container.decode(_video_stream(container, name))):
        if i >= limits.max_video_decoded_frames:
            raise MediaError(f"{name}: video has more than {limits.max_video_decoded_frames} frames "
                             "(MediaLimits.max_video_decoded_frames)")
        yield frame


def _grab(container, indices: list[int], name: str, cfg: ProcessorConfig,
          limits: MediaLimits) -> tuple[tuple[list[np.ndarray], tuple[int, int]], int]:
    """Decode up to the last wanted index, keeping the wanted frames as RGB arrays already resized to the clip's
    target size (so only one frame is ever held at source resolution). Returns (frames, source (H, W)) and how
    many frames were decoded."""
    wanted, last = set(indices), indices[-1]
    kept: dict[int, np.ndarray] = {}
    size = target = None
    seen = 0
    for i, frame in enumerate(_decoded(container, name, limits)):
        seen = i + 1
        if size is None:
            size = (frame.width, frame.height)
            check_pixels(*size, limits, name, "video frame")
            _check_volume(len(indices), size[1], size[0], limits, name)
            target = target_size(len(indices), size[1], size[0], cfg, name)
        if i in wanted:
            # A resolution change mid-stream is scaled back to the first frame's size.
            extra = {} if (frame.width, frame.height) == size else {"width": size[0], "height": size[1]}
            rgb = frame.to_ndarray(format="rgb24", **extra)
            kept[i] = rgb if rgb.shape[:2] == target else _resize(rgb, *target)
        if i >= last:
            break
    hw = (size[1], size[0]) if size else (0, 0)
    return ([kept[i] for i in indices if i in kept], hw), seen
