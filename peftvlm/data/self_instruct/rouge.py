"""ROUGE-L F1 exactly as the `rouge-score` package computes it, and a fast exact novelty index.

Self-Instruct keeps a generated instruction only if its ROUGE-L F1 against every instruction
already in the pool (seeds + accepted) is at most 0.7. Done naively that is one quadratic LCS per
pair, so 20k candidates against a 20k pool is 4e8 LCS tables. `NoveltyIndex` gives the same
accept/reject decisions with far less work:

* F1 = 2 * LCS / (m + n) and LCS <= the token-multiset overlap <= min(m, n), so a pair can only
  pass the threshold when its lengths are close and its multisets share many tokens;
* tokens are made into a set of (token, occurrence) items ordered from rare to common, and a pair
  whose overlap reaches t must share an item among the first |x| - t + 1 items of each side
  (the prefix filter of set-similarity joins), so only prefixes are indexed and probed;
* survivors get the overlap bound, then an exact bit-parallel LCS, then rouge-score's own float
  formula, so ties and rounding land where rouge-score puts them.

Tokenisation is rouge-score's default tokenizer (lowercase, split on non-alphanumerics, optional
Porter stemming), imported from the package itself.

    python -c "from peftvlm.data.self_instruct.rouge import rouge_l; print(rouge_l('a red car', 'the red car'))"
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from functools import lru_cache

# A tie-breaking slack for float comparisons in the *filters* only: they must never skip a pair
# that rouge-score would score above the threshold, so they err towards checking more pairs.
_SLACK = 1e-9


@lru_cache(maxsize=2)
def _tokenizer(use_stemmer: bool):
    from rouge_score.tokenizers import DefaultTokenizer

    return DefaultTokenizer(use_stemmer=use_stemmer)


def tokenize(text: str, use_stemmer: bool = False) -> list[str]:
    """rouge-score's default tokenisation: lowercase, alphanumeric runs, optional stemming."""
    return _tokenizer(use_stemmer).tokenize(text)


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists (bit-parallel, exact)."""
    if not a or not b:
        return 0
    return _lcs_with_masks(_position_masks(a), len(a), b)


def _position_masks(tokens: Sequence[str]) -> dict[str, int]:
    masks: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        masks[tok] = masks.get(tok, 0) | (1 << i)
    return masks


def _lcs_with_masks(masks: dict[str, int], length: int, other: Sequence[str]) -> int:
    # Allison-Dix / Hyyrö: one big-int step per token of `other`; zero bits of v count the LCS.
    full = (1 << length) - 1
    v = full
    for tok in other:
        u = v & masks.get(tok, 0)
        v = ((v + u) | (v - u)) & full
    return length - v.bit_count()


def f1_from_lcs(lcs: int, target_len: int, prediction_len: int) -> float:
    """rouge-score's F-measure, with its exact float operations (so ties round the same way)."""
    if not target_len or not prediction_len:
        return 0.0
    precision = lcs / prediction_len
    recall = lcs / target_len
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def rouge_l(target: str, prediction: str, use_stemmer: bool = False) -> float:
    """ROUGE-L F1 of two texts; equal to `RougeScorer(["rougeL"]).score(...)["rougeL"].fmeasure`."""
    t, p = tokenize(target, use_stemmer), tokenize(prediction, use_stemmer)
    return f1_from_lcs(lcs_length(t, p), len(t), len(p))


def _required_overlap(length: int, threshold: float) -> int:
    """Fewest shared items a text of `length` tokens needs with any partner to reach the
    threshold (partners shorter than length*thr/(2-thr) never reach it). Reaching, not only
    exceeding: rouge-score's float F1 can land just above a threshold it exactly equals."""
    return max(1, math.ceil(threshold * length / (2 - threshold) - _SLACK))


def _pair_overlap(m: int, n: int, threshold: float) -> int:
    """Fewest shared items for a pair of lengths m, n to reach the threshold."""
    return max(1, math.ceil(threshold * (m + n) / 2 - _SLACK))


