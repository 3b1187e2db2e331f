"""Image-classification data for the CLIP trainer, read by the shared readers (image folders,
JSONL/CSV/parquet, saved and Hub datasets; the synthetic `colour-classes` task is written as
JSONL by `peftvlm.data.read.synthetic`) through the `classification` template, with the same
bad-row policy as every run; seeded k-shot sampling and the base/new class split.

A task is a list of images (checked paths or encoded bytes), integer labels and the class names
they index. Folders hold one subfolder per class; rows hold `image` (a path relative to the
file, or bytes) and `label` (rename with the source's `columns`; `_` in labels reads as a space).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from peftvlm.data.prepare.loading import load_source
from peftvlm.data.prepare.pairs import row_captions
from peftvlm.data.read.images import load_rgb
from peftvlm.data.read.synthetic import COLOURS, write_synthetic
from peftvlm.data.rows import BadRow, BadRowReport, enforce_policy
from peftvlm.errors import DataError, RecipeError
from peftvlm.models import cache_dir
from peftvlm.recipe.schema import SourceConfig


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


def read_sources(sources, data_cfg, base_dir: Path, section: str = "train") -> list[tuple]:
    """(image, label name) rows through the shared readers (`load_source`: image folders,
    JSONL/CSV/parquet, saved or Hub datasets) and the `classification` template (columns
    `image`, `label`; rename with the source's `columns`); bad rows follow data.on_bad_row."""
    rows, report = [], BadRowReport()
    for src in sources:
        if src.template is None:
            src = src.model_copy(update={"template": "classification"})
        loaded = load_source(src, data_cfg, base_dir)
        report.merge(loaded.report)
        rows += [(row["images"][0], row_captions(row)[0]) for row in loaded.rows]
    enforce_policy(report, data_cfg.on_bad_row, f"data.{section}")
    if report.total:
        import logging

        logging.getLogger("peftvlm").warning("data.%s: skipped %s", section, report.describe())
    return rows


def _split_from_rows(rows, classnames: list[str]) -> Split:
    """Image paths (decoded per batch, so large sets never sit in memory) and label ids."""
    index = {name: i for i, name in enumerate(classnames)}
    for image, label in rows:  # images were checked by the reader (bad ones counted)
        if label not in index:
            where = image if isinstance(image, str) else "an in-memory image"
            raise DataError(f"{where}: label {label!r} is not in data.classnames "
                            f"({', '.join(classnames)})")
    return Split([image for image, _ in rows], [index[label] for _, label in rows])


def open_image(image):
    """The RGB image training sees (`load_rgb`, the one decoder), from a path, `{"bytes"}` dict
    or PIL image; an image that stopped decoding since it was read is a `DataError`."""
    try:
        return load_rgb(image)
    except BadRow as exc:
        raise DataError(f"cannot read image: {exc.detail}") from exc


def load_task(data, base_dir: Path) -> ClassificationTask:
    """The recipe's classification task; synthetic data is written to the cache first."""
    train_sources, eval_sources = data.train, data.eval
    if data.synthetic is not None:
        train_sources, eval_sources = synthetic_sources(data.synthetic)
    train_rows = read_sources(train_sources, data, base_dir, "train")
    eval_rows = read_sources(eval_sources, data, base_dir, "eval") if eval_sources else []
    names = data.classnames or sorted({label for _, label in train_rows})
    if data.synthetic is not None:  # a subset of the drawn colours: keep only those rows
        train_rows, eval_rows = _only(train_rows, names), _only(eval_rows, names)
    return ClassificationTask(names, _split_from_rows(train_rows, names),
                              _split_from_rows(eval_rows, names) if eval_rows else None)


def synthetic_sources(cfg):
    """(train, eval) sources of the built-in task, written once into the cache."""
    if cfg.name != "colour-classes":
        raise RecipeError(f"data.synthetic.name: {cfg.name!r} is not a classification task",
                          hint="CLIP-family methods use `colour-classes`")
    paths = write_synthetic(cfg, cache_dir())
    return [SourceConfig(path=str(paths["train"]))], [SourceConfig(path=str(paths["test"]))]


def _only(rows, names):
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
