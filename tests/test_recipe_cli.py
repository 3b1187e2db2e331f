"""Recipe validation and the CLI through its real entry point: clear errors, no torch at start.
The many bad-recipe messages go through the same `main()` in-process (`cli_in_process`); every
command here also runs once through `python -m peftvlm`."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from conftest import REPO, run_cli

GOOD = """
model: {id: tiny-llava}
method: {name: lora, r: 8}
data: {synthetic: {name: colour-vqa}}
train: {max_steps: 10}
"""


def write(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_validate_accepts_good_recipe(tmp_path):
    res = run_cli("validate", write(tmp_path, GOOD))
    assert res.returncode == 0, res.stderr
    assert "ok:" in res.stdout


BAD = [
    ("unknown nested key", GOOD.replace("max_steps: 10", "max_step: 10"),
     ["train.max_step", "unknown key", "max_steps"]),
    ("unknown method key", GOOD.replace("r: 8", "rank: 8"), ["method.rank", "unknown key", "lora_alpha"]),
    ("wrong type", GOOD.replace("max_steps: 10", "max_steps: ten"), ["train.max_steps", "integer"]),
    ("out of range", GOOD.replace("r: 8", "r: 0"), ["method.r", "greater than or equal to 1"]),
    ("unknown method", GOOD.replace("name: lora", "name: lorax"), ["method", "lorax", "qlora, dora, vera"]),
    ("bad literal", GOOD.replace("colour-vqa", "colour-vqq"), ["data.synthetic.name", "colour-vqa"]),
    ("missing section", "model: {id: x}\nmethod: {name: lora}\n", ["data", "required"]),
    ("invalid yaml", "model: {id: x\n  method: [", ["invalid YAML", "line"]),
    ("empty file", "", ["empty"]),
    ("not a mapping", "- a\n- b\n", ["mapping"]),
    ("unknown family", GOOD.replace("id: tiny-llava", "id: tiny-llava, family: lava"),
     ["model.family", "lava", "llava"]),
    ("unknown metric", GOOD + "eval: {metrics: [exact_match, bleuu]}\n",
     ["eval.metrics", "bleuu", "peftvlm ls metrics"]),
    ("missing data file", GOOD.replace("{synthetic: {name: colour-vqa}}", "{train: nowhere.jsonl}"),
     ["data.train[0].path", "nowhere.jsonl", "does not exist"]),
]


@pytest.mark.parametrize("label,text,needles", BAD, ids=[b[0] for b in BAD])
def test_bad_recipes_give_one_clear_message(tmp_path, label, text, needles, cli_in_process):
    path = write(tmp_path, text)
    res = cli_in_process("validate", path)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    assert str(path) in res.stderr
    for needle in needles:
        assert needle in res.stderr, (needle, res.stderr)


def test_missing_recipe_file(tmp_path):
    res = run_cli("validate", tmp_path / "nope.yaml")  # a bad recipe through the entry point
    assert res.returncode == 2 and "does not exist" in res.stderr and "Traceback" not in res.stderr


def test_debug_env_shows_traceback(tmp_path):
    res = run_cli("validate", write(tmp_path, ""), env={"PEFTVLM_DEBUG": "1"})
    assert res.returncode != 0 and "Traceback" in res.stderr and "RecipeError" in res.stderr


def test_overrides_address_dotted_fields(tmp_path):
    from peftvlm.recipe.load import load_recipe

    recipe = load_recipe(write(tmp_path, GOOD), ["train.learning_rate=1e-4", "method.r=4",
                                                 "tracking.wandb.mode=offline"])
    assert recipe.train.learning_rate == 1e-4 and recipe.method.r == 4
    assert recipe.tracking.wandb.mode == "offline"
    with pytest.raises(Exception, match="train.learning_rate"):
        load_recipe(write(tmp_path, GOOD), ["train.learning_rate=abc"])


def test_bad_override_through_cli(tmp_path):
    res = run_cli("train", write(tmp_path, GOOD), "train.lerning_rate=1", "--dry-run")
    assert res.returncode == 2 and "train.lerning_rate" in res.stderr and "Traceback" not in res.stderr


def test_help_and_validate_do_not_import_torch(tmp_path):
    code = (
        "import sys\n"
        "from peftvlm.cli import app\n"
        f"from peftvlm.api import validate\nvalidate([{str(write(tmp_path, GOOD))!r}])\n"
        "import peftvlm.recipe, peftvlm.registry, peftvlm.families\n"
        "heavy = [m for m in ('torch', 'transformers', 'trl', 'peft') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    res = run_cli("--help")
    assert res.returncode == 0 and "train" in res.stdout and "validate" in res.stdout


def test_ls_and_cp(tmp_path, cli_in_process):
    res = run_cli("ls", "methods")
    assert res.returncode == 0
    for name in ("lora", "qlora", "dora", "vera"):
        assert name in res.stdout
    assert "llava" in cli_in_process("ls", "families").stdout
    assert "tiny-llava" in cli_in_process("ls", "models").stdout
    assert "quickstart" in cli_in_process("ls", "recipes").stdout
    res = run_cli("cp", "quickstart", tmp_path)
    assert res.returncode == 0 and (tmp_path / "quickstart.yaml").exists()
    again = cli_in_process("cp", "quickstart", tmp_path)
    assert again.returncode == 2 and "already exists" in again.stderr
    missing = cli_in_process("cp", "nope", tmp_path)
    assert missing.returncode == 2 and "quickstart" in missing.stderr


def test_usage_errors_are_short_and_exit_2():
    for args in (("data", "bogus"), ("train",)):
        res = run_cli(*args)
        assert res.returncode == 2 and "Traceback" not in res.stderr
        assert "Usage:" in res.stderr
