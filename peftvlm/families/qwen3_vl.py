"""Qwen3-VL (Qwen/Qwen3-VL-*-Instruct, and the MoE Qwen3-VL-30B-A3B / 235B-A22B): a ViT with
2D rotary positions whose patch merger (plus DeepStack mergers feeding early LM layers) is the
projector, and a Qwen3 language model with interleaved multimodal rotary positions.

The dense and MoE checkpoints share module names and the chat template; the MoE language model
keeps its experts as fused 3D weights (no nn.Linear), so LoRA there reaches attention only.
Like Qwen2-VL, the stock processor wants a torchvision video processor: `processor_class` is
the image-only subclass, carrying `Qwen3FramesVideoProcessor` (NumPy) for rows with videos. The
processor itself (transformers' `Qwen3VLProcessor.replace_video_token`) writes each temporal
patch of a clip as `<t seconds><|vision_start|><|video_pad|>...<|vision_end|>`, t the mean
timestamp of the patch's frames, from the clip's `video_metadata`
(peftvlm.data.read.video.metadata);
since transformers 5.25 these replace the template's own `<|vision_start|><|video_pad|>
<|vision_end|>` wrapper instead of nesting inside it. Token counts come from the processor, so
training and the length checks follow whichever rendering the installed release uses.
"""

from __future__ import annotations

import functools
from pathlib import Path

from peftvlm.families._tiny import save_tiny
from peftvlm.families._tokenizer import build_tiny_tokenizer
from peftvlm.families.base import FamilySpec, read_template
from peftvlm.families.qwen2_vl import (FramesVideoProcessor, SPECIAL_TOKENS, _image_only,
                                       mrope_positions)

TEMPLATE_FILE = "qwen3-vl.jinja"  # Qwen/Qwen3-VL-2B-Instruct's chat template
PATCH, MERGE = 8, 2


class Qwen3FramesVideoProcessor(FramesVideoProcessor):
    """transformers' `Qwen3VLVideoProcessor` over decoded frames: Qwen2-VL's patch layout (the
    same permutation in its `patchify`), with Qwen3-VL's resize rule, whose pixel budget spans
    the whole clip (`smart_resize(num_frames, ...)` compares frames x height x width with the
    video config's min / max pixels). Real checkpoints ship that config
    (`video_preprocessor_config.json`, 16 px patches); so does the tiny twin."""

    def target_size(self, num_frames: int, height: int, width: int,
                    settings: dict | None = None) -> tuple[int, int]:
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize

        s = settings or self._merge_and_standardize_kwargs()
        # its smart_resize refuses a clip shorter than one temporal patch, which `patchify`
        # fills by repeating the last frame: size it as that filled clip
        return smart_resize(max(num_frames, s["temporal_patch_size"]), height, width,
                            temporal_factor=s["temporal_patch_size"],
                            factor=s["patch_size"] * s["merge_size"],
                            min_pixels=s["size"]["shortest_edge"],
                            max_pixels=s["size"]["longest_edge"])


def tiny_video_config(image_proc) -> dict:
    """The twin's `video_preprocessor_config.json`, laid out as Qwen3-VL checkpoints ship it:
    a clip's budget is 16 frames of 32x32 (a real one: 768 x 32 x 32 pixels per clip)."""
    return {"video_processor_type": "Qwen3VLVideoProcessor", "processor_class": "Qwen3VLProcessor",
            "size": {"shortest_edge": 32 * 32, "longest_edge": 16 * 32 * 32},
            "patch_size": PATCH, "merge_size": MERGE, "temporal_patch_size": 2, "fps": 2,
            "min_frames": 4, "max_frames": 768, "do_sample_frames": True,
            "image_mean": list(image_proc.image_mean), "image_std": list(image_proc.image_std),
            "rescale_factor": image_proc.rescale_factor, "do_resize": True, "do_rescale": True,
            "do_normalize": True, "do_convert_rgb": True}


