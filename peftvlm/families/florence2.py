"""Florence-2 (florence-community/Florence-2-base, -large: transformers' native port): a DaViT
vision tower, a projector, and a BART encoder-decoder.

Florence-2 has no chat template and is an encoder-decoder: the encoder reads the image tokens
and the task prompt (the processor expands task tokens such as `<OD>` into its own phrasing:
"Locate the objects with category name in the image."), the decoder writes the answer. A
training sample is therefore (prompt -> encoder inputs, answer -> `labels`); the model shifts
the labels right into `decoder_input_ids` itself, so every label token carries loss (padding
is -100). Only single-turn conversations fit this shape (as PaliGemma).

Boxes: `label<loc_x1><loc_y1><loc_x2><loc_y2>` on 1000 bins (`florence2` in
`peftvlm.data.boxes`), the grounding / detection templates' prompts are its task tokens.
`parse_with_processor` runs the processor's own `post_process_generation`, which the tests
hold equal to our parser.
"""

from __future__ import annotations

from pathlib import Path

from peftvlm.errors import DataError
from peftvlm.families._tiny import save_tiny, widen_output_embeddings
from peftvlm.families._tokenizer import build_tiny_tokenizer
from peftvlm.families.base import FamilySpec
from peftvlm.families.paligemma import split_conversation

IMAGE_SIZE = 64  # the DaViT tower downsamples 32x: a 2x2 grid + 1 temporal token
LOC_BINS = 1000
# The task tokens of the published checkpoints (the processor maps each to its prompt).
TASK_TOKENS = ("<OD>", "<CAPTION_TO_PHRASE_GROUNDING>", "<REGION_TO_DESCRIPTION>", "<CAPTION>",
               "<DETAILED_CAPTION>", "<OCR>", "<DENSE_REGION_CAPTION>",
               "<OPEN_VOCABULARY_DETECTION>", "<REGION_TO_CATEGORY>")


def _parts(conversations):
    parts = [split_conversation(c) for c in conversations]
    return ([prompt for prompt, _, _ in parts], [images[0] for _, images, _ in parts],
            [answer for *_, answer in parts])


def encode(processor, conversations: list[list[dict]]) -> dict:
    """Training inputs: prompt + image into the encoder, `<s>` + the answer + `</s>` as
    `labels`. The published checkpoints were trained on the tokenizer's own `<s>answer</s>`
    (their decoder starts from `</s>` and writes `</s><s>answer</s>`; Hugging Face's fine-tuning
    guide tokenises answers the same way): labels without `<s>` would first un-teach it."""
    prompts, images, answers = _parts(conversations)
    if any(a is None for a in answers):
        raise DataError("a Florence-2 training row has no assistant answer",
                        hint="every training conversation must end with the assistant's answer")
    batch = dict(processor(text=prompts, images=images, return_tensors="pt", padding="longest"))
    tok = processor.tokenizer
    target = tok(answers, return_tensors="pt", padding="longest", add_special_tokens=False)
    import torch

    rows = target["input_ids"].shape[0]
    start = torch.full((rows, 1), tok.convert_tokens_to_ids(SPEC.start_of_reply))
    labels = torch.cat([start, target["input_ids"], torch.full((rows, 1), tok.pad_token_id)],
                       dim=1)
    lengths = target["attention_mask"].sum(dim=1) + 1  # with <s>
    labels[torch.arange(rows), lengths] = tok.eos_token_id  # EOS right after each answer
    keep = torch.arange(labels.shape[1])[None, :] <= lengths[:, None]
    batch["labels"] = labels.masked_fill(~keep, -100)
    return batch


def encode_prompt(processor, conversations: list[list[dict]]) -> dict:
    """Encoder inputs for `generate` (the decoder starts from its own start token)."""
    prompts, images, _ = _parts(conversations)
    return dict(processor(text=prompts, images=images, return_tensors="pt", padding="longest"))


def decode(processor, output, batch) -> list[str]:
    """Answers from `generate`'s output: the decoder's tokens, decoded keeping the `<loc_N>`
    tokens (special tokens in the published tokenizer), without start / end / padding."""
    texts = processor.batch_decode(output, skip_special_tokens=False)
    tok = processor.tokenizer
    for token in {tok.bos_token, tok.eos_token, tok.pad_token} - {None}:
        texts = [t.replace(token, "") for t in texts]
    return [t.strip() for t in texts]


def parse_with_processor(processor, text: str, task: str, image_size: tuple[int, int]) -> list:
    """(label, pixel box) pairs from the processor's own `post_process_generation`."""
    found = processor.post_process_generation(text, task=task, image_size=image_size)[task]
    return list(zip(found["labels"], [tuple(b) for b in found["bboxes"]]))


