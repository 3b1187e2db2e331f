"""GRPO on the tiny twins: the guards against VLM GRPO's known silent failures (prompt padding vs
image tokens, rollouts from the base, a second reference copy, dropped images, non-finite
rewards), quick runs per family, and learning proofs (slow): exact match on the colour
question, IoU on grounding."""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from conftest import REPO
from peftvlm.data.batch.collate import ConversationCollator
from peftvlm.data.pipeline import prepare_data
from peftvlm.errors import RecipeError, RunError
from peftvlm.eval.generate import evaluate_rows
from peftvlm.families import FAMILIES
from peftvlm.recipe.load import validate_recipe_dict
from peftvlm.registry import get_method
from peftvlm.rewards import build_rewards
from peftvlm.trainers.generative import load_model_with_method
from peftvlm.trainers.objectives.grpo_trainer import (build_grpo_trainer, check_rollout_prompts,
                                                      finite_rewards, grpo_config)
from peftvlm.trainers.sft import build_trainer, sft_config

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220),
           "yellow": (230, 220, 30)}
QUESTIONS = ["What color is the shape?", "Name the colour of the square in this picture, "
             "using one word only please."]


def image_rows(folder: Path, count: int = 4, images_per_row=(1,)) -> list[dict]:
    """Rows with prompts of different lengths (so padding happens) and 1+ images each."""
    rows, names = [], list(COLOURS)
    for i in range(count):
        n = images_per_row[i % len(images_per_row)]
        paths = []
        for j in range(n):
            path = folder / f"img{i}_{j}.png"
            Image.new("RGB", (32 + 8 * j, 32), COLOURS[names[(i + j) % 4]]).save(path)
            paths.append(str(path))
        content = [{"type": "image"}] * n + [{"type": "text", "text": QUESTIONS[i % 2]}]
        rows.append({"row_id": f"rows.jsonl:{i + 1}", "images": paths,
                     "messages": [{"role": "user", "content": content},
                                  {"role": "assistant",
                                   "content": [{"type": "text", "text": names[i % 4]}]}]})
    return rows


def grpo_recipe(model_id: str, **grpo):
    return validate_recipe_dict({
        "model": {"id": model_id}, "method": {"name": "lora", "r": 8, "target": "language"},
        "data": {"synthetic": {"name": "colour-vqa", "train_size": 8, "eval_size": 4}},
        "train": {"objective": "grpo", "max_steps": 2, "per_device_train_batch_size": 4,
                  "logging_steps": 1, "save_steps": 1000,
                  "grpo": {"num_generations": 2, "max_completion_length": 4, **grpo},
                  "rewards": [{"name": "exact_match"}, {"name": "length", "max_words": 1,
                                                        "weight": 0.1}]}})


def make_trainer(model_id: str, rows: list[dict], run_dir: Path, **grpo):
    recipe = grpo_recipe(model_id, **grpo)
    torch.manual_seed(0)
    loaded, model = load_model_with_method(recipe, get_method("lora"))
    trainer = build_grpo_trainer(recipe, model, loaded.processor, loaded.family, rows, run_dir,
                                 [], None, [], build_rewards(recipe.train.rewards, Path(".")))
    return trainer, loaded


