"""From a recipe's `data` section to checked training and held-out rows.

Per source: open it (`readers.py`), render each record (a template, or `messages` rows as they
are), check its images, and count bad rows by reason. The rendered rows live in an Arrow table
(`table.py`); large sources (>= CACHE_MIN_ROWS records) are read in shards, rendered and
counted in `data.num_proc` processes straight into Arrow (`prepare/shards.py`) and saved under
`<cache>/prepared/<fingerprint>/` (keyed by the content of the source's files (a fast hash),
template text, options, family box format and seed) together with their bad-row report, row
count and the size and mtime of every image they name (`meta.json`, written last) and, per
processor, their token lengths (an Arrow column). A warm start memory-maps the table and reads
the lengths: no per-row work; a table that does not hold the stored row count (torn), or whose
images changed since, is rebuilt with a one-line note. In a multi-process run the main process
prepares and the others wait, then read the same folder.
Several training sources are mixed by `weight` (see `mix`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from peftvlm.data.boxes import box_format_for
from peftvlm.data.prepare import lengths, table
from peftvlm.data.prepare.filtered import filtered_sources, unfiltered
from peftvlm.data.prepare.shards import build_entries, split_entries
from peftvlm.data.prepare.table import Rows
from peftvlm.data.read.fixtures import fixture_sources
from peftvlm.data.read.formats import media_token_detail, media_token_hits, no_format_error
from peftvlm.data.read.prompt_rows import detect_source_format
from peftvlm.data.read.readers import open_source, take
from peftvlm.data.read.sources import resolve_image, to_conversation
from peftvlm.data.read.video import check_video_support
from peftvlm.data.render.templates import TemplateRenderer, load_template, merged_options
from peftvlm.data.rows import BadRow, BadRowReport, enforce_policy, with_system_prompt
from peftvlm.errors import DataError
from peftvlm.models import cache_dir

CACHE_MIN_ROWS = 1000      # below this, rendering is faster than reading a cache file
PARALLEL_MIN_ROWS = 2000   # below this, starting worker processes costs more than it saves
CACHE_VERSION = "10"        # bump when rendering or the layout changes (4: Arrow tables, row_id;
                           # 5: row formats; 6: Parquet / datasets rows named by their place in
                           # the file / split; 7: checked videos carry their source's fps and
                           # frame count; 8: one rows.arrow file, built in shards; 9: keyed
                           # on file content, meta.json holds the row count and image stats;
                           # 10: preference rows, detected before conversations)


@dataclass
class PreparedData:
    streaming = False  # streaming.StreamedData: training rows are read as training goes
    train: Rows
    eval: list[dict]
    bad_rows: dict = field(default_factory=dict)
    overflow: dict = field(default_factory=dict)
    sources: list[dict] = field(default_factory=list)
    eval_notes: dict = field(default_factory=dict)  # metric -> validity note (see metrics)

    def report(self) -> dict:
        return {"train_rows": len(self.train), "eval_rows": len(self.eval),
                "bad_rows": self.bad_rows, "dropped_overflow": self.overflow,
                "sources": self.sources}


@dataclass
class SourceRows:
    """One source's rendered rows and what happened on the way."""

    name: str
    rows: Rows
    report: BadRowReport
    records: int
    cached: bool = False
    format: str = "messages"

    def info(self, section: str, used: int | None = None) -> dict:
        return {"section": section, "source": self.name, "format": self.format,
                "records": self.records,
                "rows": len(self.rows), "used": len(self.rows) if used is None else used,
                "bad_rows": self.report.total, "from_cache": self.cached}


# --- which sources -----------------------------------------------------------------------------

