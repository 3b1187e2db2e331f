"""Mixed batches under several processes: a text-only batch carries one zero-weighted blank image.

With FSDP or DeepSpeed ZeRO-3 every rank must run the same modules: the vision tower's
parameters are gathered collectively in its forward, so a rank whose batch has no image (and
skips the vision tower) waits forever for the others (LLaMA-Factory #5616). DDP without
`find_unused_parameters` fails the same way through missing gradients of a trainable
projector. As LLaMA-Factory and ms-swift do, a text-only batch gets a blank image appended to
its first row, behind attention mask 0 and labels -100: the vision tower runs on every rank, no
real token can attend to the image, and the loss is exactly the same.

The family says how to make that image small (`FamilySpec.dummy_image_side` and
`dummy_image_options`); the encoding is the collator's own, so it matches the model.
"""

from __future__ import annotations

import contextlib
import os

IGNORE_INDEX = -100


def world_size() -> int:
    """Training processes, as torchrun / accelerate launch announce them."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def for_training(collator):
    """The collator the trainer uses: with dummy images when several processes train."""
    return WithDummyImage(collator) if world_size() > 1 else collator


@contextlib.contextmanager
def image_processor_options(image_processor, options):
    """Temporarily set image-processor attributes (e.g. no tiling for a blank image)."""
    saved = {k: getattr(image_processor, k) for k, _ in options}
    try:
        for key, value in options:
            setattr(image_processor, key, value)
        yield
    finally:
        for key, value in saved.items():
            setattr(image_processor, key, value)


def dummy_image_batch(collator) -> dict:
    """One row holding a blank image, encoded exactly as a training row is."""
    from PIL import Image

    family = collator.family
    image = Image.new("RGB", (family.dummy_image_side,) * 2, (255, 255, 255))
    row = {"messages": [{"role": "user", "content": [{"type": "image"},
                                                     {"type": "text", "text": "."}]},
                        {"role": "assistant", "content": [{"type": "text", "text": "."}]}],
           "images": [image]}
    with image_processor_options(collator.processor.image_processor, family.dummy_image_options):
        return collator([row])


def append_dummy(batch: dict, dummy: dict, pad_id: int) -> dict:
    """`batch` with `dummy`'s tokens after row 0's (padding after the others), masked out, and
    `dummy`'s image inputs as the batch's."""
    import torch

    rows, length = batch["input_ids"].shape
    extra = dummy["input_ids"].shape[1]
    out = {}
    for key, value in batch.items():
        if key == "position_ids" and value.dim() == 3:  # packed Qwen-VL rows: (4, rows, tokens)
            tail = torch.zeros((*value.shape[:2], extra), dtype=value.dtype)
            tail[:, 0] = dummy[key][:, 0]
            out[key] = torch.cat([value, tail], dim=2)
            continue
        if not (torch.is_tensor(value) and value.dim() >= 2 and value.shape[:2] == (rows, length)):
            out[key] = value
            continue
        fill = {"input_ids": pad_id, "labels": IGNORE_INDEX}.get(key, 0)
        tail = torch.full((rows, extra, *value.shape[2:]), fill, dtype=value.dtype)
        if key not in ("attention_mask", "labels") and key in dummy:
            tail[0] = dummy[key][0]
        out[key] = torch.cat([value, tail], dim=1)
    for key, value in dummy.items():
        if key not in batch:  # pixel_values, image_grid_thw, pixel_attention_mask, ...
            out[key] = value
    return out


class WithDummyImage:
    """Wrap a collator so that a batch without images still runs the vision tower."""

    def __init__(self, collator):
        self.collator = collator
        self._dummy = None

    def __getattr__(self, name):  # the wrapped collator's processor, family, ...
        if name == "collator":  # not set yet (unpickling in a data-loader worker)
            raise AttributeError(name)
        return getattr(self.collator, name)

    def __call__(self, rows: list[dict]) -> dict:
        batch = self.collator(rows)
        if "pixel_values" in batch or self.collator.family.dummy_image_refusal:
            return batch
        if self._dummy is None:
            self._dummy = dummy_image_batch(self.collator)
        tokenizer = self.collator.processor.tokenizer
        return append_dummy(batch, self._dummy, tokenizer.pad_token_id)
