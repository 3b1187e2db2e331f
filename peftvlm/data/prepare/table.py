"""Rendered rows as a `datasets` Arrow table: compact, memory-mapped when cached, decoded lazily.

Columns: `row_id` (the source's `file:line`, what bad-row and overflow reports name), `row`
(the conversation as JSON text, images left out), `images` (a list of `{"bytes", "path"}`
structs: paths stay paths and encoded images stay bytes until the collator decodes them) and,
once counted, `length` (tokens per row as the trainer sees them, image tokens included).

A cached source's rows are one Arrow file, `<cache>/prepared/<fingerprint>/rows.arrow`, written
by `datasets`' ArrowWriter and memory-mapped back with `Dataset.from_file` (Arrow IPC + JSON
metadata: nothing in a cache folder is executed, which is why this replaced pickle files).
`Rows` is the list-like view the rest of peftvlm reads: `rows[i]` decodes one row, `len(rows)`
reads no row, `rows.dataset` is what the trainer gets.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path


def arrow_schema():
    import pyarrow as pa

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    return pa.schema([("row_id", pa.string()), ("row", pa.string()),
                      ("images", pa.list_(image))])


def image_struct(image) -> dict:
    """A checked image (path, `{"bytes"}` dict or PIL image) as the Arrow `{"bytes", "path"}`
    struct: paths stay paths, PIL images are PNG-encoded."""
    if isinstance(image, str):
        return {"bytes": None, "path": image}
    if isinstance(image, dict):
        return {"bytes": image.get("bytes"), "path": image.get("path")}
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def arrow_row(row: dict) -> dict:
    """One rendered row as the table holds it: its id, its fields as JSON, images as structs."""
    return {"row_id": str(row.get("row_id", "")),
            "row": json.dumps({k: v for k, v in row.items() if k != "images"},
                              ensure_ascii=False),
            "images": [image_struct(i) for i in row["images"]]}


def to_arrow(rows: list[dict]):
    """Rendered rows -> a pyarrow table (the row's fields as JSON, images as structs)."""
    import pyarrow as pa

    entries = [arrow_row(row) for row in rows]
    return pa.table([[e[name] for e in entries] for name in ("row_id", "row", "images")],
                    schema=arrow_schema())


def decode_image(image: dict):
    """Paths come back as strings; encoded images as `{"bytes": ...}` (see collate.open_image)."""
    if image["bytes"] is None:
        return image["path"]
    return {"bytes": image["bytes"], "path": image["path"]}


def decode_batch(batch: dict) -> dict:
    """`datasets` transform: the JSON rows of a batch back into conversation dicts (other
    columns such as `length` pass through)."""
    if "row" not in batch:
        return batch
    rows = [json.loads(text) for text in batch["row"]]
    out = {key: [r.get(key) for r in rows] for key in {k for r in rows for k in r}}
    if "images" in batch:
        out["images"] = [[decode_image(i) for i in images] for images in batch["images"]]
    for key, values in batch.items():
        if key not in ("row", "images", "row_id"):
            out[key] = values
    return out


def decode_row(record: dict) -> dict:
    row = json.loads(record["row"])
    row["images"] = [decode_image(i) for i in record["images"]]
    return row


class Rows(Sequence):
    """A list-like view of rendered rows in an Arrow table (`datasets.Dataset`)."""

    def __init__(self, table):
        self.table = table

    @classmethod
    def from_rows(cls, rows: list[dict]) -> "Rows":
        import datasets

        return cls(datasets.Dataset(to_arrow(rows)))

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return decode_row(self.table[int(index)])

    def __iter__(self):
        for start in range(0, len(self), 1000):  # one Arrow read per 1,000 rows
            batch = self.table[start:start + 1000]
            for text, images in zip(batch["row"], batch["images"]):
                yield decode_row({"row": text, "images": images})

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    @property
    def row_ids(self) -> list[str]:
        return self.column("row_id").to_pylist()

    def column(self, name: str):
        """One column as a pyarrow array, in row order (one read, not one per row)."""
        import pyarrow as pa

        if not len(self):
            return pa.array([])
        return self.table.select_columns([name]).with_format("arrow")[0:len(self)][name]

    def lengths(self):
        """Token lengths (NumPy int array) from the `length` column."""
        import numpy as np

        if "length" not in self.table.column_names:
            raise KeyError("token lengths have not been counted for these rows (see lengths.py)")
        return self.column("length").to_numpy(zero_copy_only=False).astype(np.int64)

    def select(self, indices) -> "Rows":
        return Rows(self.table.select(indices))

    @property
    def dataset(self):
        """What the trainer reads: the table with rows decoded on access."""
        return self.table.with_transform(decode_batch)


def concat(parts: list[Rows]) -> Rows:
    import datasets

    tables = [p.table for p in parts if len(p)]
    if not tables:
        return parts[0] if parts else Rows.from_rows([])
    return Rows(tables[0] if len(tables) == 1 else datasets.concatenate_datasets(tables))


def concat_columns(rows: Rows, other: Rows) -> Rows:
    """The columns of both, row by row (same number of rows)."""
    import datasets

    return Rows(datasets.concatenate_datasets([rows.table, other.table], axis=1))


ROWS_FILE = "rows.arrow"  # a cached source's rows, in its cache folder


@contextmanager
def writing(path: Path, features):
    """A `datasets` ArrowWriter on a temporary sibling of `path`, renamed to `path` once
    complete, so a reader never sees a torn file there."""
    import random

    from datasets.arrow_writer import ArrowWriter

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{random.getrandbits(32)}")
    writer = ArrowWriter(path=str(tmp), features=features)
    try:
        yield writer
        writer.finalize()
    finally:
        writer.close()
    tmp.replace(path)


def write(tables, path: Path, features) -> None:
    """Arrow tables (batches of rows) into one Arrow file (see `writing`)."""
    with writing(path, features) as writer:
        for part in tables:
            writer.write_table(part)


def save(rows: Rows, path: Path) -> None:
    """Write `rows` to the Arrow file `path` (see `write`)."""
    write(rows.table.with_format("arrow").iter(batch_size=1000), path, rows.table.features)


def load(path: Path, in_memory: bool = False) -> Rows | None:
    """Rows of an Arrow file, memory-mapped (or read into memory); None when absent or not
    ours (then rebuilt): a torn or planted file is never trusted."""
    import datasets

    if not path.is_file():
        return None
    try:
        table = datasets.Dataset.from_file(str(path), in_memory=in_memory)
    except Exception:  # pyarrow raises its own errors for a file that is not Arrow
        return None
    if set(table.column_names) < {"row_id", "row", "images"}:
        return None
    return Rows(table)


def note(message: str) -> None:
    """One line on stderr about the cache (rebuilt, skipped...): said, never raised."""
    import sys

    print(f"note: {message}", file=sys.stderr, flush=True)


def drop_if_torn(path: Path, rows: int, what: str) -> None:
    """Remove the Arrow file `path` when it does not read back as `rows` rows (a torn write,
    or a file left by an older table), saying so, so that it is rebuilt."""
    import datasets

    if not path.is_file():
        return
    try:
        found = datasets.Dataset.from_file(str(path)).num_rows
    except Exception:  # pyarrow raises its own errors for a file that is not Arrow
        found = None
    if found != rows:
        note(f"cached {what} {path.name} holds {found if found is not None else 'no readable'} "
             f"rows, not {rows}: counting again")
        path.unlink(missing_ok=True)


def load_column(path: Path) -> Rows:
    """An Arrow file of extra columns (e.g. `length`), read into memory."""
    import datasets

    return Rows(datasets.Dataset.from_file(str(path), in_memory=True))
