"""Streamed training sources: each source as a `datasets.IterableDataset` of raw records, and
a raw record's conversation rows (see `streaming.py` for how training reads them).

Raw records share one schema (`raw_features`), so `interleave_datasets` can mix any sources:
`.jsonl` lines (undecoded: a bad line is a bad row of its own, named `file:line`), `.parquet`
rows (`file[index]`), WebDataset `.tar` samples (`shard.tar:key`) and `dataset:` rows streamed
by `load_dataset` (`name[index]`); one shard per file.

In a shard, the files of one sample share a key: `000042.json` holds a row in any row format
(`formats.py`) and its images are the sample's own files (`000042.jpg`, `000042.1.png`, ...),
named in the row by extension (`"jpg"`, `"1.png"`) or by file name (`"000042.1.png"`); a row
that names no image gets all of its sample's images, in extension order; any other name is a
path under `image_root` as usual. Records are rendered by the source's renderer
(`loading.make_renderer`: the `render(row_id, record)` of a prepared source).
"""

from __future__ import annotations

import copy
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

from peftvlm.data.prepare.loading import make_renderer
from peftvlm.data.read.readers import SourceData, parquet_row_id
from peftvlm.data.rows import BadRow, with_system_prompt
from peftvlm.errors import DataError

PEEK = 100            # records looked at to detect a source's row format
IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
FILE_KINDS = {".jsonl": "jsonl", ".parquet": "parquet", ".tar": "tar", ".tgz": "tar"}


# --- raw records: one IterableDataset per source ------------------------------------------------

def file_kind(path: str) -> str:
    for suffix, kind in FILE_KINDS.items():
        if path.endswith((suffix, suffix + ".gz")):
            return kind
    raise DataError(f"data file {path}: a stream reads .jsonl, .parquet or WebDataset .tar "
                    "files", hint="convert it (e.g. a .json list to .jsonl), or read it whole "
                                  "(streaming: false)")


def expand_files(pattern: str, base_dir: Path) -> list[str]:
    """The files a source's `path` names (a glob, local or any fsspec URL), sorted."""
    import fsspec

    url = pattern if "://" in pattern else str((base_dir / pattern).resolve())
    files = sorted(f.path if "://" not in url else f.full_name for f in fsspec.open_files(url))
    if not files:
        raise DataError(f"data source {pattern}: no file matches (looked in {base_dir})",
                        hint="paths and globs are relative to the recipe file")
    return files


def raw_features():
    """The raw records' schema, the same for every source (so `interleave_datasets` can mix
    them): `data` holds a row as JSON bytes, `files` a shard sample's files / a row's bytes."""
    from datasets import Features, List, Value

    return Features({"row_id": Value("string"), "source": Value("int32"),
                     "data": Value("binary"),
                     "files": List({"name": Value("string"), "bytes": Value("binary")})})


FILE_REF = "__peftvlm_file__"  # stands for `files[i]` in a packed row's JSON


def pack_row(row_id: str, source: int, row: dict) -> dict:
    """A Parquet / `datasets` row as a raw record: JSON, with its bytes values (encoded images)
    moved to `files` (JSON cannot hold them)."""
    files = []

    def strip(value):
        if isinstance(value, (bytes, bytearray)):
            files.append({"name": str(len(files)), "bytes": bytes(value)})
            return {FILE_REF: len(files) - 1}
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items()}
        return [strip(v) for v in value] if isinstance(value, (list, tuple)) else value

    data = json.dumps(strip(row), ensure_ascii=False, default=str).encode()
    return {"row_id": row_id, "source": source, "data": data, "files": files}


def unpack_row(value, files: list[dict]):
    """`pack_row` undone: file references back to their bytes."""
    if isinstance(value, dict):
        if set(value) == {FILE_REF}:
            return files[value[FILE_REF]]["bytes"]
        return {k: unpack_row(v, files) for k, v in value.items()}
    return [unpack_row(v, files) for v in value] if isinstance(value, list) else value


def jsonl_records(paths: list[str], source: int):
    """Lines of JSONL files, undecoded: a line that is not UTF-8 or not JSON is a bad row of its
    own, named when rendered (the `json` builder would fail the whole block, and keeps no line
    numbers)."""
    import fsspec

    for path in paths:
        name = Path(path).name
        with fsspec.open(path, "rb", compression="infer") as f:
            for n, raw in enumerate(f, start=1):
                if raw.strip():
                    yield {"row_id": f"{name}:{n}", "source": source, "data": raw, "files": []}


