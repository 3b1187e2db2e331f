"""Object detection data: THE reader of COCO instances JSON and YOLO label folders (one record
per image), and THE check of an image's objects. Both detection run kinds use them: the
generative `detection` data template renders the records into answers, and the detector kind
(Grounding DINO, `data/prepare/detection.py`) trains on them.

A record, whatever the layout it came from (JSONL rows give the same columns themselves):

    {"image": "img/1.jpg", "boxes": [[x1, y1, x2, y2], ...], "labels": ["cat", ...],
     "crowd": [0, ...], "width": 640, "height": 480, "categories": ["cat", "dog", ...]}

Boxes are pixels, `xyxy` (COCO's `xywh` and YOLO's normalised `cx cy w h` are converted when
read). `crowd` marks COCO `iscrowd=1` regions: left out of training answers, kept as crowd
(ignored, never a false positive) in evaluation references. `categories` are every class of the
dataset, in id order (per-category questions and PaliGemma's `detect a ; b` prompt use them).

    peftvlm data preview recipes/detection-tiny.yaml      # COCO/YOLO/JSONL -> answers + PNG

Formats: `format: coco_instances` (auto-detected: a JSON with `images`, `annotations` holding
`bbox` and `categories`) and `format: yolo` (auto-detected: a folder with `images/` and
`labels/`; class names from `data.yaml`'s `names` or `classes.txt`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from peftvlm.data.boxes import Box, clip_box, read_box
from peftvlm.data.read.images import image_size
from peftvlm.data.read.json_list import load_json
from peftvlm.data.rows import BadRow
from peftvlm.errors import DataError
from peftvlm.safe_yaml import load_yaml

# The answer for an image with no object (of the asked category): every family writes it the
# same, parsers find no box in it, and detection_map reads it as "no ground truth here".
NO_OBJECTS = "There are none."
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def is_no_objects(text: str) -> bool:
    """Whether an answer is the documented empty answer (case and surrounding space ignored)."""
    return text.strip().lower() == NO_OBJECTS.lower()


# --- checking one image's objects ------------------------------------------------------------

def image_objects(boxes, labels, crowd, width: float, height: float,
                  box_input: str = "xyxy") -> list[tuple[str, Box, bool]]:
    """(label, clipped pixel box, is crowd) per object; a box partly outside the image is
    clipped, one wholly outside or with no area is a bad row naming its index."""
    if not isinstance(boxes, (list, tuple)):
        raise BadRow("bad_column_type", "column `boxes` should be a list of boxes")
    if not isinstance(labels, (list, tuple)) or len(labels) != len(boxes):
        raise BadRow("bad_column_type", f"column `labels` should be a list of {len(boxes)} "
                                        "names, one per box")
    crowd = list(crowd) if isinstance(crowd, (list, tuple)) else [0] * len(boxes)
    if len(crowd) != len(boxes):
        raise BadRow("bad_column_type", f"column `crowd` should hold {len(boxes)} flags")
    out = []
    for i, (box, label, is_crowd) in enumerate(zip(boxes, labels, crowd)):
        if isinstance(label, bool) or not isinstance(label, (str, int)) or not str(label).strip():
            raise BadRow("bad_label", f"object {i}: label {label!r} is not a name")
        try:
            pixels = clip_box(read_box(box, box_input), width, height)
        except BadRow as bad:
            raise BadRow(bad.reason, f"object {i} ({label}): {bad.detail}") from None
        out.append((str(label).strip(), pixels, bool(is_crowd)))
    return out


# --- COCO instances JSON ---------------------------------------------------------------------

def looks_like_coco_instances(head: str) -> bool:
    """A COCO JSON whose annotations carry boxes (captions files carry `caption` instead)."""
    return '"categories"' in head and '"bbox"' in head


def read_coco_instances(path: Path) -> list[tuple[str, Any]]:
    """One record per image of a COCO instances file (`images`, `annotations`, `categories`);
    an annotation whose box is not 4 numbers is a bad row of its image."""
    data = load_json(path)
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list)
                                             for k in ("images", "annotations", "categories")):
        raise DataError(f"{path}: a COCO instances file needs `images`, `annotations` and "
                        "`categories` lists", hint="see docs/data_formats.md (detection)")
    names = {c.get("id"): str(c.get("name")) for c in data["categories"] if isinstance(c, dict)}
    per_image: dict[Any, list] = {}
    for ann in data["annotations"]:
        if isinstance(ann, dict):
            per_image.setdefault(ann.get("image_id"), []).append(ann)
    categories = [names[k] for k in sorted(names, key=lambda k: (str(type(k)), k))]
    return [coco_record(path, i, img, per_image, names, categories)
            for i, img in enumerate(data["images"])]


def coco_record(path: Path, index: int, img, per_image: dict, names: dict,
                categories: list[str]):
    if not isinstance(img, dict):
        return f"{path.name}:images[{index}]", BadRow("bad_row", "not an object")
    row_id = f"{path.name}:image_id={img.get('id')}"
    boxes, labels, crowd = [], [], []
    for ann in per_image.get(img.get("id"), []):
        if ann.get("category_id") not in names:
            return row_id, BadRow("bad_label", f"annotation {ann.get('id')}: category_id "
                                               f"{ann.get('category_id')!r} is not in `categories`")
        bbox = ann.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4:
            return row_id, BadRow("bad_box", f"annotation {ann.get('id')}: bbox {bbox!r} is not "
                                             "[x, y, w, h]")
        try:
            x, y, w, h = (float(v) for v in bbox)
        except (TypeError, ValueError):
            return row_id, BadRow("bad_box", f"annotation {ann.get('id')}: bbox {bbox!r} is not "
                                             "4 numbers")
        boxes.append([x, y, x + w, y + h])
        labels.append(names[ann["category_id"]])
        crowd.append(int(bool(ann.get("iscrowd", 0))))
    return row_id, {"image": img.get("file_name"), "boxes": boxes, "labels": labels,
                    "crowd": crowd, "width": img.get("width"), "height": img.get("height"),
                    "categories": categories, "image_id": img.get("id")}


# --- YOLO label folders ----------------------------------------------------------------------

def looks_like_yolo(path: Path) -> bool:
    return (path / "images").is_dir() and (path / "labels").is_dir()


def yolo_class_names(folder: Path) -> list[str]:
    """Class names from `data.yaml` (`names:` list or {id: name}) or `classes.txt`."""
    for name in ("data.yaml", "dataset.yaml"):
        if (folder / name).is_file():
            names = (load_yaml((folder / name).read_text()) or {}).get("names")
            if isinstance(names, dict):
                return [str(names[k]) for k in sorted(names)]
            if isinstance(names, list):
                return [str(n) for n in names]
            raise DataError(f"{folder / name}: `names` should list the class names",
                            hint="names: [cat, dog] or names: {0: cat, 1: dog}")
    if (folder / "classes.txt").is_file():
        return [n.strip() for n in (folder / "classes.txt").read_text().splitlines() if n.strip()]
    raise DataError(f"YOLO folder {folder} has no class names",
                    hint="add data.yaml with `names: [...]` or classes.txt (one name a line)")


def read_yolo(folder: Path) -> list[tuple[str, Any]]:
    """One record per image of `images/`; its `labels/<stem>.txt` lines are `class cx cy w h`
    normalised to 0-1 (a missing label file is an image with no object, as YOLO reads it)."""
    names = yolo_class_names(folder)
    records = []
    for image in sorted(p for p in (folder / "images").rglob("*")
                        if p.suffix.lower() in IMAGE_SUFFIXES):
        rel = image.relative_to(folder / "images")
        row_id = f"{folder.name}/images/{rel}"
        label_file = (folder / "labels" / rel).with_suffix(".txt")
        try:
            width, height = image_size(str(image))
            lines = label_file.read_text().splitlines() if label_file.is_file() else []
            boxes, labels = yolo_objects(lines, names, width, height, label_file.name)
        except BadRow as bad:
            records.append((row_id, bad))
            continue
        records.append((row_id, {"image": str(Path("images") / rel), "boxes": boxes,
                                 "labels": labels, "width": width, "height": height,
                                 "categories": names}))
    return records


def yolo_objects(lines: list[str], names: list[str], width: float, height: float,
                 where: str) -> tuple[list, list]:
    boxes, labels = [], []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            cls, cx, cy, w, h = int(parts[0]), *(float(v) for v in parts[1:5])
        except (ValueError, IndexError):
            raise BadRow("bad_box", f"{where}:{n}: {line.strip()!r} is not `class cx cy w h`") \
                from None
        if not 0 <= cls < len(names):
            raise BadRow("bad_label", f"{where}:{n}: class {cls} is not in the {len(names)} "
                                      "class names")
        if not all(math.isfinite(v) for v in (cx, cy, w, h)):
            raise BadRow("bad_box", f"{where}:{n}: non-finite box")
        boxes.append([(cx - w / 2) * width, (cy - h / 2) * height,
                      (cx + w / 2) * width, (cy + h / 2) * height])
        labels.append(names[cls])
    return boxes, labels
