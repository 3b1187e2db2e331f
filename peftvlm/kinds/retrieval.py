"""The retrieval kind: a peft method (lora, dora, vera) on a dual encoder, trained
contrastively on image-caption pairs in the shared dual-encoder loop (`trainers.contrastive`),
scored by recall@k both ways (`trainers.contrastive.evaluate_retrieval`), exported as a peft
adapter or merged weights (`export.retrieval`), served as a ranker and embedder
(`serving.retrieval.RetrievalPredictor`)."""

from __future__ import annotations

from pathlib import Path

from peftvlm.export import export_after_training
from peftvlm.export.retrieval import export_retrieval_adapter, export_retrieval_merged
from peftvlm.kinds import Kind
from peftvlm.kinds.classification import refuse_streams
from peftvlm.runs import prepare_run_dir
from peftvlm.serving.retrieval import RetrievalPredictor
from peftvlm.trainers import contrastive


class RetrievalKind(Kind):
    name = "retrieval"

    def check(self, recipe) -> None:
        refuse_streams(recipe)

    def dry_run(self, recipe, log=print) -> dict:
        return contrastive.dry_run_contrastive(recipe, log)

    def fit(self, recipe, run_dir: Path, *, resume: bool, overwrite: bool, log=print,
            callbacks=()) -> dict:
        summary = contrastive.train_contrastive(recipe, prepare_run_dir(run_dir, resume,
                                                                        overwrite), resume, log)
        export_after_training(recipe, run_dir, summary, log)
        return summary

    def evaluate(self, recipe, run_dir: Path, split: str, max_samples: int | None,
                 with_base: bool, log=print) -> dict:
        return contrastive.evaluate_retrieval(recipe, run_dir, split, max_samples, with_base,
                                              log)

    def export_weights(self, run, opts, log=print) -> dict:
        exporter = export_retrieval_merged if opts.merge else export_retrieval_adapter
        return exporter(run, opts, log)

    def predictor(self, files, log=print):
        return RetrievalPredictor.load(files, log)
