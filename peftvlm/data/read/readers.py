"""Read a recipe source into `(row id, record)` pairs, whatever its layout.

Kinds (by `source.format`, else the path's suffix):
- files: `.jsonl`, `.json` (a list, or `{"data": [...]}`), `.csv`/`.tsv` (cells that hold JSON
  lists/objects are parsed), `.parquet`;
- an image folder with one subfolder per class -> `{"image", "label"}` records;
- `format: coco_captions`: COCO captions JSON (`images` + `annotations` lists) -> one
  `{"image", "captions", "width", "height", "image_id"}` record per image;
- `format: coco_instances` / `format: yolo` (detection, `peftvlm.data.read.detection`): one
  `{"image", "boxes", "labels", "crowd", "width", "height", "categories"}` record per image;
- `format: vqav2`: a VQAv2 questions file (`path`) + annotations file (`annotations`) -> one
  `{"image", "question", "answers", "question_id", "image_id"}` record per question; image files
  come from `image_pattern` (default `{data_subtype}/COCO_{data_subtype}_{image_id:012d}.jpg`);
- `dataset:` a `datasets` folder saved with `save_to_disk` (split slicing as in `datasets`), or a
  Hub id read with `load_dataset` (`streaming: true` reads lazily and stops at `max_samples`).

Row ids are what bad-row, overflow and preview reports name: the row's place in the original
file or dataset, before any slicing, skipping or `max_samples`: `file:line` (JSONL, CSV, a JSON
list: the line a row starts on), `file:row N` (Parquet, 0-based as `pyarrow`/pandas count) and
`name[split][N]` (a `datasets` split, N its index in the whole split, as `dataset[split][N]`).

Large files are read in shards: `SourceData.split(limit)` plans contiguous runs of records
(JSONL line ranges, CSV record ranges, Parquet row ranges; each starts at a byte offset or row
index) that worker processes read on their own, so no process ever holds a whole file. Readers
are generators: nothing is read before the records are iterated.
"""

from __future__ import annotations

import csv
import itertools
import json
import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from peftvlm.data.read.detection import (looks_like_coco_instances, looks_like_yolo,
                                         read_coco_instances, read_yolo)
from peftvlm.data.read.json_list import (json_list_shards, load_json, read_json_list, read_text,
                                         starts_a_list)
from peftvlm.data.rows import BadRow
from peftvlm.errors import DataError
from peftvlm.safe_yaml import regular_file_problem

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
VQAV2_PATTERN = "{data_subtype}/COCO_{data_subtype}_{image_id:012d}.jpg"
SINGLE_SLICE = re.compile(r"[\w.-]+\[[^\]+]*\]")  # `train[:10%]`, not `train[:5]+test`
SHARD_ROWS = 2000  # records per shard of a large file (each worker renders a run of shards)


@dataclass
class SourceData:
    """A source opened for reading: its records, the folder its images are relative to, and
    the files whose size/mtime fingerprint it (empty: not cacheable, e.g. a Hub dataset)."""

    name: str
    records: Iterable[tuple[str, Any]]
    root: Path
    files: list[Path] = field(default_factory=list)
    default_template: str | None = None
    layout: str | None = None  # annotation layout read (coco_captions...); None: rows as they are
    # limit -> shards (picklable iterables of records) covering the first `limit` records, in
    # order, for reading in parallel; None: the source is read in one pass (`records`).
    split: Callable[[int | None], list] | None = None


class Deferred:
    """Records read when first iterated, so a start that finds the source in the preprocessing
    cache (keyed by the files' size and mtime) never parses the file."""

    def __init__(self, read, *args):
        self.read, self.args = read, args

    def __iter__(self):
        return iter(self.read(*self.args))


