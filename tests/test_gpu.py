"""Checks that only a GPU can make: bf16 mixed precision, gradient checkpointing, QLoRA with
CUDA kernels, and merging a QLoRA adapter there. Skipped without CUDA; run them with
`bash scripts/gpu_check.sh` on a GPU machine."""

from __future__ import annotations

import pytest

from peftvlm import api
from peftvlm.recipe.load import validate_recipe_dict
from test_train_run import tiny_recipe

pytestmark = pytest.mark.gpu


def gpu_train(tmp_path, method: str, **train):
    recipe = validate_recipe_dict(tiny_recipe(
        method={"name": method, "r": 4, "lora_dropout": 0.0},
        train={"max_steps": 20, "learning_rate": 1e-2, **train}))
    return api.train(recipe, tmp_path / method, log=lambda *_: None)


def test_bf16_and_gradient_checkpointing_train(tmp_path):
    import torch

    assert torch.cuda.is_bf16_supported()
    summary = gpu_train(tmp_path, "lora", bf16=True, gradient_checkpointing=True)
    assert summary["hardware"] != "cpu"
    curve = [loss for _, loss in summary["loss_curve"]]
    assert curve[-1] < curve[0]


def test_qlora_trains_and_merges_on_gpu(tmp_path):
    from peftvlm.export import export_run

    summary = gpu_train(tmp_path, "qlora", bf16=True)
    curve = [loss for _, loss in summary["loss_curve"]]
    assert curve[-1] < curve[0]
    report = export_run(tmp_path / "qlora", merge=True, out=tmp_path / "merged",
                        log=lambda *_: None)
    assert report["passed"] and report["base_quantized_in_training"]
