"""The generative kind: a VLM (image + text in, text out) adapted by a peft method, trained with
TRL (`trainers.generative`), scored by generating answers (`eval.run.evaluate_generative`),
exported as a peft adapter or merged weights (`export`), served as chat completions
(`serving.predictor.GenerativePredictor`)."""

from __future__ import annotations

from pathlib import Path

from peftvlm import export
from peftvlm.eval.run import evaluate_generative
from peftvlm.kinds import Kind
from peftvlm.serving.predictor import GenerativePredictor
from peftvlm.trainers import generative


class GenerativeKind(Kind):
    name = "generative"
    generates = True  # training objectives (SFT now; DPO, GRPO next): trainers.generative

    def dry_run(self, recipe, log=print) -> dict:
        return generative.dry_run(recipe, log)

    def fit(self, recipe, run_dir: Path, *, resume: bool, overwrite: bool, log=print,
            callbacks=()) -> dict:
        return generative.train(
            recipe, run_dir, resume, overwrite, log, callbacks,
            on_saved=lambda summary: export.export_after_training(recipe, run_dir, summary, log))

    def evaluate(self, recipe, run_dir: Path, split: str, max_samples: int | None,
                 with_base: bool, log=print) -> dict:
        return evaluate_generative(recipe, run_dir, split, max_samples, with_base, log)

    def export_weights(self, run, opts, log=print) -> dict:
        return export.export_peft_weights(run, opts, log)

    def predictor(self, files, log=print):
        return GenerativePredictor.load(files, log)
