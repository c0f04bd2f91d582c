"""The objects preprocessing hands to the rest of the engine: a processed visual item, decoded video frames, and
the one error type bad media raises."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import hashlib

import numpy as np
import torch


class MediaError(ValueError):
    """An image or video that cannot be used: unreadable, truncated, too large, or of an unusable shape.

    The message names the source (a path, "data URL", "image 2", ...) and the problem, so a server can return it
    to the client as a 400 as is."""


class VisualItem:
    """One image or video, ready for the vision tower.

    `pixel_values` is [t*h*w, C*T*P*P] float32, rows in merge-block order. The processors keep the resized uint8
    frames instead and make the float rows only when asked (8x less memory for an image while it waits for the
    tower: float32, and each image seen twice)."""

    def __init__(self, kind: str, pixel_values: torch.Tensor | Callable[[], torch.Tensor],
                 grid_thw: tuple[int, int, int], timestamps: list[float] | None = None,
                 content: np.ndarray | None = None):
        """content: the resized uint8 pixels the rows are made from (hashed for the prefix cache instead of the
        8x larger float rows)."""
        self.kind = kind  # "image" or "video"
        self._pixels = pixel_values  # the tensor, or a function making it
        self.grid_thw = tuple(grid_thw)  # (t, h, w) in patches
        self.timestamps = timestamps  # video only: seconds, one per temporal patch
        self._content = content

    @property
    def pixel_values(self) -> torch.Tensor:
        return self._pixels() if callable(self._pixels) else self._pixels

    def digest(self) -> bytes:
        """A hash of what the vision tower will see: two items with one digest embed alike."""
        h = hashlib.blake2b(f"{self.kind} {self.grid_thw} {self.timestamps}".encode(), digest_size=16)
        data = self._content if self._content is not None else self.pixel_values.numpy()
        h.update(np.ascontiguousarray(data).data)
        return h.digest()

    def num_tokens(self, merge_size: int) -> int:
        """Placeholder tokens the item occupies in the prompt: patches / merge_size**2."""
        t, h, w = self.grid_thw
        return t * h * w // merge_size**2

    def __repr__(self) -> str:
        return f"VisualItem({self.kind!r}, grid_thw={self.grid_thw})"


@dataclass
class VideoFrames:
    """Frames sampled from a video, before resizing."""

    frames: np.ndarray  # [n, H, W, 3] uint8 RGB
    indices: list[int]  # index of each sampled frame in the source video
    fps: float  # native frame rate of the source (24.0 when it was unknown, as transformers assumes)
    total_num_frames: int  # frames in the source video
    source_hw: tuple[int, int] | None = None  # (H, W) at source resolution when `frames` are already resized
