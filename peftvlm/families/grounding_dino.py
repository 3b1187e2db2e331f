"""Grounding DINO (IDEA-Research/grounding-dino-*): an open-vocabulary detector.

A Swin image backbone and a BERT text backbone, fused by a feature enhancer (bi-directional
image<->text attention, `model.encoder.layers.*.fusion_layer`), then a DETR-style query decoder
(`model.decoder`) whose queries score each text token and regress a box. Classes are text: the
prompt is the class names separated by " . " ("cat . dog ."), and a class's score for a query is
its tokens' sigmoid scores. transformers computes the training loss itself (Hungarian matching
of queries to boxes, focal-style token classification, L1 + GIoU box losses).

peftvlm trains it as the `detection` run kind (`peftvlm/kinds/detection.py`). Parts for
`method.target`: `detector` (the fusion layers and the query decoder: the default), `vision`
(Swin), `language` (BERT).

The tiny twin keeps what the model hard-codes: BERT-base-uncased's ids of [CLS] (101), [SEP]
(102), "." (1012) and "?" (1029), which `modeling_grounding_dino.SPECIAL_TOKENS` uses to split
the prompt into classes, so its WordPiece vocabulary puts those tokens at those ids.
"""

from __future__ import annotations

from pathlib import Path

from peftvlm.families.base import FamilySpec

# bert-base-uncased ids that GroundingDino's modeling code hard-codes (SPECIAL_TOKENS).
FIXED_IDS = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]", 1012: ".",
             1029: "?"}
TINY_WORDS = ("red green blue yellow orange purple white black circle square triangle shape "
              "object cat dog person car a an the of and , - ! ( ) / : ;").split()
TINY_SIDE = 64  # the tiny twin's images are resized to this square


def prompt_for(classes: list[str]) -> str:
    """Grounding DINO's prompt: class names, each closed by " ." ("cat . dog .")."""
    return " . ".join(c.lower() for c in classes) + " ."


# LoRA targets of the `detector` part, as name suffixes under `model` (full names such as
# model.decoder.layers.0.encoder_attn_text.query): the image<->text fusion of the encoder,
# the text enhancer's and decoder's self-attention, the decoder's cross-attention to the text
# and the value/output projections of its deformable cross-attention to the image, and the
# language-guided query selection (`enc_output` and the encoder's proposal box head). The
# deformable attention's sampling offsets and attention weights are left out (as in DINO
# fine-tuning practice: small changes there move the sampling points), and so is the decoder's
# box head: its weights are tied to the detection head's (`bbox_embed`), so a merged adapter
# there would also change the other copy's path. That final head (top-level `bbox_embed`,
# outside `model`) is not a `detector` target either: on a released checkpoint the boxes move
# through the decoder's hidden states; the random twin learns only with `model` trained in full,
# while a pretrained twin learns new classes with this preset alone (docs/benchmarks.md). The
# names never reach into the backbones (Swin: attention.q_proj, BERT: attention.self.query).
DETECTOR_TARGETS = (
    "fusion_layer.attn.vision_proj", "fusion_layer.attn.text_proj",
    "fusion_layer.attn.values_vision_proj", "fusion_layer.attn.values_text_proj",
    "fusion_layer.attn.out_vision_proj", "fusion_layer.attn.out_text_proj",
    "self_attn.query", "self_attn.key", "self_attn.value", "self_attn.out_proj",
    "encoder_attn_text.query", "encoder_attn_text.key", "encoder_attn_text.value",
    "encoder_attn_text.out_proj", "encoder_attn.value_proj", "encoder_attn.output_proj",
    "enc_output", "encoder_output_bbox_embed.layers.0", "encoder_output_bbox_embed.layers.1",
    "encoder_output_bbox_embed.layers.2",
)


def tiny_vocab() -> list[str]:
    """A WordPiece vocabulary with the fixed ids above and the tiny task's words."""
    size = max(FIXED_IDS) + 1 + len(TINY_WORDS) + 26
    vocab = [FIXED_IDS.get(i, f"[unused{i}]") for i in range(max(FIXED_IDS) + 1)]
    vocab += list(TINY_WORDS) + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab += [f"##{chr(c)}" for c in range(ord("a"), ord("z") + 1)]
    assert len(vocab) >= size
    return vocab


def build_tiny_tokenizer():
    """A lower-casing BERT WordPiece tokenizer over `tiny_vocab()`."""
    from transformers import BertTokenizer

    return BertTokenizer(vocab={token: i for i, token in enumerate(tiny_vocab())},
                         do_lower_case=True)