def perturb_adapter(model) -> None:
    """Non-zero LoRA B matrices, so the adapted policy differs from the base from step 0."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)


def generation_batch(trainer, rows: int) -> list[dict]:
    """What TRL's sampler hands `_generate_and_score_completions`: each row num_generations
    times in a row."""
    n = trainer.num_generations
    return [trainer.train_dataset[i] for i in range(rows) for _ in range(n)]


# LLaVA (no token types) passes the same guard in every test below that samples rollouts
@pytest.mark.parametrize("model_id", ["tiny-gemma3", "tiny-qwen2-vl"])
def test_rollout_prompts_carry_exactly_their_images_tokens(model_id, tmp_path):
    trainer, loaded = make_trainer(model_id, image_rows(tmp_path, 2), tmp_path / "run")
    assert trainer.processing_class.tokenizer.padding_side == "left"
    batch = generation_batch(trainer, 2)
    out = trainer._generate_and_score_completions(batch)  # the guard passes
    ids, mask = out["prompt_ids"], out["prompt_mask"]
    assert (mask[:, -1] == 1).all() and (mask[:, 0] == 0).any()  # left padding happened
    image_id = trainer.image_token_id
    counts = ((ids == image_id) & mask.bool()).sum(dim=1).tolist()
    assert counts == [trainer.expected_image_tokens(x) for x in batch] and min(counts) > 0
    types = out.get("token_type_ids", out.get("mm_token_type_ids"))
    if types is not None:  # the families whose forward reads token types
        assert torch.equal((types[:, : ids.shape[1]] == 1), (ids == image_id) & mask.bool())
        # trl#5785: a right-padding processor misplaces the types; the guard stops the run
        trainer.processing_class.tokenizer.padding_side = "right"
        with pytest.raises(RunError, match="padding sides disagree"):
            trainer._generate_and_score_completions(batch)


def with_images(messages: list[dict], images: list) -> list[dict]:
    """A prompt's messages with its images put into the image items, in order."""
    pending = iter(images)
    return [{**m, "content": [{**c, "image": next(pending)} if c["type"] == "image" else c
                              for c in m["content"]]} for m in messages]


def test_paligemma_rollouts_match_encode_prompt_and_completions_stay_causal(tmp_path):
    """PaliGemma has no chat template: rollouts render prompts with its rollout template,
    which must give the ids `encode_prompt` (eval, serving) gives; its token types mark the
    prefix (0) and the answer (1), so the loss's forward must type the completion 1 (TRL
    writes 0, putting it in the bidirectional prefix: a token's log-prob would see the next)."""
    trainer, loaded = make_trainer("tiny-paligemma", image_rows(tmp_path, 2), tmp_path / "run")
    assert loaded.processor.chat_template is None  # the copy TRL holds carries the template
    batch = generation_batch(trainer, 2)
    out = trainer._generate_and_score_completions(batch)  # the rollout guard passes
    for i in (0, trainer.num_generations):
        ids = out["prompt_ids"][i][out["prompt_mask"][i].bool()]
        by_hand = loaded.family.encode_prompt(
            loaded.processor, [with_images(batch[i]["prompt"], batch[i]["images"])])
        assert ids.tolist() == by_hand["input_ids"][0].tolist()
    assert not out["token_type_ids"][:, : out["prompt_ids"].shape[1]].any()
    model, n = trainer.model.eval(), out["completion_ids"].shape[1]
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
    mask = torch.cat([out["prompt_mask"], torch.ones_like(out["completion_ids"])], dim=1)

    def logps(keep: int):  # the completion's first `keep` tokens
        cut = ids.shape[1] - n + keep
        return trainer._get_per_token_logps_and_entropies(
            model, ids[:, :cut], mask[:, :cut], keep, pixel_values=out["pixel_values"],
            num_images=out["num_images"], token_type_ids=out["token_type_ids"][:, :cut])[0]

    assert torch.allclose(logps(n)[:, :-1], logps(n - 1), atol=1e-5)


def test_rollout_guard_names_a_prompt_without_its_image_tokens():

    ids = torch.tensor([[0, 5, 7, 7, 3], [5, 7, 3, 3, 3]])
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    output = {"prompt_ids": ids, "prompt_mask": mask}
    check_rollout_prompts(output, 7, [2, 1], ["a", "b"])
    with pytest.raises(RunError, match="row b: its prompt holds 1 image tokens where its images "
                                       "need 2"):
        check_rollout_prompts(output, 7, [2, 2], ["a", "b"])


def test_rollouts_come_from_the_adapted_policy(tmp_path):
    trainer, loaded = make_trainer("tiny-llava", image_rows(tmp_path, 2), tmp_path / "run")
    model = trainer.model
    perturb_adapter(model)
    prefill = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: prefill.append(out.detach()) if not prefill else None)
    batch = generation_batch(trainer, 1)
    try:
        out = trainer._generate_and_score_completions(batch)
    finally:
        hook.remove()
    inputs = {k: v for k, v in out.items() if k in ("pixel_values", "image_sizes")}
    args = {"input_ids": out["prompt_ids"], "attention_mask": out["prompt_mask"], **inputs}
    with torch.no_grad():
        adapted = model(**args).logits[:, -1]
        with model.disable_adapter():
            base = model(**args).logits[:, -1]
    sampled = prefill[0][:, -1]
    assert not torch.allclose(adapted, base, atol=1e-3)  # the adapter changes the policy
    assert torch.allclose(sampled, adapted, atol=1e-4)  # and rollouts sample from it


