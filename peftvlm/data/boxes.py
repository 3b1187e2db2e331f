"""Bounding boxes for grounding data: read pixel boxes, clip them to the image, and write them in
a model family's convention (`FamilySpec.box_format`).

- `norm1`: `[x1, y1, x2, y2]` normalised to 0-1 with fixed decimals (LLaVA-1.5, Shikra).
- `abs1000`: `(x1,y1),(x2,y2)` as integers in 0-1000 relative to the image (Qwen2-VL).
"""

from __future__ import annotations

import math

from peftvlm.data.rows import BadRow

BOX_FORMATS = ("norm1", "abs1000")
BOX_INPUTS = ("xyxy", "xywh")


def read_box(value, box_input: str = "xyxy") -> tuple[float, float, float, float]:
    """Four finite pixel numbers -> `(x1, y1, x2, y2)`; COCO `xywh` is converted."""
    if isinstance(value, dict):  # {"x", "y", "w", "h"} or {"x1", "y1", "x2", "y2"}
        keys = ("x", "y", "w", "h") if "w" in value else ("x1", "y1", "x2", "y2")
        value = [value.get(k) for k in keys]
    try:
        nums = [float(v) for v in value]
    except (TypeError, ValueError):
        raise BadRow("bad_box", f"box {value!r} is not 4 numbers") from None
    if len(nums) != 4 or not all(math.isfinite(v) for v in nums):
        raise BadRow("bad_box", f"box {value!r} is not 4 finite numbers")
    x1, y1, a, b = nums
    x2, y2 = (x1 + a, y1 + b) if box_input == "xywh" else (a, b)
    if x2 <= x1 or y2 <= y1:
        raise BadRow("bad_box", f"box {value!r} has no area ({box_input})")
    return x1, y1, x2, y2


def clip_box(box, width: float, height: float) -> tuple[float, float, float, float]:
    """Clip to the image; a box with no area left inside the image is a bad row."""
    x1, y1, x2, y2 = box
    clipped = (min(max(x1, 0.0), width), min(max(y1, 0.0), height),
               min(max(x2, 0.0), width), min(max(y2, 0.0), height))
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        raise BadRow("box_outside_image", f"box {list(box)} lies outside the {width:g}x{height:g} "
                                          "image")
    return clipped


def format_box(box, width: float, height: float, box_format: str = "norm1",
               precision: int = 2) -> str:
    """A clipped pixel box as the text a family's model reads and writes."""
    x1, y1, x2, y2 = box
    rel = (x1 / width, y1 / height, x2 / width, y2 / height)
    if box_format == "abs1000":
        a, b, c, d = (round(v * 1000) for v in rel)
        return f"({a},{b}),({c},{d})"
    if box_format == "norm1":
        return "[" + ", ".join(f"{v:.{precision}f}" for v in rel) + "]"
    raise ValueError(f"unknown box format {box_format!r}; known: {', '.join(BOX_FORMATS)}")


def box_text(value, width: float, height: float, box_input: str = "xyxy",
             box_format: str = "norm1", precision: int = 2) -> str:
    """Read, clip and format one box (the whole path a grounding row takes)."""
    return format_box(clip_box(read_box(value, box_input), width, height), width, height,
                      box_format, precision)
