"""Image-classification data for the CLIP trainer: image folders and JSONL/CSV rows (the
synthetic `colour-classes` task is written as JSONL by `peftvlm.data.synthetic`), seeded k-shot
sampling, and the base/new class split.

A task is a list of PIL images, integer labels and the class names they index. Folders hold
one subfolder per class; JSONL/CSV rows hold `image` (a path relative to the file) and `label`
(rename with the source's `columns`).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from peftvlm.errors import DataError, RecipeError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif"}


@dataclass
class Split:
    """Images (paths or PIL images) with integer labels into `classnames`."""

    images: list
    labels: list[int]


@dataclass
class ClassificationTask:
    classnames: list[str]
    train: Split
    eval: Split | None


def _rows_from_folder(folder: Path) -> list[tuple[Path, str]]:
    rows = [(f, d.name) for d in sorted(folder.iterdir()) if d.is_dir()
            for f in sorted(d.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not rows:
        raise DataError(f"{folder}: no images in class subfolders (expected "
                        f"{folder}/<class name>/<image>.png)")
    return rows


def _rows_from_table(path: Path, columns: dict[str, str]) -> list[tuple[Path, str]]:
    image_col, label_col = columns.get("image", "image"), columns.get("label", "label")
    if path.suffix == ".csv":
        import csv
        with path.open(newline="") as f:
            records = list(csv.DictReader(f))
    else:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for i, rec in enumerate(records, start=1):
        if image_col not in rec or label_col not in rec:
            raise DataError(f"{path}: row {i} lacks `{image_col}` or `{label_col}`",
                            hint="map your columns with data.train[].columns: "
                                 "{image: <col>, label: <col>}")
        rows.append((path.parent / rec[image_col], str(rec[label_col])))
    return rows


def read_sources(sources, base_dir: Path) -> list[tuple[Path, str]]:
    """(image path, label name) rows from image folders or JSONL/CSV files."""
    rows = []
    for src in sources:
        if src.path is None:
            raise RecipeError("data: classification reads image folders or JSONL/CSV files "
                              "(`path`), not `dataset`")
        path = base_dir / src.path
        found = _rows_from_folder(path) if path.is_dir() else _rows_from_table(path, src.columns)
        rows += found[:src.max_samples] if src.max_samples else found
    return rows


def _split_from_rows(rows, classnames: list[str]) -> Split:
    """Image paths (decoded per batch, so large sets never sit in memory) and label ids."""
    index = {name: i for i, name in enumerate(classnames)}
    for path, label in rows:
        if label not in index:
            raise DataError(f"{path}: label {label!r} is not in data.classnames "
                            f"({', '.join(classnames)})")
        if not Path(path).is_file():
            raise DataError(f"{path}: image not found")
    return Split([path for path, _ in rows], [index[label] for _, label in rows])


def open_image(image):
    """An RGB PIL image from a path (or an image already in memory)."""
    from PIL import Image

    if not isinstance(image, (str, Path)):
        return image.convert("RGB")
    try:
        with Image.open(image) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as exc:
        raise DataError(f"{image}: cannot read image ({exc})") from exc


def load_task(data, base_dir: Path) -> ClassificationTask:
    """The recipe's classification task; synthetic data is written to the cache first."""
    train_sources, eval_sources = data.train, data.eval
    if data.synthetic is not None:
        train_sources, eval_sources = synthetic_sources(data.synthetic)
    train_rows = read_sources(train_sources, base_dir)
    eval_rows = read_sources(eval_sources, base_dir) if eval_sources else []
    names = data.classnames or sorted({label for _, label in train_rows})
    if data.synthetic is not None:  # a subset of the drawn colours: keep only those rows
        train_rows, eval_rows = _only(train_rows, names), _only(eval_rows, names)
    return ClassificationTask(names, _split_from_rows(train_rows, names),
                              _split_from_rows(eval_rows, names) if eval_rows else None)


def synthetic_sources(cfg):
    """(train, eval) sources of the built-in task, written once into the cache."""
    from peftvlm.data.synthetic import write_synthetic
    from peftvlm.models import cache_dir
    from peftvlm.recipe import SourceConfig

    if cfg.name != "colour-classes":
        raise RecipeError(f"data.synthetic.name: {cfg.name!r} is not a classification task",
                          hint="CLIP-family methods use `colour-classes`")
    paths = write_synthetic(cfg, cache_dir())
    return [SourceConfig(path=str(paths["train"]))], [SourceConfig(path=str(paths["test"]))]


def _only(rows, names):
    from peftvlm.data.synthetic import COLOURS

    unknown = [n for n in names if n not in COLOURS]
    if unknown:
        raise RecipeError(f"data.classnames: colour-classes draws no {unknown}",
                          hint=f"pick from: {', '.join(COLOURS)}")
    return [(path, label) for path, label in rows if label in names]


def few_shot(split: Split, shots: int, n_classes: int, seed: int) -> Split:
    """`shots` images of every class, drawn without replacement with `seed`."""
    rng = random.Random(seed)
    chosen = []
    for c in range(n_classes):
        members = [i for i, y in enumerate(split.labels) if y == c]
        if len(members) < shots:
            raise DataError(f"data.shots: class {c} has {len(members)} training images, "
                            f"fewer than {shots}", hint="lower data.shots or add images")
        chosen += rng.sample(members, shots)
    chosen.sort()
    return Split([split.images[i] for i in chosen], [split.labels[i] for i in chosen])


def keep_classes(split: Split, classes: list[int]) -> Split:
    """Rows of `classes` only, relabelled 0..len(classes)-1 in that order."""
    remap = {c: i for i, c in enumerate(classes)}
    keep = [i for i, y in enumerate(split.labels) if y in remap]
    return Split([split.images[i] for i in keep], [remap[split.labels[i]] for i in keep])


def base_new_classes(n_classes: int) -> tuple[list[int], list[int]]:
    """The first half of the classes (rounded up) is base, the rest new (CoCoOp's protocol)."""
    if n_classes < 2:
        raise RecipeError("data.base_to_new needs at least two classes")
    half = (n_classes + 1) // 2
    return list(range(half)), list(range(half, n_classes))
