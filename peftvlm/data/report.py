"""`peftvlm data preview` and `peftvlm data stats`: the data exactly as the trainer will see it,
from the processor alone (no model weights are loaded).

Run: `peftvlm data preview RECIPE -n 3` (examples with the tokens that carry loss in green) and
`peftvlm data stats RECIPE` (rows per source, token-length histogram PNG, rows over
train.max_length, bad rows per reason).
"""

from __future__ import annotations

import statistics
from pathlib import Path

from peftvlm.data.batch.collate import ConversationCollator
from peftvlm.data.batch.preview import box_picture, preview_pair, render_example
from peftvlm.data.boxes import box_format_for
from peftvlm.data.pipeline import prepare_data
from peftvlm.data.prepare.loading import load_rows
from peftvlm.data.read.formats import interleaving_note
from peftvlm.data.read.preference import is_preference_row
from peftvlm.data.read.video import check_video_support
from peftvlm.errors import DataError
from peftvlm.models import cache_dir, load_processor_only


def processor_collator(recipe):
    """The trainer's collator built on the recipe model's processor (weights are not loaded)."""
    processor, family = load_processor_only(recipe.model)
    if not family.is_generative:
        raise DataError(f"data preview/stats render conversations for generative models; "
                        f"{recipe.model.id} is a dual encoder ({family.name})",
                        hint="for CLIP-family recipes look at the source files directly")
    return ConversationCollator(processor, family, recipe.train.assistant_only_loss)


def preview(recipe, n: int = 3, console=None, show_row=None) -> list[dict]:
    """Print the first `n` training rows as encoded for training; return their token counts.
    `show_row(collator, row, index, console)`, when given, prints each row the way the run's
    objective reads it (GRPO: the rollout prompt and its references)."""
    from rich.console import Console
    from rich.rule import Rule

    console = console or Console()
    collator = processor_collator(recipe)
    data = prepare_data(recipe, collator)
    streamed = getattr(data, "streaming", False)
    first = data.first_rows(n) if streamed else data.train[:n]  # a stream: as training reads it
    if streamed:
        data.bad_rows["train"] = data.train.counts.snapshot()["bad_rows"]  # met on the way
    train_rows = "streamed" if streamed else len(data.train)
    console.print(f"{recipe.name}: {train_rows} training rows, {len(data.eval)} held-out; "
                  f"tokens that carry loss in [bold green]green[/]")
    print_formats(data.sources, console)
    print_bad_rows(data.bad_rows, console)
    note = interleaving_note(first if streamed else data.train, collator.family)
    if note:
        console.print(f"note: {note}")
    shown = []
    for i, row in enumerate(first):
        if show_row is not None:
            shown.append(show_row(collator, row, i, console))
            continue
        if is_preference_row(row):  # DPO's pairs: both replies, each with its scored tokens
            shown.append(print_pair(collator, row, i, console))
            continue
        text, counts = render_example(collator, row, collator.family.image_token)
        videos = (f", {len(row['videos'])} video(s), {counts['video_tokens']} video tokens"
                  if row.get("videos") else "")
        named = f" ({row['row_id']})" if row.get("row_id") else ""  # its file:line / file:row N
        console.print(Rule(f"example {i}{named}: {counts['tokens']} tokens, "
                           f"{counts['trained_tokens']} carry loss, {counts['image_tokens']} image "
                           f"tokens ({len(row['images'])} image(s){videos})", align="left"))
        console.print(text)
        picture = picture_path(recipe, i)
        if box_picture(row, box_format_for(collator.family, collator.processor), picture):
            console.print(f"boxes of this answer drawn on its image: {picture}")
        shown.append({**counts, "row_id": row.get("row_id"), "images": len(row["images"])})
    return shown


def print_pair(collator, row: dict, index: int, console) -> dict:
    """One preference row as DPO sees it: the prompt with the chosen reply, then with the
    rejected one, the tokens each reply is scored on in green."""
    from rich.rule import Rule

    named = f" ({row['row_id']})" if row.get("row_id") else ""
    shown = {"row_id": row.get("row_id"), "images": len(row["images"])}
    pair = preview_pair(collator, row, collator.family.image_token)
    for which, (text, counts) in zip(("chosen", "rejected"), pair):
        console.print(Rule(f"example {index}{named} {which}: {counts['tokens']} tokens, "
                           f"{counts['trained_tokens']} scored, {counts['image_tokens']} image "
                           f"tokens ({len(row['images'])} image(s))", align="left"))
        console.print(text)
        shown[which] = counts
    return shown


def picture_path(recipe, index: int) -> Path:
    """Where `data preview` draws an example's boxes: the cache's previews/<recipe name>/."""
    return cache_dir() / "previews" / recipe.name / f"example-{index}.png"


def print_formats(sources: list[dict], console) -> None:
    """One line per source: the format it was read as (detected or forced) and its rows."""
    for s in sources:
        rows = "streamed" if s.get("streaming") else f"{s['records']:,} rows"
        console.print(f"{s['section']} {s['source']}: format: {s['format']}, {rows}",
                      highlight=False)


