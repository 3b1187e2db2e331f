"""The classification kind: a CLIP-family method (CoOp, VPT, CLIP-Adapter) on a frozen dual
encoder, few-shot image classification in the shared dual-encoder loop (`trainers.clip`),
scored as zero-shot vs trained accuracy (`trainers.clip_eval`), exported as the method's files
or a merged class head (`export.classification`), predicted as top-k classes
(`serving.predictor.DualEncoderPredictor`)."""

from __future__ import annotations

from peftvlm.export.classification import export_dual_encoder
from peftvlm.kinds.loop import LoopKind, LoopStages
from peftvlm.serving.predictor import DualEncoderPredictor
from peftvlm.trainers import clip
from peftvlm.trainers.clip_eval import evaluate_dual_encoder


class ClassificationKind(LoopKind):
    name = "classification"
    stages = LoopStages(dry_run=clip.dry_run_dual_encoder, train=clip.train_dual_encoder,
                        evaluate=evaluate_dual_encoder, predictor=DualEncoderPredictor)

    def export_weights(self, run, opts, log=print) -> dict:
        # one exporter for both forms: the method's own files, or a merged class head
        report = export_dual_encoder(run.dir, run.adapter_dir, opts.out, opts.merge)
        report.setdefault("kind", "merged" if opts.merge else "adapter")
        return report
