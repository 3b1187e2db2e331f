"""Detection records for the `detection` run kind (Grounding DINO): one record per image with
every object's pixel box and class name, read from a COCO instances JSON or a JSONL file.

    {"image": <absolute path>, "boxes": [[x1, y1, x2, y2], ...], "labels": ["cat", ...],
     "crowd": [0, ...], "width": 640, "height": 480}

- COCO instances JSON (`images`, `annotations` with `bbox` [x, y, w, h], `categories`): the
  file's categories, in id order, are the dataset's classes; `iscrowd=1` regions are kept as
  crowd (not trained on; ignored by the COCO evaluation, never a false positive).
- JSONL rows `{"image", "boxes", "labels"}` (+ optional `crowd`, `width`, `height`); boxes in
  pixels, `xyxy`, or COCO `xywh` with `template_options: {box_input: xywh}`; a source's
  `columns` maps these names to the file's own.
- A `datasets` source (`dataset:` Hub id or saved folder, `split:`) in the layout of the Hub's
  detection sets (CPPE-5, the transformers object-detection guide): an `image` column and an
  `objects` column with COCO `bbox` [x, y, w, h] and a ClassLabel `category` (its names are
  the classes; `columns` maps `image` / `objects`).

A box partly outside its image is clipped; a box wholly outside, with no area, not 4 numbers, or
an unnamed label makes its image a bad row (`data.on_bad_row`: skip and count, or stop). An
image without objects is kept: it teaches the detector to find nothing there.

The record shape is the one the generative `detection` data template reads, so the two kinds
of detection runs read the same files the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from peftvlm.data.boxes import clip_box, read_box
from peftvlm.data.readers import load_saved_split
from peftvlm.data.rows import BadRow, BadRowReport, enforce_policy
from peftvlm.data.sources import resolve_image
from peftvlm.data.images import image_size
from peftvlm.errors import DataError

SEPARATORS = (".", "?")  # Grounding DINO splits its prompt into classes at these tokens


@dataclass
class DetectionData:
    """Images with their objects, and the dataset's class names (prompt order)."""

    records: list[dict]
    classes: list[str]
    bad_rows: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.records)


def source_path(src, base_dir: Path) -> Path:
    path = Path(src.path) if Path(src.path).is_absolute() else base_dir / src.path
    if not path.is_file():
        raise DataError(f"detection data: {path} is not a file")
    return path


def coco_rows(path: Path) -> tuple[list[tuple[str, dict]], list[str]]:
    """(row id, raw record) per image of a COCO instances file, and its classes in id order."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list)
                                             for k in ("images", "annotations", "categories")):
        raise DataError(f"{path}: a COCO instances file needs `images`, `annotations` and "
                        "`categories` lists", hint="or give JSONL rows with image/boxes/labels")
    names = {c["id"]: str(c.get("name", c["id"])) for c in data["categories"]}
    objects: dict = {}
    for ann in data["annotations"]:
        objects.setdefault(ann.get("image_id"), []).append(ann)
    rows = []
    for img in data["images"]:
        anns = objects.get(img.get("id"), [])
        rows.append((f"{path.name}:image_id={img.get('id')}", {
            "image": img.get("file_name"), "width": img.get("width"), "height": img.get("height"),
            "boxes": [a.get("bbox") for a in anns], "box_input": "xywh",
            "labels": [names.get(a.get("category_id"), a.get("category_id")) for a in anns],
            "crowd": [int(bool(a.get("iscrowd", 0))) for a in anns]}))
    return rows, [names[k] for k in sorted(names)]


def jsonl_rows(path: Path, columns: dict, box_input: str) -> list[tuple[str, dict]]:
    """(row id, raw record) per line; `columns` maps record names to the file's columns."""
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
        if not isinstance(raw, dict):
            raise DataError(f"{path}:{n}: a row should be a JSON object")
        record = {key: raw.get(columns.get(key, key)) for key in
                  ("image", "boxes", "labels", "crowd", "width", "height")}
        rows.append((f"{path.name}:{n}", {**record, "box_input": box_input}))
    return rows


