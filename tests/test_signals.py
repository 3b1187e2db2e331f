"""Signals and resume: SIGTERM (docker stop, Kubernetes, Slurm) stops training like Ctrl-C, with a
resumable checkpoint and a message naming it; --resume names the checkpoint it continues from;
a resumed run with dropout draws the same random numbers as an uninterrupted one (streamed
or not)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from conftest import REPO, run_cli_in_process
from data_helpers import save_image
from peftvlm import api
from peftvlm.checkpoints import MANIFEST, incomplete_reason
from peftvlm.recipe.load import validate_recipe_dict
from peftvlm.trainers.signals import Interrupted, StopSignals
from test_streaming import StopAfterSaving, conversation, recipe_dict, write_jsonl
from test_train_run import tiny_recipe

QUIET = {"log": lambda *_: None}


# --- SIGTERM through the CLI ------------------------------------------------------------------

def train_until_signalled(tmp_path, recipe: dict, signum=signal.SIGTERM):
    """`peftvlm train` in a subprocess, signalled once a checkpoint is complete (so it is
    stepping); returns (process result, run folder, recipe file). Any checkpoint, not
    checkpoint-2: a fast run (the tiny CLIP's ~100 steps/s) writes and rotates checkpoint-2 away
    between two looks, and the run would go on to its 100,000 steps."""
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "peftvlm", "train", str(recipe_file), "-o",
                             str(run)], env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not any((run / "checkpoints").glob(f"checkpoint-*/{MANIFEST}")):
        if time.time() > deadline or proc.poll() is not None:
            proc.kill()
            pytest.fail(f"no complete checkpoint in {run}: {proc.communicate()}")
        time.sleep(0.05)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), run, recipe_file


def check_interrupted_then_resume(result, run, recipe_file, signame="SIGTERM", code=143):
    """The run exited with the signal's code and a message naming a complete checkpoint, from
    which --resume (two steps more) finishes, naming it."""
    assert result.returncode == code, result.stderr[-3000:]
    found = [line for line in result.stderr.splitlines()
             if line.startswith(f"error: interrupted by {signame} after step ")]
    assert found, result.stderr[-3000:]
    step = int(found[0].split("after step ")[1].split(":")[0])
    checkpoint = run / "checkpoints" / f"checkpoint-{step}"
    assert found[0].endswith(f"saved {checkpoint}") and step >= 2
    assert "hint: continue with the same command plus --resume" in result.stderr
    assert incomplete_reason(checkpoint) is None
    assert not (run / "summary.json").exists()

    res = run_cli_in_process("train", recipe_file, "-o", run, "--resume",
                             f"train.max_steps={step + 2}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resuming from {checkpoint} (step {step})" in res.stdout
    assert json.loads((run / "summary.json").read_text())["global_step"] == step + 2


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_says_so_and_resume_finishes_generative(tmp_path):
    recipe = tiny_recipe(train={"max_steps": 100000, "save_steps": 2, "logging_steps": 50},
                         eval={"metrics": []})
    check_interrupted_then_resume(*train_until_signalled(tmp_path, recipe))


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_says_so_and_resume_finishes_dual_encoder(tmp_path):
    recipe = {"name": "coop", "model": {"id": "tiny-clip"}, "method": {"name": "coop", "n_ctx": 4},
              "data": {"synthetic": {"name": "colour-classes", "train_size": 40,
                                     "eval_size": 20}, "shots": 4},
              "train": {"max_steps": 100000, "save_steps": 2, "logging_steps": 50,
                        "per_device_train_batch_size": 8}}
    check_interrupted_then_resume(*train_until_signalled(tmp_path, recipe))


def test_stop_signals_record_the_first_signal_and_a_second_stops_at_once():
    # The second signal hands SIGINT back to the handler before it: Python's Ctrl-C handler
    # here. A process started with SIGINT ignored (a job started with `&` by a script, as a CI
    # runner may start the suite) has none, and the second signal would be ignored as asked.
    started_with = signal.signal(signal.SIGINT, signal.default_int_handler)
    stop = StopSignals()
    try:
        stop.install()
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.received == signal.SIGTERM  # Python ran the handler: the process lives
            with pytest.raises(KeyboardInterrupt):  # the second signal: the usual behaviour
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)
            assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        finally:
            stop.uninstall()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, started_with)


def test_interrupted_exit_codes_are_the_shells():
    assert Interrupted(signal.SIGINT, 3, None).exit_code == 130
    assert Interrupted(signal.SIGTERM, 3, None).exit_code == 143
    assert "no checkpoint could be saved" in Interrupted(None, 3, None).message


# --- RNG state on resume ----------------------------------------------------------------------

def losses(summary) -> list[float]:
    return [loss for _, loss in summary["loss_curve"]]


def straight_and_resumed(recipe, tmp_path) -> tuple[dict, dict, list[str]]:
    """An uninterrupted run, and one killed after checkpoint-3 then resumed."""
    straight = api.train(recipe, tmp_path / "straight", **QUIET)
    with pytest.raises(KeyboardInterrupt):
        api.train(recipe, tmp_path / "run", callbacks=[StopAfterSaving(3)], **QUIET)
    logged = []
    resumed = api.train(recipe, tmp_path / "run", resume=True, log=logged.append)
    return straight, resumed, logged


def test_streamed_resume_with_dropout_equals_the_uninterrupted_run(tmp_path):
    """The data loader must not draw from the global torch RNG when its iterator starts: the
    resumed run restores the checkpoint's RNG state, then starts a new iterator, and each
    dropout mask after that would differ from the uninterrupted run's."""
    save_image(tmp_path / "red.png", (32, 32))
    write_jsonl(tmp_path / "train.jsonl", [conversation(f"a{i}") for i in range(7)])
    data = recipe_dict(tmp_path, [{"path": "train.jsonl", "streaming": True}])
    data["method"]["lora_dropout"] = 0.3
    straight, resumed, logged = straight_and_resumed(validate_recipe_dict(data), tmp_path)
    assert len(losses(straight)) == 6
    assert losses(resumed) == pytest.approx(losses(straight), rel=1e-6, abs=1e-6)
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-3"
    assert f"resuming from {checkpoint} (step 3)" in logged


def test_prepared_resume_with_dropout_equals_the_uninterrupted_run(tmp_path):
    """transformers restores rng_state.pth after skipping the trained batches: it holds."""
    recipe = validate_recipe_dict(tiny_recipe(method={"lora_dropout": 0.3},
                                              eval={"metrics": []}))
    straight, resumed, _ = straight_and_resumed(recipe, tmp_path)
    assert len(losses(straight)) == 6
    assert losses(resumed) == pytest.approx(losses(straight), rel=1e-6, abs=1e-6)
