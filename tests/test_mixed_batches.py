"""Text-only batches under several processes carry a zero-weighted blank image: the vision
tower runs (so sharded and DDP ranks stay in step) and the loss does not change."""

from __future__ import annotations

import pytest
import torch

from peftvlm.data.batch.collate import ConversationCollator
from peftvlm.data.batch.mixed import WithDummyImage, for_training
from peftvlm.errors import DataError
from peftvlm.families import FAMILIES
from peftvlm.models import load_base
from peftvlm.recipe.schema import ModelConfig

TEXT_ROWS = [
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "Say red."}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "red"}]}],
     "images": []},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "Name a colour now."}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "blue"}]}],
     "images": []},
]
GENERATIVE = [f.tiny_name for f in FAMILIES.values() if f.kind == "generative" and f.tiny_name]


@pytest.mark.parametrize("tiny", GENERATIVE)
def test_text_only_batch_runs_the_vision_tower_with_unchanged_loss(tiny):
    loaded = load_base(ModelConfig(id=tiny))
    model = loaded.model.eval()
    collator = ConversationCollator(loaded.processor, loaded.family)
    try:
        plain = collator(TEXT_ROWS)
    except DataError as err:  # a family that takes no text-only rows cannot mix them either
        assert "image in every user message" in err.message
        return
    padded = WithDummyImage(collator)(TEXT_ROWS)
    if loaded.family.dummy_image_refusal:  # stated in the spec: the batch stays as it is
        assert padded.keys() == plain.keys()
        assert torch.equal(padded["input_ids"], plain["input_ids"])
        return
    assert "pixel_values" not in plain and "pixel_values" in padded
    assert padded["input_ids"].shape[1] > plain["input_ids"].shape[1]
    assert (padded["labels"] != -100).sum() == (plain["labels"] != -100).sum()
    calls = []
    vision = model.get_submodule(loaded.family.vision_module)
    vision.register_forward_hook(lambda *_: calls.append(1))
    for p in model.get_submodule(loaded.family.projector_module).parameters():
        p.requires_grad_(True)
    without = model(**plain).loss
    assert not calls
    with_image = model(**padded).loss
    assert calls, "the vision tower ran on the blank image"
    assert torch.allclose(without, with_image, atol=1e-6), (without, with_image)
    with_image.backward()  # the projector gets a (zero) gradient: every rank reduces it
    grads = [p.grad for p in model.get_submodule(loaded.family.projector_module).parameters()]
    assert all(g is not None and torch.count_nonzero(g) == 0 for g in grads)


def test_batches_with_images_and_single_process_runs_are_left_alone(monkeypatch, tiny_llava_path):
    loaded = load_base(ModelConfig(id="tiny-llava"))
    collator = ConversationCollator(loaded.processor, loaded.family)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert for_training(collator) is collator
    monkeypatch.setenv("WORLD_SIZE", "2")
    wrapped = for_training(collator)
    assert isinstance(wrapped, WithDummyImage) and wrapped.family is loaded.family
    from PIL import Image

    row = {"messages": [{"role": "user", "content": [{"type": "image"},
                                                     {"type": "text", "text": "Colour?"}]},
                        {"role": "assistant", "content": [{"type": "text", "text": "red"}]}],
           "images": [Image.new("RGB", (32, 32), (255, 0, 0))]}
    rows = [row, TEXT_ROWS[0]]
    a, b = collator(rows), wrapped(rows)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
