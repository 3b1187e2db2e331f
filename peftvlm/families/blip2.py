"""BLIP-2 (Salesforce/blip2-opt-2.7b, -opt-6.7b, -flan-t5-xl): a frozen EVA ViT, a Q-Former
whose 32 learned queries cross-attend to the image features, a linear projection, and a frozen
language model that reads the projected queries as a soft prompt before the text.

The Q-Former is its own part: `method.target: [qformer]` trains it with LoRA (query/key/value
and output projections of its self- and cross-attention), `[qformer, language]` the Q-Former
and the OPT language model together. BLIP-2 checkpoints ship no chat template: peftvlm's own
("Question: ... Answer: ...", the paper's VQA prompt) is data, `templates/blip2-peftvlm.jinja`,
and is what the tiny twin carries and an export writes. The tiny twin is OPT-based; Flan-T5
checkpoints (encoder-decoder, same model_type) are untested here.
"""

from __future__ import annotations

import functools
from pathlib import Path

from peftvlm.families._processors import with_init
from peftvlm.families._tiny import save_tiny
from peftvlm.families._tokenizer import build_tiny_tokenizer
from peftvlm.families.base import FamilySpec, read_template

TEMPLATE_FILE = "blip2-peftvlm.jinja"  # a deviation: BLIP-2 ships no chat template
IMAGE_SIZE, PATCH, QUERIES = 32, 8, 4


@functools.cache
def processor_class():
    """`Blip2Processor` that keeps its chat template: the stock `__init__` drops the argument,
    so a saved template would be lost on every reload (the tokenizer keeps its copy)."""
    from transformers import Blip2Processor

    def __init__(self, image_processor, tokenizer, num_query_tokens=None, chat_template=None,
                 **kwargs):
        Blip2Processor.__init__(self, image_processor, tokenizer, num_query_tokens, **kwargs)
        self.chat_template = chat_template

    return with_init(Blip2Processor, __init__)


def build_tiny(out_dir: Path) -> None:
    """A 2-layer random BLIP-2 (ViT, 2-layer Q-Former with 4 queries, OPT) with its processor."""
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    template = read_template(TEMPLATE_FILE)
    # OPT's tokenizer uses </s> as both BOS and EOS.
    tok = build_tiny_tokenizer(["<image>"], chat_template=template, bos_token="</s>",
                               eos_token="</s>")
    image_proc = BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = processor_class()(image_processor=image_proc, tokenizer=tok,
                                  num_query_tokens=QUERIES, chat_template=template)
    config = Blip2Config(
        # wider init than 1e-10-ish defaults: through ViT -> Q-Former -> OPT the tiny twin's
        # attention gradients otherwise vanish below float32 resolution in a test step
        vision_config=dict(image_size=IMAGE_SIZE, patch_size=PATCH, hidden_size=64,
                           intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           initializer_range=0.1),
        qformer_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            initializer_range=0.1,
                            intermediate_size=128, encoder_hidden_size=64, vocab_size=len(tok),
                            cross_attention_frequency=1),
        text_config=dict(model_type="opt", vocab_size=len(tok), hidden_size=64, ffn_dim=128,
                         num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64,
                         max_position_embeddings=1024, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
        num_query_tokens=QUERIES, image_token_index=tok.convert_tokens_to_ids("<image>"))
    model = Blip2ForConditionalGeneration(config)
    # transformers initialises the queries to zeros: identical queries attend uniformly, so
    # their self-attention gets no gradient at all. A trained checkpoint's queries differ.
    with torch.no_grad():
        model.query_tokens.normal_(std=config.qformer_config.initializer_range)
    save_tiny(model, processor, out_dir, tok.pad_token_id, tok.eos_token_id)


SPEC = FamilySpec(
    name="blip_2",
    model_types=("blip-2",),
    vision_module="vision_model",
    qformer_module="qformer",
    projector_module="language_projection",
    language_module="language_model",
    vision_targets=("qkv", "projection", "fc1", "fc2"),
    qformer_targets=("query", "key", "value", "dense"),
    projector_targets=("",),  # language_projection is one Linear
    language_targets=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),  # OPT
    image_token="<image>",
    end_of_turn="</s>",
    tiny_name="tiny-blip2",
    build_tiny=build_tiny,
    processor_class=processor_class,
    reference_checkpoint="Salesforce/blip2-opt-2.7b",
    chat_template=TEMPLATE_FILE,  # BLIP-2 ships none: peftvlm's, as data
    images_per_row=(1, 1),  # the Q-Former's queries stand for one image
    packing_refusal="BLIP-2 puts one image's 32 Q-Former queries in front of each row's "
                    "text; packed rows would carry several; use train.group_by_length",
    dummy_image_refusal="every BLIP-2 row has exactly one image (images_per_row), so text-only "
                        "batches never occur",
    refused_objectives=(("grpo", "TRL's GRPOTrainer computes log-probabilities from the "
                                 "language model's hidden states (its fused LM head), which "
                                 "BLIP-2's output does not carry"),),
    # TRL's fused head runs `model.base_model` for the hidden states; BLIP-2 has no separate
    # backbone module (base_model is the model itself), so it returns the full forward's output,
    # which carries logits but no `last_hidden_state`
    unfused_lm_head="BLIP-2's forward (vision, Q-Former, projection, then the OPT language "
                    "model) has no backbone that returns the language model's hidden states",
    refused_methods=(("per_part", "the Q-Former cross-attends to every ViT token and the language "
                      "model sees only its 32 queries: VPT prompt tokens in the ViT would not "
                      "reach the language model as prompts"),),
)