def recipe_sources(recipe):
    """(train, eval) source lists; a synthetic task is written to the cache first; with
    `data.filter`, training reads the pairs `peftvlm data filter` kept."""
    data = recipe.data
    if data.filter is not None:
        return filtered_sources(recipe), recipe_sources(unfiltered(recipe))[1]
    if data.synthetic is None:
        return data.train or [], data.eval or []

    if data.synthetic.name in ("colour-vqa", "colour-classes", "colour-preference"):
        from peftvlm.data.read.synthetic import write_synthetic
        from peftvlm.recipe.schema import SourceConfig

        paths = write_synthetic(data.synthetic, cache_dir())
        return [SourceConfig(path=str(paths["train"]))], [SourceConfig(path=str(paths["test"]))]

    return fixture_sources(data.synthetic, cache_dir(), data.template)


# --- one source --------------------------------------------------------------------------------

class MessagesRenderer:
    """Rows that already are conversations, in one of the row formats of `formats.py`
    (`messages`, `openai_messages`, `llava_conversations`): converted and checked, not templated."""

    def __init__(self, root: Path, fmt: str = "auto", video=None):
        self.root, self.format, self.video = root, fmt, video
        self.options = {"format": fmt, "video": video}  # part of the cache key
        self._checked: dict[str, object] = {}

    def detect(self, records: list, name: str) -> None:
        """Pick the source's row format from its first rows (when not forced)."""
        if self.format == "auto" and records:
            self.format = detect_source_format(records) or no_format_error(records, name)

    def describe(self) -> str:
        return self.format

    def render(self, row_id: str, record) -> dict:
        return {"row_id": row_id,
                **to_conversation(record, self.root, self.format, self.video, self.resolve)}

    def resolve(self, image, root: Path):
        """`resolve_image`, once per path: LLaVA-style sets share each image across many rows,
        and decoding-checking it per row was most of the cold-start time."""
        if not isinstance(image, str):
            return resolve_image(image, root)
        if image not in self._checked:
            try:
                self._checked[image] = resolve_image(image, root)
            except BadRow as bad:
                self._checked[image] = bad
        checked = self._checked[image]
        if isinstance(checked, BadRow):
            raise BadRow(checked.reason, checked.detail)
        return checked

    def conversations(self, pieces: list) -> list[dict]:
        return pieces


def make_renderer(src, opened, data_cfg, box_format: str, base_dir: Path):
    """The template renderer this source asks for (own, recipe default, or the kind's default)."""
    name = src.template or data_cfg.template or opened.default_template
    if name is None:
        from peftvlm.data.read.video import VideoOptions

        fmt = data_cfg.format if src.format in ("auto", "coco_captions", "vqav2") else src.format
        return MessagesRenderer(opened.root, fmt,
                                VideoOptions(data_cfg.video_fps, data_cfg.video_max_frames,
                                             data_cfg.video_num_frames))

    template = load_template(name, base_dir)
    options = merged_options(template.spec, {**data_cfg.template_options,
                                             **src.template_options}, f"data source {opened.name}")
    return TemplateRenderer(template, options, src.columns, opened.root, box_format,
                            data_cfg.seed, opened.name, data_cfg.system_prompt)


def render_chunk(renderer, records: list) -> tuple[list, BadRowReport]:
    """Render records in order; bad ones are counted, never raised."""
    pieces, report = [], BadRowReport()
    for row_id, record in records:
        try:
            pieces.append(renderer.render(row_id, record))
        except BadRow as bad:
            report.add(bad.reason, row_id, bad.detail)
    return pieces, report


