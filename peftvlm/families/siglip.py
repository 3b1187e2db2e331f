"""SigLIP (google/siglip-*): a ViT image encoder and a text encoder trained with a sigmoid loss.

A dual encoder like CLIP, trained by peftvlm as a few-shot classifier with the CLIP-family
methods. What differs from CLIP, and is stated here as spec fields so the methods stay
family-free:
- text: no start token, one `</s>` at the end, and every text padded to `max_length` (64) with
  no attention mask; the text model pools the *last position* (a pad token), so padding must
  match training (`text_padding="max_length"`);
- vision: no CLS token; a multihead-attention (MAP) head pools all patch tokens
  (`vision_cls_token=False`: VPT's "prompts after CLS" has no anchor here);
- scores: `logit_scale.exp() * cos + logit_bias` (`logit_bias=True`), the logits of SigLIP's
  sigmoid loss; the joint width is the vision width (`joint_dim_config`).
"""

from __future__ import annotations

import math
from pathlib import Path

from peftvlm.families._tokenizer import build_tiny_tokenizer
from peftvlm.families.base import FamilySpec

EOS = "</s>"
MAX_TEXT = 64


def build_tiny_siglip_tokenizer():
    """The tiny BPE tokenizer with SigLIP's conventions: `</s>` appended, pad = `</s>`, no
    start token, and only `input_ids` (SigLIP's text model was trained without a mask)."""
    from tokenizers.processors import TemplateProcessing

    tok = build_tiny_tokenizer(eos_token=EOS, pad_token=EOS, bos_token=None)
    tok._tokenizer.post_processor = TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}",
        special_tokens=[(EOS, tok.eos_token_id)])
    tok.model_input_names = ["input_ids"]
    tok.model_max_length = MAX_TEXT
    return tok


def build_tiny(out_dir: Path) -> None:
    """A 2-layer random SiglipModel (32x32 images, patch 8) with a local tokenizer."""
    import torch
    from transformers import (
        SiglipConfig,
        SiglipModel,
        SiglipProcessor,
        SiglipTextConfig,
        SiglipVisionConfig,
    )
    from transformers.models.siglip import SiglipImageProcessorPil

    tok = build_tiny_siglip_tokenizer()
    image_proc = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    processor = SiglipProcessor(image_processor=image_proc, tokenizer=tok)
    # Text width 48 projected to the vision width 64 (SigLIP's joint space is the vision width).
    config = SiglipConfig(
        text_config=SiglipTextConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=96,
                                     num_hidden_layers=2, num_attention_heads=4,
                                     max_position_embeddings=MAX_TEXT, projection_size=64,
                                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                     bos_token_id=None),
        vision_config=SiglipVisionConfig(image_size=32, patch_size=8, hidden_size=64,
                                         intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4))
    model = SiglipModel(config)  # seeded by models.tiny_model_path, like every tiny builder
    with torch.no_grad():
        # The SigLIP paper's initial temperature and bias (t' = log 10, b = -10); transformers
        # zeroes both, which leaves the logits almost flat for a random model.
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-10.0)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


SPEC = FamilySpec(
    name="siglip",
    model_types=("siglip",),
    kind="dual_encoder",
    vision_module="vision_model",
    projector_module=None,
    language_module="text_model",
    language_targets=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    # Named with their parents: the MAP head's `attention.out_proj` lives inside an
    # nn.MultiheadAttention, whose forward reads the weight directly, so a LoRA there would do
    # nothing in training and then change the model when merged.
    vision_targets=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                    "self_attn.out_proj", "mlp.fc1", "mlp.fc2"),
    image_token=None,
    tiny_name="tiny-siglip",
    build_tiny=build_tiny,
    text_padding="max_length",
    vision_cls_token=False,
    logit_bias=True,
    joint_dim_config="vision_config.hidden_size",
)
