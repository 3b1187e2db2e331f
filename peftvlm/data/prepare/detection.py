"""The detection run kind's data (Grounding DINO): a recipe section's sources as checked
records, one per image, and the dataset's class names in prompt order.

    {"image": <absolute path>, "boxes": [[x1, y1, x2, y2], ...], "labels": ["cat", ...],
     "crowd": [0, ...], "width": 640.0, "height": 480.0}

Files are read by the readers generative detection data uses (`peftvlm.data.read`), so the two
kinds of detection runs read the same files the same way:
- a COCO instances JSON or a YOLO folder (`read/detection.py`, the one reader of both): the
  dataset's categories, in id order, are the classes; `iscrowd=1` regions are kept as crowd
  (not trained on; ignored by the COCO evaluation, never a false positive);
- rows (JSONL, a JSON list, CSV, Parquet) `{"image", "boxes", "labels"}` (+ optional `crowd`,
  `width`, `height`); boxes in pixels, `xyxy`, or COCO `xywh` with `template_options:
  {box_input: xywh}`; a source's `columns` maps these names to the file's own;
- a `datasets` source (`dataset:` Hub id or saved folder, `split:`) in the layout of the Hub's
  detection sets (CPPE-5, the transformers object-detection guide): an `image` column and an
  `objects` column with COCO `bbox` [x, y, w, h] and a ClassLabel `category` (its names are
  the classes; `columns` maps `image` / `objects`).

Each image's objects are checked by `read.detection.image_objects`, the check of the generative
`detection` template: a box partly outside its image is clipped; a box wholly outside, with no
area, not 4 numbers, or an unnamed label makes its image a bad row (`data.on_bad_row`: skip
and count, or stop), and so does a label holding '.' or '?' (they split Grounding DINO's prompt
into classes). An image without objects is kept: it teaches the detector to find nothing there.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

from peftvlm.data.read.detection import image_objects
from peftvlm.data.read.images import image_size
from peftvlm.data.read.readers import load_saved_split, open_source
from peftvlm.data.read.sources import resolve_image
from peftvlm.data.rows import BadRow, BadRowReport, enforce_policy
from peftvlm.errors import DataError

SEPARATORS = (".", "?")  # Grounding DINO splits its prompt into classes at these tokens
RECORD_KEYS = ("image", "boxes", "labels", "crowd", "width", "height")
ANNOTATION_LAYOUTS = ("coco_instances", "yolo")  # records in pixel xyxy, with `categories`


@dataclass
class DetectionData:
    """Images with their objects, and the dataset's class names (prompt order)."""

    records: list[dict]
    classes: list[str]
    bad_rows: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.records)


def checked_record(raw: dict, root: Path, box_input: str) -> dict:
    """A raw record with its image resolved and its objects read, clipped and checked."""
    if raw.get("image") is None:
        raise BadRow("missing_image", "no `image`")
    image = resolve_image(raw["image"], root)
    width, height = raw.get("width"), raw.get("height")
    if not width or not height:
        width, height = image_size(image)
    objects = image_objects(raw.get("boxes") or [], raw.get("labels") or [], raw.get("crowd"),
                            float(width), float(height), box_input)
    for i, (label, _, _) in enumerate(objects):
        if any(s in label for s in SEPARATORS):
            raise BadRow("bad_label", f"object {i}: label {label!r} holds '.' or '?', which "
                                      "split Grounding DINO's prompt into classes")
    return {"image": image, "boxes": [list(box) for _, box, _ in objects],
            "labels": [label for label, _, _ in objects],
            "crowd": [int(crowd) for _, _, crowd in objects], "width": float(width),
            "height": float(height)}


