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
