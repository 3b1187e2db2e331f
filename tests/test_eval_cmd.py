"""`peftvlm eval` on tiny-llava runs: reproduces the summary's numbers, writes predictions,
metrics and a plot, prints base vs fine-tuned, refuses bad requests; `train.eval_steps`."""

from __future__ import annotations

import json

import pytest
import yaml
from transformers import TrainerCallback

from conftest import REPO
from peftvlm import api
from peftvlm.errors import DataError, RecipeError, RunError
from peftvlm.eval.report import answer_classes, plot_comparison, prediction_rows
from peftvlm.recipe.load import load_recipe
from test_train_run import tiny_recipe

# 8 steps at this rate move tiny-llava's held-out answers off the base's.
TRAIN = {"max_steps": 8, "save_steps": 100, "learning_rate": 1e-2}


def write_recipe(folder, name="r.yaml", **sections):
    path = folder / name
    path.write_text(yaml.safe_dump(tiny_recipe(**sections)))
    return path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One short tiny run shared by the tests below: (recipe path, run folder, summary)."""
    folder = tmp_path_factory.mktemp("evalrun")
    recipe_path = write_recipe(folder, train=TRAIN)
    summary = api.train(load_recipe(recipe_path), folder / "run", log=lambda *_: None)
    return recipe_path, folder / "run", summary


def test_eval_reproduces_the_summary_exactly_and_writes_its_files(finished_run):
    recipe_path, run, summary = finished_run
    result = api.evaluate(load_recipe(recipe_path), run, log=lambda *_: None)
    em = result["metrics"]["exact_match"]
    assert em["fine_tuned"] == summary["eval"]["exact_match"]["after"]
    assert em["base"] == summary["eval"]["exact_match"]["before"]
    assert em["delta"] == em["fine_tuned"] - em["base"]

    rows = [json.loads(line) for line in (run / "eval" / "predictions.jsonl").open()]
    # training moved the answers, so the equalities above mean something
    assert any(r["prediction"] != r["base_prediction"] for r in rows)
    assert len(rows) == summary["data"]["eval_rows"] == result["num_examples"] == 8
    assert set(rows[0]) == {"id", "prompt", "references", "prediction", "base_prediction"}
    assert rows[0]["prompt"] == "user: <image> What color is the shape?"
    assert all(len(r["references"]) == 1 for r in rows)
    correct = sum(r["prediction"] == r["references"][0] for r in rows)
    assert correct / len(rows) == em["fine_tuned"]

    saved = json.loads((run / "eval" / "metrics.json").read_text())
    assert saved["metrics"]["exact_match"]["fine_tuned"] == em["fine_tuned"]
    assert saved["split"] == "test" and saved["generation"]["do_sample"] is False
    assert set(saved["per_class"]) <= {"red", "green", "blue", "yellow"}
    assert (run / "eval" / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_predictions_file_rescores_with_peftvlm_metrics(finished_run, cli_in_process):
    _, run, summary = finished_run
    preds = run / "eval" / "predictions.jsonl"
    if not preds.exists():
        api.evaluate(load_recipe(finished_run[0]), run, log=lambda *_: None)
    res = cli_in_process("metrics", "-p", preds, "-r", preds, "-m", "exact_match", "--json")
    assert res.returncode == 0, res.stderr
    rescored = json.loads(res.stdout)["scores"]["exact_match"]
    assert rescored == pytest.approx(summary["eval"]["exact_match"]["after"])


@pytest.mark.slow
def test_cli_prints_base_vs_fine_tuned_with_options(finished_run, cli_in_process):
    """`peftvlm eval` through main() in this process (test_readme.py runs it as a command)."""
    recipe_path, run, _ = finished_run
    res = cli_in_process("eval", recipe_path, "--run", run, "--max-samples", "4", "--split", "train")
    assert res.returncode == 0, res.stderr
    assert "base" in res.stdout and "fine-tuned" in res.stdout and "delta" in res.stdout
    assert "exact_match" in res.stdout and "train split, 4 examples" in res.stdout
    rows = (run / "eval" / "predictions.jsonl").read_text().splitlines()
    assert len(rows) == 4 and json.loads(rows[0])["id"] == "train-0"

    res = cli_in_process("eval", recipe_path, "--run", run, "--no-base", "--max-samples", "2")
    assert res.returncode == 0, res.stderr
    assert "n/a" in res.stdout
    assert "base_prediction" not in (run / "eval" / "predictions.jsonl").read_text()


def error_of(cli, *args):
    """`peftvlm eval ARGS` must fail with one `error: ...` paragraph (main() in this process; a
    real process's error path is tested by test_export.py's test_cli_missing_run)."""
    res = cli("eval", *args)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    assert res.stderr.startswith("error: ") and res.stderr.count("error:") == 1
    return res.stderr


def test_cli_errors_are_one_clear_message(finished_run, tmp_path, cli_in_process):
    recipe_path, run, _ = finished_run
    cli = cli_in_process
    assert "does not exist" in error_of(cli, recipe_path, "--run", tmp_path / "nope")
    (tmp_path / "unfinished").mkdir()
    assert "unfinished" in error_of(cli, recipe_path, "--run", tmp_path / "unfinished")
    (tmp_path / "unfinished" / "summary.json").write_text('{"model": ')
    assert "is damaged" in error_of(cli, recipe_path, "--run", tmp_path / "unfinished")
    other = write_recipe(tmp_path, "dora.yaml", method={"name": "dora"})
    err = error_of(cli, other, "--run", run)
    assert "method 'lora' (recipe: 'dora')" in err and "recipe.yaml" in err
    assert "not a split" in error_of(cli, recipe_path, "--run", run, "--split", "val")
    no_eval = write_recipe(tmp_path, "noeval.yaml", data={"synthetic": None,
                                                         "train": "train.jsonl"})
    (tmp_path / "train.jsonl").write_text("")
    err = error_of(cli, no_eval, "--run", run)
    assert "no held-out data" in err and "--split train" in err


def test_run_without_adapter_and_empty_metrics_are_refused(finished_run, tmp_path):
    recipe_path, run, summary = finished_run
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(RunError, match="has no adapter"):
        api.evaluate(load_recipe(recipe_path), broken)
    with pytest.raises(RecipeError, match="eval.metrics is empty"):
        api.evaluate(load_recipe(recipe_path, ["eval.metrics=[]"]), run)


def test_eval_rows_with_no_usable_rows_are_refused(finished_run, tmp_path):
    _, run, _ = finished_run
    data = {"synthetic": None, "train": "train.jsonl", "eval": "eval.jsonl"}
    good = {"messages": [{"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "red"}]}
    (tmp_path / "train.jsonl").write_text(json.dumps(good) + "\n")
    (tmp_path / "eval.jsonl").write_text(json.dumps({**good, "images": ["gone.png"]}) + "\n")
    recipe = load_recipe(write_recipe(tmp_path, data=data))
    with pytest.raises(DataError, match=r"data.eval: no usable held-out rows \(1 missing image "
                                        r"\(e\.g\. eval\.jsonl:1"):
        api.evaluate(recipe, run)


def test_multi_reference_rows_and_question_types_are_scored(tmp_path):
    """Rows with `references` (VQA's 10 answers) and `question_type` score with them."""
    from peftvlm.eval.report import compare
    from peftvlm.eval.generate import row_references

    row = {"messages": [{"role": "user", "content": [{"type": "text", "text": "how many?"}]},
                        {"role": "assistant", "content": [{"type": "text", "text": "2"}]}],
           "references": ["2"] * 3 + ["two"] * 7, "question_type": "number", "id": "q7"}
    refs = row_references(row)
    assert len(refs) == 10
    plain = {k: v for k, v in row.items() if k not in ("references",)}
    assert row_references(plain) == ["2"]
    out = prediction_rows([row], "test", ["2"], None, [refs])
    assert out == [{"id": "q7", "prompt": "user: how many?", "references": refs,
                    "prediction": "2", "question_type": "number"}]
    result = {"run_name": "t", "split": "test", "num_examples": 1, "per_class": {},
              "metrics": compare({"vqa_accuracy": 0.5, "vqa_accuracy/number": 0.5},
                                 {"vqa_accuracy": 1.0, "vqa_accuracy/number": 1.0}, {})}
    titles = plot_comparison(result, tmp_path / "p.png")
    assert titles == ["overall", "vqa_accuracy by question type"]


def test_sources_keep_eval_fields(tmp_path):
    from peftvlm.data.read.sources import to_conversation
    from peftvlm.data.rows import BadRow

    record = {"id": 7, "references": ["a", "b"], "question_type": "what",
              "messages": [{"role": "user", "content": "q"},
                           {"role": "assistant", "content": "a"}]}
    row = to_conversation(record, tmp_path)
    assert (row["id"], row["references"], row["question_type"]) == ("7", ["a", "b"], "what")
    with pytest.raises(BadRow, match="references"):
        to_conversation({**record, "references": "a"}, tmp_path)


def test_answer_classes_only_for_small_label_sets():
    assert answer_classes([["Red"], ["blue"], ["red"]]) == ["red", "blue", "red"]
    assert answer_classes([["red"], ["blue"]]) is None  # every answer distinct: not classes
    assert answer_classes([["red"], ["red"]]) is None  # one class
    assert answer_classes([["2"] * 10, ["3"] * 10]) is None  # multi-reference rows


class LogRecorder(TrainerCallback):
    """Sees what every logging integration (W&B's callback included) receives in on_log."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append((state.global_step, dict(logs or {})))


@pytest.mark.slow
def test_eval_steps_log_generation_metrics_into_history_and_wandb(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    recipe = write_recipe(tmp_path, train={"max_steps": 6, "eval_steps": 3, "save_steps": 100},
                          tracking={"wandb": {"mode": "offline", "project": "peftvlm-test"}})
    recorder = LogRecorder()
    summary = api.train(load_recipe(recipe), tmp_path / "run", log=lambda *_: None,
                        callbacks=[recorder])
    history = summary["eval_history"]
    assert [step for step, _ in history] == [3, 6]
    logged = [(step, logs["eval_exact_match"]) for step, logs in recorder.logs
              if "eval_exact_match" in logs]
    assert logged == [(step, scores["exact_match"]) for step, scores in history]
    assert all(set(scores) == {"exact_match"} for _, scores in history)
    # the last periodic eval and the after-training eval score the same model on the same rows
    assert history[-1][1]["exact_match"] == summary["eval"]["exact_match"]["after"]
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["eval_history"] == history
    (wandb_run,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    assert b"eval/exact_match" in wandb_records(wandb_run)  # W&B got them as eval/<metric>


def wandb_records(run_dir, wait_s: float = 20.0) -> bytes:
    """The offline run's record file; under load W&B's writer may lag `finish()` a little."""
    import time

    deadline = time.monotonic() + wait_s
    while True:
        blob = b"".join(p.read_bytes() for p in run_dir.rglob("*.wandb"))
        if b"eval/" in blob or time.monotonic() > deadline:
            return blob
        time.sleep(0.5)


def test_eval_history_is_empty_without_eval_steps(finished_run):
    assert finished_run[2]["eval_history"] == []


@pytest.mark.slow
def test_eval_history_survives_a_resume(tmp_path):
    from test_train_run import CrashAt

    recipe = load_recipe(write_recipe(tmp_path, train={"max_steps": 6, "eval_steps": 2,
                                                       "save_steps": 2}))
    with pytest.raises(SystemExit):
        api.train(recipe, tmp_path / "run", callbacks=[CrashAt(5)], log=lambda *_: None)
    summary = api.train(recipe, tmp_path / "run", resume=True, log=lambda *_: None)
    assert [step for step, _ in summary["eval_history"]] == [2, 4, 6]


def test_clip_family_runs_go_to_the_clip_evaluator(tmp_path):
    """Dual-encoder methods are scored by the CLIP evaluator (tested in test_clip_eval_export);
    here: the dispatch reaches it, and its own checks answer."""
    recipe = load_recipe(REPO / "recipes" / "clip-coop.yaml")
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"model": recipe.model.id, "method": "coop"}))
    with pytest.raises(RunError, match="has no adapter/ folder"):
        api.evaluate(recipe, run)


def test_qlora_run_is_reproduced_on_its_quantized_base(tmp_path):
    path = write_recipe(tmp_path, method={"name": "qlora", "r": 4, "lora_dropout": 0.0},
                        train={"max_steps": 4, "save_steps": 100, "learning_rate": 1e-2})
    summary = api.train(load_recipe(path), tmp_path / "run", log=lambda *_: None)
    result = api.evaluate(load_recipe(path), tmp_path / "run", log=lambda *_: None)
    em = result["metrics"]["exact_match"]
    assert em["fine_tuned"] == summary["eval"]["exact_match"]["after"] != em["base"]
    assert em["base"] == summary["eval"]["exact_match"]["before"]
