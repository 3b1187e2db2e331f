"""`peftvlm eval RECIPE --run RUN`: score a finished run's adapter against its base model.

    peftvlm eval recipes/quickstart.yaml --run runs/quickstart            # held-out data
    peftvlm eval quickstart --run runs/quickstart --split train --max-samples 100 --no-base

The base model is loaded as training loaded it, scored, then the run's adapter is loaded onto
it (`PeftModel.from_pretrained`) and scored on the same rows with the recipe's `eval` settings
(greedy by default), so on the held-out split the fine-tuned numbers equal the `after` numbers
in the run's summary.json. Outputs go to RUN/eval/ (see `peftvlm.eval.report`).

`evaluate_run` checks the request and the run folder, then asks the run's kind
(`peftvlm.kinds`): generative runs are scored by `evaluate_generative` below, classification runs
by `trainers.clip_eval.evaluate_dual_encoder`, retrieval runs by
`trainers.contrastive.evaluate_retrieval`; all return the same result dict.
"""

from __future__ import annotations

from pathlib import Path

from peftvlm.data.batch.collate import ConversationCollator
from peftvlm.data.boxes import box_format_for
from peftvlm.data.pipeline import prepare_data
from peftvlm.errors import DataError, RecipeError, RunError
from peftvlm.eval.generate import evaluate_rows, generation_kwargs
from peftvlm.eval.report import (answer_classes, compare, per_class_accuracy, prediction_rows,
                                 write_box_pictures, write_outputs)
from peftvlm.kinds import kind_for
from peftvlm.models import load_base
from peftvlm.registry import get_method
from peftvlm.runs import read_run_folder

SPLITS = {"test": "data.eval (the held-out rows scored during training)",
          "train": "data.train (the training rows, after the length filter)"}


def evaluate_run(recipe, run_dir: str | Path, split: str = "test", max_samples: int | None = None,
                 with_base: bool = True, log=print) -> dict:
    """Score base and fine-tuned model of a finished run; write RUN/eval/; return the result."""
    run_dir = Path(run_dir)
    if split not in SPLITS:
        raise RecipeError(f"--split {split!r} is not a split",
                          hint="; ".join(f"{k} = {v}" for k, v in SPLITS.items()))
    check_run(recipe, run_dir)
    return kind_for(recipe).evaluate(recipe, run_dir, split, max_samples, with_base, log)


def evaluate_generative(recipe, run_dir: Path, split: str = "test",
                        max_samples: int | None = None, with_base: bool = True,
                        log=print) -> dict:
    """The generative kind's `peftvlm eval`: generate answers with base and adapter, score."""
    check_request(recipe, split)
    check_adapter(run_dir)
    cfg = recipe.eval if max_samples is None else recipe.eval.model_copy(
        update={"max_samples": max_samples})
    loaded, rows = load_base_and_rows(recipe, split, cfg.max_samples)
    log(f"scoring {len(rows)} {split} rows with {', '.join(cfg.metrics)}")
    base = score(recipe, loaded, loaded.model, rows, cfg) if with_base else None
    tuned = score(recipe, loaded, load_adapter(loaded.model, run_dir, recipe.method.name), rows,
                  cfg)
    result = build_result(recipe, run_dir, split, cfg, base, tuned)
    predictions = prediction_rows(rows, split, tuned["predictions"],
                                  base and base["predictions"], tuned["references"])
    files = write_outputs(run_dir / "eval", result, predictions)
    result["files"] = {k: str(v) for k, v in files.items()}
    pictures = write_box_pictures(run_dir / "eval", rows, tuned["predictions"],
                                  box_format_for(loaded.family, loaded.processor))
    if pictures:
        result["files"]["box_pictures"] = str(pictures[0].parent)
    return result


def check_request(recipe, split: str) -> None:
    """Metrics and held-out data must exist before any model is loaded."""
    if not recipe.eval.metrics:
        raise RecipeError(f"{recipe.source_path}: eval.metrics is empty: nothing to score",
                          hint="e.g. eval.metrics=[exact_match] (see `peftvlm ls metrics`)")
    if split == "test" and not recipe.data.eval and recipe.data.synthetic is None:
        raise DataError(f"{recipe.source_path}: no held-out data: data.eval is not set",
                        hint="add data.eval to the recipe, or score training rows with "
                             "--split train")


