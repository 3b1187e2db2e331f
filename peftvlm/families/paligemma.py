"""PaliGemma (google/paligemma-*, paligemma2-*): a SigLIP vision tower, a linear projector and
a Gemma language model that attends bidirectionally over the image + prompt prefix.

PaliGemma has no chat template: a sample is a prompt (`<image>` tokens, BOS, the task text, a
newline) and a suffix (the answer, then EOS). The processor builds both from `text=` and
`suffix=` and marks the suffix with `token_type_ids == 1`, which is what carries loss. Only
single-turn conversations fit this shape.
"""

from __future__ import annotations

from pathlib import Path

from peftvlm.errors import DataError
from peftvlm.families._tiny import save_tiny
from peftvlm.families._tokenizer import build_tiny_tokenizer
from peftvlm.families.base import FamilySpec

IMAGE_SIZE, PATCH = 32, 8


def _texts(message: dict) -> str:
    content = message["content"]
    if isinstance(content, str):
        return content
    return " ".join(c["text"] for c in content if c["type"] == "text")


def _images(message: dict) -> list:
    content = message["content"]
    return [] if isinstance(content, str) else [c["image"] for c in content if c["type"] == "image"]


def split_conversation(conversation: list[dict]) -> tuple[str, list, str | None]:
    """(prompt text, images, answer or None) of a single-turn conversation.

    System messages have no slot in PaliGemma's format: their text is put before the prompt.
    """
    roles = [m["role"] for m in conversation]
    turns = [r for r in roles if r != "system"]
    if turns not in (["user"], ["user", "assistant"]):
        raise DataError(f"PaliGemma takes single-turn conversations (optional system message, one "
                        f"user message, one assistant answer); got roles {roles}",
                        hint="split multi-turn conversations into one row per turn, or use a "
                             "family with a chat template (qwen2_vl, smolvlm, llava)")
    prompt = " ".join(_texts(m) for m in conversation if m["role"] in ("system", "user"))
    images = [im for m in conversation if m["role"] == "user" for im in _images(m)]
    if not images:
        raise DataError("PaliGemma needs an image in every user message; a row has none",
                        hint="drop text-only rows or give each one an image")
    answer = _texts(conversation[-1]) if turns[-1] == "assistant" else None
    return prompt, images, answer


def _processor_inputs(processor, conversations):
    parts = [split_conversation(c) for c in conversations]
    # The processor puts BOS after the last <image> and a newline after the prompt.
    text = [processor.image_token * len(images) + prompt for prompt, images, _ in parts]
    return text, [images for _, images, _ in parts], [answer for *_, answer in parts]


def encode(processor, conversations: list[list[dict]]) -> dict:
    """Training inputs: the answer goes in as `suffix=`; labels are -100 except answer + EOS."""
    text, images, answers = _processor_inputs(processor, conversations)
    if any(a is None for a in answers):
        raise DataError("a PaliGemma training row has no assistant answer",
                        hint="every training conversation must end with the assistant's answer")
    batch = processor(text=text, images=images, suffix=answers, return_tensors="pt",
                      padding="longest")
    # Padding has token type 0 like the prompt, so the processor's labels already skip it.
    return dict(batch)


def encode_prompt(processor, conversations: list[list[dict]]) -> dict:
    """Left-padded prompt-only inputs for `generate` (the prefix with its token types)."""
    text, images, _ = _processor_inputs(processor, conversations)
    batch = processor(text=text, images=images, return_tensors="pt", padding="longest",
                      padding_side="left")
    batch.pop("labels", None)  # all -100 without a suffix; generate must not see them
    return dict(batch)


def build_tiny(out_dir: Path) -> None:
    """A 2-layer random PaliGemma with a local tokenizer and processor, saved like a Hub model."""
    from transformers import GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration
    from transformers import PaliGemmaProcessor, SiglipVisionConfig
    from transformers.models.siglip import SiglipImageProcessorPil

    tok = build_tiny_tokenizer(["<bos>", "<eos>", "<image>"], bos_token="<bos>",
                               eos_token="<eos>")
    image_proc = SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    image_proc.image_seq_length = (IMAGE_SIZE // PATCH) ** 2
    # The processor adds 1,024 <locXXXX> and 128 <segXXX> tokens: size the vocabulary after it.
    processor = PaliGemmaProcessor(image_processor=image_proc, tokenizer=tok)
    config = PaliGemmaConfig(
        vision_config=SiglipVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH, hidden_size=64,
                                         intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, projection_dim=64,
                                         vision_use_head=False),  # as PaliGemma: no pooling head
        text_config=GemmaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                                head_dim=16, max_position_embeddings=1024,
                                # wider than 0.02: with tiny random q/k weights the attention
                                # gradients vanish below float32 resolution in a test step
                                initializer_range=0.1,
                                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                eos_token_id=tok.eos_token_id),
        image_token_index=tok.convert_tokens_to_ids("<image>"), vocab_size=len(tok),
        projection_dim=64, hidden_size=64)
    model = PaliGemmaForConditionalGeneration(config)
    save_tiny(model, processor, out_dir, tok.pad_token_id, tok.eos_token_id)


def image_tokens(image_inputs: dict, config) -> tuple[int, int]:
    """One SigLIP image at the processor's fixed size: a token per patch."""
    height, width = image_inputs["pixel_values"].shape[-2:]
    patch = config.vision_config.patch_size
    patches = (height // patch) * (width // patch)
    return patches, patches


SPEC = FamilySpec(
    name="paligemma",
    model_types=("paligemma",),
    vision_module="model.vision_tower",
    projector_module="model.multi_modal_projector",
    language_module="model.language_model",
    projector_targets=("linear",),
    image_token="<image>",
    interleaved_images=False,  # the processor puts every image before the prompt
    end_of_turn="<eos>",
    box_format="paligemma",  # <locYYYY><locXXXX><locYYYY><locXXXX> label, 1024 bins
    tiny_name="tiny-paligemma",
    reference_checkpoint="google/paligemma-3b-pt-224",  # no chat template
    build_tiny=build_tiny,
    encode=encode,
    encode_prompt=encode_prompt,
    image_tokens=image_tokens,
    packing_refusal="PaliGemma attends bidirectionally over the image and prompt (a prefix-LM "
                    "mask built from token_type_ids), which packed position ids cannot confine "
                    "to one conversation",
    # GRPO: TRL renders rollout prompts with a chat template; this one writes the text
    # `encode_prompt` gives the processor (tests/test_grpo.py checks the two agree)
    rollout_template="paligemma-prompt",
    answer_token_type=1,
)
