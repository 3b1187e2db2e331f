"""GRPO rewards (`peftvlm.rewards`): each built-in reward scores completions as its metric does,
parses boxes in the family's convention, and custom rewards load only with the opt-in; the
recipe's `train.rewards` / `train.grpo` fields are checked by `peftvlm validate`."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from peftvlm.data.boxes import get_convention
from peftvlm.errors import RecipeError
from peftvlm.metrics.captioning import python_ptb_tokenize, rouge_l
from peftvlm.metrics.vqa import anls
from peftvlm.recipe.schema import RewardSpec
from peftvlm.rewards import REWARDS, build_rewards, completion_text, reward_names


def reward(name: str, **options):
    return build_rewards([RewardSpec(name=name, **options)], Path("."))[0]


def test_each_reward_logs_under_its_recipe_name():
    funcs = build_rewards([RewardSpec(name=n) for n in REWARDS], Path("."))
    assert [f.__name__ for f in funcs] == list(REWARDS)  # TRL logs rewards/<__name__>/mean
    twice = build_rewards([RewardSpec(name="format"), RewardSpec(name="format", pattern="x")],
                          Path("."))
    assert [f.__name__ for f in twice] == ["format", "format_2"]


def test_text_rewards_score_each_completion_like_their_metric():
    refs = [["Red"], ["two", "2"], ["blue"]]
    assert reward("exact_match")(prompts=[None] * 3, completions=["red.", "2", "green"],
                                 references=refs) == [1.0, 1.0, 0.0]
    # conversational prompts give conversational completions: the reply's text is scored
    chat = [[{"role": "assistant", "content": "red"}],
            [{"role": "assistant", "content": [{"type": "text", "text": "two"}]}]]
    assert reward("exact_match")(prompts=[None] * 2, completions=chat,
                                 references=refs[:2]) == [1.0, 1.0]
    ten = [["yes"] * 2 + ["no"] * 8]
    assert reward("vqa_accuracy")(prompts=[None], completions=["yes"],
                                  references=ten) == [pytest.approx(0.6)]
    docs = ["invoice 1234", "total"], [["invoice 1235"], ["total"]]
    assert reward("anls")(prompts=[None] * 2, completions=docs[0], references=docs[1]) == [
        pytest.approx(anls([docs[0][0]], [docs[1][0]])["anls"]), 1.0]
    captions = ["a red square on grey"], [["a red square on a grey background", "red box"]]
    tokenised = ([python_ptb_tokenize(captions[0][0])],
                 [[python_ptb_tokenize(r) for r in captions[1][0]]])
    assert reward("rouge_l")(prompts=[None], completions=captions[0],
                             references=captions[1]) == [
        pytest.approx(rouge_l(*tokenised)["rouge_l"])]
    cider = reward("cider_d")(prompts=[None] * 2, completions=["a red square", "nothing"],
                              references=[["a red square"], ["a blue circle"]])
    assert cider[0] > cider[1] == 0.0 and all(math.isfinite(c) for c in cider)


@pytest.mark.parametrize("fmt", ["qwen2_vl", "qwen3_vl", "paligemma", "norm1", "internvl"])
def test_box_rewards_parse_the_family_convention(fmt):
    conv = get_convention(fmt)
    target = conv.write([("cat", (10, 20, 60, 80))], 100, 100)
    near = conv.write([("cat", (12, 22, 60, 80))], 100, 100)  # IoU ~0.93
    far = conv.write([("cat", (60, 60, 100, 100))], 100, 100)  # no overlap
    completions = [target, near, far, "no box here"]
    columns = dict(prompts=[None] * 4, references=[[target]] * 4, box_format=[fmt] * 4)
    iou = reward("iou")(completions=completions, **columns)
    assert iou[0] == pytest.approx(1.0) and 0.85 < iou[1] < 1.0 and iou[2] == iou[3] == 0.0
    assert reward("box_accuracy")(completions=completions, **columns) == [1.0, 1.0, 0.0, 0.0]
    assert reward("box_accuracy", threshold=0.95)(completions=completions,
                                                  **columns) == [1.0, 0.0, 0.0, 0.0]
    assert reward("format")(completions=completions, **columns) == [1.0, 1.0, 1.0, 0.0]
    assert reward("detection_map50")(completions=completions, **columns)[::3] == [
        pytest.approx(1.0), 0.0]


def test_box_reward_names_a_reference_without_a_box():
    with pytest.raises(Exception, match="reward row 1.*holds no box in the qwen2_vl"):
        reward("iou")(prompts=[None], completions=["(1,2),(3,4)"], references=[["a cat"]],
                      box_format=["qwen2_vl"])


def test_format_pattern_and_length_rewards():
    fmt = reward("format", pattern=r"(red|green|blue|yellow)")
    assert fmt(prompts=[None] * 3, completions=["red", "red!", "a red"],
               references=[["x"]] * 3) == [1.0, 0.0, 0.0]
    length = reward("length", max_words=2)
    assert length(prompts=[None] * 4, completions=["red", "dark red", "a dark red box", ""],
                  references=[["x"]] * 4) == [1.0, 1.0, 0.5, 0.0]
    assert completion_text([{"role": "assistant", "content": " red "}]) == "red"


def write_recipe(folder: Path, **train) -> Path:
    path = folder / "r.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"id": "tiny-llava"}, "method": {"name": "lora"},
        "data": {"synthetic": {"name": "colour-vqa", "train_size": 8, "eval_size": 4}},
        "train": {"objective": "grpo", **train}}))
    return path


REWARD_FILE = """
def colour_words(prompts, completions, references, **kwargs):
    return [float(c.strip() in {"red", "green", "blue", "yellow"}) for c in completions]
