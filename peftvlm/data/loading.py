"""From a recipe's `data` section to checked training and held-out rows."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from peftvlm.data.sources import BadRowReport, enforce_policy, load_conversations
from peftvlm.errors import DataError

LENGTH_BATCH = 64


@dataclass
class PreparedData:
    train: list[dict]
    eval: list[dict]
    bad_rows: dict = field(default_factory=dict)
    overflow: dict = field(default_factory=dict)

    def report(self) -> dict:
        return {"train_rows": len(self.train), "eval_rows": len(self.eval),
                "bad_rows": self.bad_rows, "dropped_overflow": self.overflow}


def recipe_sources(recipe):
    """(train, eval) source lists; a synthetic task is written to the cache first."""
    data = recipe.data
    if data.synthetic is None:
        return data.train or [], data.eval or []
    from peftvlm.models import cache_dir
    from peftvlm.recipe import SourceConfig
    from peftvlm.data.synthetic import write_synthetic

    paths = write_synthetic(data.synthetic, cache_dir())
    return [SourceConfig(path=str(paths["train"]))], [SourceConfig(path=str(paths["test"]))]


def with_system_prompt(rows: list[dict], prompt: str | None) -> list[dict]:
    if not prompt:
        return rows
    system = {"role": "system", "content": [{"type": "text", "text": prompt}]}
    return [r if r["messages"][0]["role"] == "system"
            else {**r, "messages": [system, *r["messages"]]} for r in rows]


def token_lengths(collator, rows: list[dict]) -> list[int]:
    """Each row's length in tokens as the trainer sees it (batched for speed)."""
    lengths = []
    for start in range(0, len(rows), LENGTH_BATCH):
        batch = collator(rows[start:start + LENGTH_BATCH])
        lengths += batch["attention_mask"].sum(dim=1).tolist()
    return lengths


def drop_overflowing(rows, collator, max_length: int, policy: str, what: str):
    """Rows longer than max_length would lose image tokens or answers: drop (counted) or stop."""
    lengths = token_lengths(collator, rows)
    over = [i for i, n in enumerate(lengths) if n > max_length]
    if over and policy == "error":
        listed = ", ".join(f"row {i} ({lengths[i]} tokens)" for i in over[:5])
        raise DataError(f"{what}: {len(over)} row(s) exceed train.max_length={max_length}: {listed}",
                        hint="raise train.max_length, shorten those rows, or set "
                             "data.on_overflow: drop")
    keep = set(range(len(rows))) - set(over)
    info = {"count": len(over), "max_length": max_length, "longest": max(lengths, default=0)}
    return [r for i, r in enumerate(rows) if i in keep], info


def prepare_data(recipe, collator) -> PreparedData:
    """Load, check and length-filter the recipe's rows; bad rows never crash training later."""
    train_sources, eval_sources = recipe_sources(recipe)
    base = recipe.base_dir()
    train_report, eval_report = BadRowReport(), BadRowReport()
    train = load_conversations(train_sources, base, train_report)
    evaluation = load_conversations(eval_sources, base, eval_report)
    enforce_policy(train_report, recipe.data.on_bad_row, "data.train")
    enforce_policy(eval_report, recipe.data.on_bad_row, "data.eval")
    train = with_system_prompt(train, recipe.data.system_prompt)
    evaluation = with_system_prompt(evaluation, recipe.data.system_prompt)
    if not train:
        raise DataError("data.train: no usable rows" +
                        (f" ({train_report.describe()})" if train_report.total else ""))
    train, overflow = drop_overflowing(train, collator, recipe.train.max_length,
                                       recipe.data.on_overflow, "data.train")
    if not train:
        raise DataError(f"data.train: every row is longer than train.max_length="
                        f"{recipe.train.max_length} (longest: {overflow['longest']} tokens)",
                        hint="raise train.max_length")
    return PreparedData(train, evaluation,
                        {"train": train_report.as_dict(), "eval": eval_report.as_dict()},
                        overflow)
