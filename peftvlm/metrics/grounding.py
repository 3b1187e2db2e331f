"""Visual grounding: parse a box from generated text, box IoU, accuracy at IoU >= 0.5.

Two box formats are read from text, whichever comes first:
  `[x1, y1, x2, y2]` with coordinates normalised to 0-1 (values outside 0-1: not a box), and
  Qwen-VL style `(x1,y1),(x2,y2)` on a 0-1000 grid (optionally inside <|box_start|>..).
Reference boxes are `[x1, y1, x2, y2]` normalised to 0-1. A prediction with no parsable box
counts as a miss (IoU 0), and `box_parse_rate` reports how often that happened.
"""

from __future__ import annotations

import re

from peftvlm.errors import MetricsError
from peftvlm.metrics import mean, register

Box = tuple[float, float, float, float]
_NUM = r"\s*(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)\s*"
_BRACKET = re.compile(r"\[" + ",".join([_NUM] * 4) + r"\]")
_QWEN = re.compile(r"\(" + _NUM + "," + _NUM + r"\)\s*,?\s*(?:to\s*)?\(" + _NUM + "," + _NUM
                   + r"\)")


def parse_box(text: str) -> Box | None:
    """The first box in `text` as normalised (x1, y1, x2, y2), or None when there is none."""
    found = [*_BRACKET.finditer(text), *_QWEN.finditer(text)]
    for match in sorted(found, key=lambda m: m.start()):
        values = tuple(float(v) for v in match.groups())
        if match.re is _QWEN:
            return tuple(v / 1000.0 for v in values)  # type: ignore[return-value]
        if all(0.0 <= v <= 1.0 for v in values):
            return values  # type: ignore[return-value]
    return None


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes; degenerate boxes give 0."""
    inter_w = min(a[2], b[2]) - max(a[0], b[0])
    inter_h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0.0, inter_w) * max(0.0, inter_h)
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def reference_boxes(refs: list) -> list[Box]:
    """A reference is one box [x1, y1, x2, y2] or a list of acceptable boxes."""
    boxes = [refs] if refs and all(isinstance(v, (int, float)) for v in refs) else refs
    for box in boxes:
        if not (isinstance(box, (list, tuple)) and len(box) == 4
                and all(isinstance(v, (int, float)) for v in box)):
            raise MetricsError(f"reference box {box!r} is not [x1, y1, x2, y2]",
                               hint="grounding references are boxes normalised to 0-1")
    return [tuple(float(v) for v in box) for box in boxes]  # type: ignore[misc]


def grounding_accuracy(predictions: list[str], references: list[list],
                       threshold: float = 0.5) -> dict[str, float]:
    """Accuracy@0.5 (best IoU over the reference boxes >= threshold), mean IoU, parse rate."""
    ious, parsed = [], []
    for text, refs in zip(predictions, references):
        box = parse_box(text)
        parsed.append(float(box is not None))
        ious.append(max(box_iou(box, r) for r in reference_boxes(refs)) if box else 0.0)
    return {"grounding_accuracy": mean([float(i >= threshold) for i in ious]),
            "mean_iou": mean(ious), "box_parse_rate": mean(parsed)}


register("grounding_accuracy", grounding_accuracy, higher_is_better=True, reference="boxes",
         summary="box from text with IoU >= 0.5 to the reference; also mean IoU, parse rate")
