"""Padding-free packing and length grouping: bins filled best fit decreasing up to max_length,
packed loss equals unpacked loss per token (Qwen-VL's M-RoPE included), families that cannot
isolate packed conversations refuse at validate time, grouping uses cached lengths."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from peftvlm.data.batch.collate import ConversationCollator, IGNORE_INDEX
from peftvlm.data.batch.packing import PackedCollator, PackedRows, best_fit_decreasing, pack_batch
from peftvlm.errors import DataError, RecipeError
from peftvlm.families import FAMILIES
from peftvlm.recipe.load import validate_recipe_dict

GENERATIVE = [s for s in FAMILIES.values() if s.kind == "generative" and s.tiny_name]
PACKABLE = [s.tiny_name for s in GENERATIVE if s.packing_refusal is None]
REFUSING = [s.tiny_name for s in GENERATIVE if s.packing_refusal]
WITH_ROPE_HOOK = {s.tiny_name for s in GENERATIVE if s.packed_positions is not None}


def row(question: str, answer: str, colour=(200, 0, 0), size=(32, 32)) -> dict:
    from PIL import Image

    return {"messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]}],
        "images": [Image.new("RGB", size, colour)]}


TEXT_ONLY = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Say yes"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "yes"}]}],
             "images": []}
ROWS = [row("What color?", "red"),
        row("Which colour is the shape in this picture? " * 3, "green and blue", (0, 200, 0),
            (64, 32)),
        row("Hi", "yes", (0, 0, 9)), TEXT_ONLY]
# Two packed rows: the long conversation alone, then three together (the shorter row is padded)
BINS = [[1], [0, 2, 3]]


def test_best_fit_decreasing_fills_bins_without_exceeding_them():
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 400, size=2000)
    bins = best_fit_decreasing(lengths, 512)
    assert sorted(i for b in bins for i in b) == list(range(2000))  # every row exactly once
    totals = np.array([lengths[b].sum() for b in bins])
    assert totals.max() <= 512
    assert len(bins) <= math.ceil(lengths.sum() / 512) * 1.03  # near the lower bound
    assert bins == best_fit_decreasing(lengths, 512)  # deterministic
    # best fit: 300 goes with 200 (tightest), not with 100, which pairs with the 400
    assert sorted(map(sorted, best_fit_decreasing([400, 300, 200, 100], 512))) == \
        [[0, 3], [1, 2]]
    with pytest.raises(DataError, match="a row of 600 tokens cannot be packed into bins of 512"):
        best_fit_decreasing([100, 600], 512)


def token_losses(model, inputs: dict) -> torch.Tensor:
    """Cross-entropy of every trained token, in order (the loss TRL averages)."""
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits.float()
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:],
                                               reduction="none", ignore_index=IGNORE_INDEX)
    return losses[labels[:, 1:] != IGNORE_INDEX]


def with_text_positions(packed: dict, text: torch.Tensor) -> dict:
    """`packed` with its text position row replaced (every row of a 4-row M-RoPE layout too
    when `text` is (4, ...))."""
    positions = packed["position_ids"].clone()
    if positions.dim() == 3 and text.dim() == 2:
        positions[0] = text
    else:
        positions = text.expand_as(positions).clone()
    return dict(packed, position_ids=positions)


@pytest.mark.parametrize("name", PACKABLE)
def test_packed_loss_equals_unpacked_loss_per_token(name):
    from peftvlm.models import load_base
    from peftvlm.recipe.schema import ModelConfig

    loaded = load_base(ModelConfig(id=name))
    model = loaded.model.eval()
    # all tokens carry loss, so conversation boundaries inside the packed row are exercised
    collator = ConversationCollator(loaded.processor, loaded.family, assistant_only_loss=False)
    ordered = [ROWS[i] for b in BINS for i in b]
    padded = collator(ordered)
    packed = PackedCollator(collator, model)([{"packed_rows": [ROWS[i] for i in b]}
                                              for b in BINS])
    lengths = padded["attention_mask"].sum(1)
    per_bin = [int(lengths[:1].sum()), int(lengths[1:].sum())]
    assert packed["input_ids"].shape == (2, max(per_bin)) and "attention_mask" not in packed
    text = packed["position_ids"][0] if packed["position_ids"].dim() == 3 \
        else packed["position_ids"]
    assert text[1, int(lengths[1])] == 0  # positions restart per conversation
    assert (packed["labels"][0, per_bin[0]:] == IGNORE_INDEX).all()  # the padded tail
    unpacked, together = token_losses(model, padded), token_losses(model, packed)
    assert unpacked.shape == together.shape and unpacked.numel() > 50
    assert torch.allclose(unpacked, together, atol=1e-4)
    # without the boundaries (one long sequence) the later conversations would see the first
    crossing = with_text_positions(packed, torch.arange(packed["input_ids"].shape[1])[None])
    assert not torch.allclose(unpacked, token_losses(model, crossing), atol=1e-4)
    if name in WITH_ROPE_HOOK:  # plain token positions in every M-RoPE row: images misplaced
        flat = with_text_positions(packed, text[None].expand(4, -1, -1))
        assert not torch.allclose(unpacked, token_losses(model, flat), atol=1e-4)


def test_pack_batch_puts_all_conversations_in_one_row_by_default():
    batch = {"input_ids": torch.tensor([[5, 6, 7], [8, 9, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
             "labels": torch.tensor([[5, 6, 7], [8, 9, IGNORE_INDEX]])}
    packed = pack_batch(batch)
    assert packed["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert packed["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9]]
    two = pack_batch(batch, [1, 1], pad_id=3)
    assert two["input_ids"].tolist() == [[5, 6, 7], [8, 9, 3]]
    assert two["position_ids"].tolist() == [[0, 1, 2], [0, 1, 0]]
    assert two["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [IGNORE_INDEX, 9, IGNORE_INDEX]]


def test_a_text_only_packed_batch_with_the_blank_image_keeps_its_loss():
    """Several processes: a text-only batch of packed Qwen-VL rows carries the blank image
    behind its own M-RoPE positions, and the loss of the real tokens is unchanged."""
    from peftvlm.data.batch.mixed import WithDummyImage
    from peftvlm.models import load_base
    from peftvlm.recipe.schema import ModelConfig

    loaded = load_base(ModelConfig(id="tiny-qwen2-vl"))
    model = loaded.model.eval()
    collator = PackedCollator(ConversationCollator(loaded.processor, loaded.family, False), model)
    bins = [{"packed_rows": [TEXT_ONLY, TEXT_ONLY]}, {"packed_rows": [TEXT_ONLY]}]
    plain, with_blank = collator(bins), WithDummyImage(collator)(bins)
    assert "pixel_values" in with_blank and with_blank["position_ids"].shape[0] == 4
    assert with_blank["position_ids"].shape[2] == with_blank["input_ids"].shape[1]
    assert torch.allclose(token_losses(model, plain), token_losses(model, with_blank), atol=1e-4)


@pytest.mark.parametrize("name", REFUSING)
def test_families_that_cannot_isolate_conversations_refuse_packing(name, tmp_path):
    from peftvlm.recipe.checks import check_recipe_files

    recipe = validate_recipe_dict({
        "model": {"id": name}, "method": {"name": "lora"},
        "data": {"synthetic": {"name": "colour-vqa"}}, "train": {"packing": True}})
    recipe.source_path = tmp_path / "r.yaml"
    family = next(s for s in GENERATIVE if s.tiny_name == name)
    with pytest.raises(RecipeError, match=f"train.packing: the {family.name} family cannot "
                                          "pack conversations: "):
        check_recipe_files(recipe)


def recipe(model: str = "tiny-llava", **train):
    return validate_recipe_dict({
        "name": "pack", "model": {"id": model},
        "method": {"name": "lora", "r": 4, "lora_dropout": 0.0},
        "data": {"synthetic": {"name": "colour-vqa", "train_size": 24, "eval_size": 4},
                 "system_prompt": "Answer in one word."},
        "train": {"max_steps": 3, "per_device_train_batch_size": 4, "logging_steps": 1,
                  "learning_rate": 5e-3, "max_length": 64, **train},
        "eval": {"metrics": [], "before_training": False}})


def test_an_epoch_of_packed_training_is_one_pass_over_the_bins(tmp_path):
    """Qwen2.5-VL through `peftvlm train`'s own path: 4 rows of 40 tokens fill each bin of 160,
    an epoch takes ceil(bins / batch) steps, and the loss is finite and falls."""
    from peftvlm import api

    packed = recipe("tiny-qwen2.5-vl", packing=True, max_steps=-1, num_train_epochs=2,
                    max_length=160, per_device_train_batch_size=2)
    from transformers import TrainerCallback

    lines, logged = [], []

    class Logs(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            logged.append(dict(logs or {}))

    summary = api.train(packed, tmp_path / "packed", log=lines.append, callbacks=[Logs()])
    assert "packing: 24 rows in 6 packed rows of at most 160 tokens (100% full, 4.0 " \
           "conversations each)" in lines
    assert [s for s, _ in summary["loss_curve"]] == list(range(1, 2 * math.ceil(6 / 2) + 1))
    losses = [loss for _, loss in summary["loss_curve"]]
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[3:]) / 3 < sum(losses[:3]) / 3  # the second epoch's loss is lower
    # TRL's num_tokens counts the packed rows' real tokens (not the 4-row positions' size(1))
    assert [e["num_tokens"] for e in logged if "num_tokens" in e][-1] == 2 * 24 * 40


def test_grouping_uses_cached_lengths_of_rows_or_of_bins(tmp_path):
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from peftvlm.data.pipeline import prepare_data
    from peftvlm.models import load_base
    from peftvlm.trainers.sft import build_trainer, sft_config

    grouped = recipe(group_by_length=True)
    loaded = load_base(grouped.model)
    collator = ConversationCollator(loaded.processor, loaded.family)
    data = prepare_data(grouped, collator)
    args = sft_config(grouped.train, tmp_path / "g", [], "g")
    trainer = build_trainer(loaded.model, loaded.processor, collator, data.train, args)
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, LengthGroupedSampler)
    assert sampler.lengths == data.train.lengths().tolist() and len(sampler.lengths) == 24
    bins = PackedRows(data.train, 160)  # rows of 51 tokens: three a bin
    assert sorted(i for b in bins.bins for i in b) == list(range(24))  # each row once
    assert bins.lengths == [153] * 8
    first = bins.dataset[:2]["packed_rows"]  # what the trainer reads: the bins' rows
    assert [[r["messages"] for r in b] for b in first] == \
        [[data.train[i]["messages"] for i in b] for b in bins.bins[:2]]
    trainer = build_trainer(loaded.model, loaded.processor, PackedCollator(collator), bins, args)
    assert trainer._get_train_sampler().lengths == bins.lengths
    assert len(trainer.get_train_dataloader()) == math.ceil(len(bins) / 4)