def open_source(src, base_dir: Path) -> SourceData:
    """Open one `SourceConfig` (paths relative to the recipe folder `base_dir`)."""
    if src.dataset:
        return read_dataset(src, base_dir)
    path = checked_path(base_dir / src.path, "data file")
    root = checked_path(base_dir / src.image_root, "image_root") if src.image_root else None
    if not path.exists():
        raise DataError(f"data file {path} does not exist", hint="paths are relative to the recipe")
    if path.is_dir():
        if is_saved_dataset(path):
            return read_dataset(src, base_dir)
        if src.format == "yolo" or (src.format == "auto" and looks_like_yolo(path)):
            return SourceData(src.path, Deferred(read_yolo, path), root or path,
                              [path, path / "images", path / "labels"], "detection", "yolo")
        if path.suffix in DATA_SUFFIXES:  # the user meant a file: "no class subfolders" misleads
            raise DataError(f"data file {path} is a directory, not a file",
                            hint="give the path of the data file inside it, or a folder of "
                                 "<class>/<image> subfolders for image classification")
        records = read_image_folder(path)
        return SourceData(src.path, records, root or path, folder_files(path), "classification",
                          "image_folder")
    fmt = src.format  # row formats (messages, llava_conversations...) are read as plain rows
    if fmt == "auto" and path.suffix == ".json":
        fmt = coco_layout(path) or "auto"
    if fmt == "coco_instances":
        return SourceData(src.path, Deferred(read_coco_instances, path), root or path.parent,
                          [path], "detection", "coco_instances")
    if fmt == "coco_captions":
        records = Deferred(read_coco_captions, path)
    elif fmt == "vqav2":
        if not src.annotations:
            raise DataError(f"data source {src.path}: format vqav2 needs `annotations:` (the "
                            "annotations file beside the questions file)")
        annotations = checked_path(base_dir / src.annotations, "annotations file",
                                   file_only=True)
        records = Deferred(read_vqav2, path, annotations, src.image_pattern or VQAV2_PATTERN)
        return SourceData(src.path, records, root or path.parent, [path, annotations],
                          layout="vqav2")
    else:
        records = Deferred(read_file, path)
        if path.suffix in SHARDED:
            return SourceData(src.path, records, root or path.parent, [path],
                              split=partial(SHARDED[path.suffix], path))
    return SourceData(src.path, records, root or path.parent, [path],
                      layout="coco_captions" if fmt == "coco_captions" else None)


DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")


def checked_path(path: Path, what: str, file_only: bool = False) -> Path:
    """`path` resolved, or a `DataError` when it is a symlink loop, a FIFO (opening it would
    block forever), a device or a socket (or, with `file_only`, a directory)."""
    try:
        resolved = path.resolve()
    except (RuntimeError, OSError):  # Python < 3.13 raises RuntimeError on a symlink loop
        resolved = path
    problem = regular_file_problem(resolved)
    if problem and (file_only or not resolved.is_dir()):
        raise DataError(f"{what} {path} {problem}",
                        hint="give the path of a regular file (paths are relative to the recipe)")
    return resolved


def read_file(path: Path) -> Iterator[tuple[str, Any]]:
    readers = {".jsonl": read_jsonl, ".json": read_json, ".csv": read_csv, ".tsv": read_csv,
               ".parquet": read_parquet}
    if path.suffix not in readers:
        raise DataError(f"data file {path}: unknown type {path.suffix!r}",
                        hint="use .jsonl, .json, .csv, .tsv, .parquet, an image folder, or "
                             "`dataset:` for a datasets folder or Hub id")
    return readers[path.suffix](path)


def read_jsonl(path: Path, offset: int = 0, line: int = 1,
               count: int | None = None) -> Iterator[tuple[str, Any]]:
    """One record per line, named `file:line`; a line that is not UTF-8 or not JSON is a bad
    row of its own (read as bytes, so one bad byte never hides the rest of the file). A shard
    starts at byte `offset` (line number `line`) and stops after `count` records."""
    if count == 0:
        return
    with path.open("rb") as f:
        f.seek(offset)
        for n, raw in enumerate(f, start=line):
            text = jsonl_text(raw, n)
            if text is None:
                continue
            row_id = f"{path.name}:{n}"
            if isinstance(text, BadRow):
                yield row_id, text
            else:
                try:
                    yield row_id, json.loads(text)
                except json.JSONDecodeError as exc:
                    yield row_id, BadRow("invalid_json", exc.msg)
            if count is not None:
                count -= 1
                if not count:
                    return


