"""Evaluation metrics: a registry of named scorers over plain Python lists.

Each family of metrics lives in its own module (`vqa`, `captioning`, `classification`,
`retrieval`, `grounding`, `clipscore`) and registers its scorers with one `register(...)` call
per metric. A registered scorer takes `(predictions, references, **extras)` and returns a dict
of named scores, so one metric may report several numbers (`bleu` -> `bleu_1` .. `bleu_4`).
Nothing here imports torch; `clipscore` imports it inside its functions.

    from peftvlm.metrics import get_metric
    get_metric("vqa_accuracy").func(["Two"], [["2"] * 10])   # {"vqa_accuracy": 1.0}

Scoring prediction/reference JSONL files is `peftvlm.metrics.files.score_files`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Literal

from peftvlm.errors import MetricsError

PredictionKind = Literal["text", "labels", "ranking", "model", "masks"]
ReferenceKind = Literal["text", "labels", "ids", "boxes", "masks"]


class MetricUnavailable(MetricsError):
    """A metric cannot run on this machine (e.g. SPICE without its Java models)."""


@dataclass(frozen=True)
class MetricInfo:
    """One registered metric.

    `prepare` (optional) turns raw (predictions, references) into the form `func` expects and
    returns a note about how it did so (or None); metrics sharing a `prepare` run it once per
    scoring call, which is how captioning metrics share one tokenisation pass.
    `extras` maps a reference-row key (e.g. "question_type") to the keyword `func` takes.
    `validity` (optional) takes (predictions, references) and returns a note when the metric's
    assumptions do not hold for these rows (VQA accuracy with fewer than 10 answers), or None.
    """

    name: str
    func: Callable[..., dict[str, float]]
    higher_is_better: bool
    summary: str
    family: str
    prediction: PredictionKind = "text"
    reference: ReferenceKind = "text"
    prepare: Callable[[list, list], tuple[list, list, str | None]] | None = None
    extras: dict[str, str] = field(default_factory=dict)
    validity: Callable[[list, list], str | None] | None = None


METRICS: dict[str, MetricInfo] = {}
_BUILTIN_MODULES = (
    "peftvlm.metrics.vqa",
    "peftvlm.metrics.captioning",
    "peftvlm.metrics.classification",
    "peftvlm.metrics.retrieval",
    "peftvlm.metrics.grounding",
    "peftvlm.metrics.detection",
    "peftvlm.metrics.clipscore",
)


def register(name: str, func: Callable[..., dict[str, float]], *, higher_is_better: bool,
             summary: str, prediction: PredictionKind = "text",
             reference: ReferenceKind = "text",
             prepare: Callable | None = None, extras: dict[str, str] | None = None,
             validity: Callable | None = None) -> None:
    """Add a metric. `prediction`/`reference` say what a file row's values must be (checked
    before scoring, so errors name the line); `family` is the registering module's name."""
    family = func.__module__.rsplit(".", 1)[-1]
    METRICS[name] = MetricInfo(name, func, higher_is_better, summary, family, prediction,
                               reference, prepare, dict(extras or {}), validity)


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def available_metrics() -> dict[str, MetricInfo]:
    """All registered metrics by name (built-ins loaded on first call)."""
    _load_builtins()
    return dict(METRICS)


def get_metric(name: str) -> MetricInfo:
    """Look up one metric; unknown names raise MetricsError listing the known ones."""
    return get_metrics([name])[0]


def get_metrics(names: list[str]) -> list[MetricInfo]:
    """Look up several metrics at once so one error names every unknown metric."""
    _load_builtins()
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise MetricsError(f"unknown metric(s): {', '.join(unknown)}",
                           hint=f"available metrics: {', '.join(sorted(METRICS))}")
    return [METRICS[n] for n in names]


def mean(values: list[float]) -> float:
    """Arithmetic mean; 0.0 for an empty list so empty groups never divide by zero."""
    return sum(values) / len(values) if values else 0.0


__all__ = ["METRICS", "MetricInfo", "MetricUnavailable", "available_metrics", "get_metric",
           "get_metrics", "mean", "register"]
