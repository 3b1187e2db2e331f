"""CLIP (openai/clip-vit-*): a ViT image encoder and a causal text encoder in one joint space.

A dual encoder, not a generator: peftvlm trains it as a few-shot image classifier with the
CLIP-family methods (CoOp, VPT, CLIP-Adapter; see `peftvlm/methods/`). The tiny model keeps
CLIP's conventions that those methods rely on: the tokenizer wraps every text in
`<|startoftext|> ... <|endoftext|>`, pads with `<|endoftext|>`, and the text model pools the
first end-of-text position.
"""

from __future__ import annotations

from pathlib import Path

from peftvlm.families._tokenizer import build_tiny_tokenizer
from peftvlm.families.base import FamilySpec

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def build_tiny_clip_tokenizer():
    """The tiny BPE tokenizer with CLIP's start/end-of-text tokens added around every text."""
    from tokenizers.processors import TemplateProcessing

    tok = build_tiny_tokenizer([BOS, EOS], bos_token=BOS, eos_token=EOS, pad_token=EOS)
    # The BPE backend adds no special tokens by itself; CLIP's tokenizer adds both.
    tok._tokenizer.post_processor = TemplateProcessing(
        single=f"{BOS} $A {EOS}", pair=f"{BOS} $A {EOS} $B {EOS}",
        special_tokens=[(BOS, tok.bos_token_id), (EOS, tok.eos_token_id)])
    return tok


def build_tiny(out_dir: Path) -> None:
    """A 2-layer random CLIPModel with a local tokenizer and 32x32 image processor."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTextConfig, CLIPVisionConfig
    from transformers.models.clip import CLIPImageProcessorPil

    tok = build_tiny_clip_tokenizer()
    image_proc = CLIPImageProcessorPil(size={"shortest_edge": 32},
                                       crop_size={"height": 32, "width": 32})
    processor = CLIPProcessor(image_processor=image_proc, tokenizer=tok)
    # Distinct widths (text 48, vision 64, joint 32) so tests can tell them apart.
    # initializer_factor 4: with CLIP's default init a random 2-layer model attends almost
    # uniformly, so prompt tokens can only add image-independent shifts and VPT barely learns;
    # 4x larger initial weights give peaked attention, and all three CLIP-family methods then
    # learn the colour-classes task in ~60 steps (measured: 0.17 -> 0.78-0.93 accuracy).
    factor = 4.0
    config = CLIPConfig(
        text_config=CLIPTextConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   max_position_embeddings=64, pad_token_id=tok.pad_token_id,
                                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                   initializer_factor=factor),
        vision_config=CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=64,
                                       intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, initializer_factor=factor),
        projection_dim=32, initializer_factor=factor)
    model = CLIPModel(config)  # seeded by models.tiny_model_path, like every tiny builder
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


SPEC = FamilySpec(
    name="clip",
    model_types=("clip",),
    kind="dual_encoder",
    vision_module="vision_model",
    projector_module=None,
    language_module="text_model",
    language_targets=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    image_token=None,
    tiny_name="tiny-clip",
    build_tiny=build_tiny,
)