def parquet_records(paths: list[str], source: int):
    """Rows of Parquet files, one record batch at a time, named `file:row N` as prepared
    sources are (`readers.parquet_row_id`)."""
    import fsspec
    import pyarrow.parquet as pq

    for path in paths:
        index = 0
        with fsspec.open(path, "rb") as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=256):
                for row in batch.to_pylist():
                    yield pack_row(parquet_row_id(Path(path), index), source, row)
                    index += 1


def tar_records(paths: list[str], source: int):
    """Samples of WebDataset tar shards: consecutive files sharing a key (`000042.json`,
    `000042.jpg`), the `.json` file's bytes as `data` and the others as `files` (named by
    extension), named `shard.tar:key`.

    Read with `tarfile` rather than `datasets`' webdataset builder: the builder decodes each
    `.json` inside its generator, so one malformed file ends the whole stream, and casts every
    sample to the Arrow schema of the first five, so a row whose `content` is a list where
    those had strings is silently trained on as the list's Python text."""
    import fsspec

    for path in paths:
        name = Path(path).name
        with fsspec.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            key, files = None, {}
            for member in tar:
                if not member.isfile():
                    continue
                folder, _, base = member.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                sample = f"{folder}/{stem}" if folder else stem
                if sample != key and files:
                    yield tar_sample(f"{name}:{key}", source, files)
                    files = {}
                key = sample
                if dot:
                    files[ext.lower()] = tar.extractfile(member).read()
            if files:
                yield tar_sample(f"{name}:{key}", source, files)


def tar_sample(row_id: str, source: int, files: dict) -> dict:
    data = files.pop("json", None)
    return {"row_id": row_id, "source": source, "data": data,
            "files": [{"name": ext, "bytes": files[ext]} for ext in sorted(files)]}


def hub_stream(src, base_dir: Path, source: int):
    """A `dataset:` source streamed with `load_dataset` (a Hub id, or a folder of data files),
    images kept encoded, each row packed as a raw record named `name[split][index]` as prepared
    sources are (`readers.dataset_records`)."""
    import datasets

    name = src.dataset or src.path
    local = (base_dir / name).resolve()
    if "[" in src.split:
        raise DataError(f"data source {name}: a stream reads whole splits; use max_samples "
                        f"instead of slicing ({src.split!r})")
    try:
        stream = datasets.load_dataset(str(local) if local.is_dir() else name, split=src.split,
                                       streaming=True)
    except Exception as exc:  # datasets raises many types (network, missing config...)
        raise DataError(f"data source {name}: cannot stream dataset: "
                        f"{str(exc).splitlines()[0]}", hint="give a Hub id (needs network) or "
                        "a folder of data files, relative to the recipe") from exc
    for column, feature in (stream.features or {}).items():
        if isinstance(feature, datasets.Image) and feature.decode:
            stream = stream.cast_column(column, datasets.Image(decode=False))
    label = name.rstrip("/").split("/")[-1]
    return stream.map(lambda row, i: pack_row(f"{label}[{src.split}][{i}]", source, row),
                      with_indices=True,
                      remove_columns=list(stream.features or []) or None,
                      features=raw_features())


def open_stream(src, base_dir: Path, source: int):
    """One training source as a `datasets.IterableDataset` of raw records (`raw_features`;
    one shard per file), cut at `max_samples`."""
    from datasets import IterableDataset

    if src.dataset:
        stream = hub_stream(src, base_dir, source)
    else:
        files = expand_files(src.path, base_dir)
        kinds = {file_kind(f) for f in files}
        if len(kinds) > 1:
            raise DataError(f"data source {src.path}: its files mix {', '.join(sorted(kinds))}",
                            hint="one kind of file per source; give each kind its own source")
        reader = {"jsonl": jsonl_records, "parquet": parquet_records,
                  "tar": tar_records}[kinds.pop()]
        stream = IterableDataset.from_generator(reader, features=raw_features(),
                                                gen_kwargs={"paths": files, "source": source})
    return stream.take(src.max_samples) if src.max_samples else stream


# --- one record -> rows --------------------------------------------------------------------------

def parse_json(raw: bytes):
    """A JSON document's bytes -> its value, or `BadRow` naming what is wrong."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BadRow("bad_encoding", f"byte {raw[exc.start]:#04x} at column {exc.start + 1} "
                                     "is not UTF-8") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadRow("invalid_json", exc.msg) from None


def sample_images(row_id: str, files: list[dict]) -> dict:
    """A shard sample's image bytes, by the names a row may use: extension and file name."""
    key = row_id.rpartition(":")[2].rpartition("/")[2]
    images = {}
    for file in files:
        ext = file["name"]
        if ext.rpartition(".")[2] in IMAGE_SUFFIXES:
            images[ext] = images[f"{key}.{ext}"] = file["bytes"]
    return images


