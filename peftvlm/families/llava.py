"""LLaVA (llava-hf/llava-1.5-*): CLIP vision tower, MLP projector, Llama/Vicuna language model."""

from __future__ import annotations

from pathlib import Path

from peftvlm.families._tiny import save_tiny, widen_output_embeddings
from peftvlm.families._tokenizer import build_tiny_tokenizer
from peftvlm.families.base import FamilySpec, read_template

# The tiny twin carries the template llava-hf/llava-1.5-7b-hf publishes. It writes no `</s>`
# after a reply: `end_of_turn` below is appended after the final reply in training only, so
# every context the model is shown stays the published one (docs/families.md).
PUBLISHED_TEMPLATE = "llava-1.5"


def build_tiny(out_dir: Path) -> None:
    """A 2-layer random LLaVA with a local tokenizer and processor, saved like a Hub model."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip import CLIPImageProcessorPil

    template = read_template(PUBLISHED_TEMPLATE)
    tok = build_tiny_tokenizer(["<image>"], chat_template=template)
    image_proc = CLIPImageProcessorPil(size={"shortest_edge": 32},
                                       crop_size={"height": 32, "width": 32})
    # "default" feature selection drops CLS, so one additional token is removed from the count.
    processor = LlavaProcessor(image_processor=image_proc, tokenizer=tok, patch_size=8,
                               vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=template)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=64,
                                       intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, projection_dim=64),
        text_config=LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                max_position_embeddings=1024, pad_token_id=tok.pad_token_id,
                                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default", vision_feature_layer=-2)
    model = LlavaForConditionalGeneration(config)
    widen_output_embeddings(model)
    save_tiny(model, processor, out_dir, tok.pad_token_id)


def image_tokens(image_inputs: dict, config) -> tuple[int, int]:
    """One CLIP crop: a token per patch (the "default" strategy drops the CLS token)."""
    height, width = image_inputs["pixel_values"].shape[-2:]
    patch = config.vision_config.patch_size
    patches = (height // patch) * (width // patch)
    full = config.vision_feature_select_strategy == "full"
    return patches + int(full), patches + 1


SPEC = FamilySpec(
    name="llava",
    model_types=("llava",),
    vision_module="model.vision_tower",
    projector_module="model.multi_modal_projector",
    language_module="model.language_model",
    projector_targets=("linear_1", "linear_2"),
    image_token="<image>",
    interleaved_images=False,  # llava-1.5's published template puts a turn's images first
    end_of_turn="</s>",
    tiny_name="tiny-llava",
    reference_checkpoint="llava-hf/llava-1.5-7b-hf",
    build_tiny=build_tiny,
    image_tokens=image_tokens,
)
