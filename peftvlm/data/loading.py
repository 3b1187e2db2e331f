"""From a recipe's `data` section to checked training and held-out rows.

Per source: open it (`readers.py`), render each record (a template, or `messages` rows as they
are), check its images, and count bad rows by reason. Large sources (>= CACHE_MIN_ROWS records)
are rendered in `data.num_proc` processes and cached under `<cache>/prepared/`, keyed by the
source's files (size, mtime), template text, options, family box format and seed; small files
take the in-memory path. Several training sources are mixed by `weight` (see `mix`).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import random
from dataclasses import dataclass, field
from pathlib import Path

from peftvlm.data.readers import open_source, take
from peftvlm.data.sources import BadRow, BadRowReport, enforce_policy, to_conversation
from peftvlm.errors import DataError

CACHE_MIN_ROWS = 1000      # below this, rendering is faster than reading a cache file
PARALLEL_MIN_ROWS = 2000   # below this, starting worker processes costs more than it saves
CACHE_VERSION = "3"        # bump when rendering changes (2: rows keep id, references...)


@dataclass
class PreparedData:
    train: list[dict]
    eval: list[dict]
    bad_rows: dict = field(default_factory=dict)
    overflow: dict = field(default_factory=dict)
    sources: list[dict] = field(default_factory=list)

    def report(self) -> dict:
        return {"train_rows": len(self.train), "eval_rows": len(self.eval),
                "bad_rows": self.bad_rows, "dropped_overflow": self.overflow,
                "sources": self.sources}


@dataclass
class SourceRows:
    """One source's rendered rows and what happened on the way."""

    name: str
    rows: list[dict]
    report: BadRowReport
    records: int
    cached: bool = False

    def info(self, section: str, used: int | None = None) -> dict:
        return {"section": section, "source": self.name, "records": self.records,
                "rows": len(self.rows), "used": len(self.rows) if used is None else used,
                "bad_rows": self.report.total, "from_cache": self.cached}


# --- which sources -----------------------------------------------------------------------------

def recipe_sources(recipe):
    """(train, eval) source lists; a synthetic task is written to the cache first."""
    data = recipe.data
    if data.synthetic is None:
        return data.train or [], data.eval or []
    from peftvlm.models import cache_dir

    if data.synthetic.name in ("colour-vqa", "colour-classes"):
        from peftvlm.data.synthetic import write_synthetic
        from peftvlm.recipe import SourceConfig

        paths = write_synthetic(data.synthetic, cache_dir())
        return [SourceConfig(path=str(paths["train"]))], [SourceConfig(path=str(paths["test"]))]
    from peftvlm.data.fixtures import fixture_sources

    return fixture_sources(data.synthetic, cache_dir(), data.template)


# --- one source --------------------------------------------------------------------------------

class MessagesRenderer:
    """Rows that already hold `messages` (+ `images`): checked, not templated."""

    def __init__(self, root: Path):
        self.root = root

    def render(self, row_id: str, record) -> dict:
        return to_conversation(record, self.root)

    def conversations(self, pieces: list) -> list[dict]:
        return pieces


def make_renderer(src, opened, data_cfg, box_format: str, base_dir: Path):
    """The template renderer this source asks for (own, recipe default, or the kind's default)."""
    name = src.template or data_cfg.template or opened.default_template
    if name is None:
        return MessagesRenderer(opened.root)
    from peftvlm.data.templates import TemplateRenderer, load_template, merged_options

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
        st = f.stat()
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def load_source(src, data_cfg, base_dir: Path, box_format: str = "norm1") -> SourceRows:
    """Read, render and check one source (from the preprocessing cache when it can)."""
    opened = open_source(src, base_dir)
    renderer = make_renderer(src, opened, data_cfg, box_format, base_dir)
    key = fingerprint(src, opened, renderer, box_format, data_cfg) if data_cfg.cache else None
    cache_file = prepared_cache_dir() / f"{key}.pkl" if key else None
    if cache_file and cache_file.exists():
        with cache_file.open("rb") as f:
            rows, report, n = pickle.load(f)  # our own cache file, written below
        return SourceRows(opened.name, rows, report, n, cached=True)
    records = take(opened.records, src.max_samples)
    pieces, report = render_records(renderer, records, data_cfg.num_proc)
    rows = renderer.conversations(pieces)
    if cache_file and len(records) >= CACHE_MIN_ROWS:
        write_atomic(cache_file, pickle.dumps((rows, report, len(records)), protocol=5))
    return SourceRows(opened.name, rows, report, len(records))


def prepared_cache_dir() -> Path:
    from peftvlm.models import cache_dir

    return cache_dir() / "prepared"


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{random.getrandbits(32)}")
    tmp.write_bytes(data)
    tmp.replace(path)


# --- several sources ---------------------------------------------------------------------------

def mix(parts: list[list[dict]], weights: list[float], seed: int) -> tuple[list[dict], list[int]]:
    """Source i gets round(total * w_i / sum(w)) rows, total = all rows of all sources: sampled
    without replacement when it has more, repeated whole (plus a sample) when it has fewer."""
    total, weight_sum = sum(len(p) for p in parts), sum(weights)
    rng = random.Random(f"mix:{seed}")
    mixed, used = [], []
    for rows, weight in zip(parts, weights):
        target = round(total * weight / weight_sum) if rows else 0
        repeats, rest = divmod(target, len(rows)) if rows else (0, 0)
        picked = rows * repeats + [rows[i] for i in sorted(rng.sample(range(len(rows)), rest))]
        mixed += picked
        used.append(len(picked))
    return mixed, used