def test_reference_is_the_base_with_the_adapter_disabled(tmp_path):
    trainer, loaded = make_trainer("tiny-llava", image_rows(tmp_path, 2), tmp_path / "run",
                                   beta=0.1)
    model = trainer.model
    assert trainer.ref_model is None and list(model.peft_config) == ["default"]  # no copy
    perturb_adapter(model)
    out = trainer._generate_and_score_completions(generation_batch(trainer, 2))
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
    mask = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
    keep = out["completion_ids"].shape[1]

    def logps():
        return trainer._get_per_token_logps_and_entropies(
            model, ids, mask, keep, num_images=out["num_images"],
            pixel_values=out["pixel_values"])[0]

    with torch.no_grad():
        policy = logps()
        with model.disable_adapter():
            base = logps()
    assert torch.allclose(out["ref_per_token_logps"], base, atol=1e-5)
    assert not torch.allclose(out["ref_per_token_logps"], policy, atol=1e-3)


@pytest.mark.parametrize("model_id", ["tiny-qwen2-vl", "tiny-llava"])
def test_multi_image_rows_keep_all_their_images(model_id, tmp_path):
    rows = image_rows(tmp_path, 2, images_per_row=(2, 1))
    trainer, loaded = make_trainer(model_id, rows, tmp_path / "run")
    batch = generation_batch(trainer, 2)
    out = trainer._generate_and_score_completions(batch)
    assert out["num_images"] == [2, 2, 1, 1]
    images = out["image_grid_thw"].shape[0] if "image_grid_thw" in out else \
        out["pixel_values"].shape[0]
    assert images == 6
    counts = ((out["prompt_ids"] == trainer.image_token_id) & out["prompt_mask"].bool()).sum(1)
    one = trainer.expected_image_tokens(batch[2])
    assert counts.tolist()[2:] == [one, one] and counts[0] > one  # both images' tokens
    trainer.train()  # the loss splits images per row as the prompts hold them
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])


# the five families, and PaliGemma (its rollout template, its answer's token types and
# the prompt-only labels its processor adds, which no forward may get); with grpo-tiny's beta,
# so the reference forward (the adapter disabled) runs too
@pytest.mark.parametrize("model_id", ["tiny-llava", "tiny-qwen2-vl", "tiny-qwen2.5-vl",
                                      "tiny-smolvlm", "tiny-gemma3", "tiny-paligemma"])
def test_two_grpo_steps_train_the_adapter_with_finite_logged_rewards(model_id, tmp_path):
    trainer, loaded = make_trainer(model_id, image_rows(tmp_path, 4), tmp_path / "run", beta=0.04)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()
              if p.requires_grad}
    trainer.train()
    logged = [e for e in trainer.state.log_history if "rewards/exact_match/mean" in e]
    assert len(logged) == 2
    for entry in logged:
        for key in ("rewards/exact_match/mean", "rewards/length/mean", "reward", "loss"):
            assert math.isfinite(entry[key]), (key, entry)
    changed = [n for n, p in trainer.model.named_parameters()
               if p.requires_grad and not torch.equal(p, before[n])]
    assert changed  # rewards differ within groups, so the adapter moved


def test_non_finite_reward_stops_the_run(tmp_path):

    def broken(prompts, completions, **columns):
        return [float("nan")] * len(completions)

    with pytest.raises(RunError, match="reward broken gave non-finite scores"):
        finite_rewards(broken)(prompts=[None], completions=["x"])
    assert finite_rewards(broken).__name__ == "broken"


def shuffled_answers(rows, seed: int = 0) -> list[dict]:
    """The rows with each answer replaced by a random colour: SFT on them teaches the answer's
    form (one colour word, then the end of the turn) and nothing about the image."""
    rng = random.Random(seed)
    out = []
    for i in range(len(rows)):
        row = dict(rows[i])
        reply = {"role": "assistant", "content": [{"type": "text",
                                                   "text": rng.choice(list(COLOURS))}]}
        out.append({**row, "messages": [*row["messages"][:-1], reply]})
    return out


