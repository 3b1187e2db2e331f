"""Image-classification data for the CLIP trainer: synthetic colour classes, image folders and
JSONL/CSV rows, seeded k-shot sampling, and the base/new class split.

A task is a list of PIL images, integer labels and the class names they index. The
`colour-classes` generator draws one filled shape of the class colour on a grey, noisy
background at a random place and size: colour is learnable by tiny random models, while the
shape and position are distractors.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from peftvlm.errors import DataError, RecipeError

COLOURS = {
    "red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220),
    "yellow": (235, 215, 30), "orange": (245, 140, 20), "purple": (140, 40, 170),
    "white": (250, 250, 250), "black": (10, 10, 10),
}
DEFAULT_COLOUR_CLASSES = ["red", "green", "blue", "yellow"]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif"}


@dataclass
class Split:
    """Images with integer labels into `classnames`."""

    images: list
    labels: list[int]


@dataclass
class ClassificationTask:
    classnames: list[str]
    train: Split
    eval: Split | None


def colour_image(rgb, size: int, rng: random.Random):
    """One image: a shape filled with `rgb` (jittered) on a noisy grey background."""
    from PIL import Image, ImageDraw

    grey = rng.randint(90, 170)
    image = Image.new("RGB", (size, size), (grey, grey, grey))
    draw = ImageDraw.Draw(image)
    side = rng.randint(size // 3, size * 3 // 4)
    x, y = rng.randint(0, size - side), rng.randint(0, size - side)
    fill = tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in rgb)
    shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
    shape([x, y, x + side, y + side], fill=fill)
    # Noise from our seeded RNG (PIL's effect_noise has its own, unseeded one).
    noise = Image.frombytes("RGB", (size, size), rng.randbytes(size * size * 3))
    return Image.blend(image, noise, 0.1)


def colour_classes(classnames: list[str], n: int, size: int, seed: int) -> Split:
    """`n` images, classes balanced round-robin, reproducible from `seed`."""
    unknown = [c for c in classnames if c not in COLOURS]
    if unknown:
        raise RecipeError(f"data.classnames: colour-classes cannot draw {unknown}",
                          hint=f"use colours from: {', '.join(COLOURS)}")
    rng = random.Random(seed)
    labels = [i % len(classnames) for i in range(n)]
    rng.shuffle(labels)
    return Split([colour_image(COLOURS[classnames[y]], size, rng) for y in labels], labels)


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
    from PIL import Image

    index = {name: i for i, name in enumerate(classnames)}
    images, labels = [], []
    for path, label in rows:
        if label not in index:
            raise DataError(f"{path}: label {label!r} is not in data.classnames")
        try:
            images.append(Image.open(path).convert("RGB"))
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: cannot read image ({exc})") from exc
        labels.append(index[label])
    return Split(images, labels)


def load_task(data, base_dir: Path) -> ClassificationTask:
    """The recipe's classification task (synthetic or from files)."""
    if data.synthetic is not None:
        syn = data.synthetic
        if syn.name != "colour-classes":
            raise RecipeError(f"data.synthetic.name: {syn.name!r} is not a classification task",
                              hint="CLIP-family methods use `colour-classes`")
        names = data.classnames or DEFAULT_COLOUR_CLASSES
        return ClassificationTask(
            names, colour_classes(names, syn.train_size, syn.image_size, syn.seed),
            colour_classes(names, syn.eval_size, syn.image_size, syn.seed + 1))
    train_rows = read_sources(data.train, base_dir)
    eval_rows = read_sources(data.eval, base_dir) if data.eval else []
    names = data.classnames or sorted({label for _, label in train_rows})
    return ClassificationTask(names, _split_from_rows(train_rows, names),
                              _split_from_rows(eval_rows, names) if eval_rows else None)


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