def load_section(sources, data_cfg, base_dir: Path, box_format: str, section: str,
                 mixing: bool) -> tuple[list[dict], BadRowReport, list[dict]]:
    """All rows of one section (train/eval), mixed by weight when any weight was set."""
    loaded = [load_source(s, data_cfg, base_dir, box_format) for s in sources]
    report = BadRowReport()
    for part in loaded:
        report.merge(part.report)
    weighted = mixing and len(loaded) > 1 and any("weight" in s.model_fields_set for s in sources)
    if weighted:
        rows, used = mix([p.rows for p in loaded], [s.weight for s in sources], data_cfg.seed)
    else:
        rows, used = [r for p in loaded for r in p.rows], [len(p.rows) for p in loaded]
    return rows, report, [p.info(section, u) for p, u in zip(loaded, used)]


def with_system_prompt(rows: list[dict], prompt: str | None) -> list[dict]:
    if not prompt:
        return rows
    system = {"role": "system", "content": [{"type": "text", "text": prompt}]}
    return [r if r["messages"][0]["role"] == "system"
            else {**r, "messages": [system, *r["messages"]]} for r in rows]


def uniform_images(rows: list[dict]) -> list[dict]:
    """One image representation for all rows, so `datasets.Dataset.from_list` (in the trainer)
    accepts them: paths stay strings when every image is a path; otherwise every image becomes
    `{"bytes", "path"}` (PIL images are PNG-encoded)."""
    if all(isinstance(i, str) for r in rows for i in r["images"]):
        return rows
    return [{**r, "images": [encoded_image(i) for i in r["images"]]} for r in rows]


def encoded_image(image) -> dict:
    if isinstance(image, str):
        return {"bytes": None, "path": image}
    if isinstance(image, dict):
        return {"bytes": image.get("bytes"), "path": image.get("path")}
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def load_rows(recipe, box_format: str = "norm1") -> PreparedData:
    """Checked conversations of the recipe's train and eval sources (no length filter yet)."""
    train_sources, eval_sources = recipe_sources(recipe)
    base, data_cfg = recipe.base_dir(), recipe.data
    train, train_report, train_info = load_section(train_sources, data_cfg, base, box_format,
                                                   "train", mixing=True)
    evaluation, eval_report, eval_info = load_section(eval_sources, data_cfg, base, box_format,
                                                      "eval", mixing=False)
    enforce_policy(train_report, data_cfg.on_bad_row, "data.train")
    enforce_policy(eval_report, data_cfg.on_bad_row, "data.eval")
    if not train:
        raise DataError("data.train: no usable rows" +
                        (f" ({train_report.describe()})" if train_report.total else ""))
    return PreparedData(uniform_images(with_system_prompt(train, data_cfg.system_prompt)),
                        uniform_images(with_system_prompt(evaluation, data_cfg.system_prompt)),
                        {"train": train_report.as_dict(), "eval": eval_report.as_dict()},
                        sources=train_info + eval_info)


# --- lengths -----------------------------------------------------------------------------------

def token_lengths(collator, rows: list[dict]) -> list[int]:
    """Each row's length in tokens as the trainer sees it (see `lengths.py`)."""
    from peftvlm.data.lengths import token_lengths as fast_lengths

    return fast_lengths(collator, rows)


def drop_overflowing(rows, collator, max_length: int, policy: str, what: str):
    """Rows longer than max_length would lose image tokens or answers: drop (counted) or stop."""
    lengths = token_lengths(collator, rows)
    over = [i for i, n in enumerate(lengths) if n > max_length]
    if over and policy == "error":
        listed = ", ".join(f"row {i} ({lengths[i]} tokens)" for i in over[:5])
        raise DataError(f"{what}: {len(over)} row(s) exceed train.max_length={max_length}: "
                        f"{listed}",
                        hint="raise train.max_length, shorten those rows, or set "
                             "data.on_overflow: drop")
    dropped = set(over)
    info = {"count": len(over), "max_length": max_length, "longest": max(lengths, default=0)}
    return [r for i, r in enumerate(rows) if i not in dropped], info


def drop_unfit_rows(rows: list[dict], family, policy: str, what: str, report: dict) -> list:
    """Rows the model's family cannot take (BLIP-2 without exactly one image, Llama 3.2 Vision
    with a system prompt next to an image): counted as bad rows, or an error naming them."""
    kept, bad = [], {}
    for i, row in enumerate(rows):
        reason = family.row_problem(row["messages"])
        if reason is None:
            kept.append(row)
        else:
            bad.setdefault(reason, []).append(i)
    if bad and policy == "error":
        listed = "; ".join(f"{len(v)} {k.replace('_', ' ')} (e.g. row {v[0]})"
                           for k, v in bad.items())
        raise DataError(f"{what}: {sum(map(len, bad.values()))} row(s) this model cannot take: "
                        f"{listed}", hint="fix or drop those rows (a BLIP-2 row needs exactly "
                        "one image; Llama 3.2 Vision refuses data.system_prompt next to an "
                        "image), or set data.on_bad_row: skip")
    for reason, positions in bad.items():
        report[reason] = {"count": len(positions), "first_rows": positions[:3]}
    return kept


def prepare_data(recipe, collator) -> PreparedData:
    """Load, check and length-filter the recipe's rows; bad rows never crash training later."""
    data = load_rows(recipe, collator.family.box_format)
    for section in ("train", "eval"):
        kept = drop_unfit_rows(getattr(data, section), collator.family, recipe.data.on_bad_row,
                               f"data.{section}", data.bad_rows.setdefault(section, {}))
        setattr(data, section, kept)
    data.train, data.overflow = drop_overflowing(data.train, collator, recipe.train.max_length,
                                                 recipe.data.on_overflow, "data.train")
    if not data.train:
        raise DataError(f"data.train: every row is longer than train.max_length="
                        f"{recipe.train.max_length} (longest: {data.overflow['longest']} tokens)",
                        hint="raise train.max_length")
    return data