@pytest.mark.slow
def test_grpo_with_exact_match_raises_held_out_reward(tmp_path):
    """The colour question, which the start answers at chance: a few SFT steps on shuffled
    colours give a model that answers with a colour word but ignores the image (GRPO needs
    groups whose rewards differ: a random model samples the right word 1 time in ~600), then
    GRPO with the exact-match reward alone must raise held-out exact match by >= 0.2."""

    recipe = validate_recipe_dict({
        "model": {"id": "tiny-llava"},
        "method": {"name": "lora", "r": 16, "lora_alpha": 32, "target": "language"},
        "data": {"synthetic": {"name": "colour-vqa", "train_size": 256, "eval_size": 40}},
        "eval": {"metrics": ["exact_match"], "max_new_tokens": 3, "batch_size": 40},
        "train": {"objective": "grpo", "max_steps": 100, "per_device_train_batch_size": 64,
                  "learning_rate": 1e-3, "logging_steps": 10, "save_steps": 1000,
                  "grpo": {"num_generations": 8, "max_completion_length": 3},
                  "rewards": [{"name": "exact_match"}]}})
    torch.manual_seed(0)
    loaded, model = load_model_with_method(recipe, get_method("lora"))
    collator = ConversationCollator(loaded.processor, loaded.family, True)
    data = prepare_data(recipe, collator)
    warm = recipe.train.model_copy(update={
        "objective": "sft", "grpo": None, "rewards": None, "max_steps": 80,
        "per_device_train_batch_size": 16, "learning_rate": 2e-3})
    build_trainer(model, loaded.processor, collator, shuffled_answers(data.train),
                  sft_config(warm, tmp_path / "sft", [], "warm")).train()

    def held_out() -> float:
        return evaluate_rows(model, loaded.processor, loaded.family, data.eval,
                             recipe.eval)["scores"]["exact_match"]

    start = held_out()
    assert start <= 0.35  # colour words at chance, not the task solved
    trainer = build_grpo_trainer(recipe, model, loaded.processor, loaded.family, data.train,
                                 tmp_path / "grpo", [], None, [],
                                 build_rewards(recipe.train.rewards, Path(".")))
    trainer.train()
    curve = [e["rewards/exact_match/mean"] for e in trainer.state.log_history
             if "rewards/exact_match/mean" in e]
    assert curve[-1] > curve[0] + 0.15, curve  # the rollouts' own reward rose
    assert held_out() >= start + 0.2


@pytest.mark.slow
def test_grpo_with_the_iou_reward_raises_held_out_grounding_accuracy(tmp_path):
    """scripts/grpo_grounding.py at its defaults (~55 s on one core): the tiny PaliGemma, one
    shape per image in one quadrant, rows through the grounding template (`direction: locate`,
    PaliGemma's <loc> boxes). The SFT warm start stops once greedy Acc@0.5 on training rows
    reaches 0.4 (it grounds some rows, so sampled boxes differ in reward); then 200 GRPO steps
    with the iou + box_accuracy + format rewards. The rollouts' own box accuracy must rise,
    and held-out greedy Acc@0.5 must rise by >= 0.2 and end >= 0.25 above the best single box
    (what a model that ignores the image reaches)."""
    sys.path.insert(0, str(REPO / "scripts"))
    from grpo_grounding import parse_args, run

    result = run(parse_args(["--seed", "0", "--out", str(tmp_path)]))
    start, end = (result[k]["grounding_accuracy"] for k in ("warm_start", "grpo"))
    assert result["warm_start"]["box_parse_rate"] >= 0.9, result  # it writes <loc> boxes
    rollouts = [r["box_accuracy"] for r in result["rollouts"]]
    assert len(rollouts) == 20 and rollouts[-1] >= rollouts[0] + 0.15, rollouts
    assert end >= start + 0.2 and end >= result["baseline"] + 0.25, result


