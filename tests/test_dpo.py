"""DPO (`train.objective: dpo`): preference rows in four formats, validate-time refusals, the
guards (identical pixels for chosen and rejected, multi-image rows keep their images, the
reference is the base with the adapter disabled, finite margins), a learning proof on the tiny
LLaVA through the CLI (train -> export --merge -> predict, --resume) and a short run on every
tiny generative family the registry lists (or its refusal)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from data_helpers import data_cache, llava_collator, save_image  # noqa: F401  (fixtures)
from peftvlm.data.read.synthetic import COLOURS
from peftvlm.errors import RecipeError
from peftvlm.families import tiny_models
from peftvlm.recipe.load import load_recipe, validate_recipe_dict

QUESTION = "What color is the shape?"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def recipe(folder: Path, data: dict, model: str = "tiny-llava", method: str = "lora",
           **train) -> Path:
    path = folder / "r.yaml"
    path.write_text(yaml.safe_dump({
        "name": "r", "model": {"id": model}, "method": {"name": method, "r": 4},
        "data": data, "train": {"objective": "dpo", "max_length": 256, **train}}))
    return path


# --- formats -----------------------------------------------------------------------------------

def format_rows(folder: Path) -> dict[str, dict]:
    """One row of each preference format, all meaning the same pair on `red.png`."""
    save_image(folder / "red.png")
    return {
        "trl_preference": {
            "prompt": [{"role": "user", "content": [{"type": "image"},
                                                    {"type": "text", "text": QUESTION}]}],
            "chosen": [{"role": "assistant", "content": "red"}],
            "rejected": [{"role": "assistant", "content": "blue"}], "images": ["red.png"]},
        "rlaifv": {"image": "red.png", "question": QUESTION, "chosen": "red", "rejected": "blue"},
        "llamafactory_ranking": {
            "conversations": [{"from": "human", "value": f"<image>{QUESTION}"}],
            "chosen": {"from": "gpt", "value": "red"},
            "rejected": {"from": "gpt", "value": "blue"}, "images": ["red.png"]},
        "swift_rejected_response": {
            "messages": [{"role": "user", "content": f"<image>{QUESTION}"},
                         {"role": "assistant", "content": "red"}],
            "rejected_response": "blue", "images": ["red.png"]},
    }


def test_each_preference_format_is_detected_and_read_as_the_same_pair(tmp_path, data_cache):
    from peftvlm.data.prepare.loading import load_rows

    rows = {}
    for fmt, row in format_rows(tmp_path).items():
        write_jsonl(tmp_path / f"{fmt}.jsonl", [row])
        loaded = load_rows(load_recipe(recipe(tmp_path, {"train": f"{fmt}.jsonl"})))
        assert loaded.sources[0]["format"] == fmt  # detected and named
        rows[fmt] = loaded.train[0]
    for fmt, row in rows.items():
        assert row["row_id"] == f"{fmt}.jsonl:1"
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
        assert row["messages"][0]["content"][0] == {"type": "image"}
        assert row["messages"][-1]["content"] == [{"type": "text", "text": "red"}]
        assert row["rejected"] == {"role": "assistant",
                                   "content": [{"type": "text", "text": "blue"}]}
        assert row["images"] == [str((tmp_path / "red.png").resolve())]


def test_bad_preference_rows_are_named_by_file_and_line(tmp_path, data_cache):
    from peftvlm.data.prepare.loading import load_rows

    good = format_rows(tmp_path)["rlaifv"]
    write_jsonl(tmp_path / "p.jsonl", [
        good, {**good, "rejected": ""}, {**good, "image": "gone.png"},
        {**good, "chosen": {"role": "user", "content": "red"}}, good])
    loaded = load_rows(load_recipe(recipe(tmp_path, {"train": "p.jsonl", "on_bad_row": "skip"})))
    assert len(loaded.train) == 2
    bad = loaded.bad_rows["train"]
    assert bad["empty_answer"]["first_rows"][0].startswith("p.jsonl:2")
    assert bad["missing_image"]["first_rows"][0].startswith("p.jsonl:3")
    assert bad["bad_reply"]["first_rows"][0].startswith("p.jsonl:4")


def test_dpo_refuses_plain_conversations_naming_the_source(tmp_path, data_cache):
    from peftvlm.data.prepare.loading import load_rows
    from peftvlm.errors import DataError
    from peftvlm.trainers.objectives import objective_for

    save_image(tmp_path / "red.png")
    write_jsonl(tmp_path / "sft.jsonl", [{"messages": [
        {"role": "user", "content": f"<image>{QUESTION}"},
        {"role": "assistant", "content": "red"}], "images": ["red.png"]}])
    r = load_recipe(recipe(tmp_path, {"train": "sft.jsonl"}))
    with pytest.raises(DataError, match=r"sft\.jsonl \(messages\) holds plain conversations"):
        objective_for(r).check_data(load_rows(r))


def test_preview_shows_chosen_and_rejected_and_stats_count_pairs(tmp_path, data_cache,
                                                                 cli_in_process, monkeypatch):
    # in this process: two interpreters (torch and transformers imported twice) took ~20 s
    write_jsonl(tmp_path / "p.jsonl", [format_rows(tmp_path)["rlaifv"]] * 3)
    path = recipe(tmp_path, {"train": "p.jsonl"})
    env = {"COLUMNS": "200"}
    shown = cli_in_process("data", "preview", path, "-n", "1", env=env)
    assert shown.returncode == 0, shown.stderr
    assert "example 0 (p.jsonl:1) chosen" in shown.stdout
    assert "example 0 (p.jsonl:1) rejected" in shown.stdout
    assert "ASSISTANT: red" in shown.stdout and "ASSISTANT: blue" in shown.stdout
    monkeypatch.chdir(tmp_path)
    stats = cli_in_process("data", "stats", path, env=env)
    assert stats.returncode == 0, stats.stderr
    assert "preference pairs (chosen vs rejected): 3 training" in stats.stdout


# --- validate ----------------------------------------------------------------------------------

def synthetic(**train) -> dict:
    return {"model": {"id": "tiny-llava"}, "method": {"name": "lora"},
            "data": {"synthetic": {"name": "colour-preference"}},
            "train": {"objective": "dpo", **train}}


def checked(data: dict, tmp_path: Path):
    path = tmp_path / "v.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_recipe(path)


def test_dpo_settings_use_trls_names_and_need_objective_dpo(tmp_path):
    from trl import DPOConfig

    r = checked(synthetic(dpo={"beta": 0.3, "loss_type": ["sigmoid", "sft"],
                               "loss_weights": [1.0, 0.5]}), tmp_path)
    assert set(r.train.dpo.model_dump()) <= set(DPOConfig.__dataclass_fields__)
    with pytest.raises(RecipeError, match=r"train\.dpo.*need `objective: dpo`"):
        checked(synthetic(objective="sft", dpo={"beta": 0.3}), tmp_path)
    with pytest.raises(RecipeError, match=r"unknown DPO loss 'sigmoidd'"):
        checked(synthetic(dpo={"loss_type": "sigmoidd"}), tmp_path)
    with pytest.raises(RecipeError, match=r"train\.dpo\.max_prompt_length: unknown key"):
        checked(synthetic(dpo={"max_prompt_length": 128}), tmp_path)
    with pytest.raises(RecipeError, match=r"2 loss_weights for 1 loss_type"):
        checked(synthetic(dpo={"loss_weights": [1.0, 2.0]}), tmp_path)
    assert validate_recipe_dict({**synthetic(), "train": {}}).train.objective == "sft"


@pytest.mark.parametrize("change, message", [
    ({"model": {"id": "tiny-clip"}}, "clip is a dual encoder"),
    ({"model": {"id": "tiny-clip"}, "method": {"name": "coop"}}, "clip is a dual encoder"),
    ({"method": {"name": "per_part", "parts": {"vision": {"name": "vpt"},
                                               "language": {"name": "lora"}}}},
     "disable_adapter does not switch off"),
    ({"train": {"objective": "dpo", "packing": True}}, "train.packing is not available"),
    ({"train": {"objective": "dpo", "assistant_only_loss": False}}, "assistant_only_loss"),
])
def test_what_dpo_cannot_run_is_refused_at_validate_time(tmp_path, change, message):
    with pytest.raises(RecipeError, match=message.replace(".", r"\.")):
        checked({**synthetic(), **change}, tmp_path)


def family_cases():
    """Every tiny generative twin, with the reason its family gives for refusing dpo (if)."""
    return [(name, spec.objective_refusal("dpo")) for name, spec in sorted(tiny_models().items())
            if spec.kind == "generative"]


@pytest.mark.parametrize("model, refusal", family_cases())
def test_family_refusals_are_said_at_validate_time(tmp_path, model, refusal):
    data = {**synthetic(), "model": {"id": model}}
    if refusal is None:
        assert checked(data, tmp_path).train.objective == "dpo"
    else:
        with pytest.raises(RecipeError, match="cannot train with TRL's DPOTrainer"):
            checked(data, tmp_path)


def test_the_families_that_must_run_dpo_do():
    refused = {name for name, refusal in family_cases() if refusal}
    assert not refused & {"tiny-llava", "tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-smolvlm",
                          "tiny-gemma3"}


# --- the collator's guards ---------------------------------------------------------------------

def pair_row(images: list[str], chosen="red", rejected="blue", turns=()) -> dict:
    prompt = [*turns, {"role": "user", "content": [*({"type": "image"} for _ in images),
                                                   {"type": "text", "text": QUESTION}]}]
    return {"messages": [*prompt, {"role": "assistant",
                                   "content": [{"type": "text", "text": chosen}]}],
            "rejected": {"role": "assistant",
                         "content": [{"type": "text", "text": rejected}]},
            "images": images}


def test_chosen_and_rejected_see_identical_pixels_and_only_the_last_reply_is_scored(
        tmp_path, llava_collator):
    import torch

    from peftvlm.data.read.preference import PreferenceCollator

    red = str(tmp_path / save_image(tmp_path / "red.png", colour=(200, 0, 0)))
    green = str(tmp_path / save_image(tmp_path / "green.png", colour=(0, 200, 0)))
    earlier = ({"role": "user", "content": [{"type": "text", "text": "Hi"}]},
               {"role": "assistant", "content": [{"type": "text", "text": "Hello there"}]})
    rows = [pair_row([red], "red", "a blue one"), pair_row([green], turns=earlier)]
    batch = PreferenceCollator(llava_collator)(rows)
    chosen, rejected = batch["pixel_values"].chunk(2)
    assert torch.equal(chosen, rejected) and not torch.equal(chosen[0], chosen[1])
    tokenizer = llava_collator.processor.tokenizer
    scored = [tokenizer.decode(ids[mask.bool()]).strip()
              for ids, mask in zip(batch["input_ids"], batch["completion_mask"])]
    assert [s.removesuffix("</s>") for s in scored] == ["red", "red", "a blue one", "blue"]
    assert "labels" not in batch  # TRL derives its labels from completion_mask


def test_a_batch_whose_halves_differ_in_pixels_is_refused(llava_collator, tmp_path):
    import torch

    from peftvlm.data.read.preference import check_same_images
    from peftvlm.errors import RunError

    pixels = torch.zeros(4, 3, 8, 8)
    check_same_images({"pixel_values": pixels, "input_ids": torch.ones(4, 3)}, 2)
    pixels[3] += 1
    with pytest.raises(RunError, match="differ in `pixel_values`"):
        check_same_images({"pixel_values": pixels}, 2)


def test_multi_image_rows_keep_all_their_images(tmp_path, llava_collator):
    from peftvlm.data.read.preference import PreferenceCollator

    images = [str(tmp_path / save_image(tmp_path / f"{i}.png", colour=(60 * i, 0, 0)))
              for i in range(3)]
    batch = PreferenceCollator(llava_collator)([pair_row(images[:2]), pair_row(images[2:])])
    assert batch["pixel_values"].shape[0] == 2 * 3  # every image, for chosen and rejected
    image_id = llava_collator.processor.tokenizer.convert_tokens_to_ids(
        llava_collator.family.image_token)
    per_row = (batch["input_ids"] == image_id).sum(1).tolist()
    assert per_row[0] == per_row[2] == 2 * per_row[1] == 2 * per_row[3] > 0


def test_non_finite_margins_stop_the_run():
    from transformers import TrainerControl, TrainerState

    from peftvlm.errors import RunError
    from peftvlm.trainers.objectives.dpo_trainer import FiniteDPOMetrics

    callback, state = FiniteDPOMetrics(), TrainerState(global_step=7)
    callback.on_log(None, state, TrainerControl(), logs={"rewards/margins": 0.5, "loss": 0.6})
    with pytest.raises(RunError, match=r"step 7: rewards/margins not finite"):
        callback.on_log(None, state, TrainerControl(), logs={"rewards/margins": math.nan})


# --- the reference model -----------------------------------------------------------------------

def test_the_reference_is_the_base_with_the_adapter_disabled(tmp_path, data_cache):
    import torch

    from peftvlm.data.batch.collate import ConversationCollator
    from peftvlm.data.pipeline import prepare_data
    from peftvlm.models import load_base
    from peftvlm.registry import get_method
    from peftvlm.trainers.objectives import objective_for

    r = load_recipe(recipe(tmp_path, {"synthetic": {"name": "colour-preference",
                                                    "train_size": 4, "eval_size": 2}}))
    loaded = load_base(r.model, "lora", False)
    model = get_method("lora").apply(loaded.model, loaded.family, r.method, quantized=False)
    collator = ConversationCollator(loaded.processor, loaded.family)
    data = prepare_data(r, collator)
    trainer = objective_for(r).build_trainer(r, model, loaded.processor, collator, data,
                                             tmp_path / "run", [], None, [])
    assert list(trainer.model.peft_config) == ["default"]  # no reference copy of the adapter
    with torch.no_grad():  # move the adapter off zero: policy and reference now differ
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(0.05)
    batch = trainer.data_collator(list(data.train))
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.model, dict(batch))
    from peftvlm.trainers.objectives.dpo_trainer import reply_logps

    with model.disable_adapter():
        base = reply_logps(model, dict(batch))
    policy = reply_logps(model, dict(batch))
    torch.testing.assert_close(torch.cat([ref_chosen, ref_rejected]), base, rtol=1e-4,
                               atol=1e-4)
    assert not torch.allclose(policy, base, atol=1e-3)


# --- training ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, data_cache):
    """One run of the shipped dpo-tiny (60 steps) serves the resume, learning, export and
    predict tests: stopped by SIGTERM once its step-2 checkpoint is complete, then resumed to
    the end. Returns the stopped process, the step it saved, that checkpoint's completeness
    (read before the resume), the resumed process and the run folder."""
    from test_signals import train_until_signalled

    from conftest import run_cli
    from peftvlm.checkpoints import incomplete_reason
    from peftvlm.cli import shipped_recipes

    recipe = yaml.safe_load(shipped_recipes()["dpo-tiny"].read_text())
    recipe["train"].update(save_steps=2)
    stopped, run, recipe_file = train_until_signalled(tmp_path_factory.mktemp("dpo"), recipe)
    found = [line for line in stopped.stderr.splitlines()
             if line.startswith("error: interrupted by SIGTERM after step ")]
    assert found, stopped.stderr[-3000:]
    step = int(found[0].split("after step ")[1].split(":")[0])
    checkpoint = run / "checkpoints" / f"checkpoint-{step}"
    incomplete = incomplete_reason(checkpoint)
    resumed = run_cli("train", recipe_file, "-o", run, "--resume", "train.save_steps=1000")
    return {"stopped": stopped, "saved": found[0], "checkpoint": checkpoint, "step": step,
            "incomplete": incomplete, "resumed": resumed, "run": run}


@pytest.mark.slow
def test_a_stopped_dpo_run_resumes_from_its_checkpoint(dpo_run):
    stopped, resumed, run = dpo_run["stopped"], dpo_run["resumed"], dpo_run["run"]
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert dpo_run["step"] >= 2 and dpo_run["saved"].endswith(f"saved {dpo_run['checkpoint']}")
    assert dpo_run["incomplete"] is None
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {dpo_run['checkpoint']} (step {dpo_run['step']})" in resumed.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["global_step"] == 60 and summary["dpo"]["margin_curve"]
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert not (run / "adapter" / "ref").exists()  # only the trained adapter is saved


@pytest.mark.slow
def test_dpo_learns_to_prefer_the_right_colour_and_to_stop_then_exports_and_predicts(
        dpo_run, tmp_path, cli_in_process):
    """Learning proof (dpo-tiny): held-out preference accuracy from about chance to >= 0.9, and
    the greedy answer is the colour word alone (exact match, which a reply that runs on fails:
    DPO's sigmoid loss alone ranked the colours but never taught the end of turn, which both
    replies share; the recipe's SFT term on the chosen reply does). The run folder is an
    ordinary one: export --merge, then predict answers held-out images with one colour word."""
    run = dpo_run["run"]
    summary = json.loads((run / "summary.json").read_text())
    accuracy = summary["dpo"]["held_out_preference_accuracy"]
    assert accuracy["before"] <= 0.65 and accuracy["after"] >= 0.9, accuracy
    assert summary["dpo"]["rewards_margins"] > 0
    assert all(math.isfinite(m) for _, m in summary["dpo"]["margin_curve"])
    assert summary["eval"]["exact_match"]["after"] >= 0.85, summary["eval"]  # 64 held-out rows
    assert (run / "loss.png").is_file()

    merged = cli_in_process("export", run, "--merge", "--out", tmp_path / "merged")
    assert merged.returncode == 0 and "export ok" in merged.stdout, merged.stdout[-3000:]
    source = Path(next(s["source"] for s in summary["data"]["sources"] if s["section"] == "eval"))
    held_out = [json.loads(line) for line in source.read_text().splitlines()][:4]
    folder = source.parent
    args = [a for row in held_out for a in ("-i", folder / row["image"])]
    answered = cli_in_process("predict", tmp_path / "merged", *args, "-o", tmp_path / "p.jsonl")
    assert answered.returncode == 0, answered.stdout[-3000:]
    answers = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [a["prompt"] for a in answers] == [QUESTION] * 4  # the run's own question
    words = [a["answer"].strip() for a in answers]
    assert all(w in COLOURS for w in words), words  # one colour word, then it stopped
    assert sum(w == row["chosen"] for w, row in zip(words, held_out)) >= 3, (words, held_out)


@pytest.mark.parametrize("model", [m for m, refusal in family_cases()
                                   if refusal is None and m != "tiny-llava"])
def test_dpo_runs_two_steps_on_each_family(tmp_path, data_cache, model):
    """Every tiny generative twin whose family does not refuse dpo trains two DPO steps (about
    3 s each once its tiny model is built)."""
    from peftvlm import api

    r = load_recipe(recipe(tmp_path, {"synthetic": {"name": "colour-preference",
                                                    "train_size": 4, "eval_size": 2}},
                           model=model, max_steps=2, per_device_train_batch_size=2,
                           logging_steps=1, max_length=1024))
    summary = api.train(r, tmp_path / "run", log=lambda *_: None)
    assert summary["global_step"] == 2
    assert all(math.isfinite(summary["dpo"][k]) for k in ("rewards_margins", "logps_chosen"))
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()


@pytest.mark.slow
def test_dpo_metrics_reach_wandb(tmp_path, data_cache, monkeypatch):
    from peftvlm import api

    monkeypatch.delenv("WANDB_MODE", raising=False)
    path = recipe(tmp_path, {"synthetic": {"name": "colour-preference", "train_size": 4,
                                           "eval_size": 2}},
                  max_steps=2, per_device_train_batch_size=2, logging_steps=1)
    data = yaml.safe_load(path.read_text())
    data["tracking"] = {"wandb": {"mode": "offline", "project": "peftvlm-test"}}
    path.write_text(yaml.safe_dump(data))
    api.train(load_recipe(path), tmp_path / "run", log=lambda *_: None)
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    blob = b"".join(p.read_bytes() for p in runs[0].rglob("*") if p.is_file())
    for key in (b"rewards/margins", b"rewards/accuracies", b"logps/chosen",
                b"eval_preference_accuracy"):
        assert key in blob, key
