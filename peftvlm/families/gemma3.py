"""Gemma 3 (google/gemma-3-4b-it, -12b-it, -27b-it): a SigLIP vision tower, a projector that
average-pools patches to 256 soft tokens, and a Gemma 3 language model (sliding-window and
global layers) that attends bidirectionally among each image's tokens.

That bidirectional mask is built from `token_type_ids` (1 on image tokens): the processor returns
them and the collator passes every processor output to the model, so they reach it in training
too (TRL's stock collator historically dropped them, silently training a causal image mask).
The projector is a bare weight matrix (no nn.Linear): LoRA cannot adapt it; train it in full
with `modules_to_save: [projector]`.
"""

from __future__ import annotations

from pathlib import Path

from peftvlm.families._tiny import save_tiny
from peftvlm.families._tokenizer import build_tiny_tokenizer
from peftvlm.families.base import FamilySpec, read_template

TEMPLATE_FILE = "gemma-3.jinja"  # google/gemma-3-*-it's chat template
IMAGE_SIZE, PATCH = 32, 8
SPECIAL_TOKENS = ("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                  "<end_of_image>", "<image_soft_token>")


def build_tiny(out_dir: Path) -> None:
    """A 2-layer random Gemma 3 with a local tokenizer and processor, saved like a Hub model."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    template = read_template(TEMPLATE_FILE)
    # Gemma 3's processor reads the image markers off the tokenizer (boi/eoi/image_token).
    tok = build_tiny_tokenizer(SPECIAL_TOKENS, chat_template=template, bos_token="<bos>",
                               eos_token="<eos>", boi_token="<start_of_image>",
                               eoi_token="<end_of_image>", image_token="<image_soft_token>")
    # No pan-and-scan (the real processor's default too): one 32x32 view, pooled to 4 tokens.
    image_proc = Gemma3ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    tokens_per_image = 4
    processor = Gemma3Processor(image_processor=image_proc, tokenizer=tok, chat_template=template,
                                image_seq_length=tokens_per_image)
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in (
        ("boi_token_index", "<start_of_image>"), ("eoi_token_index", "<end_of_image>"),
        ("image_token_index", "<image_soft_token>"))}
    config = Gemma3Config(
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                         head_dim=16, max_position_embeddings=1024, sliding_window=64,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id),
        vision_config=dict(image_size=IMAGE_SIZE, patch_size=PATCH, hidden_size=64,
                           intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           vision_use_head=False),
        mm_tokens_per_image=tokens_per_image, **ids)
    model = Gemma3ForConditionalGeneration(config)
    # transformers zero-initialises the projection: image features would then reach nothing
    # and the vision tower get no gradient at all. A trained checkpoint's projection is not 0.
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=0.02)
    save_tiny(model, processor, out_dir, tok.pad_token_id,
              tok.convert_tokens_to_ids("<end_of_turn>"))


SPEC = FamilySpec(
    name="gemma3",
    model_types=("gemma3",),
    vision_module="model.vision_tower",
    projector_module="model.multi_modal_projector",
    language_module="model.language_model",
    projector_targets=(),  # mm_input_projection_weight is an nn.Parameter, not a Linear
    image_token="<image_soft_token>",
    media_tokens=("<start_of_image>", "<end_of_image>"),  # an image item renders as boi
    end_of_turn="<end_of_turn>",
    tiny_name="tiny-gemma3",
    build_tiny=build_tiny,
    reference_checkpoint="google/gemma-3-4b-it",
    packing_refusal="Gemma 3 attends bidirectionally within each image (a mask built from "
                    "token_type_ids), which packed position ids alone do not reproduce; use "
                    "train.group_by_length",
    vision_cls_token=False,  # SigLIP pools every patch; no CLS token for VPT
    refused_methods=(("per_part", "VPT prompt tokens need a CLS-token ViT; Gemma 3's SigLIP "
                      "tower has none and its projector pools a fixed patch grid"),),
)
