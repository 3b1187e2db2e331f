"""Run kinds: the one seam between the kind-agnostic flow (`peftvlm.api`) and the stages.

A run is one of four kinds, decided here and nowhere else (`kind_for`):

- `generative`: a generative VLM trained with TRL (`peftvlm.trainers.generative`);
- `classification`: a CLIP-family method (CoOp, VPT, CLIP-Adapter) on a dual encoder, few-shot
  classification with the shared dual-encoder loop (`peftvlm.trainers.clip`);
- `retrieval`: a peft method (lora, dora, vera) on a dual encoder, trained contrastively on
  image-caption pairs (`peftvlm.trainers.contrastive`);
- `detection`: a peft method (lora, dora, vera) on an open-vocabulary detector (Grounding
  DINO), class names as its prompt, trained with the model's own loss
  (`peftvlm.trainers.detection`).

Every stage asks the run's `Kind` object (`check`, `dry_run`, `fit`, `evaluate`,
`export_weights`, `predictor`) instead of comparing names, so adding a kind is one wiring
module (`kinds/<name>.py`, a `Kind` subclass) plus one line in `KINDS`; the kinds trained in
the shared dual-encoder loop subclass `kinds.loop.LoopKind` and name only their stages' functions. The wiring modules are
named by import path, as `registry.METHODS` names apply functions: they import the trainers,
exporters and predictors of their kind, and those lower stages may ask `kind_for` in turn
without an import cycle. The model's family comes from its config (no weights are loaded).
"""

from __future__ import annotations

import functools
import importlib
from pathlib import Path

from peftvlm.errors import RecipeError
from peftvlm.models import detect_family, resolve_model_path
from peftvlm.registry import get_method

# name -> "module:class" of its wiring, imported the first time a run of that kind is met
KINDS: dict[str, str] = {
    "generative": "peftvlm.kinds.generative:GenerativeKind",
    "classification": "peftvlm.kinds.classification:ClassificationKind",
    "retrieval": "peftvlm.kinds.retrieval:RetrievalKind",
    "detection": "peftvlm.kinds.detection:DetectionKind",
}

VERBS = ("check", "dry_run", "fit", "evaluate", "export_weights", "predictor")


class Kind:
    """What one kind of run does at each stage. Subclasses implement every verb in `VERBS`.

    `generates`: the trained model answers in text (chat completions, generated answers).
    """

    name: str = ""
    generates: bool = False

    def check(self, recipe) -> None:
        """Refuse what this kind cannot train, once the model's family is known (no weights)."""

    def dry_run(self, recipe, log=print) -> dict:
        """Load the model, apply the method, read the data and report; write nothing."""
        raise NotImplementedError

    def fit(self, recipe, run_dir: Path, *, resume: bool, overwrite: bool, log=print,
            callbacks=()) -> dict:
        """Train into `run_dir` (claimed by the caller); return the summary (summary.json)."""
        raise NotImplementedError

    def evaluate(self, recipe, run_dir: Path, split: str, max_samples: int | None,
                 with_base: bool, log=print) -> dict:
        """`peftvlm eval`: score base and fine-tuned model of a finished run; write RUN/eval/."""
        raise NotImplementedError

    def export_weights(self, run, opts, log=print) -> dict:
        """Write the exported weights into `opts.out` (a fresh folder); return the report that
        `export.finish_export` completes (card, checks, Hub)."""
        raise NotImplementedError

    def predictor(self, files, log=print):
        """The loaded predictor of a run folder or merged export (`serving.predictor.locate`)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<kind {self.name}>"


@functools.cache
def get_kind(name: str) -> Kind:
    """The `Kind` object registered under `name`."""
    if name not in KINDS:
        raise RecipeError(f"unknown run kind {name!r}; known: {', '.join(KINDS)}")
    module, _, cls = KINDS[name].partition(":")
    return getattr(importlib.import_module(module), cls)()


def model_family(model_cfg):
    """The family of a recipe's model, from `model.family` or its config's model_type."""
    return detect_family(resolve_model_path(model_cfg.id), model_cfg)


def kind_name(recipe, family=None) -> str:
    """The name of the kind `recipe` asks for, or a RecipeError when method and model clash
    (`family`: the model's, when the caller has it loaded already)."""
    method = get_method(recipe.method.name)
    if not method.trains_generative:
        return "classification"
    family = family or model_family(recipe.model)
    if family.is_generative:
        return "generative"
    if family.is_detector and method.trains_dual_encoders:
        return "detection"
    if not method.trains_dual_encoders:
        raise RecipeError(f"method.name: {method.name!r} does not train dual encoders such as "
                          f"{family.name} ({recipe.model.id!r})",
                          hint="use lora, dora or vera (contrastive retrieval), or coop, vpt "
                               "or clip_adapter (few-shot classification)")
    return "retrieval"


def kind_for(recipe) -> Kind:
    """THE place that decides a run's kind: from its method and its model's family."""
    return get_kind(kind_name(recipe))


def kind_for_export(family) -> Kind:
    """The kind of a merged export found without its run's recipe, from its model family: a
    dual encoder there is a retrieval export (the classification methods have no merged form
    that loads on its own)."""
    if family.is_detector:
        return get_kind("detection")
    return get_kind("generative" if family.is_generative else "retrieval")
