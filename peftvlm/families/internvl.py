"""InternVL 3 / 3.5 in transformers' native layout (OpenGVLab/InternVL3-*-hf): InternViT, a
pixel-shuffle MLP projector, and a Qwen2 (or Llama) language model.

Images are split into up to 12 448px tiles plus a thumbnail (`crop_to_patches`), each tile
256 `<IMG_CONTEXT>` tokens between `<img>` and `</img>`, so the token count depends on the
image's aspect ratio. The stock processor wants a torchvision video processor:
`processor_class` is the image-only subclass.
"""

from __future__ import annotations

import functools
from pathlib import Path

from peftvlm.families._processors import image_only
from peftvlm.families._tiny import save_tiny
from peftvlm.families._tokenizer import build_tiny_tokenizer
from peftvlm.families.base import FamilySpec, read_template

TEMPLATE_FILE = "internvl3-hf.jinja"  # OpenGVLab/InternVL3-*-hf's chat template
IMAGE_SIZE, PATCH = 32, 8
SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<img>", "</img>",
                  "<IMG_CONTEXT>", "<video>")


@functools.cache
def processor_class():
    """`InternVLProcessor` without its video processor (see `_processors.image_only`)."""
    from transformers import InternVLProcessor

    def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 256,
                 chat_template=None, **kwargs):
        InternVLProcessor.__init__(self, image_processor, tokenizer, None,
                                   image_seq_length=image_seq_length,
                                   chat_template=chat_template, **kwargs)

    return image_only(InternVLProcessor, __init__)


def build_tiny(out_dir: Path) -> None:
    """A 2-layer random InternVL (Qwen2 language model) with 32x32 tiles of 4 tokens each."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    template = read_template(TEMPLATE_FILE)
    tok = build_tiny_tokenizer(SPECIAL_TOKENS, chat_template=template, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>", start_image_token="<img>",
                               end_image_token="</img>", context_image_token="<IMG_CONTEXT>",
                               video_token="<video>")
    # Tiling as the real processor does it (up to max_patches tiles + a thumbnail), 32px tiles.
    image_proc = GotOcr2ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                          crop_to_patches=True, min_patches=1, max_patches=4)
    seq_len = (IMAGE_SIZE // PATCH) ** 2 // 4  # pixel shuffle with downsample_ratio 0.5
    processor = processor_class()(image_processor=image_proc, tokenizer=tok,
                                  chat_template=template, image_seq_length=seq_len)
    config = InternVLConfig(
        text_config=dict(model_type="qwen2", vocab_size=len(tok), hidden_size=64,
                         intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=1024,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id),
        vision_config=dict(image_size=IMAGE_SIZE, patch_size=PATCH, hidden_size=64,
                           intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=seq_len)
    model = InternVLForConditionalGeneration(config)
    save_tiny(model, processor, out_dir, tok.pad_token_id, tok.eos_token_id)


SPEC = FamilySpec(
    name="internvl",
    model_types=("internvl",),
    box_format="internvl",  # <ref>label</ref><box>[[x1, y1, x2, y2]]</box>, 0-1000
    vision_module="model.vision_tower",
    projector_module="model.multi_modal_projector",
    language_module="model.language_model",
    vision_targets=("q_proj", "k_proj", "v_proj", "projection_layer", "fc1", "fc2"),
    projector_targets=("linear_1", "linear_2"),
    image_token="<IMG_CONTEXT>",
    media_tokens=("<img>", "</img>", "<video>"),
    end_of_turn="<|im_end|>",
    tiny_name="tiny-internvl",
    build_tiny=build_tiny,
    reference_checkpoint="OpenGVLab/InternVL3-1B-hf",
    processor_class=processor_class,
    refused_methods=(("per_part", "InternVL's projector pixel-shuffles the ViT's patch grid, "
                      "which VPT prompt tokens would break"),),
)
