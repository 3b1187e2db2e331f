"""Padding-free packing and length grouping: packed loss equals unpacked loss per token, families
that cannot isolate packed conversations refuse at validate time, grouping uses cached lengths."""

from __future__ import annotations

import pytest
import torch

from peftvlm.data.collate import IGNORE_INDEX, ConversationCollator
from peftvlm.data.packing import pack_batch
from peftvlm.errors import RecipeError
from peftvlm.families import FAMILIES
from peftvlm.recipe import validate_recipe_dict

GENERATIVE = [s for s in FAMILIES.values() if s.kind == "generative" and s.tiny_name]
PACKABLE = [s.tiny_name for s in GENERATIVE if s.packing_refusal is None]
REFUSING = [s.tiny_name for s in GENERATIVE if s.packing_refusal]


def row(question: str, answer: str, colour=(200, 0, 0)) -> dict:
    from PIL import Image

    return {"messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]}],
        "images": [Image.new("RGB", (32, 32), colour)]}


ROWS = [row("What color?", "red"), row("Which colour is the shape in this picture? " * 3,
                                       "green and blue", (0, 200, 0)), row("Hi", "yes", (0, 0, 9))]


def token_losses(model, inputs: dict) -> torch.Tensor:
    """Cross-entropy of every trained token, in order (the loss TRL averages)."""
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits.float()
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:],
                                               reduction="none", ignore_index=IGNORE_INDEX)
    return losses[labels[:, 1:] != IGNORE_INDEX]


@pytest.mark.parametrize("name", PACKABLE)
def test_packed_loss_equals_unpacked_loss_per_token(name):
    from peftvlm.models import load_base
    from peftvlm.recipe import ModelConfig

    loaded = load_base(ModelConfig(id=name))
    model = loaded.model.eval()
    # all tokens carry loss, so conversation boundaries inside the packed row are exercised
    collator = ConversationCollator(loaded.processor, loaded.family, assistant_only_loss=False)
    padded = collator(ROWS)
    packed = pack_batch({k: v.clone() if isinstance(v, torch.Tensor) else v
                         for k, v in padded.items()})
    lengths = padded["attention_mask"].sum(1)
    assert packed["input_ids"].shape == (1, int(lengths.sum())) and "attention_mask" not in packed
    assert packed["position_ids"][0, int(lengths[0])] == 0  # positions restart per conversation
    unpacked, together = token_losses(model, padded), token_losses(model, packed)
    assert unpacked.shape == together.shape and unpacked.numel() > 50
    assert torch.allclose(unpacked, together, atol=1e-4)
    # without the boundaries (one long sequence) the later conversations would see the first
    crossing = dict(packed, position_ids=torch.arange(packed["input_ids"].shape[1])[None])
    assert not torch.allclose(unpacked, token_losses(model, crossing), atol=1e-4)


@pytest.mark.parametrize("name", REFUSING)
def test_families_that_cannot_isolate_conversations_refuse_packing(name, tmp_path):
    from peftvlm.recipe import check_recipe_files

    recipe = validate_recipe_dict({
        "model": {"id": name}, "method": {"name": "lora"},
        "data": {"synthetic": {"name": "colour-vqa"}}, "train": {"packing": True}})
    recipe.source_path = tmp_path / "r.yaml"
    family = next(s for s in GENERATIVE if s.tiny_name == name)
    with pytest.raises(RecipeError, match=f"train.packing: the {family.name} family cannot "
                                          "pack conversations: "):
        check_recipe_files(recipe)


def test_packed_training_follows_the_unpacked_loss_and_grouping_uses_cached_lengths(tmp_path):
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from peftvlm import api
    from peftvlm.data.loading import prepare_data
    from peftvlm.trainers.sft import build_trainer, sft_config

    def recipe(**train):
        return validate_recipe_dict({
            "name": "pack", "model": {"id": "tiny-llava"},
            "method": {"name": "lora", "r": 4, "lora_dropout": 0.0},
            "data": {"synthetic": {"name": "colour-vqa", "train_size": 24, "eval_size": 4},
                     "system_prompt": "Answer in one word."},
            "train": {"max_steps": 3, "per_device_train_batch_size": 4, "logging_steps": 1,
                      "learning_rate": 5e-3, "max_length": 64, **train},
            "eval": {"metrics": [], "before_training": False}})

    plain = api.train(recipe(), tmp_path / "plain", log=lambda *_: None)
    packed = api.train(recipe(packing=True), tmp_path / "packed", log=lambda *_: None)
    assert [s for s, _ in packed["loss_curve"]] == [1, 2, 3]
    for (_, a), (_, b) in zip(plain["loss_curve"], packed["loss_curve"]):
        assert abs(a - b) < 1e-3, (plain["loss_curve"], packed["loss_curve"])

    grouped = recipe(group_by_length=True)
    from peftvlm.models import load_base

    loaded = load_base(grouped.model)
    collator = ConversationCollator(loaded.processor, loaded.family)
    data = prepare_data(grouped, collator)
    args = sft_config(grouped.train, tmp_path / "g", [], "g")
    trainer = build_trainer(loaded.model, loaded.processor, collator, data.train, args)
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, LengthGroupedSampler)
    assert sampler.lengths == data.train.lengths().tolist() and len(sampler.lengths) == 24