"""


def test_custom_reward_runs_only_with_the_opt_in(tmp_path, cli_in_process):
    (tmp_path / "my_rewards.py").write_text(REWARD_FILE)
    spec = {"name": "custom", "path": "my_rewards.py", "function": "colour_words"}
    refused = cli_in_process("validate", write_recipe(tmp_path, rewards=[spec]))
    assert refused.returncode == 2
    assert "runs the Python code in 'my_rewards.py'" in refused.stdout + refused.stderr
    assert "allow_custom_rewards: true" in refused.stdout + refused.stderr
    with pytest.raises(RecipeError, match="allow_custom_rewards"):
        build_rewards([RewardSpec(**spec)], tmp_path)
    allowed = write_recipe(tmp_path, rewards=[spec], allow_custom_rewards=True)
    assert cli_in_process("validate", allowed).returncode == 0
    func = build_rewards([RewardSpec(**spec)], tmp_path, allow_custom=True)[0]
    assert func.__name__ == "colour_words"
    assert func(prompts=[None] * 2, completions=[" red", "cat"],
                references=[["red"]] * 2) == [1.0, 0.0]
    missing = write_recipe(tmp_path, allow_custom_rewards=True,
                           rewards=[{**spec, "function": "nope"}])
    result = cli_in_process("validate", missing)
    assert result.returncode == 2 and "defines no function 'nope'" in result.stdout + result.stderr
    assert "colour_words" in result.stdout + result.stderr  # what the file does define


def test_custom_reward_that_returns_too_few_scores_is_named(tmp_path):
    (tmp_path / "bad.py").write_text("def short(prompts, completions, **kw):\n    return [1.0]\n")
    func = build_rewards([RewardSpec(name="custom", path="bad.py", function="short")], tmp_path,
                         allow_custom=True)[0]
    with pytest.raises(RecipeError, match="returned 1 scores for 2 completions"):
        func(prompts=[None] * 2, completions=["a", "b"])


def test_validate_names_unknown_rewards_and_misplaced_fields(tmp_path, cli_in_process):
    result = cli_in_process("validate", write_recipe(tmp_path, rewards=[{"name": "iuo"}]))
    text = result.stdout + result.stderr
    assert result.returncode == 2 and "train.rewards[0].name" in text and "'iuo'" in text
    assert "available rewards: " + ", ".join(reward_names()) in text
    wrong = cli_in_process("validate", write_recipe(
        tmp_path, rewards=[{"name": "exact_match", "pattern": "x"}]))
    assert "reward 'exact_match' takes no pattern" in wrong.stdout + wrong.stderr
    none = cli_in_process("validate", write_recipe(tmp_path))
    assert "objective grpo needs at least one reward" in none.stdout + none.stderr
    sft = write_recipe(tmp_path, rewards=[{"name": "exact_match"}],
                       grpo={"num_generations": 2})
    text = sft.read_text().replace("objective: grpo", "objective: sft")
    sft.write_text(text)
    result = cli_in_process("validate", sft)
    assert "train.grpo" in result.stdout + result.stderr and "need `objective: grpo`" in (
        result.stdout + result.stderr)
    groups = cli_in_process("validate", write_recipe(
        tmp_path, rewards=[{"name": "exact_match"}], grpo={"num_generations": 3}))
    assert "not a whole number of groups of 3" in groups.stdout + groups.stderr
    unknown = cli_in_process("validate", write_recipe(
        tmp_path, rewards=[{"name": "exact_match"}], grpo={"kl_coef": 0.1}))
    assert "train.grpo.kl_coef: unknown key" in unknown.stdout + unknown.stderr
    ok = cli_in_process("validate", write_recipe(
        tmp_path, rewards=[{"name": "exact_match"}, {"name": "format", "weight": 0.1}],
        grpo={"num_generations": 2, "beta": 0.04, "loss_type": "grpo"}))
    assert ok.returncode == 0, ok.stdout + ok.stderr
