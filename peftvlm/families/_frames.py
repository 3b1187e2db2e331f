"""Shared pieces of the NumPy video processors the video families carry (`qwen2_vl`,
`qwen3_vl`, `llava_onevision`).

transformers' video processors are built on torchvision, which does not load with this torch
build; the families' own frame processors do the same computation on decoded frames with NumPy
and Pillow. This module holds what they share: pairing clips with their timing (transformers'
own `make_batched_videos` / `make_batched_metadata`) and resizing + normalising frames.
"""

from __future__ import annotations

DEFAULT_FPS = 2.0  # what Qwen's and LLaVA-OneVision's processors assume without metadata


def clips_with_timing(videos, video_metadata=None, fps: float = DEFAULT_FPS) -> list:
    """`[(frames (T, H, W, 3) uint8 array, VideoMetadata)]` for a processor call's videos;
    a clip given without a rate is taken as sampled at `fps`."""
    import numpy as np
    from transformers.video_utils import make_batched_metadata, make_batched_videos

    clips = [np.asarray(v) for v in make_batched_videos(videos)]
    timing = make_batched_metadata(clips, video_metadata=video_metadata)
    for meta in timing:
        meta.fps = meta.fps or fps
    return list(zip(clips, timing))


def resize_normalise(video, height: int, width: int, rescale_factor: float, mean, std):
    """(T, H, W, 3) uint8 -> (T, 3, height, width) float32: Pillow bicubic resize (torchvision's
    interpolation differs by rounding), rescale, normalise."""
    import numpy as np
    from PIL import Image

    resized = np.stack([f if f.shape[:2] == (height, width) else
                        np.asarray(Image.fromarray(f).resize((width, height), Image.BICUBIC))
                        for f in video]).astype(np.float32) * rescale_factor
    mean, std = np.array(mean, np.float32), np.array(std, np.float32)
    return ((resized - mean) / std).transpose(0, 3, 1, 2)