def tiny_config(vocab_size: int):
    """A ~0.4 M-parameter Grounding DINO: Swin (embed 16, depths 1x4), 1-layer BERT (32 wide),
    d_model 32, 1 encoder + 2 decoder layers (>= 2: the tied bbox_embed keys), 20 queries.
    Three feature levels (the backbone's three stages): a fourth, made by a strided conv from
    the last, would be 1x1 at 64 pixels, which its GroupNorm refuses for a single image."""
    from transformers import BertConfig, GroundingDinoConfig, SwinConfig

    backbone = SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 4],
                          window_size=4, image_size=TINY_SIDE,
                          out_features=["stage2", "stage3", "stage4"])
    text = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1,
                      num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    return GroundingDinoConfig(
        backbone_config=backbone, text_config=text, d_model=32, encoder_layers=1,
        decoder_layers=2, num_queries=20, encoder_ffn_dim=64, decoder_ffn_dim=64,
        encoder_attention_heads=2, decoder_attention_heads=2, num_feature_levels=3,
        max_text_len=32, use_timm_backbone=False, use_pretrained_backbone=False)


def like_a_pretrained_checkpoint(model) -> None:
    """Undo the parts of transformers' from-scratch init that leave an adapter nothing to steer
    (a released checkpoint has none of them): box heads whose last layer is zero and inner
    layers at std 0.02 (boxes never leave the encoder's fixed anchors, and almost no gradient
    reaches the layers before), fusion gates
    at 1e-4 (the image<->text fusion is switched off)."""
    import torch

    with torch.no_grad():
        for module in model.modules():
            kind = type(module).__name__
            if kind == "GroundingDinoMLPPredictionHead":
                # He init inside (at transformers' 0.02 two ReLU layers shrink the signal
                # ~100x), a small last layer: box deltas start near 0.3 in logit space
                for layer in module.layers[:-1]:
                    layer.weight.normal_(0.0, (2.0 / layer.in_features) ** 0.5)
                module.layers[-1].weight.normal_(0.0, 0.05)
            elif kind == "GroundingDinoFusionLayer":
                module.vision_param.fill_(0.1)
                module.text_param.fill_(0.1)


def build_tiny(out_dir: Path) -> None:
    """A random GroundingDinoForObjectDetection with a local WordPiece tokenizer and the PIL
    image processor (64x64 images), saved as a Hub checkpoint is laid out."""
    from transformers import GroundingDinoForObjectDetection, GroundingDinoProcessor
    from transformers.models.grounding_dino import GroundingDinoImageProcessorPil

    tok = build_tiny_tokenizer()
    image_proc = GroundingDinoImageProcessorPil(
        size={"height": TINY_SIDE, "width": TINY_SIDE}, do_pad=False)
    processor = GroundingDinoProcessor(image_processor=image_proc, tokenizer=tok)
    model = GroundingDinoForObjectDetection(tiny_config(len(tok)))
    like_a_pretrained_checkpoint(model)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


def model_class():
    from transformers import GroundingDinoForObjectDetection

    return GroundingDinoForObjectDetection


SPEC = FamilySpec(
    name="grounding_dino",
    model_types=("grounding-dino",),
    kind="detector",
    vision_module="model.backbone",
    vision_targets=("attention.q_proj", "attention.k_proj", "attention.v_proj",
                    "attention.o_proj", "mlp.fc1", "mlp.fc2"),
    projector_module=None,
    detector_module="model",
    detector_targets=DETECTOR_TARGETS,
    language_module="model.text_backbone",
    language_targets=("attention.self.query", "attention.self.key", "attention.self.value",
                      "attention.output.dense"),
    image_token=None,
    tiny_name="tiny-grounding-dino",
    reference_checkpoint="IDEA-Research/grounding-dino-tiny",
    build_tiny=build_tiny,
    model_class=model_class,
    refused_methods=(
        ("per_part", "per-part learning rates and vision prompts are for generative VLMs: "
                     "use lora with method.target"),
        ("qlora", "4-bit quantization of the detector is not supported: use lora (the model "
                  "is small: 172 M parameters for grounding-dino-tiny)"),
    ) + tuple((m, "a CLIP-family classification method; Grounding DINO is a detector: train it "
                  "with lora, dora or vera") for m in ("coop", "vpt", "clip_adapter")),
)
