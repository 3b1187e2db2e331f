"""Nothing lost, nothing silently wrong: run folders are ours alone, locked while written;
torn checkpoints are never resumed from; a changed recipe is not resumed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from peftvlm import api
from peftvlm.checkpoints import incomplete_reason, mark_complete, recipe_changes
from peftvlm.errors import ModelError, RunError
from peftvlm.recipe.load import validate_recipe_dict
from peftvlm.runs import LOCK, MARKER, claim_run_dir, release_run_dir
from peftvlm.trainers import generative
from test_train_run import adapter_weights, tiny_recipe

QUIET = {"log": lambda *_: None}


def recipe_file(tmp_path, **sections) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(**sections)))
    return path


# --- run folders ------------------------------------------------------------------------------

def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.txt").write_text("x")
    recipe = validate_recipe_dict(tiny_recipe())
    for overwrite in (True, False):
        with pytest.raises(RunError, match=r"not a peftvlm run folder .* thesis\.txt"):
            api.train(recipe, notes, overwrite=overwrite, **QUIET)
    assert (notes / "thesis.txt").read_text() == "x" and not (notes / MARKER).exists()


def test_overwrite_clears_a_run_folder_but_only_after_loading(tmp_path, monkeypatch):
    run = claim_run_dir(tmp_path / "run", False, False, **QUIET)
    release_run_dir(run)
    (run / "summary.json").write_text("{}")
    (run / "adapter").mkdir()

    def fails_to_load(*args):
        raise ModelError("no such model")

    monkeypatch.setattr(generative, "load_model_with_method", fails_to_load)
    with pytest.raises(ModelError):  # the new recipe fails to load: the old run stays
        api.train(validate_recipe_dict(tiny_recipe()), run, overwrite=True, **QUIET)
    assert (run / "summary.json").exists() and (run / "adapter").is_dir()
    from peftvlm.runs import prepare_run_dir

    prepare_run_dir(run, False, True)
    release_run_dir(run)
    assert sorted(p.name for p in run.iterdir()) == sorted([MARKER, LOCK])


HOLD = textwrap.dedent("""
    import sys
    from peftvlm.runs import claim_run_dir
    claim_run_dir(sys.argv[1], False, False)
    print("locked", flush=True)
    sys.stdin.read()
""")


def test_a_second_writer_is_refused_with_the_holders_pid_and_a_dead_lock_is_not(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE,
                              stdin=subprocess.PIPE, text=True, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunError, match=rf"in use by another training: pid {holder.pid}"):
            api.train(validate_recipe_dict(tiny_recipe()), run, **QUIET)
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, the lock file still names the dead pid
        holder.wait()
    assert json.loads((run / LOCK).read_text())["pid"] == holder.pid
    notices = []
    claim_run_dir(run, False, False, log=notices.append)
    release_run_dir(run)
    assert any(f"pid {holder.pid}) stopped without finishing" in n for n in notices)


def unprivileged() -> list[str]:
    """A command prefix that drops root (root ignores a folder's write permission)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot make a folder unwritable")
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.mark.parametrize("recipe", ["quickstart", "clip-coop"])
def test_unwritable_output_folder_is_refused_before_anything_loads(recipe):
    top = Path(tempfile.mkdtemp())
    try:
        (top / "ro").mkdir()
        for folder in (top, top / "ro"):
            folder.chmod(0o755 if folder == top else 0o555)
        res = subprocess.run([*unprivileged(), sys.executable, "-m", "peftvlm", "train", recipe,
                              "-o", str(top / "ro" / "run")], capture_output=True, text=True,
                             cwd=top, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    finally:
        shutil.rmtree(top)
    assert res.returncode == 2, res.stderr
    assert "cannot write the run folder" in res.stderr and "Permission denied" in res.stderr
    assert "Traceback" not in res.stderr and "model:" not in res.stdout


# --- checkpoints ------------------------------------------------------------------------------

def test_a_checkpoint_is_complete_only_with_all_its_bytes(tmp_path):
    folder = tmp_path / "checkpoint-2"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(b"x" * 100)
    assert "did not finish" in incomplete_reason(folder)
    mark_complete(folder)
    assert incomplete_reason(folder) is None
    (folder / "adapter_model.safetensors").write_bytes(b"x" * 60)
    assert incomplete_reason(folder) == "adapter_model.safetensors has 60 bytes, 100 were written"


KILL_DURING_SAVE = textwrap.dedent("""
    import os, signal, sys, yaml
    from transformers import Trainer
    from peftvlm import api
    from peftvlm.recipe import validate_recipe_dict

    save_rest = Trainer._save_optimizer_and_scheduler

    def killed_mid_save(self, output_dir):  # the adapter of checkpoint-4 is on disk, nothing else
        if self.state.global_step == 4:
            os.kill(os.getpid(), signal.SIGKILL)
        return save_rest(self, output_dir)

    Trainer._save_optimizer_and_scheduler = killed_mid_save
    recipe = validate_recipe_dict(yaml.safe_load(open(sys.argv[1])))
    api.train(recipe, sys.argv[2], log=lambda *_: None)
""")


def test_a_checkpoint_torn_by_sigkill_is_skipped_and_resume_is_exact(tmp_path):
    sections = {"train": {"max_steps": 6, "save_steps": 2}}
    recipe = validate_recipe_dict(tiny_recipe(**sections))
    api.train(recipe, tmp_path / "straight", **QUIET)

    run = tmp_path / "killed"
    res = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, recipe_file(tmp_path, **sections),
                          run], env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == -signal.SIGKILL, res.stderr
    torn = run / "checkpoints" / "checkpoint-4"
    assert torn.is_dir() and not (torn / "trainer_state.json").exists()

    with pytest.raises(RunError, match="unfinished run.*\n.*--resume"):
        api.train(recipe, run, **QUIET)
    notices = []
    changed = validate_recipe_dict(tiny_recipe(**sections, method={"r": 8}))
    with pytest.raises(RunError, match=r"recipe changed since the checkpoints .*: "
                                       r"method\.r 4 -> 8"):
        api.train(changed, run, resume=True, log=notices.append)
    assert any("stopped without finishing" in n for n in notices)  # the killed run's lock

    notices = []  # a safe change (logging) is allowed on resume
    safe = validate_recipe_dict(tiny_recipe(train={**sections["train"], "logging_steps": 2}))
    summary = api.train(safe, run, resume=True, log=notices.append)
    assert summary["global_step"] == 6
    assert any("checkpoint-4 is incomplete" in n and "falling back" in n for n in notices)
    assert (run / "checkpoints" / "incomplete-checkpoint-4").is_dir()
    straight, resumed = adapter_weights(tmp_path / "straight"), adapter_weights(run)
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert (straight[key] - resumed[key]).abs().max() <= 1e-6, key


def test_recipe_changes_name_fields_and_allow_safe_ones():
    old = tiny_recipe()
    new = tiny_recipe(method={"r": 16}, train={"max_steps": 60, "learning_rate": 1e-3},
                      eval={"max_new_tokens": 5})
    new["data"] = {"train": [{"path": "a.jsonl"}]}
    assert recipe_changes(old, new) == [
        "data.synthetic.eval_size 8 -> (unset)", "data.synthetic.name 'colour-vqa' -> (unset)",
        "data.synthetic.train_size 48 -> (unset)", "data.train[0].path (unset) -> 'a.jsonl'",
        "method.r 4 -> 16", "train.learning_rate 0.005 -> 0.001"]
