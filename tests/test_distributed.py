"""Data-parallel training: 2 CPU processes (gloo, via torchrun) give the same losses as one
process with the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, run_cli_in_process
from test_train_run import tiny_recipe


def loss_curves_of_one_and_two_processes(tmp_path, port: int, timeout: int):
    """Train `one.yaml` in one process and `two.yaml` under `torchrun --nproc_per_node 2`
    (both in tmp_path); their summaries' loss curves."""
    res = run_cli_in_process("train", tmp_path / "one.yaml", "-o", tmp_path / "run1")
    assert res.returncode == 0, res.stderr
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(port), "-m",
                          "peftvlm", "train", str(tmp_path / "two.yaml"), "-o",
                          str(tmp_path / "run2")], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return [json.loads((tmp_path / run / "summary.json").read_text())["loss_curve"]
            for run in ("run1", "run2")]


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    if shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None:
        pytest.skip("torchrun not installed beside this python")
    common = {"eval": {"metrics": []}}
    one = tiny_recipe(train={"max_steps": 4, "per_device_train_batch_size": 4}, **common)
    two = tiny_recipe(train={"max_steps": 4, "per_device_train_batch_size": 2}, **common)
    (tmp_path / "one.yaml").write_text(yaml.safe_dump(one))
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(two))
    curve1, curve2 = loss_curves_of_one_and_two_processes(tmp_path, 29517, timeout=600)
    assert [s for s, _ in curve1] == [s for s, _ in curve2] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(curve1, curve2):
        assert abs(a - b) < 1e-4, (curve1, curve2)


@pytest.mark.slow
def test_text_only_rank_beside_an_image_rank_neither_hangs_nor_changes_the_loss(tmp_path):
    """Rank 0's batch is text-only, rank 1's has an image, the projector trains and DDP looks
    for no unused parameters: without the blank image rank 0 skips the vision tower, its
    projector gradients never arrive and both ranks wait forever."""
    if shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None:
        pytest.skip("torchrun not installed beside this python")
    from PIL import Image

    Image.new("RGB", (32, 32), (255, 0, 0)).save(tmp_path / "red.png")
    user = [{"type": "text", "text": "Say red."}]
    rows = [{"messages": [{"role": "user", "content": user},
                          {"role": "assistant", "content": [{"type": "text", "text": "red"}]}],
             "images": []},
            {"messages": [{"role": "user", "content": [{"type": "image"}, *user]},
                          {"role": "assistant", "content": [{"type": "text", "text": "red"}]}],
             "images": ["red.png"]}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tiny_recipe(method={"modules_to_save": ["projector"]}, eval={"metrics": []},
                         train={"max_steps": 3, "ddp_find_unused_parameters": False})
    recipe["data"] = {"train": "train.jsonl"}
    for name, batch in (("one", 2), ("two", 1)):
        recipe["train"]["per_device_train_batch_size"] = batch
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(recipe))
    curve1, curve2 = loss_curves_of_one_and_two_processes(tmp_path, 29518, timeout=420)
    assert [s for s, _ in curve2] == [1, 2, 3]
    for (_, a), (_, b) in zip(curve1, curve2):
        assert abs(a - b) < 1e-4 * abs(a), (curve1, curve2)
    assert (tmp_path / "run2" / "adapter" / "adapter_model.safetensors").exists()
