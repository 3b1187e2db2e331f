"""Llama 3.2 Vision (meta-llama/Llama-3.2-11B-Vision-Instruct, -90B-): a tiled ViT (up to 4
tiles per image, with a global encoder over its intermediate layers), a linear projector, and a
Llama language model that reads the image through gated cross-attention layers interleaved
with its self-attention layers; the text holds one `<|image|>` token per image.

LoRA's language preset (q/k/v/o, gate/up/down) covers the cross-attention layers too
(`layers.N.cross_attn.*`). The published template refuses a system message next to an image
and writes today's date into the system block of text-only prompts.
"""

from __future__ import annotations

from pathlib import Path

from peftvlm.families._tiny import save_tiny
from peftvlm.families._tokenizer import build_tiny_tokenizer
from peftvlm.families.base import FamilySpec, read_template

TEMPLATE_FILE = "llama-3.2-vision.jinja"  # Llama-3.2-11B-Vision-Instruct's chat template
TILE, PATCH = 32, 8
SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
                  "<|python_tag|>", "<|image|>")


def build_tiny(out_dir: Path) -> None:
    """A 2-layer random Llama 3.2 Vision (layer 1 cross-attends), tiles of 32x32, up to 2."""
    import torch
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaProcessor
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    template = read_template(TEMPLATE_FILE)
    tok = build_tiny_tokenizer(SPECIAL_TOKENS, chat_template=template,
                               bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                               pad_token="<|finetune_right_pad_id|>")
    image_proc = MllamaImageProcessorPil(size={"height": TILE, "width": TILE}, max_image_tiles=2)
    processor = MllamaProcessor(image_processor=image_proc, tokenizer=tok, chat_template=template)
    config = MllamaConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, cross_attention_layers=[1],
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id),
        # vision_output_dim = hidden_size x (1 + len(intermediate_layers_indices))
        vision_config=dict(image_size=TILE, patch_size=PATCH, hidden_size=64,
                           intermediate_size=128, num_hidden_layers=2, num_global_layers=1,
                           attention_heads=4, max_num_tiles=2,
                           supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]],
                           intermediate_layers_indices=[0], vision_output_dim=128),
        image_token_index=tok.convert_tokens_to_ids("<|image|>"))
    model = MllamaForConditionalGeneration(config)
    # transformers zero-initialises the tanh gates of the cross-attention layers (and of the
    # vision tower's positional and global layers): closed gates pass no image signal, so the
    # vision tower would get no gradient at all. Llama 3.2 Vision's trained gates are open.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("gate", "_gate", "gate_attn", "gate_ffn")):
                param.fill_(0.5)
    save_tiny(model, processor, out_dir, tok.pad_token_id, tok.eos_token_id)


SPEC = FamilySpec(
    name="mllama",
    model_types=("mllama",),
    vision_module="model.vision_model",
    projector_module="model.multi_modal_projector",
    language_module="model.language_model",
    vision_targets=("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"),
    projector_targets=("",),  # the projector is one Linear
    image_token="<|image|>",
    end_of_turn="<|eot_id|>",
    tiny_name="tiny-mllama",
    build_tiny=build_tiny,
    reference_checkpoint="meta-llama/Llama-3.2-11B-Vision-Instruct",
    packing_refusal="Llama 3.2 Vision's cross-attention mask is per row and per image tile; "
                    "packed rows would need it rebuilt per conversation; use "
                    "train.group_by_length",
    dummy_image_refusal="its cross-attention mask has no place for an image the text never "
                        "names; text-only batches train without one (keep "
                        "train.ddp_find_unused_parameters on under several processes)",
    system_with_images=False,  # its template raises on a system message next to an image
    refused_methods=(("per_part", "the image reaches Llama 3.2 Vision through cross-attention "
                      "over tiled ViT features, not as prompt tokens; VPT prompts have no place "
                      "in its tiled, gated-position encoder"),),
)
