"""`train.group_by_length` left unset groups rows by length when their lengths vary (and only
then); the grouped order is seeded per epoch, so a resumed run sees the order the interrupted
one would have seen (transformers' stock sampler draws from the global RNG instead).
"""

from __future__ import annotations

import json
import random

from PIL import Image

from peftvlm.data.batch.packing import (group_by_default, random_batch_padding,
                                        seeded_length_grouped_sampler)
from peftvlm.recipe.load import validate_recipe_dict


def test_only_lengths_that_vary_are_grouped_by_default():
    assert random_batch_padding([51] * 24, 4) == 0.0
    assert not group_by_default([51] * 24, 4)
    assert not group_by_default([50, 51, 52, 50] * 6, 4)  # ~2% padding
    varied = [random.Random(i).randint(40, 400) for i in range(64)]
    assert random_batch_padding(varied, 8) > 0.2 and group_by_default(varied, 8)
    assert not group_by_default([], 8) and not group_by_default(varied, 1)


def test_the_grouped_order_is_seeded_per_epoch_so_a_resume_repeats_it():
    lengths = [random.Random(i).randint(10, 500) for i in range(200)]
    first = seeded_length_grouped_sampler(8, lengths, seed=42)
    epoch0, epoch1 = list(first), None
    first.set_epoch(1)
    epoch1 = list(first)
    assert sorted(epoch0) == sorted(epoch1) == list(range(200))  # each row once per epoch
    assert epoch0 != epoch1  # a new order every epoch
    resumed = seeded_length_grouped_sampler(8, lengths, seed=42)
    resumed.set_epoch(1)  # what the trainer calls when a run resumes in epoch 1
    assert list(resumed) == epoch1
    resumed.set_epoch(0)
    assert list(resumed) == epoch0
    # batches are of similar length: much less padding than random batches
    batches = [epoch0[i:i + 8] for i in range(0, 200, 8)]
    padded = sum(max(lengths[j] for j in b) * len(b) for b in batches)
    assert 1 - sum(lengths) / padded < 0.5 * random_batch_padding(lengths, 8)


def write_rows(folder, n: int = 24):
    rng = random.Random(0)
    Image.new("RGB", (32, 32), (200, 0, 0)).save(folder / "red.png")
    with (folder / "rows.jsonl").open("w") as f:
        for i in range(n):
            answer = " ".join(rng.choices(["red", "square", "small", "left"], k=rng.randint(1, 40)))
            f.write(json.dumps({"id": i, "images": ["red.png"], "messages": [
                {"role": "user", "content": "What is in the picture?"},
                {"role": "assistant", "content": answer}]}) + "\n")
    return folder / "rows.jsonl"


def trainer_for(tmp_path, data: dict, **train):
    from peftvlm.data.batch.collate import ConversationCollator
    from peftvlm.data.pipeline import prepare_data
    from peftvlm.models import load_base
    from peftvlm.trainers.sft import build_trainer, sft_config

    recipe = validate_recipe_dict({
        "name": "group", "model": {"id": "tiny-llava"},
        "method": {"name": "lora", "r": 4, "lora_dropout": 0.0}, "data": data,
        "train": {"max_steps": 2, "per_device_train_batch_size": 4, "max_length": 256, **train},
        "eval": {"metrics": [], "before_training": False}})
    loaded = load_base(recipe.model)
    collator = ConversationCollator(loaded.processor, loaded.family)
    prepared = prepare_data(recipe, collator)
    args = sft_config(recipe.train, tmp_path / "run", [], "g")
    return build_trainer(loaded.model, loaded.processor, collator, prepared.train, args,
                         group_by_length=recipe.train.group_by_length)


def test_unset_grouping_follows_the_data_and_an_explicit_value_wins(tmp_path):
    from transformers.trainer_pt_utils import LengthGroupedSampler

    equal = trainer_for(tmp_path, {"synthetic": {"name": "colour-vqa", "train_size": 16,
                                                 "eval_size": 2}})
    assert not equal.grouped_by_length
    assert not isinstance(equal._get_train_sampler(), LengthGroupedSampler)
    rows = {"train": str(write_rows(tmp_path))}
    varied = trainer_for(tmp_path, rows)
    assert varied.grouped_by_length
    sampler = varied._get_train_sampler()
    assert isinstance(sampler, LengthGroupedSampler) and hasattr(sampler, "set_epoch")
    assert not trainer_for(tmp_path, rows, group_by_length=False).grouped_by_length


def test_peftvlm_train_groups_varied_rows_by_default_and_says_so(tmp_path):
    from conftest import run_cli

    rows = write_rows(tmp_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "name: grouped\nmodel: {id: tiny-llava}\nmethod: {name: lora, r: 4}\n"
        f"data: {{train: {rows}}}\n"
        "train: {max_steps: 2, per_device_train_batch_size: 4, max_length: 256, "
        "logging_steps: 1, save_steps: 1000}\n"
        "eval: {metrics: [], before_training: false}\n")
    res = run_cli("train", recipe, "-o", tmp_path / "run")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "batching rows of similar length" in res.stdout + res.stderr
    res = run_cli("train", recipe, "train.group_by_length=false", "-o", tmp_path / "run2")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "batching rows of similar length" not in res.stdout + res.stderr


def test_the_trainers_dataloader_repeats_an_epochs_grouped_order_after_a_restart(tmp_path):
    """What --resume relies on: a new trainer (a restarted process) told the epoch, as the
    trainer tells it, yields that epoch's batches in the same order."""
    rows = {"train": str(write_rows(tmp_path, n=40))}

    def epoch_batches(epoch):
        loader = trainer_for(tmp_path, rows).get_train_dataloader()
        loader.set_epoch(epoch)
        return [b["input_ids"].tolist() for b in loader]

    first, again = epoch_batches(1), epoch_batches(1)
    assert first == again and len(first) == 10
    assert epoch_batches(0) != first
