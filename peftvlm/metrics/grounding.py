"""Visual grounding: parse a box from generated text, box IoU, accuracy at IoU >= 0.5.

Predictions are parsed with the family's own box convention (`peftvlm.data.boxes`), passed per
row as `box_format` (eval does; a references file may carry a `box_format` key). Without one,
two forms are read, whichever comes first: `[x1, y1, x2, y2]` normalised to 0-1 and Qwen-VL
`(x1,y1),(x2,y2)` on a 0-1000 grid.

References are either numbers, one box `[x1, y1, x2, y2]` normalised to 0-1 or a list of
acceptable boxes, or text in the family's convention (what eval takes from the row's answer;
IoU is then computed in the convention's own grid, which needs no image size). A reference that
is not a sound box (NaN, negative, swapped corners, pixels where 0-1 is expected, text with no
box) is an error naming the row, never a silent IoU 0. A prediction with no parsable box counts
as a miss (IoU 0), and `box_parse_rate` reports how often that happened.
"""

from __future__ import annotations

import math
import re

from peftvlm.data.boxes import BoxConvention, get_convention
from peftvlm.errors import MetricsError
from peftvlm.metrics import mean, register

Box = tuple[float, float, float, float]
_NUM = r"\s*(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)\s*"
_BRACKET = re.compile(r"\[" + ",".join([_NUM] * 4) + r"\]")
_QWEN = re.compile(r"\(" + _NUM + "," + _NUM + r"\)\s*,?\s*(?:to\s*)?\(" + _NUM + "," + _NUM
                   + r"\)")
_HINT = "grounding references are [x1, y1, x2, y2] normalised to 0-1, with x1 <= x2 and y1 <= y2"


def parse_box(text: str) -> Box | None:
    """The first box in `text` as normalised (x1, y1, x2, y2), or None when there is none
    (the two generic forms; `parse_answer` reads a family's own convention)."""
    found = [*_BRACKET.finditer(text), *_QWEN.finditer(text)]
    for match in sorted(found, key=lambda m: m.start()):
        values = tuple(float(v) for v in match.groups())
        if match.re is _QWEN:
            return tuple(v / 1000.0 for v in values)  # type: ignore[return-value]
        if all(0.0 <= v <= 1.0 for v in values):
            return values  # type: ignore[return-value]
    return None


def parse_answer(text: str, convention: BoxConvention | None) -> Box | None:
    """The first box of an answer in the convention's grid (None: no box)."""
    if convention is None:
        return parse_box(text)
    found = convention.parse(text)
    return found[0][1] if found else None


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes; degenerate boxes give 0."""
    inter_w = min(a[2], b[2]) - max(a[0], b[0])
    inter_h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0.0, inter_w) * max(0.0, inter_h)
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def check_box(box, where: str, top: float | None = 1.0, what: str = "0-1") -> Box:
    """A sound reference box or a MetricsError naming `where`: four finite numbers, none
    negative, corners in order (x1 <= x2, y1 <= y2) and, with `top`, none above it."""
    if not (isinstance(box, (list, tuple)) and len(box) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):
        raise MetricsError(f"{where}: reference box {box!r} is not [x1, y1, x2, y2]", hint=_HINT)
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise MetricsError(f"{where}: reference box {list(box)} has a NaN or infinite value",
                           hint="drop or fix the row; a box needs four finite numbers")
    if min(x1, y1, x2, y2) < 0:
        raise MetricsError(f"{where}: reference box {list(box)} has a negative coordinate",
                           hint=_HINT)
    if x2 < x1 or y2 < y1:
        raise MetricsError(f"{where}: reference box {list(box)} has swapped corners "
                           f"({'x2 < x1' if x2 < x1 else 'y2 < y1'})",
                           hint="write [x1, y1, x2, y2] (top-left, bottom-right); COCO "
                                "[x, y, w, h] boxes must be converted first")
    if top is not None and max(x1, y1, x2, y2) > top:
        raise MetricsError(f"{where}: reference box {list(box)} has values above {top:g}: "
                           f"pixel coordinates where {what} relative ones are expected",
                           hint="divide x by the image width and y by its height")
    return x1, y1, x2, y2


def reference_boxes(refs: list, where: str = "reference") -> list[Box]:
    """A numeric reference is one box [x1, y1, x2, y2] or a list of acceptable boxes,
    normalised to 0-1; each is checked (`check_box`)."""
    if not isinstance(refs, (list, tuple)) or not refs:
        raise MetricsError(f"{where}: references {refs!r} are not a box or a list of boxes",
                           hint=_HINT)
    boxes = [refs] if all(isinstance(v, (int, float)) for v in refs) else refs
    return [check_box(box, where) for box in boxes]


def text_reference_boxes(refs: list[str], convention: BoxConvention | None,
                         where: str) -> list[Box]:
    """Reference answers written as text: each must hold a sound box in the convention."""
    boxes = []
    for text in refs:
        box = parse_answer(text, convention)
        if box is None:
            name = convention.name if convention else "0-1 [x1, y1, x2, y2] or (x1,y1),(x2,y2)"
            raise MetricsError(f"{where}: reference {text!r} holds no box in the {name} "
                               "box convention",
                               hint="grounding_accuracy scores answers that are boxes: with the "
                                    "grounding template, evaluate `direction: locate` rows (with "
                                    "`both` the last answer is a description); or give numeric "
                                    "references normalised to 0-1")
        top = None if convention is None or convention.grid == "resized_pixels" else (
            convention.top or convention.scale)
        boxes.append(check_box(list(box), where, top, f"0-{top:g}" if top else ""))
    return boxes


def _row_ious(text: str, refs: list, convention: BoxConvention | None,
              where: str) -> tuple[float, bool]:
    """(best IoU over the row's reference boxes, whether the prediction held a box)."""
    if refs and all(isinstance(r, str) for r in refs):
        ref_boxes = text_reference_boxes(refs, convention, where)
        box = parse_answer(text, convention)
    else:
        ref_boxes = reference_boxes(refs, where)
        box = parse_answer(text, convention)
        if box is not None and convention is not None:
            try:
                box = convention.relative(box)
            except ValueError as exc:
                raise MetricsError(f"{where}: {exc}",
                                   hint="give references as text in the same convention") \
                    from None
    if box is None:
        return 0.0, False
    return max(box_iou(box, r) for r in ref_boxes), True


def grounding_accuracy(predictions: list[str], references: list[list],
                       box_format: list[str | None] | None = None,
                       threshold: float = 0.5) -> dict[str, float]:
    """Accuracy@0.5 (best IoU over the reference boxes >= threshold), mean IoU, parse rate;
    `box_format` (one per row) names the convention answers are written in."""
    formats = box_format or [None] * len(predictions)
    ious, parsed = [], []
    for i, (text, refs, fmt) in enumerate(zip(predictions, references, formats)):
        try:
            convention = get_convention(fmt) if fmt else None
        except ValueError as exc:
            raise MetricsError(f"row {i + 1}: {exc}") from None
        iou, ok = _row_ious(text, refs, convention, f"row {i + 1}")
        ious.append(iou)
        parsed.append(float(ok))
    return {"grounding_accuracy": mean([float(i >= threshold) for i in ious]),
            "mean_iou": mean(ious), "box_parse_rate": mean(parsed)}


register("grounding_accuracy", grounding_accuracy, higher_is_better=True, reference="boxes",
         extras={"box_format": "box_format"},
         summary="box from text with IoU >= 0.5 to the reference; also mean IoU, parse rate")
