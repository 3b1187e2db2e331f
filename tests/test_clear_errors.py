"""Ordinary mistakes end in one paragraph naming the file, field or row and the fix, never a
traceback: bad override values, adapter targets that are containers, unwritable `cp`
destinations, several recipes validated at once, `train.max_steps=0`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import REPO, run_cli
from peftvlm.errors import RecipeError
from peftvlm.recipe.load import validate_recipe_dict
from test_run_safety import unprivileged
from test_train_run import tiny_recipe

GOOD = "model: {id: tiny-llava}\nmethod: {name: lora}\ndata: {synthetic: {name: colour-vqa}}\n"


def one_paragraph(res, *needles) -> None:
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    for needle in needles:
        assert needle in res.stderr, (needle, res.stderr)


def test_override_with_invalid_yaml_names_the_override(tmp_path):
    (tmp_path / "r.yaml").write_text(GOOD)
    res = run_cli("validate", tmp_path / "r.yaml", "train.learning_rate=[1")
    one_paragraph(res, "override `train.learning_rate=[1`", "not valid YAML", "quote")


def test_validate_reports_every_file_and_applies_overrides(tmp_path):
    (tmp_path / "good.yaml").write_text(GOOD)
    (tmp_path / "bad.yaml").write_text("model: {id: x}\n")
    res = run_cli("validate", tmp_path / "good.yaml", tmp_path / "bad.yaml", tmp_path / "nope.yaml",
                  "train.max_steps=5")
    one_paragraph(res, "bad.yaml: method: required", "nope.yaml does not exist",
                  "2 of 3 recipe(s) have problems")
    assert f"ok: {tmp_path / 'good.yaml'}" in res.stdout and "max_steps=5" not in res.stderr
    res = run_cli("validate", tmp_path / "good.yaml", "train.max_steps=0")
    one_paragraph(res, "train.max_steps", "0 steps would train nothing")


def test_max_steps_zero_is_refused_and_minus_one_means_epochs():
    with pytest.raises(RecipeError, match="0 steps would train nothing"):
        validate_recipe_dict(tiny_recipe(train={"max_steps": 0}))
    assert validate_recipe_dict(tiny_recipe(train={"max_steps": -1})).train.max_steps == -1


def test_cp_into_a_read_only_folder():
    top = Path(tempfile.mkdtemp())
    try:
        (top / "ro").mkdir()
        top.chmod(0o755)
        (top / "ro").chmod(0o555)
        res = subprocess.run([*unprivileged(), sys.executable, "-m", "peftvlm", "cp",
                              "quickstart", str(top / "ro")], capture_output=True, text=True,
                             cwd=top, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    finally:
        shutil.rmtree(top)
    one_paragraph(res, "cannot copy quickstart.yaml to", "Permission denied")


@pytest.mark.parametrize("regex,needles", [
    (r"model\.language_model\.layers\.0", ["matches 1 module(s) that are not layers",
                                            "layers.0 (LlamaDecoderLayer)",
                                            "e.g. model.language_model.layers.0.self_attn.q_proj"]),
    (r".*\.nothing_here", ["no module of this model matches", r"layers.\d+.self_attn.q_proj"]),
])
def test_target_regex_errors_name_modules_and_real_layer_names(regex, needles):
    from peftvlm.trainers.generative import load_model_with_method
    from peftvlm.registry import get_method

    recipe = validate_recipe_dict(tiny_recipe(method={"target_regex": regex}))
    with pytest.raises(RecipeError) as err:
        load_model_with_method(recipe, get_method("lora"))
    assert str(err.value).startswith("method.target_regex: ")
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))
    assert "--dry-run" not in str(err.value)
