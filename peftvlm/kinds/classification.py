"""The classification kind: a CLIP-family method (CoOp, VPT, CLIP-Adapter) on a frozen dual
encoder, few-shot image classification in the shared dual-encoder loop (`trainers.clip`),
scored as zero-shot vs trained accuracy (`trainers.clip_eval`), exported as the method's files
or a merged class head (`export.classification`), predicted as top-k classes
(`serving.predictor.DualEncoderPredictor`)."""

from __future__ import annotations

from pathlib import Path

from peftvlm.export import export_after_training
from peftvlm.export.classification import export_dual_encoder
from peftvlm.kinds import Kind
from peftvlm.recipe.checks import refuse_dual_encoder_stream
from peftvlm.runs import prepare_run_dir
from peftvlm.serving.predictor import DualEncoderPredictor
from peftvlm.trainers import clip
from peftvlm.trainers.clip_eval import evaluate_dual_encoder


def refuse_streams(recipe) -> None:
    """Dual encoders train on a table read whole: a Hub id's family is known only now."""
    if recipe.data.streams():
        refuse_dual_encoder_stream(recipe.source_path or "recipe", recipe.model.id)


class ClassificationKind(Kind):
    name = "classification"

    def check(self, recipe) -> None:
        refuse_streams(recipe)

    def dry_run(self, recipe, log=print) -> dict:
        return clip.dry_run_dual_encoder(recipe, log)

    def fit(self, recipe, run_dir: Path, *, resume: bool, overwrite: bool, log=print,
            callbacks=()) -> dict:
        summary = clip.train_dual_encoder(recipe, prepare_run_dir(run_dir, resume, overwrite),
                                          resume, log)
        export_after_training(recipe, run_dir, summary, log)
        return summary

    def evaluate(self, recipe, run_dir: Path, split: str, max_samples: int | None,
                 with_base: bool, log=print) -> dict:
        return evaluate_dual_encoder(recipe, run_dir, split=split, max_samples=max_samples,
                                     with_base=with_base, log=log)

    def export_weights(self, run, opts, log=print) -> dict:
        report = export_dual_encoder(run.dir, run.adapter_dir, opts.out, opts.merge)
        report.setdefault("kind", "merged" if opts.merge else "adapter")
        return report

    def predictor(self, files, log=print):
        return DualEncoderPredictor.load(files, log)
