"""Cold preparation of a large source: records rendered straight into an Arrow table, in shards.

`datasets.Dataset.map` runs `ShardRenderer` over a table of shard numbers (shards: contiguous
runs of records that a reader can start in the middle of, see `readers.SourceData.split`) in
`num_proc` processes. Each process reads its own shards, renders and checks each record, counts
the rows' tokens when a collator is given (`lengths.BatchCounter`, on the rows just rendered:
no second pass over the table) and hands back a shard's entries as columns, which `map` writes
to disk as it goes: no process holds the source or all its rows in Python. `map` splits the
shard table between processes in order and keeps that order, so rows come out exactly as one
process rendering record by record would make them.

A bad record is kept in the built table as an entry of its own (`bad`, `detail`): the bad-row
report (counts by reason, first row ids of each) is then read from the table in source order,
the same for any number of processes. The rows the trainer gets are the table's good entries,
written to their own file (`split_entries`).
"""

from __future__ import annotations

import itertools
from pathlib import Path

from peftvlm.data.prepare import table
from peftvlm.data.prepare.lengths import BatchCounter
from peftvlm.data.prepare.table import arrow_row, arrow_schema
from peftvlm.data.rows import BadRow, BadRowReport, with_system_prompt

ROW_COLUMNS = ("row_id", "row", "images")
ENTRY_COLUMNS = (*ROW_COLUMNS, "bad", "detail", "records")


def entry_features(with_length: bool):
    """The built table's columns: the rows' own, bad-row reason/detail, a record tally and,
    when counted, the token length."""
    import datasets
    import pyarrow as pa

    schema = arrow_schema()
    extra = [("bad", pa.string()), ("detail", pa.string()), ("records", pa.int8())]
    for name, kind in extra + ([("length", pa.int64())] if with_length else []):
        schema = schema.append(pa.field(name, kind))
    return datasets.Features.from_arrow_schema(schema)


def rendered_entries(records, renderer, system_prompt: str | None):
    """(entry, row) per row of each record, in order, or (entry, None) for a bad record.
    `records` is 1 on the first entry a record makes (a template may make several rows of one
    record), so its sum is the number of records read."""
    for row_id, record in records:
        try:
            piece = renderer.render(row_id, record)
        except BadRow as bad:
            yield {"row_id": row_id, "row": None, "images": [], "bad": bad.reason,
                   "detail": bad.detail, "records": 1}, None
            continue
        rows = with_system_prompt(renderer.conversations([piece]), system_prompt)
        if not rows:  # no conversation from this record: still counted as read
            yield {"row_id": row_id, "row": None, "images": [], "bad": None, "detail": None,
                   "records": 1}, None
        for i, row in enumerate(rows):
            yield {**arrow_row(row), "bad": None, "detail": None, "records": int(i == 0)}, row


class ShardRenderer:
    """`Dataset.map` function over the shard numbers: every entry of those shards, as columns
    (picklable: each process gets the shard list, the renderer and the collator once)."""

    def __init__(self, shards: list, renderer, system_prompt: str | None, collator=None):
        self.shards, self.renderer, self.system_prompt = shards, renderer, system_prompt
        self.counter = BatchCounter(collator) if collator is not None else None

    def __call__(self, batch: dict) -> dict:
        records = itertools.chain.from_iterable(self.shards[i] for i in batch["shard"])
        columns = {name: [] for name in ENTRY_COLUMNS}
        rows, where = [], []
        for entry, row in rendered_entries(records, self.renderer, self.system_prompt):
            if row is not None:
                rows.append(row)
                where.append(len(columns["row_id"]))
            for name in ENTRY_COLUMNS:
                columns[name].append(entry[name])
        if self.counter is not None:
            columns["length"] = [0] * len(columns["row_id"])
            for i, n in zip(where, self.counter.rows(rows) if rows else []):
                columns["length"][i] = n
        return columns


def build_entries(shards: list, renderer, system_prompt: str | None, num_proc: int | None,
                  workdir: Path, collator=None):
    """The built table: a `datasets.Dataset` in Arrow files under `workdir` (also when the
    rows end up in memory: only the good rows are read back)."""
    import datasets

    index = datasets.Dataset.from_dict({"shard": list(range(len(shards)))})
    procs = num_proc if num_proc and num_proc > 1 and len(shards) > 1 else None
    return index.map(
        ShardRenderer(shards, renderer, system_prompt, collator), batched=True, batch_size=1,
        num_proc=procs, remove_columns=["shard"], features=entry_features(collator is not None),
        load_from_cache_file=False, new_fingerprint=workdir.name,
        cache_file_name=str(workdir / "entries.arrow"),
        desc="preparing rows" if len(shards) > 10 else None)


def split_entries(built, rows_path: Path, lengths_path: Path | None) -> tuple[BadRowReport, int]:
    """Write the good entries' rows (and lengths) to their own Arrow files; return the bad-row
    report (read in source order: the same as one process rendering record by record) and the
    number of records. One pass over the built table, batch by batch and not memory-mapped,
    so this process never holds (or maps) the whole table."""
    from contextlib import nullcontext

    import pyarrow.compute as pc

    report, records = BadRowReport(), 0
    row_features = entry_features(False).copy()
    for name in ("bad", "detail", "records"):
        del row_features[name]
    with table.writing(rows_path, row_features) as rows, \
            (table.writing(lengths_path, length_features()) if lengths_path else
             nullcontext()) as lengths:
        for batch in entry_batches(built):
            records += int(pc.sum(batch.column("records")).as_py() or 0)
            add_bad_rows(report, batch)
            kept = pa_table(batch.filter(pc.is_valid(batch.column("row"))))
            rows.write_table(kept.select(list(ROW_COLUMNS)))
            if lengths is not None:
                lengths.write_table(kept.select(["length"]))
    return report, records


def length_features():
    import datasets

    return datasets.Features({"length": datasets.Value("int64")})


def add_bad_rows(report: BadRowReport, batch) -> None:
    import pyarrow.compute as pc

    bad = pc.indices_nonzero(pc.is_valid(batch.column("bad")))
    if len(bad):
        for e in batch.take(bad).select(["row_id", "bad", "detail"]).to_pylist():
            report.add(e["bad"], e["row_id"], e["detail"])


def entry_batches(built):
    """The built table's record batches in order, read from its files without memory-mapping
    them."""
    import pyarrow as pa

    for name in [f["filename"] for f in built.cache_files]:
        with pa.OSFile(name) as source:
            yield from pa.ipc.open_stream(source)


def pa_table(batch):
    import pyarrow as pa

    return pa.Table.from_batches([batch])