def jsonl_text(raw: bytes, n: int) -> str | BadRow | None:
    """Line `n` of a JSONL file as text; None for a blank line (not a record)."""
    try:
        text = raw.decode("utf-8-sig" if n == 1 else "utf-8")
    except UnicodeDecodeError as exc:
        return BadRow("bad_encoding", f"byte {raw[exc.start]:#04x} at column {exc.start + 1} "
                                      "is not UTF-8")
    return text if text.strip() else None


def jsonl_shards(path: Path, limit: int | None) -> list[Deferred]:
    """Shards of `SHARD_ROWS` records: one pass over the lines (no JSON parsing) notes the byte
    offset and line number where each shard starts."""
    starts, records, offset = [], 0, 0
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            if limit is not None and records >= limit:
                break
            if jsonl_text(raw, n) is not None:
                if records % SHARD_ROWS == 0:
                    starts.append([offset, n, 0])
                starts[-1][2] += 1
                records += 1
            offset += len(raw)
    return [Deferred(read_jsonl, path, *start) for start in starts]


def read_json(path: Path) -> Iterable[tuple[str, Any]]:
    """A JSON list (or `{"data": [...]}`); each record is named by the line it starts on. A
    list is read one item at a time (`json_list.py`)."""
    if starts_a_list(path):
        return read_json_list(path)
    text = read_text(path)
    items = json_list_items(text, path)
    if items is not None:
        return [(f"{path.name}:{line}", r) for line, r in items]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc
    if isinstance(data, dict):  # {"data": [...]}-style wrappers
        data = next((v for v in data.values() if isinstance(v, list)), [])
    return [(f"{path.name}[{i}]", r) for i, r in enumerate(data)]


def json_list_items(text: str, path: Path) -> list[tuple[int, Any]] | None:
    """(line, item) for each element of a top-level JSON list; None if the text is not one.
    `json.loads` keeps no positions, so elements are decoded one by one with `raw_decode`."""
    decoder, ws = json.JSONDecoder(), re.compile(r"[ \t\n\r]*")
    pos = ws.match(text, 0).end()
    if not text.startswith("[", pos):
        return None
    pos = ws.match(text, pos + 1).end()
    items = []
    while pos < len(text) and text[pos] != "]":
        try:
            item, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc
        items.append((text.count("\n", 0, pos) + 1, item))
        pos = ws.match(text, end).end()
        if text.startswith(",", pos):
            pos = ws.match(text, pos + 1).end()
    return items


class TextLines:
    """A UTF-8 file's lines (endings kept, as `csv` wants them) from byte `offset`, keeping the
    byte offset and line number reached, so a CSV shard can start where a record ended. A bad
    byte is an error naming its line (a BOM on line 1 is dropped)."""

    def __init__(self, path: Path, offset: int = 0, line: int = 0):
        self.path, self.offset, self.line = path, offset, line

    def __iter__(self) -> Iterator[str]:
        with self.path.open("rb") as f:
            f.seek(self.offset)
            for raw in f:
                self.line += 1
                self.offset += len(raw)
                try:
                    yield raw.decode("utf-8-sig" if self.line == 1 else "utf-8")
                except UnicodeDecodeError as exc:
                    raise DataError(f"{self.path}:{self.line}: byte {raw[exc.start]:#04x} is "
                                    "not UTF-8", hint="save the file as UTF-8 (e.g. `iconv -f "
                                                      "latin1 -t utf-8`)") from exc


def csv_reader(path: Path, lines: TextLines, fieldnames: list[str] | None = None):
    return csv.DictReader(lines, fieldnames=fieldnames,
                          delimiter="\t" if path.suffix == ".tsv" else ",")


