"""The detection kind: a peft method (lora, dora, vera) on an open-vocabulary detector
(Grounding DINO), class names as its text prompt, trained with the model's own loss in the
shared dual-encoder loop (`trainers.detection`), scored by COCO mAP
(`trainers.detection.evaluate_detection`), exported as a peft adapter or merged weights
(`export.detection`), served as boxes with labels and scores
(`serving.detection.DetectionPredictor`)."""

from __future__ import annotations

from peftvlm.errors import RecipeError
from peftvlm.export.detection import export_detection_adapter, export_detection_merged
from peftvlm.kinds.loop import LoopKind, LoopStages
from peftvlm.serving.detection import DetectionPredictor
from peftvlm.trainers import detection


class DetectionKind(LoopKind):
    name = "detection"
    stages = LoopStages(dry_run=detection.dry_run_detection, train=detection.train_detection,
                        evaluate=detection.evaluate_detection, predictor=DetectionPredictor,
                        export_adapter=export_detection_adapter,
                        export_merged=export_detection_merged)

    def refuse_stream(self, recipe) -> None:
        raise RecipeError(f"{recipe.source_path or 'recipe'}: streaming: detection runs "
                          "read their images and boxes whole",
                          hint="read the data whole (streaming: false)")
