"""Shared settings of the built-in tiny twins (random weights built from config)."""

from __future__ import annotations

# Standard deviation of a tiny twin's output embeddings (lm_head). With transformers' default
# 0.02 and a 64-wide model, a normalised hidden state can raise the right token's logit by at
# most ~8 * 8 * 0.02 = 1.3 over ~600 others: LoRA learns the argmax (exact match 1.0) while the
# loss stays near ln(vocab) (~5), and a loss curve that looks like nothing was learned. At 0.2
# the same LoRA reaches a loss near 0 in the same steps. Only the head is widened: the inner
# layers keep their default scale, so their gradients and the tests built on them do not change.
OUTPUT_EMBEDDING_STD = 0.2


def widen_output_embeddings(model, std: float = OUTPUT_EMBEDDING_STD) -> None:
    """Re-draw the tiny twin's output embeddings at `std` (seeded by the caller's RNG), unless
    they are tied to the input embeddings (widening those would change every layer's input)."""
    import torch

    head = model.get_output_embeddings()
    if head is None or head.weight is model.get_input_embeddings().weight:
        return
    with torch.no_grad():
        head.weight.normal_(0.0, std)


def save_tiny(model, processor, out_dir, pad_token_id: int,
              eos_token_id: int | None = None) -> None:
    """Save a tiny twin as a Hub checkpoint would be laid out (weights, processor), with the
    generation settings its eval needs: padding, and the token a reply stops at."""
    model.generation_config.pad_token_id = pad_token_id
    if eos_token_id is not None:
        model.generation_config.eos_token_id = eos_token_id
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