class NoveltyIndex:
    """A growing pool of texts that answers "does any pool text have ROUGE-L F1 > threshold?".

    The answers are exactly those of a loop over the pool with rouge-score; only the work
    differs. `frequency_hint` (texts like the ones to come) orders items from rare to common,
    which keeps prefixes selective; any order is correct, the hint only makes it faster.
    """

    def __init__(self, threshold: float = 0.7, use_stemmer: bool = False,
                 frequency_hint: Iterable[str] = ()):
        if not 0 <= threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        self.threshold = threshold
        self.use_stemmer = use_stemmer
        self.texts: list[str] = []
        self._tokens: list[list[str]] = []
        self._items: list[frozenset[int]] = []
        self._lengths: list[int] = []
        self._postings: dict[int, dict[int, list[int]]] = {}
        self._max_len = 0
        self._item_ids: dict[tuple[str, int], int] = {}
        self._rank: dict[int, int] = {}
        self._rank_hint(frequency_hint)

    def __len__(self) -> int:
        return len(self.texts)

    def _rank_hint(self, texts: Iterable[str]) -> None:
        counts: dict[int, int] = {}
        for text in texts:
            for item in self._item_list(tokenize(text, self.use_stemmer)):
                counts[item] = counts.get(item, 0) + 1
        self._rank = counts  # frozen from here on: the order must never change once used

    def _item_list(self, tokens: list[str]) -> list[int]:
        # The k-th occurrence of a token is its own item, so set overlap == multiset overlap.
        seen: dict[str, int] = {}
        items = []
        for tok in tokens:
            k = seen[tok] = seen.get(tok, 0) + 1
            items.append(self._item_ids.setdefault((tok, k), len(self._item_ids)))
        return items

    def _ordered(self, items: list[int]) -> list[int]:
        return sorted(items, key=lambda i: (self._rank.get(i, 0), i))

    def add(self, text: str) -> None:
        """Put a text into the pool."""
        tokens = tokenize(text, self.use_stemmer)
        items = self._item_list(tokens)
        idx = len(self.texts)
        self.texts.append(text)
        self._tokens.append(tokens)
        self._items.append(frozenset(items))
        n = len(items)
        self._lengths.append(n)
        self._max_len = max(self._max_len, n)
        # Postings: item -> partner length -> texts, so a probe meets only feasible lengths.
        for item in self._ordered(items)[:n - _required_overlap(n, self.threshold) + 1]:
            self._postings.setdefault(item, {}).setdefault(n, []).append(idx)

    def find_similar(self, text: str) -> tuple[int, float] | None:
        """(pool index, F1) of the first pool text (in pool order) scoring above the threshold,
        or None when the text is novel."""
        tokens = tokenize(text, self.use_stemmer)
        if not tokens:
            return None  # rouge-score scores an empty text 0 against anything
        items = self._item_list(tokens)
        return self._first_above(tokens, frozenset(items), self._probe(self._ordered(items)))

    def _probe(self, ordered: list[int]) -> list[int]:
        """Pool texts of feasible length sharing an item with this text's pair-specific prefix."""
        m, thr = len(ordered), self.threshold
        n_lo = max(1, math.ceil(thr * m / (2 - thr) - _SLACK))
        n_hi = self._max_len if thr == 0 else min(self._max_len,
                                                  math.floor(m * (2 - thr) / thr + _SLACK))
        # A pair (m, n) reaching the threshold shares t(m, n) items, so this text's first
        # m - t + 1 items already meet the partner's indexed prefix: the i-th item (from 0)
        # only needs partners of the lengths n with i <= m - t(m, n).
        last_position = {n: m - _pair_overlap(m, n, thr) for n in range(n_lo, n_hi + 1)}
        found: set[int] = set()
        for i, item in enumerate(ordered[:m - _required_overlap(m, thr) + 1]):
            for n, texts in self._postings.get(item, {}).items():
                if last_position.get(n, -1) >= i:
                    found.update(texts)
        return sorted(found)

    def _first_above(self, tokens, items, candidates) -> tuple[int, float] | None:
        m, thr = len(tokens), self.threshold
        pool_items, lengths = self._items, self._lengths
        masks = None
        for j in candidates:
            n = lengths[j]
            if 2 * len(items & pool_items[j]) < thr * (m + n) - _SLACK:
                continue  # LCS <= multiset overlap
            masks = masks or _position_masks(tokens)
            f1 = f1_from_lcs(_lcs_with_masks(masks, m, self._tokens[j]), n, m)
            if f1 > thr:
                return j, f1
        return None

    def check_and_add(self, text: str) -> bool:
        """Add the text if it is novel; return whether it was added."""
        if self.find_similar(text) is not None:
            return False
        self.add(text)
        return True


def naive_novelty_filter(candidates: Iterable[str], pool: Iterable[str], threshold: float = 0.7,
                         use_stemmer: bool = False) -> list[bool]:
    """Reference: rouge-score against every pool text, accepted candidates joining the pool.

    Quadratic and slow; tests and `scripts/bench_rouge.py` check `NoveltyIndex` against it.
    """
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
    pool = list(pool)
    decisions = []
    for cand in candidates:
        novel = all(scorer.score(p, cand)["rougeL"].fmeasure <= threshold for p in pool)
        decisions.append(novel)
        if novel:
            pool.append(cand)
    return decisions


def fast_novelty_filter(candidates: Iterable[str], pool: Iterable[str], threshold: float = 0.7,
                        use_stemmer: bool = False) -> list[bool]:
    """Same decisions as `naive_novelty_filter`, through a `NoveltyIndex`."""
    candidates, pool = list(candidates), list(pool)
    index = NoveltyIndex(threshold, use_stemmer, frequency_hint=pool + candidates)
    for text in pool:
        index.add(text)
    return [index.check_and_add(c) for c in candidates]