def content_items(record: dict) -> list[dict]:
    """The content items of a `messages` row (where OpenAI / HF rows carry their images)."""
    turns = record.get("messages")
    if not isinstance(turns, list):
        return []
    return [item for turn in turns if isinstance(turn, dict) and isinstance(turn.get("content"),
                                                                           list)
            for item in turn["content"] if isinstance(item, dict)]


def with_sample_images(record, files: list[dict], row_id: str, image_column: str | None):
    """The row with its sample's image names replaced by their bytes (module docstring);
    `image_column`: a template's image column, instead of the row formats' image fields."""
    images = sample_images(row_id, files)
    if not images or not isinstance(record, dict):
        return record

    def swap(value):
        if isinstance(value, str) and value in images:
            return images[value]
        return [swap(v) for v in value] if isinstance(value, list) else value

    own = [images[f["name"]] for f in files if f["name"] in images]  # in extension order
    record = copy.deepcopy(record)
    if image_column is not None:  # a template takes one image
        record[image_column] = own[0] if record.get(image_column) is None else \
            swap(record[image_column])
        return record
    named = False
    for holder, key in [(record, "images"), (record, "image")] + [
            (item, k) for item in content_items(record) for k in ("image", "url", "path")]:
        if key in holder:
            holder[key], named = swap(holder[key]), True
    for item in content_items(record):
        if isinstance(item.get("image_url"), dict):
            item["image_url"]["url"], named = swap(item["image_url"].get("url")), True
        elif "image_url" in item:
            item["image_url"], named = swap(item["image_url"]), True
    if not named:  # WebDataset sets mostly pair one row with its sample's images
        record["images"] = own
    return record


@dataclass
class StreamSource:
    """One training source as the stream reads it: how its raw records decode and render."""

    name: str
    kind: str       # jsonl, parquet, tar, dataset
    renderer: object  # loading.MessagesRenderer or templates.TemplateRenderer

    def record(self, example: dict):
        """A raw record's row (a template's columns, or a row in a row format), or `BadRow`."""
        files = example["files"]
        if self.kind != "tar":
            return unpack_row(parse_json(example["data"]), files)
        if example["data"] is None:
            raise BadRow("no_json", "the sample has no .json file (it has "
                                    f"{', '.join(f['name'] for f in files) or 'no files'})")
        image_column = getattr(self.renderer, "columns", {}).get("image")
        return with_sample_images(parse_json(example["data"]), files, example["row_id"],
                                  image_column)

    def rows(self, example: dict, system_prompt: str | None) -> list[dict]:
        """The conversation rows of one raw record (a template may make several)."""
        piece = self.renderer.render(example["row_id"], self.record(example))
        return with_system_prompt(self.renderer.conversations([piece]), system_prompt)

    def detect(self, stream) -> None:
        """Pick the row format from the source's first records (when not forced)."""
        if not hasattr(self.renderer, "detect"):
            return
        import itertools

        records = []
        for example in itertools.islice(stream, PEEK):
            try:
                records.append((example["row_id"], self.record(example)))
            except BadRow as bad:
                records.append((example["row_id"], bad))
        self.renderer.detect(records, self.name)


def stream_source(src, stream, index: int, data_cfg, base_dir: Path, box_format: str):
    """The `StreamSource` of a recipe source (its renderer from `loading.make_renderer`)."""
    name = src.dataset or src.path
    if src.image_root:
        root = (base_dir / src.image_root).resolve()
    elif src.dataset:
        local = (base_dir / src.dataset).resolve()
        root = local if local.is_dir() else base_dir
    else:
        root = (base_dir / src.path).resolve().parent
    renderer = make_renderer(src, SourceData(name, (), root), data_cfg, box_format, base_dir)
    if getattr(renderer, "options", {}).get("group_by_image"):
        raise DataError(f"data.train[{index}] ({name}): the template's group_by_image gathers "
                        "the rows of each image across the whole source, which a stream "
                        "never holds", hint="set template_options: {group_by_image: false}, "
                                            "or read the source whole (streaming: false)")
    source = StreamSource(name, "dataset" if src.dataset else file_kind(name), renderer)
    source.detect(stream)
    return source
