"""Multimodal preprocessing: images and videos in, `VisualItem`s (patches + grid) out, ready for the vision tower.

    cfg = ProcessorConfig.from_dir(checkpoint_dir, vision=model_config.vision)
    item = process_image(load_image("cat.png", limits), cfg)             # VisualItem(kind="image", ...)
    clip = process_video(load_video("clip.mp4", cfg, limits), cfg)       # VisualItem(kind="video", timestamps=...)

Bad media raises `MediaError` (a ValueError) whose message names the source and the problem.
"""

from qwen35.multimodal.config import MediaLimits, ProcessorConfig
from qwen35.multimodal.image import load_image, patchify, process_image, smart_resize, to_rgb
from qwen35.multimodal.items import MediaError, VideoFrames, VisualItem
from qwen35.multimodal.video import (calculate_timestamps, load_video, process_video, sample_indices,
                                     smart_resize_video)

__all__ = [
    "MediaError", "MediaLimits", "ProcessorConfig", "VideoFrames", "VisualItem", "calculate_timestamps",
    "load_image", "load_video", "patchify", "process_image", "process_video", "sample_indices", "smart_resize",
    "smart_resize_video", "to_rgb",
]