def read_csv(path: Path, offset: int = 0, line: int = 0, count: int | None = None,
             fieldnames: list[str] | None = None) -> Iterator[tuple[str, Any]]:
    """Rows as dicts named by their (last) line; empty cells are missing values, JSON-looking
    cells are parsed. A UTF-8 BOM (Excel's "CSV UTF-8") is dropped, so the first column keeps
    its name. A shard starts at byte `offset` after line `line`, with the header's
    `fieldnames`, and stops after `count` rows."""
    lines = TextLines(path, offset, line)
    reader = csv_reader(path, lines, fieldnames)
    for row in itertools.islice(reader, count):
        yield (f"{path.name}:{line + reader.line_num}",
               {k: csv_cell(v) for k, v in row.items() if k})


def csv_shards(path: Path, limit: int | None) -> list[Deferred]:
    """Shards of `SHARD_ROWS` rows, each starting where the previous row ended (one parse of
    the file, which also finds any byte that is not UTF-8 before workers start)."""
    lines = TextLines(path)
    reader = csv_reader(path, lines)
    fieldnames = reader.fieldnames or []
    starts, boundary = [], (lines.offset, lines.line)
    for records, _ in enumerate(itertools.islice(reader, limit)):
        if records % SHARD_ROWS == 0:
            starts.append([*boundary, 0, fieldnames])
        starts[-1][2] += 1
        boundary = (lines.offset, lines.line)
    return [Deferred(read_csv, path, *start) for start in starts]


