"""End-to-end training runs on tiny-llava: run folder, resume, refusals, W&B offline, bad data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from transformers import TrainerCallback

from conftest import REPO, run_cli_in_process
from peftvlm import api
from peftvlm.errors import DataError, RunError
from peftvlm.recipe.load import validate_recipe_dict


def tiny_recipe(**sections) -> dict:
    recipe = {
        "name": "tiny",
        "model": {"id": "tiny-llava"},
        "method": {"name": "lora", "r": 4, "lora_dropout": 0.0},
        "data": {"synthetic": {"name": "colour-vqa", "train_size": 48, "eval_size": 8}},
        "train": {"max_steps": 6, "save_steps": 3, "per_device_train_batch_size": 4,
                  "logging_steps": 1, "learning_rate": 5e-3, "max_length": 64},
        "eval": {"metrics": ["exact_match"], "max_new_tokens": 2},
    }
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value}
    return recipe


def train(tmp_path, name="run", **sections):
    recipe = validate_recipe_dict(tiny_recipe(**sections))
    return api.train(recipe, tmp_path / name, log=lambda *_: None)


def adapter_weights(run_dir):
    from safetensors.torch import load_file

    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def test_run_folder_is_complete_and_adapter_loads_with_plain_peft(tmp_path):
    summary = train(tmp_path)
    run = tmp_path / "run"
    for name in ("recipe.yaml", "summary.json", "loss.png", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "adapter/tokenizer.json",
                 "adapter/processor_config.json", "checkpoints/checkpoint-6"):
        assert (run / name).exists(), name
    saved = json.loads((run / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert 0 < saved["trainable_params"] < saved["total_params"]
    assert saved["global_step"] == 6 and saved["final_loss"] > 0
    assert set(saved["eval"]["exact_match"]) == {"before", "after"}
    assert saved["data"]["train_rows"] == 48

    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from peftvlm.models import tiny_model_path

    base = AutoModelForImageTextToText.from_pretrained(tiny_model_path("tiny-llava"))
    model = PeftModel.from_pretrained(base, run / "adapter")
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_finished_run_is_not_overwritten_by_accident(tmp_path):
    train(tmp_path)
    with pytest.raises(RunError, match="finished run"):
        train(tmp_path)
    recipe = validate_recipe_dict(tiny_recipe(train={"max_steps": 3}))
    summary = api.train(recipe, tmp_path / "run", overwrite=True, log=lambda *_: None)
    assert summary["global_step"] == 3


class CrashAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise SystemExit("simulated kill")


# Resume after a kill: tests/test_run_safety.py (SIGKILL during a checkpoint save).


def test_wandb_offline_writes_a_run_without_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_supersecret_token_123")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    train(tmp_path, tracking={"wandb": {"mode": "offline", "project": "peftvlm-test"}})
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    blob = b"".join(p.read_bytes() for p in runs[0].rglob("*") if p.is_file())
    assert b"hf_supersecret_token_123" not in blob
    assert b"learning_rate" in blob  # the resolved recipe went to the run config


def write_image(path, colour=(200, 0, 0)):
    from PIL import Image

    Image.new("RGB", (32, 32), colour).save(path)


def messy_dataset(folder):
    """12 good rows, 2 long ones and one of each bad kind."""
    (folder / "img").mkdir(parents=True)
    write_image(folder / "img" / "ok.png")
    (folder / "img" / "empty.png").write_bytes(b"")
    (folder / "img" / "corrupt.png").write_bytes(b"not a png at all")
    (folder.parent / "outside.png").write_bytes((folder / "img" / "ok.png").read_bytes())

    def row(image="img/ok.png", question="What color is the shape?", answer="red"):
        return json.dumps({"images": [image], "messages": [
            {"role": "user", "content": question}, {"role": "assistant", "content": answer}]})

    lines = [row() for _ in range(12)]
    lines += [row(question="What color is the shape? " * 8) for _ in range(2)]
    lines += [row(image="img/missing.png"), row(image="img/empty.png"),
              row(image="img/corrupt.png"), row(image="../outside.png"), row(answer=" "),
              "{not json"]
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "train.jsonl"


def test_bad_rows_are_counted_and_long_rows_dropped(tmp_path):
    path = messy_dataset(tmp_path / "data")
    data = {"synthetic": None, "train": str(path)}
    summary = train(tmp_path, data=data, train={"max_steps": 2, "max_length": 60})
    report = summary["data"]
    bad = {reason: v["count"] for reason, v in report["bad_rows"]["train"].items()}
    assert bad == {"missing_image": 1, "corrupt_image": 2, "path_escapes_root": 1,
                   "empty_answer": 1, "invalid_json": 1}
    assert "train.jsonl:13" in report["bad_rows"]["train"]["missing_image"]["first_rows"][0] or \
        "train.jsonl:15" in report["bad_rows"]["train"]["missing_image"]["first_rows"][0]
    assert report["dropped_overflow"]["count"] == 2 and report["train_rows"] == 12


def test_strict_policies_stop_before_training_naming_rows(tmp_path):
    path = messy_dataset(tmp_path / "data")
    with pytest.raises(DataError, match=r"missing image \(e\.g\. train\.jsonl:15"):
        train(tmp_path, "a", data={"synthetic": None, "train": str(path), "on_bad_row": "error"})
    good = tmp_path / "data" / "good.jsonl"
    good.write_text("".join(l + "\n" for l in path.read_text().splitlines()[:14]))
    with pytest.raises(DataError, match=r"2 row\(s\) exceed train.max_length=60: good\.jsonl:13 \("):
        train(tmp_path, "b", data={"synthetic": None, "train": str(good), "on_overflow": "error"},
              train={"max_length": 60})
    with pytest.raises(DataError, match="every row is longer"):
        train(tmp_path, "c", data={"synthetic": None, "train": str(good)}, train={"max_length": 20})
    assert not (tmp_path / "a" / "checkpoints").exists()


def test_dry_run_prints_counts_and_the_loss_mask(tmp_path):
    recipe = tmp_path / "r.yaml"
    import yaml

    recipe.write_text(yaml.safe_dump(tiny_recipe()))
    res = run_cli_in_process("train", recipe, "--dry-run", "-o", tmp_path / "dry")
    assert res.returncode == 0, res.stderr
    assert "trainable params:" in res.stdout and "carry loss" in res.stdout
    assert "<image>x16" in res.stdout and "ASSISTANT:" in res.stdout
    assert not (tmp_path / "dry").exists()


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(tmp_path):
    import yaml

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(train={"max_steps": 60, "save_steps": 1})))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "peftvlm", "train", str(recipe), "-o",
                             str(tmp_path / "run")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not list((tmp_path / "run" / "checkpoints").glob("checkpoint-*")):  # any: one may
        if time.time() > deadline or proc.poll() is not None:                # rotate away
            proc.kill()
            pytest.fail(f"no checkpoint: {proc.communicate()}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # mid-training: a step is saved, more to go
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err  # the shell's code for SIGINT (test_signals.py: SIGTERM)
    assert "interrupted by SIGINT" in err and "--resume" in err
    assert list((tmp_path / "run" / "checkpoints").glob("checkpoint-*"))
    res = run_cli_in_process("train", recipe, "-o", tmp_path / "run", "--resume")
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["global_step"] == 60


@pytest.mark.slow
def test_unreachable_wandb_server_falls_back_to_offline(tmp_path, monkeypatch):
    from peftvlm.tracking import start_wandb

    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "2")  # the wait a user may set; default 20 s
    notices = []
    recipe = validate_recipe_dict(tiny_recipe(tracking={"wandb": {"mode": "online"}}))
    run = start_wandb(recipe, tmp_path, log=notices.append)
    try:
        assert run.settings.mode == "offline"
        assert any("logging offline" in n for n in notices)
        assert list((tmp_path / "wandb").glob("offline-run-*"))
    finally:
        run.finish()
