"""From what a caller sends to what the engine takes: media sources (chat content parts, `multi_modal_data`) are
resolved under a `MediaPolicy`, decoded and processed into VisualItems, and the prompt's placeholders expanded.

Chat messages carry media as OpenAI parts (`image_url`, `video_url`: a data: URL, a local path or file:// URL when
a local media directory is allowed, an http(s) URL when remote fetching is allowed) or as Python objects
(`{"type": "image", "image": <PIL image | path | array>}`, likewise `video`). `split_chat_media` swaps every such
part for a bare `{"type": "image"}` / `{"type": "video"}`, which is what chat templates render as placeholders, and
returns the sources in order.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from qwen35.multimodal.config import MediaLimits, ProcessorConfig
from qwen35.multimodal.fetch import fetch, fetch_sync
from qwen35.multimodal.image import load_image, process_image
from qwen35.multimodal.items import MediaError, VisualItem
from qwen35.multimodal.prompt import MultimodalPrompt, VisionTokens, expand_prompt
from qwen35.multimodal.video import load_video, process_video

IMAGE_PARTS = ("image_url", "input_image", "image", "image_pil")
VIDEO_PARTS = ("video_url", "video")


@dataclass(frozen=True)
class MediaPolicy:
    """Where URL-named media may come from. data: URLs are always accepted."""

    allowed_local_media_path: Path | None = None  # local files (plain paths, file:// URLs) only inside this folder
    allow_remote_media: bool = False  # fetch http(s) URLs (from public addresses only; see multimodal.fetch)
    remote_timeout: float = 10.0  # seconds for one whole fetch, redirects included
    allowed_media_domains: frozenset[str] | None = None  # if set, fetch from these hosts only, wherever they resolve

    @staticmethod
    def of(allowed_local_media_path=None, allow_remote_media: bool = False, allowed_media_domains=None,
           remote_timeout: float = 10.0) -> "MediaPolicy":
        """From the LLM / server arguments, checked."""
        if not (isinstance(remote_timeout, (int, float)) and 0 < remote_timeout < float("inf")):
            raise ValueError(f"media_fetch_timeout must be a positive number of seconds, got {remote_timeout!r}")
        if isinstance(allowed_media_domains, str):
            allowed_media_domains = [allowed_media_domains]
        hosts = None if allowed_media_domains is None else frozenset(
            host.lower().strip("[]") for host in allowed_media_domains)  # "[::1]" is spelled ::1 in a URL's hostname
        root = Path(allowed_local_media_path) if allowed_local_media_path else None
        return MediaPolicy(root, allow_remote_media, float(remote_timeout), hosts)


@dataclass
class URLSource:
    """A media reference from a chat part, resolved under the policy when it is loaded."""

    url: str
    data: bytes | None = None  # the body, once an http(s) URL is fetched


def split_chat_media(messages: list) -> tuple[list, list, list]:
    """(messages with media parts replaced by placeholder parts, image sources, video sources)."""
    out, images, videos = [], [], []
    for msg in messages:
        content = msg.get("content") if isinstance(msg, Mapping) else None
        if not isinstance(content, list):
            out.append(msg)
            continue
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind in IMAGE_PARTS or (kind is None and isinstance(part, Mapping) and "image" in part):
                images.append(_part_source(part, kind or "image"))
                parts.append({"type": "image"})
            elif kind in VIDEO_PARTS or (kind is None and isinstance(part, Mapping) and "video" in part):
                videos.append(_part_source(part, kind or "video"))
                parts.append({"type": "video"})
            else:
                parts.append(part)
        out.append({**msg, "content": parts})
    return out, images, videos


def _part_source(part: Mapping, kind: str):
    if kind in ("image_url", "video_url", "input_image"):
        ref = part.get(kind)
        url = ref.get("url") if isinstance(ref, Mapping) else ref
        if not isinstance(url, str) or not url:
            raise MediaError(f"a {kind} content part needs a URL ({kind}: {{\"url\": ...}})")
        return URLSource(url)
    src = part.get(kind) if kind in part else part.get("image" if kind == "image_pil" else kind)
    if src is None:
        raise MediaError(f"a {kind} content part has no {kind!r} entry")
    return src


def resolve(src, policy: MediaPolicy, max_bytes: int, what: str):
    """A URLSource -> something load_image / load_video take (bytes, a path or the data URL); others unchanged."""
    if not isinstance(src, URLSource):
        return src
    if src.data is not None:
        return src.data
    url = src.url
    if url.startswith("data:"):
        return url
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        _check_remote(url, policy, what)
        return fetch_sync(url, max_bytes, policy.remote_timeout, policy.allowed_media_domains, f"{what} URL")
    if scheme in ("", "file") or (len(scheme) == 1 and url[1:3] == ":\\"):  # a path (or a Windows drive letter)
        path = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path) if scheme == "file" else url)
        root = policy.allowed_local_media_path
        if root is None:
            raise MediaError(f"{what} {url[:80]}: local files are not allowed (start the server with "
                             "--allowed-local-media-path DIR, or send a data: URL)")
        try:
            real, root = path.resolve(), Path(root).resolve()
        except (OSError, RuntimeError) as e:  # a symlink loop: RuntimeError before Python 3.13, OSError after
            raise MediaError(f"{what} {url[:80]}: cannot resolve this path ({e})") from None
        if not real.is_relative_to(root):
            raise MediaError(f"{what} {url[:80]}: outside the allowed local media folder {root}")
        return real
    raise MediaError(f"{what} URL {url[:80]}: unsupported scheme {scheme!r} (use data:, http(s): or a local path)")


def _check_remote(url: str, policy: MediaPolicy, what: str) -> None:
    if not policy.allow_remote_media:
        raise MediaError(f"{what} URL {url[:80]}: fetching http(s) media is disabled (start the server with "
                         "--allow-remote-media, or send a data: URL)")


async def fetch_remote_media(images: list, videos: list, policy: MediaPolicy, limits: MediaLimits
                             ) -> tuple[list, list]:
    """The sources with every http(s) URLSource fetched, concurrently and on the running event loop (a slow host
    then holds no worker thread that other requests wait for). Counts are checked first: nothing is fetched for a
    request that will be refused."""
    limits.check_counts(len(images), len(videos))

    async def one(src, max_bytes: int, what: str):
        if not (isinstance(src, URLSource) and src.data is None
                and urllib.parse.urlsplit(src.url).scheme.lower() in ("http", "https")):
            return src
        _check_remote(src.url, policy, what)
        return URLSource(src.url, await fetch(src.url, max_bytes, policy.remote_timeout,
                                              policy.allowed_media_domains, f"{what} URL"))

    tasks = [asyncio.ensure_future(one(src, limits.max_image_bytes, _item_name("image", k, len(images))))
             for k, src in enumerate(images, 1)]
    tasks += [asyncio.ensure_future(one(src, limits.max_video_bytes, _item_name("video", k, len(videos))))
              for k, src in enumerate(videos, 1)]
    try:
        done = await asyncio.gather(*tasks)
    finally:
        for task in tasks:  # one failure ends the request: stop the other fetches now, not at their deadlines
            task.cancel()
    return done[:len(images)], done[len(images):]


def _item_name(kind: str, k: int, count: int) -> str:
    return f"{kind} {k}" if count > 1 else kind


def as_list(x) -> list:
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) and not _is_frames_pair(x) else [x]


def video_list(x) -> list:
    """`multi_modal_data["video"]`: one video (a path, an array, a list of PIL frames, (frames, fps)) or a list."""
    if isinstance(x, list) and x and all(isinstance(f, Image.Image) for f in x):
        return [x]  # a list of PIL images is the frames of one video
    return as_list(x)


def _is_frames_pair(x) -> bool:
    # (frames, fps) is one video, not two items
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], (int, float)) and not isinstance(x[1], bool)


def process_media(images: list, videos: list, cfg: ProcessorConfig, limits: MediaLimits,
                  policy: MediaPolicy = MediaPolicy()) -> tuple[list[VisualItem], list[VisualItem]]:
    """Load and process every source (VisualItems pass through). Errors name the item: "image 2", "video 1"."""
    limits.check_counts(len(images), len(videos))
    out_images, out_videos = [], []
    for k, src in enumerate(images, 1):
        if isinstance(src, VisualItem):
            out_images.append(src)
            continue
        name = _item_name("image", k, len(images))
        img = load_image(resolve(src, policy, limits.max_image_bytes, name), limits, _name(src, name))
        out_images.append(process_image(img, cfg, name))
    for k, src in enumerate(videos, 1):
        if isinstance(src, VisualItem):
            out_videos.append(src)
            continue
        name = _item_name("video", k, len(videos))
        frames = load_video(resolve(src, policy, limits.max_video_bytes, name), cfg, limits, _name(src, name))
        out_videos.append(process_video(frames, cfg, name))
    return out_images, out_videos


def _name(src, default: str) -> str | None:
    # paths name themselves; a URL the client sent is quoted back; everything else is "image 2" etc.
    if isinstance(src, URLSource):
        return default if src.url.startswith("data:") else f"{default} {src.url[:100]}"
    return None if isinstance(src, (str, Path)) and not str(src).startswith("data:") else default


def prepare_prompt(token_ids: list[int], images: list, videos: list, model_config, cfg: ProcessorConfig,
                   encode, limits: MediaLimits = MediaLimits(), policy: MediaPolicy = MediaPolicy()
                   ) -> tuple[list[int], MultimodalPrompt | None]:
    """Process the media of one prompt and expand its placeholders; (token_ids, None) when it has none."""
    tokens = VisionTokens.of(model_config)
    if not images and not videos:
        if any(t in (tokens.image, tokens.video) for t in token_ids) and model_config.is_multimodal:
            raise MediaError("the prompt has image/video placeholders but no image or video was given")
        return list(token_ids), None
    if model_config.vision is None:
        raise MediaError(f"this model ({model_config.model_type}) has no vision tower: it takes text only")
    image_items, video_items = process_media(images, videos, cfg, limits, policy)
    return expand_prompt(token_ids, image_items, video_items, tokens, cfg.merge_size, encode)
