"""Images: decode any accepted source into an RGB PIL image without trusting it, and turn it into vision-tower
patches exactly as transformers' `Qwen2VLImageProcessorPil` does.

Also owns what images and videos share: reading a path / bytes / data URL under a byte limit, `smart_resize`,
and `patchify` (merge-block row order, spec §3.4)."""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from qwen35.multimodal.config import MediaLimits, ProcessorConfig
from qwen35.multimodal.items import MediaError, VisualItem

# Formats Image.open may pick. Everything else (EPS runs Ghostscript, plus dozens of rarely-fuzzed plugins) is
# refused as "not a supported image".
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "AVIF", "PPM", "QOI")
MAX_ASPECT_RATIO = 200
STRIP_ROWS = 256  # image rows normalised at a time


def load_image(src, limits: MediaLimits = MediaLimits(), name: str | None = None) -> Image.Image:
    """Decode `src` into an RGB image, or raise MediaError naming `name` (default: the path, "data URL", ...).

    `src` is a PIL image, a path (str or Path), raw bytes, a `data:<type>;base64,<data>` URL, or a uint8 numpy
    array H x W (grey), H x W x 3 (RGB) or H x W x 4 (RGBA); float arrays are refused rather than guessed at.
    Encoded sources get their EXIF orientation applied (as transformers' `load_image` does for paths and URLs);
    PIL images and arrays are taken as they are (as transformers' processors do). Transparency is composited
    onto white, as `to_rgb`. The declared size is checked against `limits` before any pixel is decoded."""
    if isinstance(src, Image.Image):
        name = name or "image"
        check_pixels(src.width, src.height, limits, name)
        try:
            src.load()  # a lazily opened image decodes here
            return to_rgb(src)
        except MemoryError:
            raise
        except Exception as e:  # a broken lazily opened file, or a mode PIL cannot convert (e.g. "La")
            raise MediaError(f"{name}: cannot decode or convert this {src.mode} image "
                             f"({type(e).__name__}: {e})") from None
    if isinstance(src, np.ndarray):
        return Image.fromarray(_array_to_rgb(src, limits, name or "image array"))
    data, name = read_source(src, limits.max_image_bytes, "image", name)
    fp = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        with warnings.catch_warnings():
            # Our own pixel limit is checked below; PIL's warning would only duplicate it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(fp, formats=_formats()) as im:
                check_pixels(im.width, im.height, limits, name)  # Image.open is lazy: nothing is decoded yet
                im.load()
                try:
                    image = ImageOps.exif_transpose(im)
                except Exception:  # a malformed EXIF block should not cost the user a good image
                    image = im.copy()
            return to_rgb(image)
    except MediaError:
        raise
    except Image.DecompressionBombError as e:
        raise MediaError(f"{name}: declared image size is too large to decode safely ({e})") from None
    except UnidentifiedImageError:
        raise MediaError(f"{name}: not an image in a supported format ({', '.join(IMAGE_FORMATS)})") from None
    except MemoryError:
        raise
    except Exception as e:  # PIL signals corrupt data with OSError, SyntaxError, ValueError, zlib/struct errors
        raise MediaError(f"{name}: corrupt or truncated image ({type(e).__name__}: {e})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """transformers' `convert_to_rgb`: anything with alpha (or a transparency key) is composited onto white."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def smart_resize(height: int, width: int, factor: int = 32, min_pixels: int = 65536,
                 max_pixels: int = 16777216) -> tuple[int, int]:
    """transformers' qwen2_vl `smart_resize`: sides become multiples of `factor`, area is kept within
    [min_pixels, max_pixels] at about the same aspect ratio (spec §3.2). Python's round is banker's rounding."""
    if min(height, width) <= 0:
        raise MediaError(f"image has no pixels ({height}x{width})")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise MediaError(f"image aspect ratio {max(height, width) / min(height, width):.1f} ({width}x{height}) is "
                         f"above the limit of {MAX_ASPECT_RATIO}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def process_image(image: Image.Image, cfg: ProcessorConfig, name: str = "image") -> VisualItem:
    """Resize (PIL bicubic), rescale, normalise and patchify one image; bit-identical to
    `Qwen2VLImageProcessorPil` with the same settings, including its arithmetic (float64 rescale, float32
    normalise). `name` labels errors (an aspect ratio above 200)."""
    image = to_rgb(image)
    try:
        h, w = smart_resize(image.height, image.width, cfg.factor, cfg.image_min_pixels, cfg.image_max_pixels)
    except MediaError as e:
        raise MediaError(f"{name}: {e}") from None
    if (h, w) != (image.height, image.width):
        image = image.resize((w, h), Image.Resampling.BICUBIC)
    pixels = np.asarray(image)  # kept as uint8 until the tower asks for the float patches
    return VisualItem("image", lambda: _image_patches(pixels, cfg), (1, h // cfg.patch_size, w // cfg.patch_size),
                      content=pixels)


def _image_patches(pixels: np.ndarray, cfg: ProcessorConfig) -> torch.Tensor:
    h = pixels.shape[0]
    mean, std = np.array(cfg.image_mean, np.float32), np.array(cfg.image_std, np.float32)
    x = np.empty(pixels.shape, np.float32)  # [H, W, C]
    for r in range(0, h, STRIP_ROWS):  # in strips: the float64 step would otherwise cost 8 bytes per value at once
        x[r:r + STRIP_ROWS] = ((pixels[r:r + STRIP_ROWS].astype(np.float64) * cfg.rescale_factor).astype(np.float32)
                               - mean) / std
    frames = torch.from_numpy(x).permute(2, 0, 1)[None]  # [1, C, H, W]
    return patchify(frames, cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size)[0]


def patchify(frames: torch.Tensor, patch_size: int, merge_size: int,
             temporal_patch_size: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """[T, C, H, W] -> ([gt*gh*gw, C*tp*P*P], (gt, gh, gw)), rows in merge-block order (spec §3.4).

    T is padded to a multiple of temporal_patch_size by repeating the last frame (so an image is seen twice)."""
    T, C, H, W = frames.shape
    P, m, tp = patch_size, merge_size, temporal_patch_size
    if H % (P * m) or W % (P * m):
        raise ValueError(f"frame size {H}x{W} is not a multiple of patch_size * merge_size = {P * m}")
    if T == 1:  # an image: a view repeating it, so the only copy made is the patches themselves
        frames, pad = frames.expand(tp, -1, -1, -1), tp - 1
    elif pad := -T % tp:
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)])
    gt, gh, gw = (T + pad) // tp, H // P, W // P
    x = frames.reshape(gt, tp, C, gh // m, m, P, gw // m, m, P)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (gt, block row, block col, in-block row, in-block col, C, tp, y, x)
    return x.reshape(gt * gh * gw, C * tp * P * P), (gt, gh, gw)


def read_source(src, max_bytes: int, what: str, name: str | None = None) -> tuple[bytes | Path, str]:
    """A path, raw bytes or base64 data URL -> (Path or bytes, display name), refusing more than max_bytes.

    http(s) URLs are refused: fetching (timeouts, redirects, private addresses) is the server's job."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        name = name or f"{what} bytes"
        data = bytes(src)
    elif isinstance(src, str) and src.startswith("data:"):
        name = name or "data URL"
        header, sep, payload = src.partition(",")
        if not sep or not header.endswith(";base64"):
            raise MediaError(f"{name}: only base64 data URLs are supported (data:<type>;base64,<data>)")
        if len(payload) // 4 * 3 > max_bytes + 3:
            raise MediaError(f"{name}: {what} is larger than the limit of {max_bytes} bytes")
        try:
            data = base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError) as e:
            raise MediaError(f"{name}: data URL payload is not valid base64 ({e})") from None
    elif isinstance(src, str) and src.startswith(("http://", "https://")):
        raise MediaError(f"{_short(src)}: {what} URLs must be fetched by the caller; pass the bytes")
    elif isinstance(src, (str, os.PathLike)):
        path = Path(src)
        name = name or _short(str(path))
        try:
            st = path.stat()
        except OSError as e:
            raise MediaError(f"{name}: cannot read {what} file ({e.strerror or e})") from None
        if not path.is_file():
            raise MediaError(f"{name}: not a regular file")
        if st.st_size > max_bytes:
            raise MediaError(f"{name}: {what} file is {st.st_size} bytes, above the limit of {max_bytes}")
        if st.st_size == 0:
            raise MediaError(f"{name}: {what} file is empty")
        return path, name
    else:
        raise MediaError(f"{name or what}: unsupported {what} source of type {type(src).__name__}")
    if len(data) > max_bytes:
        raise MediaError(f"{name}: {what} is {len(data)} bytes, above the limit of {max_bytes}")
    if not data:
        raise MediaError(f"{name}: {what} data is empty")
    return data, name


def _array_to_rgb(a: np.ndarray, limits: MediaLimits, name: str) -> np.ndarray:
    """uint8 H x W [x 1|3|4] -> H x W x 3; RGBA blended onto white with transformers' numpy arithmetic."""
    if a.dtype != np.uint8:
        raise MediaError(f"{name}: expected a uint8 array, got {a.dtype} (scale floats yourself: "
                         "(x * 255).round().astype(np.uint8))")
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    if a.ndim != 3 or a.shape[-1] not in (3, 4):
        raise MediaError(f"{name}: expected an H x W, H x W x 3 or H x W x 4 array, got shape {a.shape}")
    check_pixels(a.shape[1], a.shape[0], limits, name)
    if a.shape[-1] == 4:
        alpha = a[..., 3:4] / 255
        a = np.round(alpha * a[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return np.ascontiguousarray(a)


def check_pixels(width: int, height: int, limits: MediaLimits, name: str, what: str = "image") -> None:
    """An image (or one video frame, what="video frame") must have pixels and at most max_image_pixels of them."""
    if width <= 0 or height <= 0:
        raise MediaError(f"{name}: {what} has no pixels ({width}x{height})")
    if width * height > limits.max_image_pixels:
        raise MediaError(f"{name}: {width}x{height} {what} has {width * height} pixels, above the limit of "
                         f"{limits.max_image_pixels} (MediaLimits.max_image_pixels)")


def _formats() -> list[str]:
    Image.init()
    return [f for f in IMAGE_FORMATS if f in Image.OPEN]


def _short(text: str, n: int = 120) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."
