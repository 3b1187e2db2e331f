"""Qwen2-VL and Qwen2.5-VL (Qwen/Qwen2-VL-*, Qwen/Qwen2.5-VL-*): a native-resolution ViT whose
patch merger is the projector, and a Qwen2 language model with multimodal rotary positions.

Both ship the same ChatML template (`<|im_start|>role ... <|im_end|>`). Qwen2-VL writes
boxes as 0-1000 integers between box tokens; Qwen2.5-VL writes JSON `bbox_2d` in absolute
pixels of its resized input (see peftvlm/data/boxes.py). Their processors ask for a video
processor, which needs torchvision; `processor_class` is an image-only subclass that loads
without it and carries `FramesVideoProcessor` (NumPy) for rows with videos.
"""

from __future__ import annotations

import functools
from pathlib import Path

from peftvlm.families._frames import VideoConfigMixin, clips_with_timing, resize_normalise
from peftvlm.families._tiny import save_tiny, widen_output_embeddings
from peftvlm.families._tokenizer import build_tiny_tokenizer
from peftvlm.families.base import FamilySpec, read_template

# The template Qwen2-VL-*-Instruct and Qwen2.5-VL-*-Instruct publish (byte-identical).
PUBLISHED_TEMPLATE = "qwen2-vl"

PATCH, MERGE = 8, 2
SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>", "<|endoftext|>")


