"""Inputs that are not what they claim: YAML alias bombs, paths that are directories, FIFOs,
devices or symlink loops. Each fails fast with a clear error, or becomes a counted bad row."""

from __future__ import annotations

import json
import os
import time

import pytest
from data_helpers import data_cache, recipe_file, save_image  # noqa: F401

from peftvlm.errors import DataError, RecipeError
from peftvlm.recipe.load import load_recipe
from peftvlm.safe_yaml import load_yaml

BOMB_LEVELS = 9


def alias_bomb(field: str) -> str:
    """A recipe whose free-text `field` is nine levels of nine aliases (387 million strings)."""
    lines = ["name: bomb", "model: {id: tiny-llava}", "method: {name: lora}",
             "data: {synthetic: {name: colour-vqa}}",
             f"{field}:", '  l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, BOMB_LEVELS):
        lines.append(f"  l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_a_yaml_alias_bomb_in_a_recipe_is_refused_in_milliseconds(tmp_path, cli_in_process):
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb("description"))
    started = time.perf_counter()
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert time.perf_counter() - started < 0.5
    assert str(path) in str(info.value) and "alias" in str(info.value)
    result = cli_in_process("validate", path)
    assert result.returncode != 0 and "alias" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_an_alias_bomb_in_an_override_or_a_template_is_refused(tmp_path):
    recipe = tmp_path / "ok.yaml"
    recipe.write_text("name: ok\nmodel: {id: tiny-llava}\nmethod: {name: lora}\n"
                      "data: {synthetic: {name: colour-vqa}}\n")
    levels = ['l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]'] + [
        f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, BOMB_LEVELS)]
    with pytest.raises(RecipeError, match="alias"):
        load_recipe(recipe, ["description={" + ", ".join(levels) + "}"])
    from peftvlm.data.render.templates import load_template

    template = tmp_path / "bomb_template.yaml"
    template.write_text(alias_bomb("description"))
    with pytest.raises(DataError, match=f"{template}.*alias"):
        load_template(template.name, tmp_path)


def test_ordinary_anchors_still_load():
    assert load_yaml("a: &x {k: 1}\nb: *x\nc: [*x, *x]\n") == {
        "a": {"k": 1}, "b": {"k": 1}, "c": [{"k": 1}, {"k": 1}]}
    with pytest.raises(ValueError, match="recursive"):
        load_yaml("a: &x [1, *x]\n")


def test_a_recipe_path_that_is_a_directory_fifo_or_loop_is_a_clear_error(tmp_path,
                                                                        cli_in_process):
    fifo = tmp_path / "recipe.fifo"
    os.mkfifo(fifo)
    loop = tmp_path / "loop.yaml"
    loop.symlink_to(loop)
    for path, words in [(tmp_path, "is a directory"), (fifo, "FIFO"), (loop, "symlink loop"),
                        ("/dev/null", "device")]:
        result = cli_in_process("validate", path)  # must not hang on the FIFO
        out = result.stdout + result.stderr
        assert result.returncode != 0 and words in out and str(path) in out, out
        assert "Traceback" not in out


def test_a_data_path_that_is_not_a_file_is_a_clear_error(tmp_path):
    from peftvlm.data.prepare.loading import load_source
    from peftvlm.recipe.schema import DataConfig, SourceConfig

    (tmp_path / "train.jsonl").mkdir()
    os.mkfifo(tmp_path / "fifo.jsonl")
    (tmp_path / "loop.jsonl").symlink_to(tmp_path / "loop.jsonl")
    for name, words in [("train.jsonl", "is a directory, not a file"),
                        ("fifo.jsonl", "FIFO"), ("loop.jsonl", "symlink loop")]:
        with pytest.raises(DataError, match=words) as info:  # must not hang on the FIFO
            load_source(SourceConfig(path=name), DataConfig(cache=False), tmp_path)
        assert name in str(info.value)


def test_image_paths_that_are_not_files_are_counted_bad_rows(tmp_path):
    from peftvlm.data.prepare.loading import load_rows

    save_image(tmp_path / "a.png")
    (tmp_path / "folder.png").mkdir()
    os.mkfifo(tmp_path / "fifo.png")
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    names = ["a.png", "folder.png", "fifo.png", "loop.png"]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({
        "messages": [{"role": "user", "content": "<image>What is it?"},
                     {"role": "assistant", "content": "red"}], "images": [n]}) + "\n"
        for n in names))
    started = time.perf_counter()
    data = load_rows(load_recipe(recipe_file(tmp_path, {"train": "t.jsonl"})))
    assert time.perf_counter() - started < 30 and len(data.train) == 1
    bad = data.bad_rows["train"]["bad_image"]
    assert bad["count"] == 3
    assert [r.split(" ")[0] for r in bad["first_rows"]] == ["t.jsonl:2", "t.jsonl:3", "t.jsonl:4"]
    for row, words in zip(bad["first_rows"], ["directory", "FIFO", "symlink loop"]):
        assert words in row


def test_an_image_replaced_by_a_fifo_after_the_checks_does_not_hang_training(tmp_path):
    from peftvlm.data.read.images import load_rgb
    from peftvlm.data.rows import BadRow

    os.mkfifo(tmp_path / "late.png")
    with pytest.raises(BadRow, match="FIFO"):
        load_rgb(str(tmp_path / "late.png"))