def test_wandb_gets_a_table_of_sampled_completions_and_vllm_needs_cuda(tmp_path):
    recipe = grpo_recipe("tiny-llava")
    with_wandb = grpo_config(recipe, tmp_path, ["wandb"], None)
    assert with_wandb.log_completions and with_wandb.reward_weights == [1.0, 0.1]
    assert not grpo_config(recipe, tmp_path, [], None).log_completions
    assert with_wandb.num_generations == 2 and with_wandb.max_completion_length == 4
    vllm = grpo_recipe("tiny-llava", use_vllm=True)
    if not torch.cuda.is_available():
        with pytest.raises(RecipeError, match="vLLM rollouts need a CUDA GPU"):
            grpo_config(vllm, tmp_path, [], None)


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory):
    """One grpo-tiny run through the CLI serves the CLI and the resume tests: SIGTERM once its
    step-2 checkpoint is complete, then --resume for two steps more (test_signals' check)."""
    from test_signals import check_interrupted_then_resume, train_until_signalled

    from peftvlm.cli import shipped_recipes

    recipe = yaml.safe_load(shipped_recipes()["grpo-tiny"].read_text())
    recipe["data"]["synthetic"].update(train_size=32, eval_size=4)
    recipe["train"].update(max_steps=200, save_steps=2, logging_steps=1)
    stopped, run, recipe_file = train_until_signalled(tmp_path_factory.mktemp("grpo"), recipe)
    check_interrupted_then_resume(stopped, run, recipe_file)
    return stopped, run, recipe_file


@pytest.mark.slow
def test_grpo_tiny_trains_through_the_cli_and_preview_shows_references(grpo_run,
                                                                       cli_in_process):
    """The user's path: `peftvlm train recipes/grpo-tiny.yaml` writes a run folder whose
    summary holds each reward's logged mean; `data preview` shows the rollout prompt and the
    references the rewards compare with."""
    import json

    stopped, run, recipe_file = grpo_run
    assert "grpo: rewards exact_match x 1, length x 0.1" in stopped.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert (run / "adapter" / "adapter_config.json").is_file()
    rewards = summary["grpo"]["rewards"]
    assert set(rewards) == {"exact_match", "length"}
    assert all(math.isfinite(v) for v in rewards.values())
    curve = summary["grpo"]["reward_curve"]  # logged every step, before and after the resume
    assert len(curve) >= 2 and curve[-1][0] == summary["global_step"]
    shown = cli_in_process("data", "preview", recipe_file, "-n", "1")
    assert shown.returncode == 0, shown.stdout[-3000:]
    assert "GRPO prompt" in shown.stdout and "What color is the shape?" in shown.stdout
    assert "references:" in shown.stdout and "ASSISTANT:" in shown.stdout


REFUSING = [f for f in FAMILIES.values() if f.tiny_name and f.objective_refusal("grpo")]


@pytest.mark.parametrize("family", REFUSING, ids=lambda f: f.name)
def test_validate_refuses_families_trl_cannot_roll_out(family, cli_in_process):
    res = cli_in_process("validate", "recipes/grpo-tiny.yaml", f"model.id={family.tiny_name}")
    text = res.stdout + res.stderr
    assert res.returncode == 2
    assert f"the {family.name} family cannot train with TRL's GRPOTrainer" in text
    assert family.objective_refusal("grpo") in " ".join(text.split())


def test_validate_takes_paligemma_which_has_no_chat_template_but_a_rollout_template(
        cli_in_process):
    res = cli_in_process("validate", "recipes/grpo-tiny.yaml", "model.id=tiny-paligemma")
    assert res.returncode == 0, res.stdout + res.stderr


def test_validate_refuses_methods_the_adapter_switch_does_not_cover(cli_in_process):
    res = cli_in_process("validate", "recipes/llava-vpt-lora-tiny.yaml", "train.objective=grpo",
                         "train.rewards=[{name: exact_match}]")
    text = " ".join((res.stdout + res.stderr).split())
    assert res.returncode == 2
    assert "method 'per_part' adds modules that peft's disable_adapter does not switch off" in text


