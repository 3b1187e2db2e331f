"""Cold preparation of a large source: records rendered straight into an Arrow table, in shards.

`datasets.Dataset.from_generator` runs `rendered_entries` over the source's shards (contiguous
runs of records that a reader can start in the middle of: see `readers.SourceData.split`) in
`num_proc` processes; each process reads its own shards, renders and checks each record and
writes Arrow batches to disk as it goes, so no process holds the source or its rows in Python.
Shards are split between processes in order and the table keeps that order, so rows come out
exactly as one process rendering record by record would make them.

A bad record is kept in the built table as an entry of its own (`bad`, `detail`): the bad-row
report (counts by reason, first row ids of each) is then read from the table in source order,
the same for any number of processes. The rows the trainer gets are the table's good entries
(`select_rows`).
"""

from __future__ import annotations

import itertools
from pathlib import Path

from peftvlm.data.sources import MAX_LISTED_ROWS, BadRow, BadRowReport
from peftvlm.data.table import Rows, arrow_row, arrow_schema
from peftvlm.errors import PeftVLMError

ROW_COLUMNS = ("row_id", "row", "images")


def entry_features():
    """The built table's columns: the rows' own, plus bad-row reason/detail and a record tally."""
    import datasets
    import pyarrow as pa

    schema = arrow_schema()
    for name, kind in (("bad", pa.string()), ("detail", pa.string()), ("records", pa.int8())):
        schema = schema.append(pa.field(name, kind))
    return datasets.Features.from_arrow_schema(schema)


def rendered_entries(shards: list, renderer, system_prompt: str | None):
    """`from_generator` function: each record's rows in order, or one entry for a bad record.
    `records` is 1 on the first entry a record makes (a template may make several rows of one
    record), so its sum is the number of records read."""
    from peftvlm.data.loading import with_system_prompt

    for row_id, record in itertools.chain.from_iterable(shards):
        try:
            piece = renderer.render(row_id, record)
        except BadRow as bad:
            yield {"row_id": row_id, "row": None, "images": [], "bad": bad.reason,
                   "detail": bad.detail, "records": 1}
            continue
        rows = with_system_prompt(renderer.conversations([piece]), system_prompt)
        if not rows:  # no conversation from this record: still counted as read
            yield {"row_id": row_id, "row": None, "images": [], "bad": None, "detail": None,
                   "records": 1}
        for i, row in enumerate(rows):
            yield {**arrow_row(row), "bad": None, "detail": None, "records": int(i == 0)}


def build_entries(shards: list, renderer, system_prompt: str | None, num_proc: int | None,
                  workdir: Path, in_memory: bool):
    """The built table (a `datasets.Dataset` under `workdir`, or in memory)."""
    import datasets
    from datasets.exceptions import DatasetGenerationError
    from datasets.utils import disable_progress_bars, enable_progress_bars

    procs = num_proc if num_proc and num_proc > 1 and len(shards) > 1 else None
    disable_progress_bars()  # one bar per process would only clutter the log
    try:
        return datasets.Dataset.from_generator(
            rendered_entries, features=entry_features(), cache_dir=str(workdir),
            keep_in_memory=in_memory, num_proc=procs, fingerprint=workdir.name,
            gen_kwargs={"shards": shards, "renderer": renderer, "system_prompt": system_prompt})
    except DatasetGenerationError as exc:
        raise user_error(exc) from exc
    finally:
        enable_progress_bars()


def user_error(exc: Exception) -> Exception:
    """Our own error (a reader's, naming the file) when it caused the generation error."""
    cause = exc
    while cause is not None and not isinstance(cause, PeftVLMError):
        cause = cause.__cause__ or cause.__context__
    return cause or exc


def bad_row_report(built) -> BadRowReport:
    """Counts by reason (in order of first appearance) and the first row ids of each, read
    from the table's `bad` column: the same report one process rendering in order makes."""
    import pyarrow.compute as pc

    table = built.data.table
    bad = table.column("bad")
    report = BadRowReport()
    if bad.null_count == len(bad):
        return report
    counts = pc.value_counts(bad.drop_null()).to_pylist()
    firsts = {}
    for item in counts:
        reason = item["values"]
        where = pc.indices_nonzero(pc.fill_null(pc.equal(bad, reason), False))
        firsts[reason] = where[:MAX_LISTED_ROWS].to_pylist()
    for item in sorted(counts, key=lambda c: firsts[c["values"]][0]):
        reason = item["values"]
        report.counts[reason] = item["counts"]
        picked = table.take(firsts[reason]).select(["row_id", "detail"]).to_pylist()
        report.examples[reason] = [f"{e['row_id']} ({e['detail']})" for e in picked]
    return report


def select_rows(built, in_memory: bool) -> Rows:
    """The good entries with the rows' own columns (bad and tally entries left out); in
    memory, the selection is copied out (saving to disk copies it anyway)."""
    import pyarrow.compute as pc

    rows = built.select_columns(list(ROW_COLUMNS))
    valid = pc.is_valid(built.data.table.column("row"))
    if pc.all(valid).as_py() in (True, None):  # None: no entries at all
        return Rows(rows)
    rows = rows.select(pc.indices_nonzero(valid))
    return Rows(rows.flatten_indices(keep_in_memory=True) if in_memory else rows)


def record_count(built) -> int:
    import pyarrow.compute as pc

    return int(pc.sum(built.data.column("records")).as_py() or 0)