def csv_cell(value: str | None):
    if value is None or value == "":
        return None
    if value[0] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def open_parquet(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises its own hierarchy for unreadable files
        raise DataError(f"{path}: cannot read Parquet: {exc}") from exc


def read_parquet(path: Path, start: int = 0, stop: int | None = None
                 ) -> Iterator[tuple[str, Any]]:
    """Rows `start` to `stop` (all by default) as dicts, named by their place in the file,
    read in record batches of the row groups that hold them."""
    parquet = open_parquet(path)
    groups, index, first = [], 0, 0  # row groups overlapping [start, stop); first one's row
    for g in range(parquet.num_row_groups):
        size = parquet.metadata.row_group(g).num_rows
        if index + size > start and (stop is None or index < stop):
            first = index if not groups else first
            groups.append(g)
        index += size
    if not groups:
        return
    index = first
    import pyarrow as pa

    try:
        for batch in parquet.iter_batches(batch_size=1000, row_groups=groups):
            for i, row in enumerate(batch.to_pylist(), start=index):
                if stop is not None and i >= stop:
                    return
                if i >= start:
                    yield parquet_row_id(path, i), row
            index += batch.num_rows
    except (OSError, pa.ArrowException) as exc:  # a damaged page
        raise DataError(f"{path}: cannot read Parquet: {exc}") from exc


def parquet_row_id(path: Path, index: int) -> str:
    """A Parquet row by its 0-based position in the file (`pq.read_table(path)[index]`)."""
    return f"{path.name}:row {index}"


def parquet_shards(path: Path, limit: int | None) -> list[Deferred]:
    """Shards of `SHARD_ROWS` rows (the row count is in the file's footer: nothing is read)."""
    rows = open_parquet(path).metadata.num_rows
    rows = rows if limit is None else min(rows, limit)
    return [Deferred(read_parquet, path, i, min(i + SHARD_ROWS, rows))
            for i in range(0, rows, SHARD_ROWS)]


def json_shards(path: Path, limit: int | None) -> list[Deferred]:
    """A JSON list in shards of `SHARD_ROWS` items (`json_list.py`); another JSON file whole."""
    if not starts_a_list(path):
        return [Deferred(first_records, Deferred(read_json, path), limit)]
    return [Deferred(read_json_list, path, *start)
            for start in json_list_shards(path, limit, SHARD_ROWS)]


def first_records(records: Iterable, limit: int | None) -> Iterator:
    return itertools.islice(records, limit)


SHARDED = {".jsonl": jsonl_shards, ".csv": csv_shards, ".tsv": csv_shards,
           ".parquet": parquet_shards, ".json": json_shards}


def read_image_folder(path: Path) -> list[tuple[str, Any]]:
    """`<folder>/<class>/<image>` -> `{"image": "<class>/<image>", "label": "<class>"}`."""
    records = []
    for class_dir in sorted(p for p in path.iterdir() if p.is_dir()):
        for image in sorted(class_dir.iterdir()):
            if image.suffix.lower() in IMAGE_SUFFIXES:
                rel = f"{class_dir.name}/{image.name}"
                records.append((rel, {"image": rel, "label": class_dir.name}))
    if not records:
        raise DataError(f"image folder {path} has no class subfolders with images",
                        hint="lay it out as <folder>/<class name>/<image files>")
    return records


def folder_files(path: Path) -> list[Path]:
    return [path, *sorted(p for p in path.iterdir() if p.is_dir())]


def looks_like_coco(path: Path) -> bool:
    """A JSON object with `images` and `annotations` lists (read only the first 64 KiB)."""
    with path.open(errors="replace") as f:  # a bad byte is reported when the file is read
        head = f.read(65536)
    return head.lstrip().startswith("{") and '"images"' in head and '"annotations"' in head


def coco_layout(path: Path) -> str | None:
    """`coco_instances` (annotations with boxes), `coco_captions`, or None (not COCO)."""
    if not looks_like_coco(path):
        return None
    with path.open(errors="replace") as f:
        head = f.read(1 << 20)
    return "coco_instances" if looks_like_coco_instances(head) else "coco_captions"


def read_coco_captions(path: Path) -> list[tuple[str, Any]]:
    data = load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise DataError(f"{path}: a COCO captions file needs `images` and `annotations` lists")
    captions: dict[Any, list] = {}
    for ann in data["annotations"]:
        if isinstance(ann, dict):
            captions.setdefault(ann.get("image_id"), []).append(ann.get("caption"))
    records = []
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict):
            records.append((f"{path.name}:images[{i}]", BadRow("bad_row", "not an object")))
            continue
        records.append((f"{path.name}:image_id={img.get('id')}",
                        {"image": img.get("file_name"), "captions": captions.get(img.get("id"), []),
                         "width": img.get("width"), "height": img.get("height"),
                         "image_id": img.get("id")}))
    return records


def read_vqav2(questions: Path, annotations: Path, pattern: str) -> list[tuple[str, Any]]:
    q_data, a_data = load_json(questions), load_json(annotations)
    if not isinstance(q_data, dict) or not isinstance(q_data.get("questions"), list):
        raise DataError(f"{questions}: a VQAv2 questions file needs a `questions` list")
    if not isinstance(a_data, dict) or not isinstance(a_data.get("annotations"), list):
        raise DataError(f"{annotations}: a VQAv2 annotations file needs an `annotations` list")
    answers = {a.get("question_id"): a.get("answers") for a in a_data["annotations"]
               if isinstance(a, dict)}
    subtype = q_data.get("data_subtype", "")
    records = []
    for q in q_data["questions"]:
        row_id = f"{questions.name}:question_id={q.get('question_id')}"
        try:
            image = pattern.format(image_id=int(q["image_id"]), data_subtype=subtype)
        except (KeyError, TypeError, ValueError) as exc:
            records.append((row_id, BadRow("bad_column_type", f"image_id: {exc}")))
            continue
        records.append((row_id, {"image": image, "question": q.get("question"),
                                 "answers": answers.get(q.get("question_id")),
                                 "question_id": q.get("question_id"), "image_id": q["image_id"]}))
    return records


# --- datasets --------------------------------------------------------------------------------

def is_saved_dataset(path: Path) -> bool:
    return any((path / f).exists() for f in ("dataset_info.json", "state.json",
                                             "dataset_dict.json"))