def print_bad_rows(bad_rows: dict, console) -> None:
    """One line per section and reason: how many rows were left out, and the first ones."""
    for section, reasons in bad_rows.items():
        for reason, info in reasons.items():
            console.print(f"bad rows ({section}) {reason}: {info['count']}, e.g. "
                          f"{'; '.join(info['first_rows'][:2])}", highlight=False)


def stats(recipe, plot_path: Path) -> dict:
    """Rows per source, token lengths (histogram written to `plot_path`), overflow, bad rows."""
    refuse_unreadable_streams(recipe)
    collator = processor_collator(recipe)
    data = load_rows(recipe, box_format_for(collator.family, collator.processor), collator)
    check_video_support(data.train, collator.family, recipe.model.id)
    check_video_support(data.eval, collator.family, recipe.model.id)
    lengths = data.train.lengths().tolist()  # the cached `length` column
    max_length = recipe.train.max_length
    plot_lengths(lengths, max_length, plot_path, f"{recipe.name}: training rows by token length")
    pairs = {"train_pairs": preference_pairs(data.train), "eval_pairs": preference_pairs(data.eval)}
    return {"recipe": recipe.name, "train_rows": len(data.train), "eval_rows": len(data.eval),
            **{k: v for k, v in pairs.items() if v is not None},
            "sources": data.sources, "token_lengths": summarise_lengths(lengths),
            "over_max_length": over_max_length(lengths, data.train.row_ids, max_length,
                                               recipe.data.on_overflow),
            "bad_rows": data.bad_rows, "histogram": str(plot_path),
            "notes": [n for n in [interleaving_note(data.train, collator.family)] if n]}


def preference_pairs(rows) -> int | None:
    """How many rows are preference pairs (a chosen and a rejected reply); None: none are."""
    if hasattr(rows, "column"):  # an Arrow table: count without decoding every row
        import pyarrow.compute as pc

        count = pc.sum(pc.match_substring(rows.column("row"), '"rejected": {')).as_py() or 0
    else:
        count = sum(is_preference_row(r) for r in rows)
    return count or None


def refuse_unreadable_streams(recipe) -> None:
    """`data stats` reads every row of a source at once; a streamed source that only a stream
    can read (WebDataset shards, a glob of files) is refused with what to do instead."""
    import glob

    if not recipe.data.streams():
        return
    for i, src in enumerate(recipe.data.train or []):
        path = src.path or ""
        if glob.has_magic(path) or path.endswith((".tar", ".tar.gz", ".tgz")):
            raise DataError(
                f"data.train[{i}] ({path}): data stats reads a source whole, and this one is "
                "read only as a stream (WebDataset shards or a glob of files)",
                hint="`peftvlm data preview RECIPE -n N` shows the first rows as training reads "
                     "them; a streamed run reports its bad and over-long rows at the end (log "
                     "and summary.json)")


def over_max_length(lengths: list[int], row_ids: list[str], max_length: int,
                    policy: str) -> dict:
    """Rows over max_length, named by their source row (`file:line`)."""
    over = [i for i, n in enumerate(lengths) if n > max_length]
    return {"count": len(over), "max_length": max_length, "policy": policy,
            "first_rows": [f"{row_ids[i]} ({lengths[i]} tokens)" for i in over[:5]]}


def summarise_lengths(lengths: list[int]) -> dict:
    ordered = sorted(lengths)
    return {"min": ordered[0], "median": statistics.median(ordered),
            "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], "max": ordered[-1],
            "mean": round(statistics.fmean(ordered), 1)}


def plot_lengths(lengths: list[int], max_length: int, path: Path, title: str) -> None:
    """Histogram of token lengths with train.max_length marked (matplotlib, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(lengths, bins=min(50, max(5, len(set(lengths)))), color="#4878cf")
    ax.axvline(max_length, color="#d62728", linestyle="--", label=f"max_length {max_length}")
    ax.set_xlabel("tokens per row (image tokens included)")
    ax.set_ylabel("rows")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_stats(result: dict, console=None) -> None:
    """The stats as a few readable tables."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table("section", "source", "records", "rows", "used", "bad", "cached",
                  title=f"{result['recipe']}: sources")
    for s in result["sources"]:
        table.add_row(s["section"], s["source"], str(s["records"]), str(s["rows"]),
                      str(s["used"]), str(s["bad_rows"]), "yes" if s["from_cache"] else "no")
    console.print(table)
    print_formats(result["sources"], console)
    t = result["token_lengths"]
    over = result["over_max_length"]
    console.print(f"train rows {result['train_rows']}, eval rows {result['eval_rows']}; tokens "
                  f"min {t['min']}, median {t['median']}, p95 {t['p95']}, max {t['max']}")
    if "train_pairs" in result or "eval_pairs" in result:
        console.print(f"preference pairs (chosen vs rejected): {result.get('train_pairs', 0)} "
                      f"training, {result.get('eval_pairs', 0)} held-out")
    console.print(f"over train.max_length={over['max_length']}: {over['count']} row(s) "
                  f"(data.on_overflow: {over['policy']})"
                  + (f", e.g. {', '.join(over['first_rows'][:3])}" if over["count"] else ""))
    print_bad_rows(result["bad_rows"], console)
    for note in result.get("notes", []):
        console.print(f"note: {note}")
    console.print(f"histogram: {result['histogram']}")
