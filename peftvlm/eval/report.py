"""What `peftvlm eval` writes and prints: base vs fine-tuned scores, predictions, bar charts.

    RUN/eval/predictions.jsonl  one row per example: id, prompt, references, prediction (the
                                fine-tuned model's), base_prediction; it is also a valid
                                predictions *and* references file for `peftvlm metrics`
    RUN/eval/metrics.json       per score: base, fine_tuned, delta, higher_is_better; per-class
                                exact match for classification-like answers; settings
    RUN/eval/metrics.png        grouped bars (base vs fine-tuned), then one panel per breakdown
                                (`vqa_accuracy/<question type>`, answer classes)
    RUN/eval/boxes/row-N.png    grounding / detection rows (answers with boxes in the family's
                                convention): reference boxes green, crowd grey, the fine-tuned
                                model's predicted boxes red, for the first few rows
"""

from __future__ import annotations

import json
from pathlib import Path

from peftvlm.data.batch.preview import box_picture
from peftvlm.metrics import get_metric

MAX_CLASSES = 20  # more distinct answers than this is free text, not classes
MAX_BOX_PICTURES = 8  # eval rows whose boxes are drawn (a few to look at, not a gallery)


def compare(base: dict | None, tuned: dict, higher_is_better: dict) -> dict:
    """{score: {base, fine_tuned, delta, higher_is_better}} (base/delta None without a base)."""
    out = {}
    for name, value in tuned.items():
        before = (base or {}).get(name)
        delta = value - before if value is not None and before is not None else None
        out[name] = {"base": before, "fine_tuned": value, "delta": delta,
                     "higher_is_better": higher_is_better.get(name, True)}
    return out


def answer_classes(references: list[list[str]]) -> list[str] | None:
    """Each row's single answer when the answers look like a small label set, else None."""
    if not references or any(len(r) != 1 for r in references):
        return None
    classes = [r[0].strip().lower() for r in references]
    distinct = len(set(classes))
    return classes if 2 <= distinct <= MAX_CLASSES and distinct < len(classes) else None


def per_class_accuracy(predictions: list[str], classes: list[str]) -> dict[str, float]:
    """Exact match (VQA-normalised) among the rows of each answer class."""
    scores = get_metric("exact_match").func(predictions, [[c] for c in classes],
                                            question_types=classes)
    return {k.split("/", 1)[1]: v for k, v in scores.items() if "/" in k}


def prompt_text(messages: list[dict]) -> str:
    """The prompt turns as plain text (`user: <image> What color...`), family-independent."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    turns = []
    for m in messages[:last]:
        parts = ["<image>" if c["type"] == "image" else c.get("text", "") for c in m["content"]]
        turns.append(f"{m['role']}: {' '.join(p for p in parts if p)}")
    return "\n".join(turns)


def prediction_rows(rows: list[dict], split: str, tuned: list[str], base: list[str] | None,
                    references: list[list[str]]) -> list[dict]:
    """The rows of predictions.jsonl, in data order."""
    out = []
    for i, row in enumerate(rows):
        item = {"id": row.get("id", f"{split}-{i}"), "prompt": prompt_text(row["messages"]),
                "references": references[i], "prediction": tuned[i]}
        if base is not None:
            item["base_prediction"] = base[i]
        if "question_type" in row:
            item["question_type"] = row["question_type"]
        out.append(item)
    return out


def write_outputs(out_dir: Path, result: dict, predictions: list[dict]) -> dict[str, Path]:
    """predictions.jsonl, metrics.json and metrics.png under `out_dir`; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"predictions": out_dir / "predictions.jsonl", "metrics": out_dir / "metrics.json",
             "plot": out_dir / "metrics.png"}
    with paths["predictions"].open("w", encoding="utf-8") as f:
        for row in predictions:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    paths["metrics"].write_text(json.dumps(result, indent=2) + "\n")
    plot_comparison(result, paths["plot"])
    return paths