def render_records(renderer, records: list, num_proc: int | None) -> tuple[list, BadRowReport]:
    """`render_chunk` over all records, in `num_proc` forked processes for large sources."""
    if not num_proc or num_proc < 2 or len(records) < PARALLEL_MIN_ROWS:
        return render_chunk(renderer, records)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    size = -(-len(records) // (num_proc * 4))
    chunks = [records[i:i + size] for i in range(0, len(records), size)]
    pieces, report = [], BadRowReport()
    with ProcessPoolExecutor(num_proc, mp_context=multiprocessing.get_context("fork")) as pool:
        for chunk_pieces, chunk_report in pool.map(render_chunk, [renderer] * len(chunks), chunks):
            pieces += chunk_pieces
            report.merge(chunk_report)
    return pieces, report


def fingerprint(src, opened, renderer, box_format: str, data_cfg) -> str | None:
    """Cache key of a source's rendered rows; None when its inputs cannot be fingerprinted."""
    if not opened.files or src.streaming:
        return None
    h = hashlib.sha1(CACHE_VERSION.encode())
    template = getattr(renderer, "spec", None)
    h.update(json.dumps([src.model_dump(mode="json"), box_format, data_cfg.seed,
                         data_cfg.system_prompt, getattr(renderer, "options", None),
                         template.model_dump(mode="json") if template else None],
                        sort_keys=True, default=str).encode())
    for f in opened.files:
        h.update(f"{f}:{content_key(f)}".encode())
    return h.hexdigest()[:16]


def content_key(path: Path) -> str:
    """A file's content hash (a folder's size and mtime: its files are listed on their own).
    Content, not size + mtime: `cp -p` and `rsync -t` carry the mtime over an edit of the
    same size. xxh3 (xxhash is a dependency of `datasets`) hashes ~1 GB/s on one core (a 100 MB
    file in ~0.1 s), small next to loading a model; nothing here needs a cryptographic hash."""
    import xxhash

    if path.is_dir():
        st = path.stat()
        return f"dir:{st.st_size}:{st.st_mtime_ns}"
    digest = xxhash.xxh3_128()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def load_source(src, data_cfg, base_dir: Path, box_format: str = "norm1",
                collator=None) -> SourceRows:
    """Read, render and check one source (from the preprocessing cache when it can); with a
    collator, the rows also carry their token lengths (`length` column)."""
    opened = open_source(src, base_dir)
    renderer = make_renderer(src, opened, data_cfg, box_format, base_dir)
    key = fingerprint(src, opened, renderer, box_format, data_cfg) if data_cfg.cache else None
    folder = prepared_cache_dir() / key if key else None
    with main_process_first():
        loaded = read_cached(folder, opened.name) if folder else None
        if loaded is None:
            loaded = render_source(opened, renderer, src, data_cfg, folder, collator)
        if collator is not None:
            from peftvlm.data.prepare.lengths import with_lengths

            on_disk = folder if folder and (folder / "meta.json").is_file() else None
            # Before counting: the processor would read such rows' text as extra media. The
            # cached lengths are of the whole table, so a source that loses rows counts afresh.
            kept = drop_media_token_rows(loaded.rows, collator.family, loaded.report)
            if kept is not loaded.rows:
                on_disk, loaded.rows = None, kept
            loaded.rows = with_lengths(loaded.rows, collator, data_cfg.num_proc, on_disk)
    return loaded


def render_source(opened, renderer, src, data_cfg, folder: Path | None,
                  collator=None) -> SourceRows:
    """Render every record into an Arrow table. A source of fewer than CACHE_MIN_ROWS records
    is rendered here; a larger one is built in shards (`prepare/shards.py`), its tokens counted on
    the way when a collator is given, and saved to `folder`."""
    records = iter(opened.records)
    head = take(records, min(src.max_samples or CACHE_MIN_ROWS, CACHE_MIN_ROWS))
    if hasattr(renderer, "detect"):
        renderer.detect(head, opened.name)
    fmt = source_format(renderer, opened)
    if len(head) == CACHE_MIN_ROWS and not groups_rows(renderer):
        return build_source(opened, renderer, src, data_cfg, folder, (head, records), fmt,
                            collator)
    # Small, or grouped per image across the whole source (`group_by_image`): in memory.
    records = head + take(records, src.max_samples and src.max_samples - len(head))
    pieces, report = render_records(renderer, records, data_cfg.num_proc)
    rows = Rows.from_rows(with_system_prompt(renderer.conversations(pieces),
                                             data_cfg.system_prompt))
    del pieces
    if folder and len(records) >= CACHE_MIN_ROWS:
        rows = save_prepared(rows, report, len(records), fmt, folder)
    return SourceRows(opened.name, rows, report, len(records), format=fmt)


def build_source(opened, renderer, src, data_cfg, folder: Path | None, read: tuple,
                 fmt: str, collator=None) -> SourceRows:
    """A large source rendered shard by shard in `data.num_proc` processes straight into
    Arrow (`prepare/shards.py`), then saved to `folder` (or, uncached, copied into memory); with a
    collator, with its `length` column (saved as the lengths cache a warm start reads).
    `read`: the records taken so far and the rest, for a source that cannot be split."""
    limit = src.max_samples
    if opened.split is not None:
        shards = opened.split(limit)
    else:  # read in one pass, in this process
        head, rest = read
        shards = [itertools.chain(head, itertools.islice(rest, limit and limit - len(head)))]
    with build_folder() as scratch:
        workdir = Path(scratch)
        built = build_entries(shards, renderer, data_cfg.system_prompt, data_cfg.num_proc,
                               workdir, collator)
        out = folder or workdir
        counted = lengths.lengths_file(out, lengths.collator_fingerprint(collator)) \
            if collator is not None else None
        report, records = split_entries(built, out / table.ROWS_FILE, counted)
        del built
        rows = table.load(out / table.ROWS_FILE, in_memory=folder is None)
        if folder:  # rows and lengths are in place: the report completes the cache folder
            write_meta(folder, report, records, fmt, rows)
        if counted is not None and folder:
            rows = lengths.with_lengths(rows, collator, None, folder)  # reads that file
        elif counted is not None:
            rows = table.concat_columns(rows, table.load_column(counted))
    return SourceRows(opened.name, rows, report, records, format=fmt)


def groups_rows(renderer) -> bool:
    """Whether the renderer makes rows across records (`group_by_image`: one conversation per
    image, from every record that asks about it), so it needs all records at once."""
    return bool((getattr(renderer, "options", None) or {}).get("group_by_image"))


def save_prepared(rows: Rows, report: BadRowReport, records: int, fmt: str,
                  folder: Path) -> Rows:
    """Rows, then their report, into the cache folder; the rows memory-mapped from there."""
    table.save(rows, folder / table.ROWS_FILE)
    saved = table.load(folder / table.ROWS_FILE) or rows
    write_meta(folder, report, records, fmt, saved)
    return saved


def write_meta(folder: Path, report: BadRowReport, records: int, fmt: str, rows: Rows) -> None:
    """The report, the row count and the images' stats, written last: a folder without
    `meta.json` is never read back."""
    meta = {"records": records, "counts": dict(report.counts),
            "examples": dict(report.examples), "format": fmt, "rows": len(rows),
            "images": image_stats(image_paths(rows))}
    write_atomic(folder / "meta.json", json.dumps(meta).encode())


def image_paths(rows: Rows) -> list[str]:
    """The distinct image files the rows name (images stored as bytes are in the table)."""
    import pyarrow.compute as pc

    if not len(rows):
        return []
    images = pc.list_flatten(rows.column("images"))
    paths = pc.struct_field(images, "path").filter(pc.is_null(pc.struct_field(images, "bytes")))
    return sorted(p for p in pc.unique(paths).to_pylist() if p)


def image_stats(paths: list[str]) -> dict[str, list[int] | None]:
    """Path -> [size, mtime_ns] (None when it cannot be stat-ed): what a warm start compares."""
    stats = {}
    for path in paths:
        try:
            st = os.stat(path)
            stats[path] = [st.st_size, st.st_mtime_ns]
        except OSError:
            stats[path] = None
    return stats


def changed_images(stored: dict) -> list[str]:
    """The images whose size or mtime differ from when the rows were cached (or that are gone)."""
    now = image_stats(list(stored))
    return [p for p, stat in stored.items() if now[p] != stat]


def build_folder():
    """A scratch folder beside the cache for a build's Arrow files, removed afterwards."""
    import tempfile

    prepared_cache_dir().mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix=".build-", dir=prepared_cache_dir(),
                                       ignore_cleanup_errors=True)


