"""Training rows read as a stream, for data that does not fit in memory or on disk at once.

With `streaming: true` on a training source (or `data.streaming: true` for all of them),
training reads its rows as it goes: nothing is prepared, cached or counted before the first
step, and memory stays bounded whatever the data's size. The flow, one rank's view:

  sources -> one `datasets.IterableDataset` of raw records each (`open_stream`; one shard per
  file) -> mixed by `weight` (`interleave_datasets` with probabilities) or read one after the
  other -> this rank's part (`split_dataset_by_node`) -> `StreamingRows`: each record decoded and
  rendered by the source's renderer (`loading.make_renderer`: the same `render(row_id, record)`
  as a prepared source), checked for the model's family, its tokens counted; bad and over-long
  rows are counted by reason and named (`file:line`, `shard.tar:key`), never raised unless
  `data.on_bad_row` / `data.on_overflow` say `error` -> the trainer's collator.

Sources (`.jsonl`, `.parquet`, WebDataset `.tar` shards, `dataset:`) and how a record becomes
rows, images in shards included: `stream/sources.py`. User docs: docs/streaming.md.

A stream has no length: `train.max_steps` says how long to train, and a stream that ends first
starts again (the next pass, `datasets`' epoch, in a reshuffled shard order). What needs every
row before training (length grouping, bin packing, a template's `group_by_image`) is refused.

Resume: each checkpoint holds `peftvlm-stream.json`, every rank's position after the last batch
that step trained on (`datasets`' `state_dict()` plus the rows of the current record already
used, and the bad-row counts so far). `--resume` loads it, so training continues at the next
row, not at the shard's start, and the trainer does not replay batches (`ignore_data_skip`);
the trainer restores the checkpoint's RNG states, and the data loader draws nothing from them,
so a resumed run (dropout on) trains exactly as an uninterrupted one.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch.utils.data
from transformers import TrainerCallback

from peftvlm.data.boxes import box_format_for
from peftvlm.data.prepare.lengths import LengthCounter, collator_lengths
from peftvlm.data.prepare.loading import drop_unfit_rows, load_section, recipe_sources
from peftvlm.data.read.formats import media_token_detail, token_in_text
from peftvlm.data.read.video import check_video_support
from peftvlm.data.rows import BadRow, BadRowReport, enforce_policy
from peftvlm.data.stream.sources import StreamSource, open_stream, stream_source
from peftvlm.errors import DataError, RunError
from peftvlm.recipe.checks import check_streaming

STATE_FILE = "peftvlm-stream.json"
CHUNK = 32            # records rendered and token-counted together (one batched tokenizer call)


# --- the training rows ---------------------------------------------------------------------------

POSITION = "_stream_position"  # the key a streamed row carries its position under (collator drops it)


@dataclass
class Position:
    """Where one rank's stream stands after a row: resuming there yields the row after it."""

    epoch: int = 0                 # the pass over the stream (datasets' epoch)
    state: dict | None = None      # datasets' state_dict() before the row's record (None: start)
    skip: int = 0                  # rows of that record already used
    records: int = 0               # records read so far
    rows: int = 0                  # rows yielded so far
    counts: dict = field(default_factory=dict)  # bad_rows / dropped_overflow so far

    def as_dict(self) -> dict:
        return {"epoch": self.epoch, "state": self.state, "skip": self.skip,
                "records": self.records, "rows": self.rows, "counts": self.counts}