@functools.cache
def processor_class():
    """Qwen3-VL's processor without the video processor (see `qwen2_vl._image_only`)."""
    from transformers.models.qwen3_vl import Qwen3VLProcessor

    return _image_only(Qwen3VLProcessor, Qwen3FramesVideoProcessor)


def _text_config(vocab_size: int, tok, moe: bool) -> dict:
    text = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                max_position_embeddings=1024,
                # the (time, height, width) rotary sections sum to head_dim / 2
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [2, 3, 3], "mrope_interleaved": True},
                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id)
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                    decoder_sparse_step=1)
    return text


def _build(out_dir: Path, moe: bool) -> None:
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    template = read_template(TEMPLATE_FILE)
    tok = build_tiny_tokenizer(SPECIAL_TOKENS, chat_template=template, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>")
    # 32x32 images: a 4x4 patch grid merged 2x2 into 4 image tokens (Qwen3-VL: patch 16, so
    # a real checkpoint's min/max_pixels give 4x more pixels per token).
    image_proc = Qwen2VLImageProcessorPil(size={"shortest_edge": 32 * 32, "longest_edge": 32 * 32},
                                          patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2)
    processor = processor_class()(image_processor=image_proc, tokenizer=tok,
                                  chat_template=template)
    processor.video_processor.configure(tiny_video_config(image_proc))  # saved with it
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, patch_size=PATCH,
                  spatial_merge_size=MERGE, temporal_patch_size=2, out_hidden_size=64,
                  num_position_embeddings=16, deepstack_visual_indexes=[0])
    config = AutoConfig.for_model("qwen3_vl_moe" if moe else "qwen3_vl",
                                  text_config=_text_config(len(tok), tok, moe),
                                  vision_config=vision, **ids)
    model = AutoModelForImageTextToText.from_config(config)
    save_tiny(model, processor, out_dir, tok.pad_token_id, tok.eos_token_id)


def build_tiny(out_dir: Path) -> None:
    """A 2-layer random Qwen3-VL with a local tokenizer and image-only processor."""
    _build(out_dir, moe=False)


def build_tiny_moe(out_dir: Path) -> None:
    """The same with a 4-expert MoE language model (Qwen3-VL-30B-A3B's layout)."""
    _build(out_dir, moe=True)


_COMMON = dict(
    vision_module="model.visual",
    projector_module="model.visual.merger",
    language_module="model.language_model",
    # Dotted, so that patch_embed.proj (a Conv3d) is left alone.
    vision_targets=("attn.qkv", "attn.proj", "mlp.linear_fc1", "mlp.linear_fc2"),
    projector_targets=("linear_fc1", "linear_fc2"),
    image_token="<|image_pad|>",
    media_tokens=("<|vision_start|>", "<|vision_end|>", "<|video_pad|>"),
    end_of_turn="<|im_end|>",
    takes_video=True,
    box_format="qwen3_vl",  # JSON bbox_2d, 0-1000 relative integers
    processor_class=processor_class,
    reference_checkpoint="Qwen/Qwen3-VL-2B-Instruct",
    packed_positions=mrope_positions,  # packed rows: each conversation's own M-RoPE grid
    refused_methods=(("per_part", "VPT prompt tokens need a ViT with a CLS token and a fixed "
                      "patch grid; Qwen3-VL's ViT has neither (native resolution, 2D RoPE, "
                      "patch merging)"),),
)

SPEC = FamilySpec(name="qwen3_vl", model_types=("qwen3_vl",), tiny_name="tiny-qwen3-vl",
                  build_tiny=build_tiny, **_COMMON)

# Same spec; the experts are fused 3D parameters, so LoRA reaches the attention projections.
MOE_SPEC = FamilySpec(name="qwen3_vl_moe", model_types=("qwen3_vl_moe",),
                      language_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
                      tiny_name="tiny-qwen3-vl-moe", build_tiny=build_tiny_moe, **_COMMON)