def source_format(renderer, opened) -> str:
    """How a source was read: its row format, or its layout + the template that rendered it."""
    if hasattr(renderer, "describe"):
        return renderer.describe()
    return f"{opened.layout or 'columns'} + template {renderer.spec.name}"


def read_cached(folder: Path, name: str) -> SourceRows | None:
    """A source's cached rows and report (Arrow + JSON: nothing read is executed); None when
    there is none, or (said in one line, and the folder removed) when it cannot be trusted: a
    table that does not hold the stored number of rows, or images changed since."""
    meta_file = folder / "meta.json"
    if not meta_file.is_file():
        return None  # not built yet (or a build that never finished: meta.json comes last)
    try:
        meta = json.loads(meta_file.read_text())
        report = BadRowReport()
        for reason, count in meta["counts"].items():
            report.counts[reason] = int(count)
            report.examples[reason] = [str(e) for e in meta["examples"].get(reason, [])]
        records, expected, images = int(meta["records"]), int(meta["rows"]), dict(meta["images"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return discard(folder, name, "its meta.json is unreadable")
    rows = table.load(folder / table.ROWS_FILE)
    if rows is None or len(rows) != expected:
        found = "no readable rows" if rows is None else f"{len(rows)} rows"
        return discard(folder, name, f"the table holds {found}, not {expected} (a torn write?)")
    changed = changed_images(images)
    if changed:
        return discard(folder, name, f"{len(changed)} image(s) changed since it was cached "
                                     f"(e.g. {changed[0]})")
    return SourceRows(name, rows, report, records, cached=True,
                      format=str(meta.get("format", "messages")))


def discard(folder: Path, name: str, why: str) -> None:
    """Move an untrusted cache folder aside and delete it (a reader that still maps its files
    keeps them until it closes them); the source is then prepared again."""
    table.note(f"cached rows of {name}: {why}; preparing it again")
    stale = folder.with_name(f".stale-{folder.name}-{random.getrandbits(32):08x}")
    try:
        folder.rename(stale)
    except OSError:
        stale = folder
    shutil.rmtree(stale, ignore_errors=True)
    return None


def main_process_first():
    """accelerate's `main_process_first`: in a multi-process run, the main process prepares
    (and caches) the data while the others wait, then they read the same cache."""
    from accelerate import PartialState

    return PartialState().main_process_first()


def prepared_cache_dir() -> Path:
    return cache_dir() / "prepared"


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{random.getrandbits(32)}")
    tmp.write_bytes(data)
    tmp.replace(path)


# --- several sources ---------------------------------------------------------------------------

def mix_indices(sizes: list[int], weights: list[float], seed: int) -> list[list[int]]:
    """Source i gets round(total * w_i / sum(w)) rows, total = all rows of all sources: sampled
    without replacement when it has more, repeated whole (plus a sample) when it has fewer."""
    total, weight_sum = sum(sizes), sum(weights)
    rng = random.Random(f"mix:{seed}")
    picked = []
    for size, weight in zip(sizes, weights):
        target = round(total * weight / weight_sum) if size else 0
        repeats, rest = divmod(target, size) if size else (0, 0)
        picked.append(list(range(size)) * repeats + sorted(rng.sample(range(size), rest)))
    return picked


def mix(parts: list, weights: list[float], seed: int) -> tuple[list, list[int]]:
    """Rows of several sources mixed by weight (see `mix_indices`); `Rows` stay Arrow views."""
    picked = mix_indices([len(p) for p in parts], weights, seed)
    used = [len(p) for p in picked]
    if all(isinstance(p, Rows) for p in parts):
        return table.concat([p.select(i) for p, i in zip(parts, picked)]), used
    return [part[i] for part, idx in zip(parts, picked) for i in idx], used


def load_section(sources, data_cfg, base_dir: Path, box_format: str, section: str,
                 mixing: bool, collator=None) -> tuple[Rows, BadRowReport, list[dict]]:
    """All rows of one section (train/eval), mixed by weight when any weight was set."""
    loaded = [load_source(s, data_cfg, base_dir, box_format, collator) for s in sources]
    report = BadRowReport()
    for part in loaded:
        report.merge(part.report)
    weighted = mixing and len(loaded) > 1 and any("weight" in s.model_fields_set for s in sources)
    if weighted:
        rows, used = mix([p.rows for p in loaded], [s.weight for s in sources], data_cfg.seed)
    else:
        rows, used = table.concat([p.rows for p in loaded]), [len(p.rows) for p in loaded]
    return rows, report, [p.info(section, u) for p, u in zip(loaded, used)]


def load_rows(recipe, box_format: str = "norm1", collator=None) -> PreparedData:
    """Checked conversations of the recipe's train and eval sources (no length filter yet);
    with a collator, training rows carry their token lengths."""
    train_sources, eval_sources = recipe_sources(recipe)
    base, data_cfg = recipe.base_dir(), recipe.data
    train, train_report, train_info = load_section(train_sources, data_cfg, base, box_format,
                                                   "train", mixing=True, collator=collator)
    evaluation, eval_report, eval_info = load_section(eval_sources, data_cfg, base, box_format,
                                                      "eval", mixing=False)
    if collator is not None:  # training rows were checked per source, before counting
        evaluation = drop_media_token_rows(evaluation, collator.family, eval_report)
    enforce_policy(train_report, data_cfg.on_bad_row, "data.train")
    enforce_policy(eval_report, data_cfg.on_bad_row, "data.eval")
    if not len(train):
        raise DataError("data.train: no usable rows" +
                        (f" ({train_report.describe()})" if train_report.total else ""))
    if eval_sources and not evaluation:  # else held-out scores would be silently missing
        raise DataError("data.eval: no usable held-out rows" +
                        (f" ({eval_report.describe()})" if eval_report.total else
                         " (the source is empty)"),
                        hint="fix those rows (or the images they name), or remove data.eval")
    return PreparedData(train, list(evaluation),
                        {"train": train_report.as_dict(), "eval": eval_report.as_dict()},
                        sources=train_info + eval_info)


# --- lengths -----------------------------------------------------------------------------------

def drop_overflowing(rows: Rows, max_length: int, policy: str, what: str):
    """Rows longer than max_length would lose image tokens or answers: drop (counted) or stop.
    Over-long rows are named by their source row (`file:line`), read from the Arrow table."""
    import numpy as np

    lengths = rows.lengths()
    over = np.flatnonzero(lengths > max_length)
    examples = [f"{rows.table[int(i)]['row_id']} ({lengths[i]} tokens)" for i in over[:5]]
    if len(over) and policy == "error":
        raise DataError(f"{what}: {len(over)} row(s) exceed train.max_length={max_length}: "
                        f"{', '.join(examples)}",
                        hint="raise train.max_length, shorten those rows, or set "
                             "data.on_overflow: drop")
    info = {"count": int(len(over)), "max_length": max_length,
            "longest": int(lengths.max()) if len(lengths) else 0, "first_rows": examples}
    kept = rows if not len(over) else rows.select(np.flatnonzero(lengths <= max_length))
    return kept, info


def drop_media_token_rows(rows: Rows, family, report: BadRowReport) -> Rows:
    """`rows` without those whose text holds the family's own image/video tokens (typed
    `<|image_pad|>`, `<start_of_image>`...), each counted in `report` as `media_token_in_text`
    with the token and the fix; `rows` itself when none does."""
    hits = media_token_hits(rows, family.literal_media_tokens())
    if not hits:
        return rows
    ids = rows.row_ids
    for index, token, role in hits:
        report.add("media_token_in_text", ids[index], media_token_detail(token, role, family.name))
    bad = {index for index, _, _ in hits}
    return rows.select([i for i in range(len(rows)) if i not in bad])


def drop_unfit_rows(rows, family, policy: str, what: str, report: dict):
    """Rows the model's family cannot take (BLIP-2 without exactly one image, Llama 3.2 Vision
    with a system prompt next to an image): counted as bad rows, or an error naming them."""
    if family.images_per_row is None and family.system_with_images:
        return rows  # the family takes any row: decode none (a warm start stays fast)
    keep, bad = [], {}
    for i, row in enumerate(rows):
        reason = family.row_problem(row["messages"])
        if reason is None:
            keep.append(i)
        else:
            bad.setdefault(reason, []).append(row.get("row_id") or f"row {i}")
    if bad and policy == "error":
        listed = "; ".join(f"{len(v)} {k.replace('_', ' ')} (e.g. {v[0]})"
                           for k, v in bad.items())
        raise DataError(f"{what}: {sum(map(len, bad.values()))} row(s) this model cannot take: "
                        f"{listed}", hint="fix or drop those rows (a BLIP-2 row needs exactly "
                        "one image; Llama 3.2 Vision refuses data.system_prompt next to an "
                        "image), or set data.on_bad_row: skip")
    for reason, names in bad.items():
        report[reason] = {"count": len(names), "first_rows": names[:3]}
    if not bad:
        return rows
    return rows.select(keep) if hasattr(rows, "select") else [rows[i] for i in keep]


def prepare_rows(recipe, collator) -> PreparedData:
    """Load, check and length-filter the recipe's rows; bad rows never crash training later."""
    data = load_rows(recipe, box_format_for(collator.family, collator.processor), collator)
    for section in ("train", "eval"):
        check_video_support(getattr(data, section), collator.family, recipe.model.id)
        kept = drop_unfit_rows(getattr(data, section), collator.family, recipe.data.on_bad_row,
                               f"data.{section}", data.bad_rows.setdefault(section, {}))
        setattr(data, section, kept)
    data.train, data.overflow = drop_overflowing(data.train, recipe.train.max_length,
                                                 recipe.data.on_overflow, "data.train")
    collator.spare_rows = data.train  # stand-ins for a batch whose images all fail to open
    if not len(data.train):
        raise DataError(f"data.train: every row is longer than train.max_length="
                        f"{recipe.train.max_length} (longest: {data.overflow['longest']} tokens)",
                        hint="raise train.max_length")
    return data


# --- rows whose images fail during training --------------------------------------------------

SKIPPED_ROWS_FILE = "skipped_rows.jsonl"  # in the run folder; appended by every process


def skipped_rows_file(run_dir: Path, resume) -> Path:
    """Where the collators of a training append the rows they skip; a fresh run starts it
    empty (the main process only), a resumed one adds to it."""
    from accelerate import PartialState

    path = run_dir / SKIPPED_ROWS_FILE
    if not resume and PartialState().is_main_process:
        path.unlink(missing_ok=True)
    return path


def count_skipped_rows(data: PreparedData, path: Path, log) -> None:
    """Training rows skipped because their images failed to open (`collate.decode_or_skip`),
    into the bad-row report (`unreadable_at_training`, named by `file:line`) and the log.
    Each row counts once however many epochs met it."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return
    first: dict[str, str] = {}
    for line in lines:
        try:
            entry = json.loads(line)
            first.setdefault(str(entry["row_id"]), str(entry["detail"]))
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a kill: the others still count
    if not first:
        return
    named = [f"{row} ({detail})" for row, detail in itertools.islice(first.items(), 3)]
    data.bad_rows.setdefault("train", {})["unreadable_at_training"] = {
        "count": len(first), "first_rows": named}
    log(f"skipped {len(first)} training row(s) whose images failed to open during training, "
        f"e.g. {named[0]}")
