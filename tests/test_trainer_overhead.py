"""Per-step trainer work of ours stays off the hot path: `total_flos` is the figure transformers
computes, with the model's parameters counted once instead of every step."""

from __future__ import annotations

import torch
from transformers import Trainer

from test_group_by_default import trainer_for


def test_flos_equal_transformers_and_parameters_are_counted_once(tmp_path, monkeypatch):
    trainer = trainer_for(tmp_path, {"synthetic": {"name": "colour-vqa", "train_size": 8,
                                                   "eval_size": 2}})
    inputs = {"input_ids": torch.ones(4, 37, dtype=torch.long)}
    expected = Trainer.floating_point_ops(trainer, inputs)
    assert expected > 0
    counted = []
    real = type(trainer.model).num_parameters
    monkeypatch.setattr(type(trainer.model), "num_parameters",
                        lambda self, **kw: counted.append(1) or real(self, **kw))
    assert [trainer.floating_point_ops(inputs) for _ in range(3)] == [expected] * 3
    assert len(counted) == 1
    assert trainer.floating_point_ops({"pixel_values": torch.ones(1)}) == 0


def test_training_runs_with_the_existing_objects_left_out_of_gc():
    import gc

    import pytest

    from peftvlm.trainers.generative import gc_skips_what_exists

    assert gc.get_freeze_count() == 0
    with gc_skips_what_exists():
        assert gc.get_freeze_count() > 1000  # libraries, model, data: not walked by gc.collect
        made = [[]]
        made[0].append(made)  # a cycle made while training is collected as before
        del made
        assert gc.collect() >= 1
    assert gc.get_freeze_count() == 0
    with pytest.raises(RuntimeError), gc_skips_what_exists():
        raise RuntimeError("a failed step")
    assert gc.get_freeze_count() == 0