def check_run(recipe, run_dir: Path) -> dict:
    """The run folder exists, finished, and was trained from this recipe's model and method."""
    summary = read_run_folder(run_dir).summary
    expected = {"model": recipe.model.id, "method": recipe.method.name}
    wrong = {k: v for k, v in expected.items() if summary.get(k) != v}
    if wrong:
        said = ", ".join(f"{k} {summary.get(k)!r} (recipe: {v!r})" for k, v in wrong.items())
        raise RunError(f"run {run_dir} was trained with {said}: the recipe "
                       f"{recipe.source_path} does not match it",
                       hint=f"pass the run's own recipe: {run_dir / 'recipe.yaml'}")
    return summary


def check_adapter(run_dir: Path) -> None:
    if not (run_dir / "adapter" / "adapter_config.json").is_file():
        raise RunError(f"run {run_dir} has no adapter ({run_dir / 'adapter'} lacks "
                       "adapter_config.json)",
                       hint="the run folder is damaged: train again with --overwrite")


def load_base_and_rows(recipe, split: str, max_samples: int | None):
    """The base model as training loaded it, and the split's rows exactly as training read
    them (same loading, bad-row policy, system prompt and length filter)."""
    from transformers import set_seed

    set_seed(recipe.train.seed)
    loaded = load_base(recipe.model, recipe.method.name)
    collator = ConversationCollator(loaded.processor, loaded.family,
                                    recipe.train.assistant_only_loss)
    data = prepare_data(recipe, collator)
    rows = data.eval if split == "test" else data.train
    if not rows:
        bad = data.bad_rows.get("eval") or {}
        why = ", ".join(f"{v['count']} {reason}" for reason, v in bad.items()) or "it is empty"
        raise DataError(f"{recipe.source_path}: data.eval has no usable rows ({why})",
                        hint="fix the held-out data, or score training rows with --split train")
    place_on_device(loaded)
    return loaded, rows[:max_samples] if max_samples else rows


def place_on_device(loaded) -> None:
    """On a GPU, move an unquantized model there (bitsandbytes places quantized ones itself).
    A quantized base gets the preparation QLoRA training gave it (norms and other
    full-precision weights in fp32), so its numbers match the ones scored during training."""
    import torch

    if loaded.quantized:
        from peft import prepare_model_for_kbit_training

        loaded.model = prepare_model_for_kbit_training(loaded.model,
                                                       use_gradient_checkpointing=False)
    elif torch.cuda.is_available():
        loaded.model.to("cuda")


def load_adapter(model, run_dir: Path, method_name: str):
    """The run's adapter on top of `model` (modified in place: score the base first), by the
    method's own loader where it saves more than peft does (per_part's prompts)."""
    from peft import PeftModel

    loader = get_method(method_name).hook("load_trained") or PeftModel.from_pretrained
    try:
        return loader(model, run_dir / "adapter")
    except (RuntimeError, ValueError, KeyError) as exc:
        raise RunError(f"cannot load the adapter of {run_dir} onto the base model: "
                       f"{str(exc).splitlines()[0]}",
                       hint="evaluate with the recipe the run was trained with") from exc


def score(recipe, loaded, model, rows: list[dict], cfg) -> dict:
    from transformers import set_seed

    set_seed(recipe.train.seed)  # only sampling (eval.do_sample) draws random numbers
    return evaluate_rows(model, loaded.processor, loaded.family, rows, cfg, progress=True)


def build_result(recipe, run_dir: Path, split: str, cfg, base: dict | None, tuned: dict) -> dict:
    """metrics.json's content: per score base/fine-tuned/delta, per-class scores, settings."""
    classes = answer_classes(tuned["references"])
    per_class = {}
    if classes:
        per_class = compare(base and per_class_accuracy(base["predictions"], classes),
                            per_class_accuracy(tuned["predictions"], classes), {})
    return {
        "run": str(run_dir), "run_name": recipe.name, "recipe": str(recipe.source_path),
        "model": recipe.model.id, "method": recipe.method.name, "split": split,
        "num_examples": len(tuned["predictions"]),
        "generation": {**generation_kwargs(cfg), "batch_size": cfg.batch_size},
        "metrics": compare(base and base["scores"], tuned["scores"], tuned["higher_is_better"]),
        "per_class": per_class, "notes": tuned["notes"],
    }
