"""The leaf types of the data layer: a bad row, the report that counts them, and the policy
that stops a run on them. Every data module imports these from here (nothing below it), so
readers, formats, images and video never import back up into the modules that use them."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from peftvlm.errors import DataError

MAX_LISTED_ROWS = 5


class BadRow(Exception):
    """A row that cannot be used; `reason` is a short stable key, `detail` says why."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass
class BadRowReport:
    """Counts of skipped rows per reason, with the first few row ids of each."""

    counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def add(self, reason: str, row_id: str, detail: str) -> None:
        self.counts[reason] += 1
        if len(self.examples[reason]) < MAX_LISTED_ROWS:
            self.examples[reason].append(f"{row_id} ({detail})")

    def merge(self, other: "BadRowReport") -> None:
        for reason, count in other.counts.items():
            self.counts[reason] += count
            room = MAX_LISTED_ROWS - len(self.examples[reason])
            self.examples[reason].extend(other.examples[reason][:max(room, 0)])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict:
        return {r: {"count": c, "first_rows": self.examples[r]} for r, c in self.counts.items()}

    def describe(self) -> str:
        return "; ".join(f"{c} {r.replace('_', ' ')} (e.g. {self.examples[r][0]})"
                         for r, c in self.counts.items())


def enforce_policy(report: BadRowReport, policy: str, what: str) -> None:
    """With `on_bad_row: error`, any bad row stops the run before training, naming rows."""
    if report.total and policy == "error":
        raise DataError(f"{what}: {report.total} bad row(s): {report.describe()}",
                        hint="fix those rows, or set data.on_bad_row: skip to drop and count them")


def with_system_prompt(rows, prompt: str | None) -> list[dict]:
    if not prompt:
        return rows
    system = {"role": "system", "content": [{"type": "text", "text": prompt}]}
    return [r if r["messages"][0]["role"] == "system"
            else {**r, "messages": [system, *r["messages"]]} for r in rows]