class StreamCounts:
    """Bad and over-long rows met so far; `snapshot()` is shared by rows until a count changes."""

    def __init__(self, max_length: int, snapshot: dict | None = None):
        self.bad, self.max_length = BadRowReport(), max_length
        self.overflow = {"count": 0, "max_length": max_length, "longest": 0, "first_rows": []}
        self._snapshot = None
        if snapshot:
            for reason, entry in snapshot["bad_rows"].items():
                self.bad.counts[reason] = entry["count"]
                self.bad.examples[reason] = list(entry["first_rows"])
            self.overflow = copy.deepcopy(snapshot["dropped_overflow"])

    def snapshot(self) -> dict:
        if self._snapshot is None:
            self._snapshot = {"bad_rows": copy.deepcopy(self.bad.as_dict()),
                              "dropped_overflow": copy.deepcopy(self.overflow)}
        return self._snapshot

    def add_bad(self, row_id: str, bad: BadRow) -> None:
        self.bad.add(bad.reason, row_id, bad.detail)
        self._snapshot = None

    def add_length(self, row_id: str, length: int) -> bool:
        """Count a row's length; False when it is over max_length (then counted as dropped)."""
        if length > self.overflow["longest"]:
            self.overflow["longest"], self._snapshot = length, None
        if length <= self.max_length:
            return True
        self.overflow["count"] += 1
        if len(self.overflow["first_rows"]) < 5:
            self.overflow["first_rows"].append(f"{row_id} ({length} tokens)")
        self._snapshot = None
        return False


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of training processes, as torchrun / accelerate launch
    announce them (RANK, WORLD_SIZE). Read from the launcher because the data loads before the
    trainer sets accelerate up: until then, on CPU, accelerate's `PartialState` reports one
    process."""
    import os

    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def combine(streams: list, sources, seed: int):
    """Several sources as one stream: mixed by weight when any source sets one (each row comes
    from source i with probability w_i / sum(w), until every source has been read once), else
    read one after the other."""
    import datasets

    if len(streams) == 1:
        return streams[0]
    if any("weight" in s.model_fields_set for s in sources):
        total = sum(s.weight for s in sources)
        return datasets.interleave_datasets(streams, [s.weight / total for s in sources],
                                            seed=seed, stopping_strategy="all_exhausted")
    return datasets.concatenate_datasets(streams)


class StreamingRows(torch.utils.data.IterableDataset):
    """One rank's training rows, read, rendered, checked and token-counted as training asks for
    them. It never ends: each pass over the stream is followed by the next, until
    `train.max_steps`."""

    def __init__(self, stream, sources: list[StreamSource], collator, data_cfg, max_length: int,
                 what: str = "data.train"):
        super().__init__()
        self.stream, self.sources, self.collator = stream, sources, collator
        self.family, self.what = collator.family, what
        self.system_prompt = data_cfg.system_prompt
        self.on_bad_row, self.on_overflow = data_cfg.on_bad_row, data_cfg.on_overflow
        self.start = Position(counts=StreamCounts(max_length).snapshot())
        self.max_length = max_length
        self.batch_ends: list[Position] = []  # the position after each batch collated, in order
        self.forgotten = 0  # batch_ends dropped from the front (see forget_before)
        self.final: dict | None = None  # all ranks' counts once training has ended
        self._counter = None

    # reading
    def __iter__(self):
        start = self.start
        self.records, self.rows = start.records, start.rows
        self.counts = StreamCounts(self.max_length, start.counts)
        epoch, state, skip = start.epoch, start.state, start.skip
        while True:
            yielded = 0
            for row in self.one_pass(epoch, state, skip):
                yielded += 1
                yield row
            if not yielded and state is None:
                raise DataError(f"{self.what}: the stream has no usable rows ("
                                f"{self.counts.bad.describe() or 'every row is too long'})",
                                hint="fix those rows (or the images they name)")
            epoch, state, skip = epoch + 1, None, 0

    def one_pass(self, epoch: int, state: dict | None, skip: int):
        """Rows of one pass, from `state` on; the first record's first `skip` rows were used."""
        self.stream.set_epoch(epoch)
        if state is not None:
            self.stream.load_state_dict(state)
        chunk, before = [], state
        for example in self.stream:
            chunk.append((before, example))
            before = self.stream.state_dict()
            if len(chunk) == CHUNK:
                yield from self.chunk_rows(chunk, epoch, skip)
                chunk, skip = [], 0
        yield from self.chunk_rows(chunk, epoch, skip)

    def chunk_rows(self, chunk: list, epoch: int, skip: int):
        """Render a chunk of records, count their tokens in one call, then account for each row
        in stream order (so every row's position holds the counts up to it)."""
        counted = epoch == 0  # later passes meet the same bad rows again: counted once
        rendered = [(before, example, self.render(example)) for before, example in chunk]
        good = [r for _, _, rows in rendered for r in rows if not isinstance(r, BadRow)]
        lengths = iter(self.lengths(good))
        for i, (before, example, rows) in enumerate(rendered):
            used = skip if i == 0 else 0  # the record a resumed stream stopped in
            self.records += not used
            for k, row in enumerate(rows):
                length = None if isinstance(row, BadRow) else next(lengths)
                if k < used:
                    continue
                if isinstance(row, BadRow):
                    self.bad(example["row_id"], row, counted)
                elif self.fits(example["row_id"], length, counted):
                    self.rows += 1
                    yield {**row, POSITION: Position(epoch, before, k + 1, self.records,
                                                     self.rows, self.counts.snapshot())}

    def render(self, example: dict) -> list:
        """A record's rows, each checked for the model's family, or `[BadRow]`."""
        try:
            rows = self.sources[example["source"]].rows(example, self.system_prompt)
        except BadRow as bad:
            return [bad]
        return [self.unfit(row) or row for row in rows]

    def unfit(self, row: dict) -> BadRow | None:
        """Why the model's family cannot take a row (as `drop_unfit_rows` says), or None."""
        if row.get("videos") and not self.family.takes_video:
            return BadRow("video_not_supported", f"the {self.family.name} family takes no "
                                                 "video in peftvlm")
        typed = token_in_text(row["messages"], self.family.literal_media_tokens())
        if typed:  # as `loading.drop_media_token_rows` does for prepared sources
            return BadRow("media_token_in_text", media_token_detail(*typed, self.family.name))
        reason = self.family.row_problem(row["messages"])
        return BadRow(reason, reason.replace("_", " ")) if reason else None

    def lengths(self, rows: list[dict]) -> list[int]:
        """Token counts as the collator makes them (`lengths.LengthCounter`, kept: it remembers
        image sizes and per-size expansions)."""
        if not rows:
            return []
        if self.family.encode is not None:
            return collator_lengths(self.collator, rows)
        if self._counter is None:
            self._counter = LengthCounter(self.collator)
        return self._counter(rows)

    def bad(self, row_id: str, bad: BadRow, counted: bool = True) -> None:
        if not counted:
            return
        if self.on_bad_row == "error":
            raise DataError(f"{self.what}: bad row {row_id}: {bad.reason.replace('_', ' ')} "
                            f"({bad.detail})", hint="fix that row, or set data.on_bad_row: "
                                                    "skip to drop and count bad rows")
        self.counts.add_bad(row_id, bad)

    def fits(self, row_id: str, length: int, counted: bool = True) -> bool:
        """Whether a row is within max_length (a longer one is counted, or stops the run)."""
        if not counted:
            return length <= self.max_length
        if self.counts.add_length(row_id, length):
            return True
        if self.on_overflow == "drop":
            return False
        raise DataError(f"{self.what}: row {row_id} has {length} tokens, over train.max_length="
                        f"{self.max_length}", hint="raise train.max_length, shorten that row, "
                                                   "or set data.on_overflow: drop")

    # training
    def dataloader(self, batch_size: int, collator, device):
        """This rank's batches. accelerate's `prepare_data_loader` with one process: the rank's
        part is already split off (`split_dataset_by_node`), accelerate would split it again."""
        from accelerate.data_loader import prepare_data_loader
        from torch.utils.data import DataLoader

        # Its own generator: starting an iterator draws a seed, and from the global torch RNG
        # that draw would shift every dropout mask of a resumed run (the trainer restores the
        # checkpoint's RNG state before the iterator starts), so losses would differ from an
        # uninterrupted run's.
        loader = DataLoader(self, batch_size=batch_size, collate_fn=collator,
                            generator=torch.Generator())
        return prepare_data_loader(loader, device, num_processes=1, process_index=0,
                                   put_on_device=True, dispatch_batches=False)

    def position_after(self, batches: int) -> Position:
        """The position after this session's first `batches` batches."""
        return self.batch_ends[batches - 1 - self.forgotten] if batches else self.start

    def forget_before(self, batches: int) -> None:
        """Drop the positions before the `batches`-th (checkpointed: never asked for again)."""
        drop = batches - 1 - self.forgotten
        if drop > 0:
            del self.batch_ends[:drop]
            self.forgotten += drop

    def restore(self, checkpoint, log=print) -> None:
        """Continue from the position a checkpoint saved for this rank."""
        path = Path(checkpoint) / STATE_FILE
        if not path.is_file():
            raise RunError(f"{checkpoint} holds no stream position ({STATE_FILE}), so a "
                           "streamed run cannot continue where it stopped",
                           hint="start over with --overwrite")
        saved = json.loads(path.read_text())
        rank, world = rank_and_world()
        if saved["world_size"] != world:
            raise RunError(f"{checkpoint} was written by {saved['world_size']} training "
                           f"process(es), this run has {world}: each process's stream position "
                           "belongs to its own part of the data",
                           hint=f"resume with {saved['world_size']} process(es)")
        self.start = Position(**saved["ranks"][rank])
        if rank == 0:
            log(f"stream: resuming after row {self.start.rows} (record {self.start.records}, "
                f"pass {self.start.epoch + 1}) as saved in {Path(checkpoint).name}; the shard "
                "it stopped in is re-read up to there without rendering, no batch is replayed")

    def counts_after(self, batches: int) -> dict:
        """This rank's counts after its first `batches` batches of this session."""
        position = self.position_after(batches)
        return {"records": position.records, "rows": position.rows, **position.counts}