def dataset_rows(src, base_dir: Path) -> tuple[list[tuple[str, dict]], list[str]]:
    """(row id, raw record) per row of a `datasets` split with `image` + `objects` columns, and
    the ClassLabel names of `objects.category`."""
    folder = base_dir / src.dataset
    if folder.is_dir():
        data = load_saved_split(folder, src.split)[0]
    else:
        from datasets import load_dataset

        data = load_dataset(src.dataset, split=src.split)
    image_col, objects_col = src.columns.get("image", "image"), src.columns.get("objects",
                                                                                 "objects")
    if objects_col not in data.column_names:
        raise DataError(f"dataset {src.dataset}: no `{objects_col}` column (has "
                        f"{', '.join(data.column_names)})",
                        hint="detection sets need `objects` {bbox, category}; map it with "
                             "columns: {objects: <name>}")
    feature = data.features[objects_col]
    category = getattr(feature, "feature", feature)["category"]
    category = getattr(category, "feature", category)
    names = list(getattr(category, "names", None) or [])
    rows = []
    for n, row in enumerate(data):
        objects = row[objects_col] or {}
        labels = [names[c] if names and isinstance(c, int) else c
                  for c in objects.get("category", [])]
        rows.append((f"{src.dataset}[{n}]", {"image": row[image_col], "boxes": objects.get(
            "bbox", []), "labels": labels, "crowd": objects.get("iscrowd"),
            "width": row.get("width"), "height": row.get("height")}))
    return rows, names


def file_rows(src, base_dir: Path):
    """(row id, raw record or BadRow) per record of a file or folder source, the folder its
    images are relative to, and whether its boxes are already pixel xyxy (COCO, YOLO)."""
    opened = open_source(src, base_dir)
    if opened.layout in ANNOTATION_LAYOUTS:
        return opened.records, opened.root, True
    if opened.layout is not None:
        raise DataError(f"detection data: {src.path} is read as {opened.layout}, which has no "
                        "boxes", hint="give a COCO instances JSON, a YOLO folder (images/ + "
                                      "labels/) or rows with image/boxes/labels")

    def renamed(records):
        for row_id, raw in records:
            if isinstance(raw, dict):
                raw = {key: raw.get(src.columns.get(key, key)) for key in RECORD_KEYS}
            yield row_id, raw
    return renamed(opened.records), opened.root, False


def read_source(src, base_dir: Path, options: dict, report: BadRowReport):
    """The checked records of one source and the classes it names (COCO / YOLO categories, a
    dataset's ClassLabel names), or []."""
    if src.dataset:
        rows, classes = dataset_rows(src, base_dir)
        return checked_records(rows, base_dir, "xywh", src, report, []), classes
    rows, root, in_pixels = file_rows(src, base_dir)
    box_input = "xyxy" if in_pixels else {**options, **src.template_options}.get("box_input",
                                                                                 "xyxy")
    classes: list[str] = []  # filled from the records' `categories`
    records = checked_records(rows, root, box_input, src, report, classes)
    return records, classes


def checked_records(rows, root: Path, box_input: str, src, report: BadRowReport,
                    categories: list[str]) -> list[dict]:
    """The usable records among the first `src.max_samples` rows; bad ones counted. The first
    record's `categories` (COCO / YOLO) are added to `categories`."""
    records = []
    for row_id, raw in itertools.islice(rows, src.max_samples):
        try:
            if isinstance(raw, BadRow):
                raise raw
            if not isinstance(raw, dict):
                raise BadRow("bad_row", "a row must be a JSON object")
            if not categories and raw.get("categories"):
                categories += raw["categories"]
            records.append(checked_record(raw, root, box_input))
        except BadRow as bad:
            report.add(bad.reason, row_id, bad.detail)
    return records


def read_section(sources, base_dir: Path, options: dict, policy: str, what: str,
                 classes: list[str] | None = None) -> DetectionData:
    """Every source of a section; classes: `classes` if given, else the sources' categories
    then any other label, in order of first appearance."""
    report, records, named = BadRowReport(), [], []
    for src in sources:
        got, file_classes = read_source(src, base_dir, options, report)
        records += got
        named = list(dict.fromkeys([*named, *file_classes]))
    enforce_policy(report, policy, what)
    if not records:
        raise DataError(f"{what}: no usable images" +
                        (f" ({report.describe()})" if report.total else ""))
    # each class once (a comprehension testing `found` while it grows would keep every label)
    found = list(dict.fromkeys([*(classes or named),
                                *(label for r in records for label in r["labels"])]))
    return DetectionData(records, found, report.as_dict())
