"""The detection kind: a peft method (lora, dora, vera) on an open-vocabulary detector
(Grounding DINO), class names as its text prompt, trained with the model's own loss in the
shared dual-encoder loop (`trainers.detection`), scored by COCO mAP
(`trainers.detection.evaluate_detection`), exported as a peft adapter or merged weights
(`export.detection`), served as boxes with labels and scores
(`serving.detection.DetectionPredictor`)."""

from __future__ import annotations

from pathlib import Path

from peftvlm.errors import RecipeError
from peftvlm.export import export_after_training
from peftvlm.export.detection import export_detection_adapter, export_detection_merged
from peftvlm.kinds import Kind
from peftvlm.runs import prepare_run_dir
from peftvlm.serving.detection import DetectionPredictor
from peftvlm.trainers import detection


class DetectionKind(Kind):
    name = "detection"

    def check(self, recipe) -> None:
        if recipe.data.streams():
            raise RecipeError(f"{recipe.source_path or 'recipe'}: streaming: detection runs "
                              "read their images and boxes whole",
                              hint="read the data whole (streaming: false)")

    def dry_run(self, recipe, log=print) -> dict:
        return detection.dry_run_detection(recipe, log)

    def fit(self, recipe, run_dir: Path, *, resume: bool, overwrite: bool, log=print,
            callbacks=()) -> dict:
        summary = detection.train_detection(recipe, prepare_run_dir(run_dir, resume, overwrite),
                                            resume, log)
        export_after_training(recipe, run_dir, summary, log)
        return summary

    def evaluate(self, recipe, run_dir: Path, split: str, max_samples: int | None,
                 with_base: bool, log=print) -> dict:
        return detection.evaluate_detection(recipe, run_dir, split, max_samples, with_base, log)

    def export_weights(self, run, opts, log=print) -> dict:
        exporter = export_detection_merged if opts.merge else export_detection_adapter
        return exporter(run, opts, log)

    def predictor(self, files, log=print):
        return DetectionPredictor.load(files, log)