def read_dataset(src, base_dir: Path) -> SourceData:
    """A `save_to_disk` folder (local, cacheable) or a Hub id via `load_dataset`."""
    name = src.dataset or src.path
    local = (base_dir / name).resolve()
    root = (base_dir / src.image_root).resolve() if src.image_root else None
    split = src.split
    if local.is_dir() and is_saved_dataset(local):
        dataset, indices = load_saved_split(local, split)
        files = sorted(p for p in local.rglob("*") if p.is_file())
        return SourceData(name, dataset_records(dataset, name, split, indices), root or local,
                          files)
    import datasets

    if src.streaming and "[" in split:
        raise DataError(f"data source {name}: streaming reads whole splits; use "
                        f"max_samples instead of slicing ({split!r})")
    # One sliced split (`train[10:20]`) is read whole and sliced here, so that rows keep their
    # index in the split; `datasets` would number a slice from 0.
    whole = split.split("[")[0] if SINGLE_SLICE.fullmatch(split) and not src.streaming else split
    try:
        # A local folder of data files (not saved with save_to_disk) is read like a Hub repo.
        dataset = datasets.load_dataset(str(local) if local.is_dir() else name, split=whole,
                                        streaming=src.streaming)
    except Exception as exc:  # datasets raises many types (network, missing config...)
        raise DataError(f"data source {name}: cannot load dataset: {str(exc).splitlines()[0]}",
                        hint="give a Hub id (needs network), or a folder saved with "
                             "Dataset.save_to_disk, relative to the recipe") from exc
    dataset, indices = slice_split(dataset, split, name) if whole != split else (dataset, None)
    return SourceData(name, dataset_records(dataset, name, split, indices), root or base_dir)


def load_saved_split(path: Path, split: str):
    """`load_from_disk`, then the split (for a DatasetDict) and its slice (`train[:10%]`):
    (dataset, the rows' indices in the whole split, or None when not sliced)."""
    import datasets

    loaded = datasets.load_from_disk(str(path))
    name = split.split("[")[0]
    if isinstance(loaded, datasets.DatasetDict):
        if name not in loaded:
            raise DataError(f"dataset {path} has no split {name!r}; it has {', '.join(loaded)}")
        loaded = loaded[name]
    return slice_split(loaded, split, path) if "[" in split else (loaded, None)


def slice_split(dataset, split: str, where):
    """`dataset` (one whole split) sliced as `split` says (`train[10:20]`, `train[:10%]`),
    with the kept rows' indices in the whole split."""
    import datasets

    name = split.split("[")[0]
    try:
        parts = datasets.ReadInstruction.from_spec(split).to_absolute({name: len(dataset)})
    except (ValueError, AssertionError) as exc:
        raise DataError(f"dataset {where}: bad split {split!r}: {exc}",
                        hint="write e.g. train, train[:1000] or train[10%:20%]") from exc
    indices = [i for p in parts for i in range(p.from_, p.to)]
    return dataset.select(indices), indices


def dataset_records(dataset, name: str, split: str = "train",
                    indices: list[int] | None = None) -> Iterable[tuple[str, Any]]:
    """Rows with `Image` features kept encoded (`{"bytes", "path"}`), decoded when batched,
    named `name[split][i]` by their index i in the whole split (`indices`: of a slice)."""
    import datasets

    features = getattr(dataset, "features", None) or {}
    for column, feature in features.items():
        if isinstance(feature, datasets.Image) and feature.decode:
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
    label, split = name.rstrip("/").split("/")[-1], split.split("[")[0]
    rows = dataset.to_list() if isinstance(dataset, datasets.Dataset) else dataset
    positions = itertools.count() if indices is None else indices
    return ((f"{label}[{split}][{i}]", row) for i, row in zip(positions, rows))


def take(records: Iterable, limit: int | None) -> list:
    """The first `limit` records (all when None), reading no further (streaming-safe)."""
    return list(itertools.islice(records, limit))