class StreamCollator:
    """The training collator, noting the stream position each batch ends at (for checkpoints)."""

    def __init__(self, collator, rows: StreamingRows):
        self.collator, self.rows = collator, rows

    def __getattr__(self, name):  # the wrapped collator's processor, family, ...
        if name in ("collator", "rows"):
            raise AttributeError(name)
        return getattr(self.collator, name)

    def __call__(self, batch: list[dict]) -> dict:
        self.rows.batch_ends.append(batch[-1][POSITION])
        return self.collator([{k: v for k, v in r.items() if k != POSITION} for r in batch])


# --- checkpoints and the run's report ----------------------------------------------------------

def all_ranks(value) -> list:
    """`value` of every rank, in rank order (a collective: every rank must call it)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) \
            or torch.distributed.get_world_size() == 1:
        return [value]
    from accelerate.utils import gather_object

    return gather_object([value])


def merged_counts(per_rank: list[dict]) -> dict:
    """Counts of all ranks as one report (the first rows named, per reason, rank 0's first)."""
    bad, overflow = BadRowReport(), {"count": 0, "max_length": None, "longest": 0,
                                     "first_rows": []}
    for counts in per_rank:
        part = StreamCounts(0, counts)
        bad.merge(part.bad)
        overflow["count"] += part.overflow["count"]
        overflow["max_length"] = part.overflow["max_length"]
        overflow["longest"] = max(overflow["longest"], part.overflow["longest"])
        overflow["first_rows"] = (overflow["first_rows"] + part.overflow["first_rows"])[:5]
    return {"records": sum(c["records"] for c in per_rank),
            "rows": sum(c["rows"] for c in per_rank), "processes": len(per_rank),
            "bad_rows": bad.as_dict(), "dropped_overflow": overflow}


class StreamCheckpoint(TrainerCallback):
    """Each checkpoint gets every rank's stream position after the last batch its step trained
    on (written before `MarkCheckpointComplete` lists the checkpoint's files), and the run ends
    with the stream's counts (summary.json and a log line)."""

    def __init__(self, rows: StreamingRows, log=print):
        self.rows, self.log, self.first_step = rows, log, 0

    def trained(self, args, state) -> int:
        """Batches trained on in this session: each optimizer step takes
        gradient_accumulation_steps of them (the data loader may have collated more already)."""
        return (state.global_step - self.first_step) * args.gradient_accumulation_steps

    def on_train_begin(self, args, state, control, **kwargs):
        self.first_step = state.global_step

    def on_save(self, args, state, control, **kwargs):
        positions = all_ranks(self.rows.position_after(self.trained(args, state)).as_dict())
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if args.should_save and folder.is_dir():
            from peftvlm.data.prepare.loading import write_atomic

            write_atomic(folder / STATE_FILE, json.dumps(
                {"world_size": len(positions), "ranks": positions}, default=plain).encode())
        self.rows.forget_before(self.trained(args, state))

    def on_train_end(self, args, state, control, **kwargs):
        counts = all_ranks(self.rows.counts_after(self.trained(args, state)))
        self.rows.final = merged_counts(counts)
        if state.is_world_process_zero:
            self.log(describe_counts(self.rows.final))


def plain(value):
    """JSON for the NumPy values a `datasets` state may hold."""
    return value.tolist() if hasattr(value, "tolist") else str(value)


def describe_counts(counts: dict) -> str:
    bad = sum(v["count"] for v in counts["bad_rows"].values())
    listed = "; ".join(f"{v['count']} {k.replace('_', ' ')} (e.g. {v['first_rows'][0]})"
                       for k, v in counts["bad_rows"].items())
    over = counts["dropped_overflow"]
    return (f"stream: {counts['rows']} rows trained on from {counts['records']} records read "
            f"({counts['processes']} process(es)); {bad} bad rows" + (f": {listed}" if bad else "")
            + f"; {over['count']} over train.max_length={over['max_length']}"
            + (f" (e.g. {over['first_rows'][0]})" if over["count"] else ""))


# --- from a recipe -----------------------------------------------------------------------------

def open_training_stream(recipe, collator, rank: int | None = None,
                         world: int | None = None) -> StreamingRows:
    """The recipe's training sources as this rank's `StreamingRows` (rank and world size from
    accelerate unless given)."""
    from datasets.distributed import split_dataset_by_node

    if rank is None:
        rank, world = rank_and_world()
    data_cfg, base = recipe.data, recipe.base_dir()
    train_sources = recipe_sources(recipe)[0]
    opened = [open_stream(src, base, i) for i, src in enumerate(train_sources)]
    box_format = box_format_for(collator.family, collator.processor)
    sources = [stream_source(src, stream, i, data_cfg, base, box_format)
               for i, (src, stream) in enumerate(zip(train_sources, opened))]
    stream = combine(opened, train_sources, data_cfg.seed)
    if world > 1:
        stream = split_dataset_by_node(stream, rank=rank, world_size=world)
    return StreamingRows(stream, sources, collator, data_cfg, recipe.train.max_length)


def prepare_streaming(recipe, collator):
    """`pipeline.prepare_data` for a streamed run: the training stream, and the held-out rows read
    whole and checked as `prepare_data` checks them."""
    check_streaming(recipe)
    rows = open_training_stream(recipe, collator)
    data_cfg, family = recipe.data, collator.family
    eval_sources = recipe_sources(recipe)[1]
    evaluation, report, info = load_section(eval_sources, data_cfg, recipe.base_dir(),
                                            family.box_format, "eval", mixing=False)
    enforce_policy(report, data_cfg.on_bad_row, "data.eval")
    if eval_sources and not evaluation:  # else held-out scores would be silently missing
        raise DataError("data.eval: no usable held-out rows" +
                        (f" ({report.describe()})" if report.total else " (the source is empty)"),
                        hint="fix those rows (or the images they name), or remove data.eval")
    evaluation = list(evaluation)
    check_video_support(evaluation, family, recipe.model.id)
    bad = {"eval": report.as_dict()}
    evaluation = drop_unfit_rows(evaluation, family, data_cfg.on_bad_row, "data.eval",
                                 bad["eval"])
    return StreamedData(rows, evaluation, bad, sources=[
        {"section": "train", "source": s.name, "format": source_format(s), "streaming": True}
        for s in rows.sources] + info)


def source_format(source: StreamSource) -> str:
    if hasattr(source.renderer, "describe"):
        return source.renderer.describe()
    return f"{source.kind} + template {source.renderer.spec.name}"


class StreamedData:
    """`PreparedData` of a streamed run: `train` is the `StreamingRows`, and the report counts
    what the run read up to its last trained batch."""

    streaming = True

    def __init__(self, train: StreamingRows, evaluation: list, bad_rows: dict, sources: list):
        self.train, self.eval, self.bad_rows, self.sources = train, evaluation, bad_rows, sources
        self.overflow, self.eval_notes = {}, {}

    def counts(self) -> dict:
        return self.train.final or merged_counts([self.train.counts_after(0)])

    def report(self) -> dict:
        counts = self.counts()
        return {"train_rows": counts["rows"], "eval_rows": len(self.eval),
                "bad_rows": {"train": counts["bad_rows"], **self.bad_rows},
                "dropped_overflow": counts["dropped_overflow"], "sources": self.sources,
                "stream": {"records_read": counts["records"], "processes": counts["processes"]}}

    def describe(self) -> str:
        rank, world = rank_and_world()
        part = f" (process {rank} of {world} reads its own part)" if world > 1 else ""
        bad = sum(v["count"] for v in self.bad_rows["eval"].values())
        return (f"data: training rows streamed from {len(self.train.sources)} source(s){part}, "
                f"rendered as training reads them; {len(self.eval)} held-out rows, {bad} bad "
                "held-out rows")

    def first_row(self) -> dict:
        """The stream's first row (for `--dry-run`)."""
        return self.first_rows(1)[0]

    def first_rows(self, n: int) -> list[dict]:
        """The stream's first `n` rows (for `--dry-run` and `data preview`); the bad and
        over-long rows met on the way are in `counts()`."""
        import itertools

        rows = itertools.islice(iter(self.train), n)
        return [{k: v for k, v in row.items() if k != POSITION} for row in rows]
