"""Padding-free packing (`train.packing`) and length-grouped batching (`train.group_by_length`).

`PackedCollator` wraps the training collator: the batch it encodes (assistant-only labels and
all) is laid end to end in ONE row with its padding removed, `position_ids` restart at 0 for
each conversation and no `attention_mask` is passed. transformers reads conversation
boundaries from those positions: on CPU/SDPA/eager it builds a block-diagonal causal mask
(`masking_utils.find_packed_sequence_indices`), with flash-attention it takes the varlen path.
So no token attends across conversations and each token sees the positions it would see alone;
the first token of each conversation gets label -100, so nothing is trained to predict it
from the previous conversation (unpacked, it is never predicted either). Images stay in batch
order, which is the order of their placeholder tokens in the packed row.

TRL refuses packing for image data, and transformers' `DataCollatorWithFlattening` expects
pre-tokenised rows without images, hence this small layer on our own collator's output.
"""

from __future__ import annotations

from peftvlm.data.collate import IGNORE_INDEX


def pack_batch(batch: dict) -> dict:
    """A right-padded batch -> one padding-free row with per-conversation position ids."""
    import torch

    mask = batch["attention_mask"].bool()
    lengths = mask.sum(dim=1)
    packed = {}
    for key, value in batch.items():
        if key == "attention_mask":
            continue
        per_token = isinstance(value, torch.Tensor) and value.dim() == 2 and \
            value.shape == mask.shape
        packed[key] = value[mask].unsqueeze(0) if per_token else value
    packed["position_ids"] = torch.cat([torch.arange(int(n)) for n in lengths]).unsqueeze(0)
    if "labels" in packed:
        starts = torch.cumsum(lengths, 0) - lengths
        packed["labels"][0, starts] = IGNORE_INDEX
    return packed


class PackedCollator:
    """The training collator, then `pack_batch`: a batch of conversations as one packed row."""

    def __init__(self, collator):
        self.collator = collator
        self.processor, self.family = collator.processor, collator.family

    def __call__(self, rows: list[dict]) -> dict:
        return pack_batch(self.collator(rows))


def train_collator(collator, packing: bool):
    return PackedCollator(collator) if packing else collator