class FramesVideoProcessor:
    """Qwen2-VL's video preprocessing over decoded frames, in NumPy and Pillow.

    transformers' `Qwen2VLVideoProcessor` imports torchvision, which does not load with this
    torch build. This is the same computation (frames resized to a pixel budget on a multiple of
    patch x merge, rescaled, normalised, grouped `temporal_patch_size` frames per patch with the
    last frame repeated to fill a group), returning the model's `pixel_values_videos` +
    `video_grid_thw`, and the clips' `video_metadata` (passed in by the collator: the source's
    rate, frame count and the indices used) from which the processor derives timing. Settings
    come from the checkpoint's video processor config when loaded (`configure`, resolved as
    transformers resolves it, falling back to the image processor's config as it does), else
    from the image processor. Resizing is Pillow's bicubic, not torchvision's, so pixels may
    differ from the stock processor's by interpolation rounding. Qwen3-VL subclasses
    `target_size` (its budget spans all frames).
    """

    model_input_names = ["pixel_values_videos", "video_grid_thw"]
    SETTINGS = ("patch_size", "merge_size", "temporal_patch_size", "image_mean", "image_std",
                "rescale_factor", "fps")

    def __init__(self, image_processor, fps: float = 2.0):
        self.image_processor, self.fps, self.video_config = image_processor, fps, None
        for name in self.SETTINGS[:-1]:
            setattr(self, name, getattr(image_processor, name))
        self.min_pixels = image_processor.size["shortest_edge"]
        self.max_pixels = image_processor.size["longest_edge"]

    def configure(self, config: dict) -> None:
        """Take the settings of a video processor config (`_frames.checkpoint_video_config`);
        one that names a video processor is kept, to be saved with the processor."""
        for name in self.SETTINGS:
            if config.get(name) is not None:
                setattr(self, name, config[name])
        size = config.get("size") or {}
        self.min_pixels = config.get("min_pixels") or size.get("shortest_edge", self.min_pixels)
        self.max_pixels = config.get("max_pixels") or size.get("longest_edge", self.max_pixels)
        if config.get("video_processor_type"):
            self.video_config = dict(config)

    def __call__(self, videos, video_metadata=None, **kwargs):
        import numpy as np
        from transformers import BatchFeature

        patches, grids, timing = [], [], []
        for video, meta in clips_with_timing(videos, video_metadata, self.fps):
            video_patches, grid = self.patchify(self.frames(video))
            patches.append(video_patches)
            grids.append(grid)
            timing.append(meta)
        return BatchFeature({"pixel_values_videos": np.concatenate(patches).astype(np.float32),
                             "video_grid_thw": np.array(grids, dtype=np.int64),
                             "video_metadata": timing})

    def _merge_and_standardize_kwargs(self, **videos_kwargs) -> dict:
        """The settings a processor call uses: its `videos_kwargs` over this processor's own, with
        `size` as {shortest_edge, longest_edge} pixels. transformers' video-processor API: since
        5.25 the processors' `_get_num_multimodal_tokens` reads `merge_size` from it and passes
        it back to `get_num_of_video_patches`."""
        settings = {name: getattr(self, name) for name in self.SETTINGS}
        settings["size"] = {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}
        settings.update({k: v for k, v in videos_kwargs.items() if v is not None})
        return settings

    def target_size(self, num_frames: int, height: int, width: int,
                    settings: dict | None = None) -> tuple[int, int]:
        """(height, width) every frame is resized to: Qwen2-VL's `smart_resize` per frame."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        s = settings or self._merge_and_standardize_kwargs()
        return smart_resize(height, width, factor=s["patch_size"] * s["merge_size"],
                            min_pixels=s["size"]["shortest_edge"],
                            max_pixels=s["size"]["longest_edge"])

    def get_num_of_video_patches(self, num_frames: int, height: int, width: int,
                                 videos_kwargs=None) -> int:
        """Patches of a clip of this size (transformers' video-processor API, which the
        processor's `_get_num_multimodal_tokens` calls)."""
        s = self._merge_and_standardize_kwargs(**(videos_kwargs or {}))
        h, w = self.target_size(num_frames, height, width, s)
        return -(-num_frames // s["temporal_patch_size"]) * (h // s["patch_size"]) \
            * (w // s["patch_size"])

    def frames(self, video):
        """(T, H, W, 3) uint8 -> (T, 3, h, w) float32, resized and normalised."""
        h, w = self.target_size(len(video), *video.shape[1:3])
        return resize_normalise(video, h, w, self.rescale_factor, self.image_mean, self.image_std)

    def patchify(self, video):
        """(T, C, H, W) -> (grid_t * grid_h * grid_w, C * t * p * p) patches and [t, h, w]."""
        import numpy as np

        t, p, m = self.temporal_patch_size, self.patch_size, self.merge_size
        if pad := -len(video) % t:
            video = np.concatenate([video, np.repeat(video[-1:], pad, axis=0)])
        frames, channels, height, width = video.shape
        grid_t, grid_h, grid_w = frames // t, height // p, width // p
        patches = video.reshape(grid_t, t, channels, grid_h // m, m, p, grid_w // m, m, p)
        patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return patches.reshape(grid_t * grid_h * grid_w, channels * t * p * p), \
            [grid_t, grid_h, grid_w]


def _image_only(processor_cls, video_processor_cls=FramesVideoProcessor):
    """A subclass of a Qwen processor whose sub-processors are the image processor and tokenizer.

    `ProcessorMixin` reads sub-processors from the `__init__` signature, so leaving
    `video_processor` out of it keeps transformers from looking for the torchvision-backed video
    processor when building, saving or loading; `video_processor_cls` (NumPy) takes its place.
    """

    class ImageOnlyProcessor(VideoConfigMixin, processor_cls):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            # The parent's __init__ insists on a video processor: set what it sets, skip the rest.
            # (Qwen3-VL's also wraps each temporal patch of a clip in vision start/end tokens.)
            for name, default in (("image", "<|image_pad|>"), ("video", "<|video_pad|>"),
                                  ("vision_start", "<|vision_start|>"),
                                  ("vision_end", "<|vision_end|>")):
                token = getattr(tokenizer, f"{name}_token", default)
                setattr(self, f"{name}_token", token)
                setattr(self, f"{name}_token_id", tokenizer.convert_tokens_to_ids(token))
            super(processor_cls, self).__init__(image_processor, tokenizer,
                                                chat_template=chat_template)
            # Not a sub-processor (nothing saved or looked up): turns frame arrays into video
            # inputs when rows carry videos.
            self.video_processor = video_processor_cls(image_processor)

    # transformers writes `__name__` into saved configs as `processor_class`: saved and exported
    # folders then name the stock class, as Hub checkpoints do.
    ImageOnlyProcessor.__name__ = processor_cls.__name__
    ImageOnlyProcessor.__qualname__ = "ImageOnly" + processor_cls.__name__
    return ImageOnlyProcessor


@functools.cache
def processor_class(version: str):
    """The image-only processor class of Qwen2-VL (`"2"`) or Qwen2.5-VL (`"2.5"`)."""
    from transformers.models.qwen2_5_vl import Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl import Qwen2VLProcessor

    return _image_only(Qwen2VLProcessor if version == "2" else Qwen2_5_VLProcessor)


def _vision_config(version: str):
    from transformers.models.qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_vl import Qwen2VLVisionConfig

    common = dict(depth=2, hidden_size=64, num_heads=4, in_channels=3, patch_size=PATCH,
                  spatial_merge_size=MERGE, temporal_patch_size=2)
    if version == "2":
        # Qwen2-VL: embed_dim is the ViT width, hidden_size the merger's output (the LM width).
        return Qwen2VLVisionConfig(embed_dim=64, mlp_ratio=2, **common)
    return Qwen2_5_VLVisionConfig(intermediate_size=128, out_hidden_size=64, window_size=32,
                                  fullatt_block_indexes=[1], **common)


def _build_tiny(version: str, out_dir: Path) -> None:
    """A 2-layer random Qwen{version}-VL with a local tokenizer and image-only processor."""
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    template = read_template(PUBLISHED_TEMPLATE)
    tok = build_tiny_tokenizer(SPECIAL_TOKENS, chat_template=template,
                               eos_token="<|im_end|>", pad_token="<|endoftext|>")
    # 32x32 images: a 4x4 patch grid, merged 2x2 into 4 image tokens.
    image_proc = Qwen2VLImageProcessorPil(size={"shortest_edge": 32 * 32, "longest_edge": 32 * 32},
                                          patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2)
    processor = processor_class(version)(image_processor=image_proc, tokenizer=tok,
                                         chat_template=template)
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    # head_dim 16: the three multimodal rotary sections (time, height, width) sum to 16 / 2.
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [2, 3, 3]},
                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id)
    model_type = "qwen2_vl" if version == "2" else "qwen2_5_vl"
    config = AutoConfig.for_model(model_type, text_config=text,
                                  vision_config=_vision_config(version).to_dict(), **ids)
    model = AutoModelForImageTextToText.from_config(config)
    widen_output_embeddings(model)
    save_tiny(model, processor, out_dir, tok.pad_token_id, tok.eos_token_id)


def build_tiny_qwen2_vl(out_dir: Path) -> None:
    """A 2-layer random Qwen2-VL saved like a Hub model."""
    _build_tiny("2", out_dir)


def build_tiny_qwen2_5_vl(out_dir: Path) -> None:
    """A 2-layer random Qwen2.5-VL saved like a Hub model."""
    _build_tiny("2.5", out_dir)


def image_tokens(image_inputs: dict, config) -> tuple[int, int]:
    """Native resolution: the processor's (t, h, w) patch grid, merged merge x merge per token."""
    grid = int(image_inputs["image_grid_thw"][0].prod())
    return grid // config.vision_config.spatial_merge_size ** 2, grid


def mrope_positions(model, batch: dict):
    """Each row's own 3-D M-RoPE positions (time, height, width), (3, rows, tokens), from the
    model's `get_rope_index` on the right-padded batch (padding ignored), so that a packed
    conversation keeps the positions it has alone (`FamilySpec.packed_positions`)."""
    owner = next(m for m in model.modules() if hasattr(type(m), "get_rope_index"))
    grids = {k: batch[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")
             if batch.get(k) is not None}
    positions, _ = owner.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                        attention_mask=batch["attention_mask"], **grids)
    return positions


_COMMON = dict(
    vision_module="model.visual",
    projector_module="model.visual.merger",
    language_module="model.language_model",
    image_token="<|image_pad|>",
    media_tokens=("<|vision_start|>", "<|vision_end|>", "<|video_pad|>"),
    end_of_turn="<|im_end|>",
    takes_video=True,
    image_tokens=image_tokens,
    dummy_image_side=PATCH * MERGE * 2,  # a multiple of patch x merge the tiny models accept
    # packed rows: 4-row position ids (text + each conversation's own 3-D M-RoPE grid)
    packed_positions=mrope_positions,
)

QWEN2_VL_SPEC = FamilySpec(
    name="qwen2_vl",
    model_types=("qwen2_vl",),
    # Dotted, so that patch_embed.proj (a Conv3d) is left alone.
    vision_targets=("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"),
    projector_targets=("mlp.0", "mlp.2"),  # merger.mlp: Linear, GELU, Linear
    tiny_name="tiny-qwen2-vl",
    reference_checkpoint="Qwen/Qwen2-VL-2B-Instruct",
    build_tiny=build_tiny_qwen2_vl,
    processor_class=functools.partial(processor_class, "2"),
    box_format="qwen2_vl",  # object_ref + box_start (x1,y1),(x2,y2) box_end tokens, 0-1000
    **_COMMON,
)

QWEN2_5_VL_SPEC = FamilySpec(
    name="qwen2_5_vl",
    model_types=("qwen2_5_vl",),
    vision_targets=("attn.qkv", "attn.proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    projector_targets=("mlp.0", "mlp.2"),
    tiny_name="tiny-qwen2.5-vl",
    reference_checkpoint="Qwen/Qwen2.5-VL-3B-Instruct",
    build_tiny=build_tiny_qwen2_5_vl,
    processor_class=functools.partial(processor_class, "2.5"),
    # JSON bbox_2d in pixels of the image as its processor resizes it (bound to the processor's
    # smart_resize settings by `data.boxes.box_format_for`)
    box_format="qwen2_5_vl",
    **_COMMON,
)
