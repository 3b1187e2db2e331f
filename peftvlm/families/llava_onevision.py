"""LLaVA-OneVision (llava-hf/llava-onevision-qwen2-0.5b-ov-hf, -7b-, -72b-): a SigLIP tower, an
MLP projector and a Qwen2 language model, with anyres tiling up to 9 tiles ("anyres_max_9"):
the image-token count depends on the image's size (see `llava_next`). The stock processor wants
a torchvision video processor: `processor_class` is the image-only subclass, carrying
`OnevisionFramesVideoProcessor` (NumPy) for rows with videos. A clip is one `<video>` that the
processor (`LlavaOnevisionProcessor.replace_video_token`) expands to frames x pooled patches + 1
tokens: the model pools each frame's patch grid 2x2 (`apply_pooling`, ceil(side / 2) per side)
and appends one `image_newline` per clip.
"""

from __future__ import annotations

import functools
from pathlib import Path

from peftvlm.data.read.video import uneven_frames_error
from peftvlm.families._frames import VideoConfigMixin, clips_with_timing, resize_normalise
from peftvlm.families._processors import image_only
from peftvlm.families._tiny import save_tiny
from peftvlm.families._tokenizer import build_tiny_tokenizer
from peftvlm.families.base import FamilySpec, read_template

TEMPLATE_FILE = "llava-onevision-qwen2.jinja"  # llava-hf/llava-onevision-qwen2-*-hf's template
IMAGE_SIZE, PATCH = 32, 8
GRID_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]


UNIFORM_FRAMES = ("stacks a batch's clips into one (clips, frames, 3, H, W) tensor "
                  "(LlavaOnevisionModel.get_video_features), so every clip needs the same number "
                  "of frames")


class OnevisionFramesVideoProcessor:
    """transformers' `LlavaOnevisionVideoProcessor` over decoded frames, in NumPy and Pillow:
    every frame resized to the vision tower's square input (bicubic), rescaled and normalised,
    a batch's clips stacked as `pixel_values_videos`. Sizes and mean / std are the checkpoint's
    video config's when loaded (`configure`; transformers falls back to the image processor's
    config, and so do these), else the image processor's."""

    model_input_names = ["pixel_values_videos"]

    def __init__(self, image_processor, fps: float = 2.0):
        self.image_processor, self.fps, self.video_config = image_processor, fps, None
        self.size = dict(image_processor.size)
        self.image_mean, self.image_std = image_processor.image_mean, image_processor.image_std
        self.rescale_factor = image_processor.rescale_factor

    def configure(self, config: dict) -> None:
        """Take a video processor config's settings (`_frames.checkpoint_video_config`)."""
        for name in ("size", "image_mean", "image_std", "rescale_factor", "fps"):
            if config.get(name) is not None:
                setattr(self, name, config[name])
        if config.get("video_processor_type"):
            self.video_config = dict(config)

    def __call__(self, videos, video_metadata=None, **kwargs):
        import numpy as np
        from transformers import BatchFeature

        clips = clips_with_timing(videos, video_metadata, self.fps)
        frames = [resize_normalise(v, self.size["height"], self.size["width"],
                                   self.rescale_factor, self.image_mean, self.image_std)
                  for v, _ in clips]
        if len({len(f) for f in frames}) > 1:
            raise uneven_frames_error(SPEC, {len(f) for f in frames})
        return BatchFeature({"pixel_values_videos": np.stack(frames),
                             "video_metadata": [meta for _, meta in clips]})


@functools.cache
def processor_class():
    """`LlavaOnevisionProcessor` without its video processor (see `_processors.image_only`)."""
    from transformers import LlavaOnevisionProcessor

    def __init__(self, image_processor=None, tokenizer=None, num_image_tokens=None,
                 vision_feature_select_strategy=None, chat_template=None, image_token="<image>",
                 video_token="<video>", vision_aspect_ratio="anyres_max_9", **kwargs):
        LlavaOnevisionProcessor.__init__(
            self, image_processor, tokenizer, None, num_image_tokens=num_image_tokens,
            vision_feature_select_strategy=vision_feature_select_strategy,
            chat_template=chat_template, image_token=image_token, video_token=video_token,
            vision_aspect_ratio=vision_aspect_ratio, **kwargs)
        # Not a sub-processor (nothing saved or looked up): turns frame arrays into video inputs.
        self.video_processor = OnevisionFramesVideoProcessor(image_processor)

    return image_only(LlavaOnevisionProcessor, __init__, (VideoConfigMixin,))


def build_tiny(out_dir: Path) -> None:
    """A 2-layer random LLaVA-OneVision (SigLIP + Qwen2) with 32px tiles, up to 2x2."""
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil)

    template = read_template(TEMPLATE_FILE)
    tok = build_tiny_tokenizer(["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<image>",
                                "<video>"], chat_template=template, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>")
    image_proc = LlavaOnevisionImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                                 image_grid_pinpoints=GRID_PINPOINTS)
    processor = processor_class()(image_processor=image_proc, tokenizer=tok,
                                  num_image_tokens=(IMAGE_SIZE // PATCH) ** 2,
                                  vision_feature_select_strategy="full", chat_template=template)
    vision = dict(model_type="siglip_vision_model", image_size=IMAGE_SIZE, patch_size=PATCH,
                  hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, vision_use_head=False)
    text = dict(model_type="qwen2", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=1024, pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config = AutoConfig.for_model("llava_onevision", vision_config=vision, text_config=text,
                                  image_token_index=tok.convert_tokens_to_ids("<image>"),
                                  video_token_index=tok.convert_tokens_to_ids("<video>"),
                                  image_grid_pinpoints=GRID_PINPOINTS,
                                  vision_feature_select_strategy="full", vision_feature_layer=-1)
    model = AutoModelForImageTextToText.from_config(config)
    save_tiny(model, processor, out_dir, tok.pad_token_id, tok.eos_token_id)


SPEC = FamilySpec(
    name="llava_onevision",
    model_types=("llava_onevision",),
    vision_module="model.vision_tower",
    projector_module="model.multi_modal_projector",
    language_module="model.language_model",
    projector_targets=("linear_1", "linear_2"),
    image_token="<image>",
    media_tokens=("<video>",),
    end_of_turn="<|im_end|>",
    takes_video=True,
    uniform_video_frames=UNIFORM_FRAMES,
    tiny_name="tiny-llava-onevision",
    build_tiny=build_tiny,
    reference_checkpoint="llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
    processor_class=processor_class,
    vision_cls_token=False,  # SigLIP
    refused_methods=(("per_part", "VPT prompt tokens need a CLS-token ViT; LLaVA-OneVision's "
                      "SigLIP tower has none and anyres tiling expects exactly its patch grid"),),
)
