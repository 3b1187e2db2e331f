"""LLaVA-NeXT / LLaVA-1.6 (llava-hf/llava-v1.6-mistral-7b-hf, -vicuna-, -34b-): LLaVA's CLIP
tower, MLP projector and language model, with "anyres" tiling: an image is resized to the best
of `image_grid_pinpoints`, cut into tiles, and each tile's features (minus padding, plus one
newline token per row) follow the base view's. The image-token count therefore depends on the
image's size; lengths are measured per size with the real processor (`data/prepare/lengths.py`).
"""

from __future__ import annotations

from pathlib import Path

from peftvlm.families._tiny import save_tiny
from peftvlm.families._tokenizer import build_tiny_tokenizer
from peftvlm.families.base import FamilySpec, read_template

TEMPLATE_FILE = "llava-v1.6-mistral.jinja"  # llava-hf/llava-v1.6-mistral-7b-hf's chat template
IMAGE_SIZE, PATCH = 32, 8
# Tiny twin's pinpoints: the real ones are multiples of 336 up to 672x672 (2x2 tiles) and more.
GRID_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]


def build_tiny(out_dir: Path) -> None:
    """A 2-layer random LLaVA-NeXT (CLIP + Mistral) with 32px tiles, up to 2x2."""
    from transformers import AutoConfig, AutoModelForImageTextToText, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import (
        LlavaNextImageProcessorPil)

    template = read_template(TEMPLATE_FILE)
    tok = build_tiny_tokenizer(["<image>", "[INST]", "[/INST]"], chat_template=template)
    image_proc = LlavaNextImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                            crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                            image_grid_pinpoints=GRID_PINPOINTS)
    # "default" feature selection drops CLS: one additional token is removed from the count.
    processor = LlavaNextProcessor(image_processor=image_proc, tokenizer=tok, patch_size=PATCH,
                                   vision_feature_select_strategy="default",
                                   num_additional_image_tokens=1, chat_template=template)
    vision = dict(model_type="clip_vision_model", image_size=IMAGE_SIZE, patch_size=PATCH,
                  hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, projection_dim=64)
    text = dict(model_type="mistral", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                max_position_embeddings=1024, pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config = AutoConfig.for_model("llava_next", vision_config=vision, text_config=text,
                                  image_token_index=tok.convert_tokens_to_ids("<image>"),
                                  image_grid_pinpoints=GRID_PINPOINTS,
                                  vision_feature_select_strategy="default", vision_feature_layer=-2)
    model = AutoModelForImageTextToText.from_config(config)
    save_tiny(model, processor, out_dir, tok.pad_token_id, tok.eos_token_id)


SPEC = FamilySpec(
    name="llava_next",
    model_types=("llava_next",),
    vision_module="model.vision_tower",
    projector_module="model.multi_modal_projector",
    language_module="model.language_model",
    projector_targets=("linear_1", "linear_2"),
    image_token="<image>",
    end_of_turn="</s>",
    tiny_name="tiny-llava-next",
    build_tiny=build_tiny,
    reference_checkpoint="llava-hf/llava-v1.6-mistral-7b-hf",
    refused_methods=(("per_part", "VPT prompts are not supported with anyres tiling: every tile "
                      "passes the vision tower separately and the projector's tile layout "
                      "expects exactly the patch grid"),),
)
