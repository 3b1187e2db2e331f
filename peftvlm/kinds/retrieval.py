"""The retrieval kind: a peft method (lora, dora, vera) on a dual encoder, trained
contrastively on image-caption pairs in the shared dual-encoder loop (`trainers.contrastive`),
scored by recall@k both ways (`trainers.contrastive.evaluate_retrieval`), exported as a peft
adapter or merged weights (`export.retrieval`), served as a ranker and embedder
(`serving.retrieval.RetrievalPredictor`)."""

from __future__ import annotations

from peftvlm.export.retrieval import export_retrieval_adapter, export_retrieval_merged
from peftvlm.kinds.loop import LoopKind, LoopStages
from peftvlm.serving.retrieval import RetrievalPredictor
from peftvlm.trainers import contrastive


class RetrievalKind(LoopKind):
    name = "retrieval"
    stages = LoopStages(dry_run=contrastive.dry_run_contrastive,
                        train=contrastive.train_contrastive,
                        evaluate=contrastive.evaluate_retrieval, predictor=RetrievalPredictor,
                        export_adapter=export_retrieval_adapter,
                        export_merged=export_retrieval_merged)