def plot_panels(result: dict) -> list[tuple[str, dict]]:
    """(title, {label: {base, fine_tuned}}) per panel: overall scores, then each breakdown."""
    scores = {k: v for k, v in result["metrics"].items() if v["fine_tuned"] is not None}
    panels = [("overall", {k: v for k, v in scores.items() if "/" not in k})]
    prefixes = sorted({k.split("/", 1)[0] for k in scores if "/" in k})
    for prefix in prefixes:
        panels.append((f"{prefix} by question type",
                       {k.split("/", 1)[1]: v for k, v in scores.items()
                        if k.startswith(prefix + "/")}))
    if result.get("per_class"):
        panels.append(("exact match per answer class", result["per_class"]))
    return [(title, bars) for title, bars in panels if bars]


def plot_comparison(result: dict, path: Path) -> list[str]:
    """Grouped bars, base vs fine-tuned, one panel per group of scores; returns panel titles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = plot_panels(result)
    widest = max((len(bars) for _, bars in panels), default=1)
    fig, axes = plt.subplots(len(panels) or 1, 1, squeeze=False, dpi=110,
                             figsize=(max(6.0, 0.8 * widest + 2), 3.2 * max(len(panels), 1)))
    for ax, (title, bars) in zip(axes[:, 0], panels):
        draw_grouped_bars(ax, bars, title)
    fig.suptitle(f"{result['run_name']}: {result['split']} split, "
                 f"{result['num_examples']} examples")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return [title for title, _ in panels]


def draw_grouped_bars(ax, bars: dict, title: str) -> None:
    """Base (grey) beside fine-tuned (blue) for each label, values printed on the bars."""
    labels = list(bars)
    xs = list(range(len(labels)))
    has_base = any(v.get("base") is not None for v in bars.values())
    width = 0.38 if has_base else 0.55
    series = [("fine-tuned", "fine_tuned", "#1f77b4", width / 2 if has_base else 0.0)]
    if has_base:
        series.insert(0, ("base", "base", "#9e9e9e", -width / 2))
    top = 0.0
    for label, key, colour, shift in series:
        values = [bars[k].get(key) or 0.0 for k in labels]
        drawn = ax.bar([x + shift for x in xs], values, width, label=label, color=colour)
        ax.bar_label(drawn, fmt="%.3g", fontsize="x-small", padding=1)
        top = max(top, *values)
    rotate = len(labels) > 6
    ax.set_xticks(xs, labels, rotation=30 if rotate else 0, ha="right" if rotate else "center")
    ax.set_xlim(-0.8, len(labels) - 0.2)
    ax.set_ylim(0, (top or 1.0) * 1.25)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", ncols=2)


def print_comparison(result: dict, console=None) -> None:
    """The base vs fine-tuned table (with deltas), the per-class table, notes, output paths."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"{result['run_name']}: {result['split']} split, "
                        f"{result['num_examples']} examples")
    for column in ("metric", "base", "fine-tuned", "delta"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for name, row in result["metrics"].items():
        table.add_row(name, *score_cells(row))
    console.print(table)
    if result.get("per_class"):
        classes = Table(title="exact match per answer class")
        for column in ("answer", "base", "fine-tuned", "delta"):
            classes.add_column(column, justify="left" if column == "answer" else "right")
        for name, row in result["per_class"].items():
            classes.add_row(name, *score_cells({**row, "higher_is_better": True}))
        console.print(classes)
    for name, note in result.get("notes", {}).items():
        console.print(f"[dim]{name}: {note}[/dim]")
    for what, path in result.get("files", {}).items():
        console.print(f"{what}: {path}")


def score_cells(row: dict) -> list[str]:
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    delta = row.get("delta")
    if delta is None:
        shown = "n/a"
    else:
        better = delta > 0 if row["higher_is_better"] else delta < 0
        colour = "green" if better else "red" if delta != 0 else "dim"
        shown = f"[{colour}]{delta:+.4f}[/{colour}]"
    return [fmt(row.get("base")), f"[bold]{fmt(row.get('fine_tuned'))}[/bold]", shown]


def write_box_pictures(folder: Path, rows: list[dict], predictions: list[str], box_format: str,
                       limit: int = MAX_BOX_PICTURES) -> list[Path]:
    """Reference vs predicted boxes drawn on the first `limit` rows whose answers hold boxes."""
    written = []
    for i, (row, prediction) in enumerate(zip(rows, predictions)):
        if len(written) >= limit:
            break
        path = folder / "boxes" / f"row-{i}.png"
        if box_picture(row, box_format, path, prediction):
            written.append(path)
    return written
