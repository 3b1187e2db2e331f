"""SmolVLM / Idefics3 (HuggingFaceTB/SmolVLM-*, SmolVLM2-*, HuggingFaceM4/Idefics3-*): a SigLIP
vision model, a pixel-shuffle connector, and a Llama-style text model at `model.text_model`.

SmolVLM v1 checkpoints have model_type `idefics3`, SmolVLM2 ones `smolvlm`; both keep the same
module layout and chat template (`User:<image>question<end_of_utterance>\\nAssistant: answer`).
Idefics3-8B-Llama3 shares the layout with a Llama-3 template of its own.
The tiny model is an Idefics3 with SmolVLM's template: SmolVLM2's processor also needs a video
processor, which needs torchvision.
"""

from __future__ import annotations

from pathlib import Path

from peftvlm.families._tiny import save_tiny, widen_output_embeddings
from peftvlm.families._tokenizer import build_tiny_tokenizer
from peftvlm.families.base import FamilySpec, read_template

# The tiny twin carries the template HuggingFaceTB/SmolVLM-*-Instruct (and SmolVLM2) publish;
# HuggingFaceM4/Idefics3-8B-Llama3 ships its own (`<|begin_of_text|>User:...`), which is what
# trains when that checkpoint is loaded: the checkpoint's template is the source of truth.
PUBLISHED_TEMPLATE = "smolvlm"

SPECIAL_TOKENS = ("<|im_start|>", "<fake_token_around_image>", "<global-img>", "<image>",
                  "<end_of_utterance>")
IMAGE_SIZE, PATCH, SCALE_FACTOR = 32, 8, 2


def build_tiny(out_dir: Path) -> None:
    """A 2-layer random SmolVLM (Idefics3 architecture) with a local tokenizer and processor."""
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor,
                              Idefics3VisionConfig, LlamaConfig)
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    template = read_template(PUBLISHED_TEMPLATE)
    tok = build_tiny_tokenizer(SPECIAL_TOKENS, chat_template=template,
                               bos_token="<|im_start|>", eos_token="<end_of_utterance>")
    # One global image, no tiling: (32/8)^2 patches, pixel-shuffled by 2x2 into 4 tokens.
    image_proc = Idefics3ImageProcessorPil(
        do_image_splitting=False, size={"longest_edge": IMAGE_SIZE},
        max_image_size={"longest_edge": IMAGE_SIZE})
    seq_len = (IMAGE_SIZE // PATCH) ** 2 // SCALE_FACTOR ** 2
    processor = Idefics3Processor(image_processor=image_proc, tokenizer=tok,
                                  image_seq_len=seq_len, chat_template=template)
    config = Idefics3Config(
        vision_config=Idefics3VisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH, hidden_size=64,
                                           intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4),
        text_config=LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                max_position_embeddings=1024, pad_token_id=tok.pad_token_id,
                                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
        image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=SCALE_FACTOR,
        pad_token_id=tok.pad_token_id)
    model = Idefics3ForConditionalGeneration(config)
    widen_output_embeddings(model)
    save_tiny(model, processor, out_dir, tok.pad_token_id, tok.eos_token_id)


def image_tokens(image_inputs: dict, config) -> tuple[int, int]:
    """Every tile (and the global view) is pixel-shuffled by scale_factor^2 into fewer tokens;
    each tile also adds a few text tokens (<fake_token_around_image>, <row_i_col_j>)."""
    tiles = image_inputs["pixel_values"].shape[1]
    side = config.vision_config.image_size // config.vision_config.patch_size
    per_tile = side * side // config.scale_factor ** 2
    return tiles * (per_tile + 3), tiles * side * side


SPEC = FamilySpec(
    name="smolvlm",
    model_types=("idefics3", "smolvlm"),
    vision_module="model.vision_model",
    projector_module="model.connector",
    language_module="model.text_model",
    vision_targets=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    projector_targets=("proj",),  # connector.modality_projection.proj
    image_token="<image>",
    # Each image is framed by these; tiles are tagged <row_i_col_j> (the processor's 6 x 6).
    media_tokens=("<fake_token_around_image>", "<global-img>", "<video>",
                  *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7))),
    end_of_turn="<end_of_utterance>",
    tiny_name="tiny-smolvlm",
    reference_checkpoint="HuggingFaceTB/SmolVLM-256M-Instruct",
    build_tiny=build_tiny,
    image_tokens=image_tokens,
    # SmolVLM2 takes video as frames of <image> tokens with "Frame from mm:ss" stamps, through
    # SmolVLMProcessor + SmolVLMVideoProcessor; the latter is built on torchvision.
    video_refusal="Idefics3 / SmolVLM v1 take no video, and SmolVLM2's video processor "
                  "(SmolVLMVideoProcessor) needs torchvision, which does not load with this "
                  "torch build; peftvlm has no NumPy frames processor for it yet",
    # a blank image needs no tiles: one view of 64 tokens instead of up to 17
    dummy_image_options=(("do_image_splitting", False),),
)
