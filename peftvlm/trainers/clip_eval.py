"""`peftvlm eval` for CLIP-family runs: zero-shot CLIP (the base) vs the trained method,
scored on exactly the images training scored, so the numbers reproduce summary.json."""

from __future__ import annotations

from pathlib import Path

from peftvlm.errors import RecipeError, RunError
from peftvlm.eval.report import compare, write_outputs
from peftvlm.methods.dual_encoder import DualEncoderClassifier, load_method
from peftvlm.metrics.classification import per_class_accuracy, top1_accuracy, top5_accuracy
from peftvlm.trainers.clip import (ADAPTER_DIR, EvalSets, ImageSet, load_dual_encoder,
                                   prepare_task)

EVAL_SPLITS = ("test", "train")


def evaluate_dual_encoder(recipe, run_dir, split: str = "test", max_samples: int | None = None,
                          with_base: bool = True, log=print) -> dict:
    """Score a finished CLIP-family run: zero-shot CLIP (the base) vs the trained method.

    Reloads the base model and the run's `adapter/` (`load_method`) and scores `split`
    (`test`: the held-out images, `train`: the (few-shot) training images) exactly as training
    did (same images, order, `eval.max_samples`, `eval.batch_size`), so on `test`
    `metrics.accuracy` {base, fine_tuned} equals summary.json's `eval.accuracy` {before, after}
    (also returned as `accuracy`). `max_samples` overrides `eval.max_samples` (per class group).
    Scores, through `peftvlm.metrics`: top-1 `accuracy`, `per_class_accuracy` (their mean;
    each class under `per_class`), `top5_accuracy` beyond 5 classes, and for base-to-new runs
    `accuracy_new` and `harmonic_mean`. The result has the shape of `peftvlm eval`'s for
    generative runs; it is written to RUN/eval/ (metrics.json, predictions.jsonl, metrics.png).
    """
    run_dir = Path(run_dir)
    if split not in EVAL_SPLITS:
        raise RecipeError(f"--split {split!r}: a CLIP-family run has the splits "
                          f"{', '.join(EVAL_SPLITS)} (held-out / training images)")
    if max_samples is not None:
        recipe = recipe.model_copy(update={"eval": recipe.eval.model_copy(
            update={"max_samples": max_samples})})
    classifiers, sets = load_for_eval(recipe, run_dir, split, with_base)
    scored = {which: {group: score_classes(c, sets.classnames[group], sets.data[group],
                                           sets.batch_size) for group in sets.data}
              for which, c in classifiers.items()}
    base = _summarise_groups(scored["zero_shot"]) if with_base else (None, None)
    tuned = _summarise_groups(scored["trained"])
    result = {
        "run": str(run_dir), "run_name": recipe.name, "recipe": str(recipe.source_path),
        "model": recipe.model.id, "method": recipe.method.name, "split": split,
        "num_examples": sum(len(d.labels) for d in sets.data.values()),
        "metrics": compare(base[0], tuned[0], {}), "per_class": compare(base[1], tuned[1], {}),
        "notes": {}, "accuracy": {"before": base[0] and base[0]["accuracy"],
                                  "after": tuned[0]["accuracy"]}}
    files = write_outputs(run_dir / "eval", result, _prediction_rows(sets, scored))
    result["files"] = {k: str(v) for k, v in files.items()}
    log(f"{split}: accuracy {result['accuracy']['after']:.4f} with {recipe.method.name}"
        + (f" ({result['accuracy']['before']:.4f} zero-shot)" if with_base else ""))
    return result


def load_for_eval(recipe, run_dir: Path, split: str, with_base: bool):
    """({"zero_shot"?, "trained"} classifiers on one base model, the image sets to score)."""
    import torch

    if not (run_dir / ADAPTER_DIR).is_dir():
        raise RunError(f"{run_dir} has no {ADAPTER_DIR}/ folder: the run is unfinished",
                       hint="finish it with `peftvlm train RECIPE --resume`")
    loaded = load_dual_encoder(recipe)
    loaded.model.to("cuda" if torch.cuda.is_available() else "cpu")
    classnames, train_data, sets = prepare_task(recipe, loaded.processor)
    if split == "train":
        sets = EvalSets({"base": classnames}, {"base": train_data}, recipe.eval.batch_size)
    if not sets.data:
        raise RunError(f"{run_dir}: the recipe has no held-out images to evaluate on",
                       hint="add data.eval (or use a synthetic task), or use --split train")
    tokenizer = loaded.processor.tokenizer
    classifiers = {"trained": load_method(loaded.model, loaded.family, tokenizer,
                                          run_dir / ADAPTER_DIR)}
    if with_base:
        classifiers["zero_shot"] = DualEncoderClassifier(
            loaded.model, loaded.family, None, tokenizer, classnames,
            recipe.data.prompt_templates)
    return classifiers, sets


def _summarise_groups(groups: dict) -> tuple[dict, dict]:
    """(overall scores, per-class accuracy by class name) from each group's scores."""
    base = groups["base"][0]
    scores = {"accuracy": base["top1_accuracy"], **{k: v for k, v in base.items()
              if k in ("per_class_accuracy", "top5_accuracy")}}
    if "new" in groups:
        new = groups["new"][0]["top1_accuracy"]
        scores.update(accuracy_new=new, harmonic_mean=_harmonic(scores["accuracy"], new))
    per_class = {k.split("/", 1)[1]: v for g in groups.values() for k, v in g[0].items()
                 if k.startswith("per_class_accuracy/")}
    return scores, per_class


def _prediction_rows(sets: EvalSets, scored: dict) -> list[dict]:
    rows = []
    for group, data in sets.data.items():
        names = sets.classnames[group]
        for i, label in enumerate(data.labels.tolist()):
            image = data.images[i]
            row = {"group": group, "image": image if isinstance(image, str) else i,
                   "label": names[label]}
            for which in scored:
                row["prediction" if which == "trained" else "base_prediction"] = \
                    scored[which][group][1][i][0]
            rows.append(row)
    return rows


def _harmonic(b: float, n: float) -> float:
    return 2 * b * n / (b + n) if b + n else 0.0


def score_classes(classifier, classnames: list[str], data: ImageSet,
                  batch_size: int) -> tuple[dict, list[list[str]]]:
    """(scores, class names ranked best first per image) of `classifier` over `classnames` on
    `data`: top-1, per-class accuracy (+ top-5 beyond 5 classes) via `peftvlm.metrics`. The
    classifier's own classes are restored afterwards."""
    import torch

    trained = classifier.classnames
    classifier.set_classnames(classnames)
    classifier.eval()
    device = next(classifier.parameters()).device
    ranked = []
    with torch.no_grad():
        for index in torch.arange(len(data.labels)).split(batch_size):
            logits = classifier(data.pixels(index).to(device)).cpu()
            # stable: ties rank the lower class first, as argmax (training's accuracy) does
            ranked += torch.argsort(logits, dim=-1, descending=True, stable=True).tolist()
    classifier.set_classnames(trained)
    predictions = [[classnames[i] for i in row] for row in ranked]
    references = [[classnames[i]] for i in data.labels.tolist()]
    scores = {**top1_accuracy(predictions, references),
              **per_class_accuracy(predictions, references)}
    if len(classnames) > 5:
        scores.update(top5_accuracy(predictions, references))
    return scores, predictions