def build_tiny(out_dir: Path) -> None:
    """A ~0.2M-parameter random Florence-2 (DaViT 1x4 stages, BART 1+1 layers) with a local
    tokenizer holding the 1,000 `<loc_N>` tokens, saved like a Hub checkpoint."""
    from transformers import (BartConfig, Florence2Config, Florence2ForConditionalGeneration,
                              Florence2Processor)
    from transformers.models.clip import CLIPImageProcessorPil
    from transformers.models.florence2.configuration_florence2 import Florence2VisionConfig

    locs = [f"<loc_{i}>" for i in range(LOC_BINS)]
    tok = build_tiny_tokenizer(["<image>", *locs], bos_token="<s>", eos_token="</s>",
                               image_token="<image>")
    image_proc = CLIPImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                       crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                       do_center_crop=False)
    image_proc.image_seq_length = (IMAGE_SIZE // 32) ** 2 + 1
    # The published processor's parsing rules (its processor_config.json), trimmed.
    rules = {"ocr": {"pattern": r"(.+?)" + r"<loc_(\d+)>" * 8, "area_threshold": 0.0},
             "phrase_grounding": {"banned_grounding_tokens": ["the image"]},
             "pure_text": {}, "description_with_bboxes": {}, "description_with_polygons": {},
             "polygons": {}, "bboxes": {}, "description_with_bboxes_or_polygons": {}}
    processor = Florence2Processor(image_processor=image_proc, tokenizer=tok,
                                   post_processor_config=rules)
    vision = Florence2VisionConfig(depths=[1, 1, 1, 1], embed_dim=[16, 16, 32, 32],
                                   num_heads=[1, 1, 2, 2], num_groups=[1, 1, 2, 2],
                                   window_size=2, projection_dim=32, drop_path_rate=0.0)
    text = BartConfig(vocab_size=len(tok), d_model=32, encoder_layers=1, decoder_layers=1,
                      encoder_attention_heads=2, decoder_attention_heads=2,
                      encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=256,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.eos_token_id,
                      forced_eos_token_id=None,
                      # wider than 0.02: with tiny random q/k weights the attention gradients
                      # vanish below float32 resolution in a test step (as tiny PaliGemma)
                      init_std=0.1)
    # Untied from the input embeddings (the published model ties them) so that the head can
    # be widened as every tiny twin's is (`_tiny.OUTPUT_EMBEDDING_STD`): with a 32-wide model
    # and a tied 0.1-scale head, no token's logit can stand out and nothing looks learned.
    text.tie_word_embeddings = False
    config = Florence2Config(vision_config=vision, text_config=text, tie_word_embeddings=False,
                             image_token_id=tok.convert_tokens_to_ids("<image>"))
    model = Florence2ForConditionalGeneration(config)
    widen_output_embeddings(model)
    model.generation_config.decoder_start_token_id = tok.eos_token_id
    save_tiny(model, processor, out_dir, tok.pad_token_id, tok.eos_token_id)


def image_tokens(image_inputs: dict, config) -> tuple[int, int]:
    """A fixed-size image: one token per 32x32 cell of the last DaViT stage, plus one."""
    height, width = image_inputs["pixel_values"].shape[-2:]
    cells = (height // 32) * (width // 32)
    return cells + 1, cells


SPEC = FamilySpec(
    name="florence2",
    model_types=("florence2",),
    vision_module="model.vision_tower",
    projector_module="model.multi_modal_projector",
    language_module="model.language_model",
    # BART's attention and feed-forward layers (encoder and decoder)
    language_targets=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    vision_targets=("qkv", "proj", "fc1", "fc2"),
    projector_targets=("image_projection",),
    image_token="<image>",
    interleaved_images=False,
    start_of_reply="<s>",  # the tokenizer's BOS, which `encode` writes first: see there
    end_of_turn="</s>",
    box_format="florence2",  # label<loc_x1><loc_y1><loc_x2><loc_y2>, 1000 bins
    tiny_name="tiny-florence2",
    reference_checkpoint="florence-community/Florence-2-base",  # no chat template
    build_tiny=build_tiny,
    encode=encode,
    encode_prompt=encode_prompt,
    decode=decode,
    image_tokens=image_tokens,
    images_per_row=(1, 1),
    own_loss="Florence-2 is an encoder-decoder: TRL's fused LM head runs the backbone without "
             "labels and shifts them as a causal LM's, so its decoder would see only its start "
             "token",
    packing_refusal="Florence-2 is an encoder-decoder: its decoder reads one answer per row, "
                    "which packed rows cannot keep apart",
    refused_objectives=(
        ("dpo", "TRL's DPOTrainer scores replies as a decoder-only model's continuation of the "
                "prompt; Florence-2 is an encoder-decoder (its decoder reads only the answer)"),
        ("grpo", "TRL's GRPOTrainer samples and scores completions as a decoder-only model's; "
                 "Florence-2 is an encoder-decoder")),
)
