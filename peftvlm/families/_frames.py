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


VIDEO_CONFIG_FILE = "video_preprocessor_config.json"


def checkpoint_video_config(path, revision: str | None = None) -> dict:
    """The video-processor settings transformers would build the stock video processor from
    (`VideoProcessorMixin.get_video_processor_dict`: a nested `processor_config.json` entry,
    else `video_preprocessor_config.json`, else the image processor's config), or {} if none."""
    from transformers.video_processing_utils import VideoProcessorMixin

    try:
        config, _ = VideoProcessorMixin.get_video_processor_dict(str(path), revision=revision)
    except (OSError, ValueError):
        return {}
    return config


class VideoConfigMixin:
    """For a processor class whose `video_processor` is a NumPy frames processor: loading gives
    it the checkpoint's video settings (`configure(checkpoint_video_config(path))`), saving writes
    a video processor config back, so run folders and exports keep what trained."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        processor = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        processor.video_processor.configure(checkpoint_video_config(
            pretrained_model_name_or_path, kwargs.get("revision")))
        return processor

    def save_pretrained(self, save_directory, *args, **kwargs):
        import json
        from pathlib import Path

        out = super().save_pretrained(save_directory, *args, **kwargs)
        config = getattr(self.video_processor, "video_config", None)
        if config:
            Path(save_directory, VIDEO_CONFIG_FILE).write_text(
                json.dumps(config, indent=2, sort_keys=True) + "\n")
        return out