def checked_record(raw: dict, root: Path) -> dict:
    """A raw record with its image resolved and its boxes read, clipped and checked."""
    if raw.get("image") is None:
        raise BadRow("missing_image", "no `image`")
    image = resolve_image(raw["image"], root)
    width, height = raw.get("width"), raw.get("height")
    if not width or not height:
        width, height = image_size(image)
    boxes, labels = raw.get("boxes") or [], raw.get("labels") or []
    if not isinstance(boxes, list) or not isinstance(labels, list) or len(boxes) != len(labels):
        raise BadRow("bad_column_type", "`boxes` and `labels` should be lists of one box and "
                                        "one class name per object")
    crowd = raw.get("crowd") or [0] * len(boxes)
    out = []
    for i, (box, label) in enumerate(zip(boxes, labels)):
        name = str(label).strip() if isinstance(label, (str, int)) else ""
        if not name or any(s in name for s in SEPARATORS):
            raise BadRow("bad_label", f"object {i}: label {label!r} is not a class name "
                                      "(empty, or holding '.' or '?', which split the prompt)")
        try:
            out.append(clip_box(read_box(box, raw["box_input"]), float(width), float(height)))
        except BadRow as bad:
            raise BadRow(bad.reason, f"object {i} ({name}): {bad.detail}") from None
    return {"image": image, "boxes": [list(b) for b in out], "labels": [str(x).strip()
                                                                        for x in labels],
            "crowd": [int(bool(c)) for c in crowd], "width": float(width),
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
            "bbox", []), "labels": labels, "box_input": "xywh", "crowd": objects.get(
            "iscrowd"), "width": row.get("width"), "height": row.get("height")}))
    return rows, names


def read_source(src, base_dir: Path, options: dict, report: BadRowReport):
    """The checked records of one source and the classes its file names (COCO), or []."""
    if src.dataset:
        rows, classes = dataset_rows(src, base_dir)
        return checked_records(rows, base_dir, src, report), classes
    path = source_path(src, base_dir)
    root = Path(src.image_root) if src.image_root else path.parent
    root = root if root.is_absolute() else base_dir / root
    if path.suffix.lower() == ".json":
        rows, classes = coco_rows(path)
    elif path.suffix.lower() == ".jsonl":
        box_input = {**options, **src.template_options}.get("box_input", "xyxy")
        rows, classes = jsonl_rows(path, src.columns, box_input), []
    else:
        raise DataError(f"detection data: {path}: read are COCO instances .json files and "
                        ".jsonl rows with image/boxes/labels")
    return checked_records(rows, root, src, report), classes


def checked_records(rows: list, root: Path, src, report: BadRowReport) -> list[dict]:
    """The usable records among `rows` (up to `src.max_samples`); bad ones counted."""
    records = []
    for row_id, raw in rows[:src.max_samples] if src.max_samples else rows:
        try:
            records.append(checked_record(raw, root))
        except BadRow as bad:
            report.add(bad.reason, row_id, bad.detail)
    return records


def read_section(sources, base_dir: Path, options: dict, policy: str, what: str,
                 classes: list[str] | None = None) -> DetectionData:
    """Every source of a section; classes: `classes` if given, else the COCO files' categories
    then any other label, in order of first appearance."""
    report, records, named = BadRowReport(), [], []
    for src in sources:
        got, file_classes = read_source(src, base_dir, options, report)
        records += got
        named += [c for c in file_classes if c not in named]
    enforce_policy(report, policy, what)
    if not records:
        raise DataError(f"{what}: no usable images" +
                        (f" ({report.describe()})" if report.total else ""))
    # each class once (a comprehension testing `found` while it grows would keep every label)
    found = list(dict.fromkeys([*(classes or named),
                                *(label for r in records for label in r["labels"])]))
    return DetectionData(records, found, report.as_dict())
