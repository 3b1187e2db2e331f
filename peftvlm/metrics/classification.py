"""Classification metrics: top-1, top-5 and per-class (balanced) accuracy.

A prediction is either one label or a list of labels ranked best first; a reference row holds
the true label (`references: ["cat"]`; further entries also count as correct). Labels compare
after `str(x).strip().lower()` so "Cat " and "cat" agree, as generated text needs.
"""

from __future__ import annotations

from collections import defaultdict

from peftvlm.metrics import mean, register


def _label(x) -> str:
    return str(x).strip().lower()


def _ranked(prediction) -> list[str]:
    items = prediction if isinstance(prediction, (list, tuple)) else [prediction]
    return [_label(p) for p in items]


def _hits(predictions: list, references: list[list], k: int) -> list[float]:
    return [float(any(p in {_label(r) for r in refs} for p in _ranked(pred)[:k]))
            for pred, refs in zip(predictions, references)]


def top_k_accuracy(predictions: list, references: list[list], k: int) -> float:
    """Fraction of rows whose true label is among the first k predicted labels."""
    return mean(_hits(predictions, references, k))


def top1_accuracy(predictions: list, references: list[list]) -> dict[str, float]:
    """Top-1 accuracy."""
    return {"top1_accuracy": top_k_accuracy(predictions, references, 1)}


def top5_accuracy(predictions: list, references: list[list]) -> dict[str, float]:
    """Top-5 accuracy (a single-label prediction counts as a list of one)."""
    return {"top5_accuracy": top_k_accuracy(predictions, references, 5)}


def per_class_accuracy(predictions: list, references: list[list]) -> dict[str, float]:
    """Top-1 accuracy of each true class (`per_class_accuracy/<class>`) and their unweighted
    mean (`per_class_accuracy`, a.k.a. balanced accuracy); the class is each row's first label."""
    groups: dict[str, list[float]] = defaultdict(list)
    for hit, refs in zip(_hits(predictions, references, 1), references):
        groups[_label(refs[0])].append(hit)
    per_class = {f"per_class_accuracy/{c}": mean(v) for c, v in sorted(groups.items())}
    return {"per_class_accuracy": mean(list(per_class.values())), **per_class}


_KW = {"higher_is_better": True, "prediction": "labels", "reference": "labels"}
register("top1_accuracy", top1_accuracy, summary="first predicted label is correct", **_KW)
register("top5_accuracy", top5_accuracy,
         summary="correct label among the first five predicted", **_KW)
register("per_class_accuracy", per_class_accuracy,
         summary="top-1 accuracy per class and their mean (balanced accuracy)", **_KW)
