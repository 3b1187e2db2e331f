"""A wheel install works like the editable one: shipped recipes and data templates travel in the
package, so `peftvlm ls recipes`, `peftvlm cp quickstart my.yaml` and a quickstart dry run work
from any folder after `pip install .`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import REPO

SKIP = shutil.ignore_patterns(".git", ".venv", "runs", "wandb", "build", "dist", "*.egg-info",
                              "__pycache__", ".pytest_cache")


def run(*cmd, cwd, env=None, timeout=600):
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, (cmd, res.stdout[-2000:], res.stderr[-3000:])
    return res


@pytest.mark.slow
def test_wheel_installed_into_a_fresh_venv_ships_recipes_and_templates(tmp_path):
    source = tmp_path / "src"  # a copy, so building leaves no build/ or egg-info in the repo
    shutil.copytree(REPO, source, ignore=SKIP, symlinks=True)
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
        "-w", tmp_path / "dist", source, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("peftvlm-*.whl"))

    venv = tmp_path / "venv"  # fresh venv; torch & co. come from this interpreter's packages
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    site = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
               cwd=tmp_path).stdout.strip()
    # a path line, not the shared venv's own .pth files: its editable peftvlm stays out of sight
    Path(site, "shared-packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q", wheel,
        cwd=tmp_path)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    peftvlm = venv / "bin" / "peftvlm"
    where = run(python, "-c", "import peftvlm; print(peftvlm.__file__)", cwd=elsewhere, env=env)
    assert where.stdout.startswith(site), where.stdout
    listed = run(peftvlm, "ls", "recipes", cwd=elsewhere, env=env).stdout
    assert "quickstart" in listed and "clip-coop" in listed
    assert "vqa" in run(peftvlm, "ls", "templates", cwd=elsewhere, env=env).stdout
    run(peftvlm, "cp", "quickstart", "my.yaml", cwd=elsewhere, env=env)
    assert (elsewhere / "my.yaml").read_text() == (REPO / "recipes" / "quickstart.yaml").read_text()
    dry = run(peftvlm, "train", "my.yaml", "--dry-run", "data.synthetic.train_size=16",
              "data.synthetic.eval_size=4", cwd=elsewhere, env=env)
    assert "trainable params:" in dry.stdout and not (elsewhere / "runs").exists()
