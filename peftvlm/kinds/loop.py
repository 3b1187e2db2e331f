"""The wiring every kind trained in the shared dual-encoder loop (`trainers.loop`) has in
common: classification, retrieval and detection differ only in which functions do each stage,
which `LoopStages` names, and in what they say when asked to stream."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from peftvlm.export import export_after_training
from peftvlm.kinds import Kind
from peftvlm.recipe import refuse_dual_encoder_stream
from peftvlm.runs import prepare_run_dir


@dataclass(frozen=True)
class LoopStages:
    """The functions of one loop-trained kind, stage by stage."""

    dry_run: Callable  # (recipe, log) -> report
    train: Callable  # (recipe, run_dir, resume, log) -> summary
    evaluate: Callable  # (recipe, run_dir, split, max_samples, with_base, log) -> report
    predictor: type  # has .load(files, log)
    export_adapter: Callable | None = None  # (run, opts, log) -> report; None: override
    export_merged: Callable | None = None  # `export_weights`


class LoopKind(Kind):
    """A kind trained in the dual-encoder loop: a subclass sets `name` and `stages`."""

    stages: LoopStages

    def check(self, recipe) -> None:
        if recipe.data.streams():
            self.refuse_stream(recipe)

    def refuse_stream(self, recipe) -> None:
        """Loop-trained kinds read their table whole: a Hub id's family is known only now."""
        refuse_dual_encoder_stream(recipe.source_path or "recipe", recipe.model.id)

    def dry_run(self, recipe, log=print) -> dict:
        return self.stages.dry_run(recipe, log)

    def fit(self, recipe, run_dir: Path, *, resume: bool, overwrite: bool, log=print,
            callbacks=()) -> dict:
        summary = self.stages.train(recipe, prepare_run_dir(run_dir, resume, overwrite), resume,
                                    log)
        export_after_training(recipe, run_dir, summary, log)
        return summary

    def evaluate(self, recipe, run_dir: Path, split: str, max_samples: int | None,
                 with_base: bool, log=print) -> dict:
        return self.stages.evaluate(recipe, run_dir, split, max_samples, with_base, log)

    def export_weights(self, run, opts, log=print) -> dict:
        exporter = self.stages.export_merged if opts.merge else self.stages.export_adapter
        return exporter(run, opts, log)

    def predictor(self, files, log=print):
        return self.stages.predictor.load(files, log)
