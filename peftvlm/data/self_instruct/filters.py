"""The filters a generated task passes before it is kept, each counted in the report.

A candidate is rejected by the first filter it fails, in this order (cheap checks first):
truncated, empty_output, input_equals_output, too_short, too_long, blacklisted,
exact_duplicate, not_novel (ROUGE-L against seeds + kept instructions, as in Self-Instruct),
near_duplicate (ROUGE-L of the whole task against kept tasks). `malformed` counts pieces of an
answer that did not parse into a task at all.

In visual mode the duplicate and novelty pools are per image: the same question about two
different images makes two different training rows.
"""

from __future__ import annotations

import re

from peftvlm.data.self_instruct.prompts import Candidate
from peftvlm.data.self_instruct.rouge import NoveltyIndex

REASONS = ("truncated", "malformed", "empty_output", "input_equals_output", "too_short",
           "too_long", "blacklisted", "exact_duplicate", "not_novel", "near_duplicate")


def normalise(text: str) -> str:
    """Case, inner whitespace and surrounding punctuation do not make a task different."""
    return " ".join(text.lower().split()).strip(" .,;:!?\"'")


class Filters:
    """Decides on candidates, remembers what was kept, and counts rejections per reason."""

    def __init__(self, config, seed_tasks: list[tuple[str, str]], per_image: bool,
                 frequency_hint: list[str]):
        self.config = config
        self.per_image = per_image
        self.counts = dict.fromkeys(REASONS, 0)
        words = "|".join(re.escape(w.strip()) for w in config.blacklist if w.strip())
        self._blacklist = re.compile(rf"(?i)(?<!\w)(?:{words})(?!\w)") if words else None
        # Per-image pools stay small, so only the global pool is worth ordering by frequency.
        self._hint = [] if per_image else frequency_hint
        self._exact: set[tuple] = set()
        self._novelty: dict[str | None, NoveltyIndex] = {}
        self._near: dict[str | None, NoveltyIndex] = {}
        for instruction, task_input in ([] if per_image else seed_tasks):
            self._exact.add((None, normalise(instruction), normalise(task_input)))
            self._index(self._novelty, None, self.config.rouge_threshold).add(instruction)

    def _index(self, pools: dict, scope, threshold: float) -> NoveltyIndex:
        if scope not in pools:
            pools[scope] = NoveltyIndex(threshold, self.config.use_stemmer, self._hint)
        return pools[scope]

    def _scope(self, cand: Candidate):
        return cand.image if self.per_image else None

    def reason(self, cand: Candidate) -> str | None:
        """The first filter the candidate fails, or None; changes nothing."""
        cfg, scope = self.config, self._scope(cand)
        if cand.truncated and cfg.drop_truncated:
            return "truncated"
        if any(not normalise(answer) for _, answer in cand.turns):
            return "empty_output"
        if any(normalise(a) in {normalise(cand.input), normalise(q)} for q, a in cand.turns):
            return "input_equals_output"
        lengths = [len(q.split()) for q in cand.questions]
        if min(lengths) < cfg.min_words:
            return "too_short"
        if max(lengths) > cfg.max_words:
            return "too_long"
        if self._blacklist and self._blacklist.search(cand.instruction):
            return "blacklisted"
        if self._exact_key(cand) in self._exact:
            return "exact_duplicate"
        novelty = self._novelty.get(scope)
        if novelty is not None and novelty.find_similar(cand.instruction) is not None:
            return "not_novel"
        near = self._near.get(scope)
        if near is not None and near.find_similar(cand.full_text()) is not None:
            return "near_duplicate"
        return None

    def _exact_key(self, cand: Candidate) -> tuple:
        return (self._scope(cand), normalise(cand.instruction), normalise(cand.input))

    def keep(self, cand: Candidate) -> None:
        """Add a kept candidate to the duplicate and novelty pools."""
        scope = self._scope(cand)
        self._exact.add(self._exact_key(cand))
        self._index(self._novelty, scope, self.config.rouge_threshold).add(cand.instruction)
        self._index(self._near, scope, self.config.near_duplicate_threshold).add(cand.full_text())

    def check(self, cand: Candidate) -> bool:
        """Keep the candidate (True) or count why it was rejected (False)."""
        reason = self.reason(cand)
        if reason is not None:
            self.counts[reason] += 1
            return False
        self.keep(cand)
        return True
