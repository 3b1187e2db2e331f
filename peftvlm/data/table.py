"""Rendered rows as a `datasets` Arrow table: compact, memory-mapped when cached, decoded lazily.

Columns: `row_id` (the source's `file:line`, what bad-row and overflow reports name), `row`
(the conversation as JSON text, images left out), `images` (a list of `{"bytes", "path"}`
structs: paths stay paths and encoded images stay bytes until the collator decodes them) and,
once counted, `length` (tokens per row as the trainer sees them, image tokens included).

A cached source is a `save_to_disk` folder under `<cache>/prepared/<fingerprint>/`; reading it
back is `load_from_disk` (Arrow IPC + JSON metadata: nothing in a cache folder is executed, which
is why this replaced pickle files). `Rows` is the list-like view the rest of peftvlm reads:
`rows[i]` decodes one row, `len(rows)` reads no row, `rows.dataset` is what the trainer gets.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

def arrow_schema():
    import pyarrow as pa

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    return pa.schema([("row_id", pa.string()), ("row", pa.string()),
                      ("images", pa.list_(image))])


def image_struct(image) -> dict:
    """A checked image (path, `{"bytes"}` dict or PIL image) as the Arrow struct."""
    from peftvlm.data.loading import encoded_image

    return encoded_image(image)


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
        return self.column("length").to_numpy().astype(np.int64)

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


def save(rows: Rows, folder: Path) -> None:
    """Write `rows` to `folder` atomically (a temporary sibling, then a rename)."""
    import random
    import shutil

    from datasets.utils import disable_progress_bars, enable_progress_bars

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f"{folder.name}.tmp{random.getrandbits(32)}")
    disable_progress_bars()  # a save takes a moment; its bar would only clutter the log
    try:
        rows.table.save_to_disk(str(tmp))
    finally:
        enable_progress_bars()
    if folder.exists() and load(folder) is None:  # torn or planted: replace, never reuse
        shutil.rmtree(folder)
    try:
        tmp.rename(folder)
    except OSError:  # another process finished first: its copy is the same rows
        shutil.rmtree(tmp, ignore_errors=True)


def load(folder: Path) -> Rows | None:
    """Memory-mapped rows of a cache folder; None when absent or unreadable (then rebuilt)."""
    import datasets

    if not (folder / "state.json").is_file():
        return None
    try:
        table = datasets.load_from_disk(str(folder))
    except Exception:  # a torn or foreign folder: treat as a cache miss, never trust it
        return None
    if not isinstance(table, datasets.Dataset) or set(table.column_names) < {"row_id", "row",
                                                                               "images"}:
        return None
    return Rows(table)