def test_trl_prompt_rows_are_read_with_their_reference_column(tmp_path, cli_in_process):
    """TRL's GRPO layout (prompt + images + `solution`) is detected as `trl_prompt`; preview
    shows the rollout prompt and every reference; a row without a reference is named."""
    import json

    for name, colour in (("red.png", "red"), ("blue.png", "blue")):
        Image.new("RGB", (32, 32), COLOURS[colour]).save(tmp_path / name)
    rows = [{"prompt": [{"role": "user", "content": [{"type": "image"},
                                                     {"type": "text", "text": "Which colour?"}]}],
             "images": ["red.png"], "solution": "red"},
            {"prompt": "What colour is this?", "image": "blue.png", "solution": ["blue", "navy"]},
            {"prompt": "No answer here", "image": "blue.png"}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"id": "tiny-llava"}, "method": {"name": "lora"},
        "data": {"train": [{"path": "train.jsonl"}]},
        "train": {"objective": "grpo", "per_device_train_batch_size": 2,
                  "grpo": {"num_generations": 2}, "rewards": [{"name": "exact_match"}]}}))
    res = cli_in_process("data", "preview", recipe, "-n", "2")
    assert res.returncode == 0, res.stdout + res.stderr
    text = res.stdout
    assert "format: trl_prompt" in text and "GRPO prompt" in text
    assert "Which colour?" in text and "references: red" in text
    assert "references: blue | navy" in text
    assert "no_reference" in text and "train.jsonl:3" in text  # the bad row, by file:line


@pytest.mark.slow
def test_a_stopped_grpo_run_resumes_from_its_checkpoint_and_evaluates(grpo_run, cli_in_process):
    """SIGTERM mid-run saves a complete checkpoint; --resume finishes from it (TRL's GRPO
    state and the rollout sampler restored: checked by the fixture), and `peftvlm eval` scores
    the run's adapter."""
    import json

    _, run, recipe_file = grpo_run
    summary = json.loads((run / "summary.json").read_text())
    assert summary["grpo"]["reward_curve"] and (run / "adapter" / "adapter_config.json").is_file()
    res = cli_in_process("eval", recipe_file, "--run", run, "--split", "test")
    assert res.returncode == 0, res.stdout[-3000:]
    assert "exact_match" in res.stdout


def test_grpo_rows_take_paths_bytes_and_pil_images_and_keep_references(tmp_path):
    import io

    from peftvlm.trainers.objectives.grpo_trainer import grpo_dataset

    rows = image_rows(tmp_path, 3)
    buffer = io.BytesIO()
    Image.new("RGB", (20, 10), COLOURS["red"]).save(buffer, format="PNG")
    rows[1]["images"] = [{"bytes": buffer.getvalue(), "path": None}]  # a Hub dataset's image
    rows[2]["images"] = [Image.new("RGB", (12, 12), COLOURS["blue"])]  # in memory
    rows[2]["references"] = ["blue", "navy"]
    dataset = grpo_dataset(rows, "norm1")
    sizes = [dataset[i]["images"][0].size for i in range(3)]
    assert sizes == [(32, 32), (20, 10), (12, 12)]
    assert dataset[0]["prompt"][-1]["role"] == "user"  # the answer is not in the prompt
    assert [dataset[i]["references"] for i in range(3)] == [["red"], ["green"], ["blue", "navy"]]
    assert dataset[0]["box_format"] == "norm1" and dataset[0]["row_id"] == "rows.jsonl:1"


def test_a_completion_budget_shorter_than_the_references_is_warned(tmp_path):
    """Grounding's first GRPO runs learnt nothing: a norm1 box is 17 tokens of the tiny
    tokenizer, max_completion_length was 16, every rollout was cut, every reward 0."""
    from peftvlm.models import load_processor_only
    from peftvlm.recipe.schema import ModelConfig
    from peftvlm.trainers.objectives.grpo import completion_too_short

    processor, _ = load_processor_only(ModelConfig(id="tiny-llava"))
    rows = image_rows(tmp_path, 3)
    for row in rows:
        row["messages"][-1]["content"] = [{"type": "text", "text": "[0.1, 0.5, 0.5, 0.8]"}]
    warning = completion_too_short(rows, processor.tokenizer, 16)
    assert "max_completion_length 16 is shorter than the references (median 18 tokens" in warning
    assert "raise it to at least 18" in warning
    assert completion_too_short(rows, processor.tokenizer, 18) is None
