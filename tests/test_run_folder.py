"""One reader of run folders (`runs.read_run_folder`): export, eval, predict and serve open a
run folder, a merged export or an adapter export the same way, and say the same thing about one
that is missing, unfinished or damaged."""

from __future__ import annotations

import json
import re

import pytest

from peftvlm.errors import RunError
from peftvlm.recipe.load import validate_recipe_dict
from peftvlm.runs import ADAPTER, MERGED, RUN, read_run_folder

RECIPE = {"name": "r", "model": {"id": "tiny-llava"}, "method": {"name": "lora"},
          "data": {"synthetic": {"name": "colour-vqa"}}}


@pytest.fixture
def run(tmp_path):
    """A finished run folder's files (no weights: nothing here loads a model)."""
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "recipe.yaml").write_text(validate_recipe_dict(RECIPE).to_yaml())
    (run / "summary.json").write_text(json.dumps({"model": "tiny-llava", "method": "lora"}))
    (run / ".peftvlm-run").write_text("{}")
    return run


def test_each_layout_is_read_with_its_recipe_and_summary(run):
    folder = read_run_folder(run)
    assert (folder.layout, folder.adapter_dir, folder.run_dir) == (RUN, run / "adapter", run)
    assert folder.recipe.name == "r" and folder.summary["method"] == "lora"

    merged = run / "merged"
    merged.mkdir()
    (merged / "config.json").write_text("{}")
    (merged / "model.safetensors").write_bytes(b"")
    (merged / "export_report.json").write_text(json.dumps({"kind": "merged"}))
    folder = read_run_folder(merged, accept=(RUN, MERGED))
    assert (folder.layout, folder.run_dir.resolve()) == (MERGED, run.resolve())
    assert folder.recipe.name == "r" and folder.name == "r-merged"
    assert folder.summary["model"] == "tiny-llava" and folder.export_report == {"kind": "merged"}

    export = run / "export"
    export.mkdir()
    (export / "adapter_config.json").write_text("{}")
    assert read_run_folder(export, accept=(ADAPTER,)).layout == ADAPTER
    with pytest.raises(RunError, match="is an adapter-only export: give the run folder"):
        read_run_folder(export, accept=(RUN, MERGED))
    with pytest.raises(RunError, match="is a merged export, not a run folder"):
        read_run_folder(merged)


@pytest.mark.parametrize("damage, message", [
    (lambda run: (run / "summary.json").unlink(), "has no summary.json: the run is unfinished"),
    (lambda run: (run / "summary.json").write_text('{"model": '),
     "summary.json is not valid JSON .*: the run folder is damaged"),
    (lambda run: (run / "adapter").rmdir(), "has no adapter/ folder"),
    (lambda run: (run / "recipe.yaml").unlink(), "has no recipe.yaml"),
    (lambda run: (run / "recipe.yaml").write_text("name: r\nmodel: {id: tiny-llava}\n"),
     "recipe.yaml does not validate"),
])
def test_export_eval_and_predict_say_the_same_about_a_broken_run(run, tmp_path, damage, message,
                                                                cli_in_process):
    damage(run)
    (tmp_path / "r.yaml").write_text(validate_recipe_dict(RECIPE).to_yaml())
    (tmp_path / "i.png").write_bytes(b"")
    said = {}
    for verb, args in {"export": (run,), "eval": (tmp_path / "r.yaml", "--run", run),
                       "predict": (run, "--image", tmp_path / "i.png")}.items():
        if verb == "eval" and "recipe.yaml" in message:
            continue  # eval scores the recipe it is given; the run's own copy is not read
        res = cli_in_process(verb, *args)
        assert res.returncode == 2 and "Traceback" not in res.stderr, (verb, res.stderr)
        said[verb] = res.stderr.splitlines()[0]
    assert all(re.search(message, line) for line in said.values()), said
    assert len(set(said.values())) == 1, said


def test_a_missing_folder_is_named_by_every_command(tmp_path, cli_in_process):
    nope = tmp_path / "nope"
    (tmp_path / "r.yaml").write_text(validate_recipe_dict(RECIPE).to_yaml())
    for args in (("export", nope), ("eval", tmp_path / "r.yaml", "--run", nope),
                 ("predict", nope, "--image", tmp_path / "r.yaml")):
        res = cli_in_process(*args)
        assert res.returncode == 2
        assert res.stderr.startswith(f"error: run folder {nope} does not exist"), res.stderr
