"""Benchmark the ROUGE-L novelty filter: `NoveltyIndex` against a naive rouge-score loop.

Builds a seeded synthetic corpus of instruction-like sentences (Zipf-distributed words, 4-30
words long, a share of them light edits of earlier ones so the filter has work to reject), then:

1. runs the fast filter over all candidates against the pool (candidates accepted join it);
2. runs the naive loop (rouge-score against every pool text) on a subsample of candidates, and
   the fast filter on the same subsample, checks that the decisions are identical, and reports
   the per-candidate time ratio measured in this run.

    PYTHONPATH=. python scripts/bench_rouge.py --pool 20000 --candidates 20000 --naive-sample 20
"""

from __future__ import annotations

import argparse
import itertools
import random
import time

from peftvlm.data.self_instruct.rouge import NoveltyIndex, naive_novelty_filter


def synthetic_corpus(size: int, seed: int, vocab_size: int = 5000,
                     edit_share: float = 0.3) -> list[str]:
    """Instruction-like sentences; `edit_share` of them are 1-3 word edits of earlier ones."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(vocab_size)]
    # Zipf: a few words are very common, as in real instructions.
    cum = list(itertools.accumulate(1 / (rank + 1) for rank in range(vocab_size)))
    texts: list[str] = []
    for _ in range(size):
        if texts and rng.random() < edit_share:
            words = rng.choice(texts).split()
            for _ in range(rng.randint(1, 3)):
                words[rng.randrange(len(words))] = rng.choices(vocab, cum_weights=cum)[0]
        else:
            words = rng.choices(vocab, cum_weights=cum, k=rng.randint(4, 30))
        texts.append(" ".join(words))
    return texts


def run_fast(pool: list[str], candidates: list[str], threshold: float,
             hint: list[str]) -> tuple[list[bool], float, float]:
    """Decisions, wall seconds and CPU seconds, index building included."""
    start, cpu = time.perf_counter(), time.process_time()
    index = NoveltyIndex(threshold, frequency_hint=hint)
    for text in pool:
        index.add(text)
    decisions = [index.check_and_add(c) for c in candidates]
    return decisions, time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool", type=int, default=20000, help="texts already in the pool")
    parser.add_argument("--candidates", type=int, default=20000, help="texts to filter")
    parser.add_argument("--naive-sample", type=int, default=20,
                        help="candidates the naive loop scores (it is ~1 s each at pool 20k)")
    parser.add_argument("--threshold", type=float, default=0.7, help="reject when F1 > this")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    corpus = synthetic_corpus(args.pool + args.candidates, args.seed)
    pool, candidates = corpus[:args.pool], corpus[args.pool:]
    decisions, fast_s, fast_cpu = run_fast(pool, candidates, args.threshold, corpus)
    print(f"fast: {args.candidates} candidates vs pool {args.pool}: {fast_s:.1f} s "
          f"({fast_cpu:.1f} s CPU, one core), "
          f"kept {sum(decisions)} ({fast_s / args.candidates * 1e3:.2f} ms/candidate)")

    sample = candidates[:args.naive_sample]
    start, cpu = time.perf_counter(), time.process_time()
    naive = naive_novelty_filter(sample, pool, args.threshold)
    naive_s, naive_cpu = time.perf_counter() - start, time.process_time() - cpu
    fast_sample, _, _ = run_fast(pool, sample, args.threshold, corpus)
    assert naive == fast_sample, "fast and naive filters disagree"
    per_naive = naive_cpu / len(sample)
    per_fast = fast_cpu / args.candidates
    print(f"naive: {len(sample)} candidates vs pool {args.pool}: {naive_s:.1f} s "
          f"({naive_cpu:.1f} s CPU) "
          f"({per_naive * 1e3:.0f} ms/candidate); decisions identical to fast on this sample "
          f"(kept {sum(naive)}/{len(sample)})")
    hours = per_naive * args.candidates / 3600
    print(f"speed-up per candidate (CPU time): {per_naive / per_fast:.0f}x; naive extrapolated "
          f"to all {args.candidates} candidates: {hours:.1f} CPU hours")


if __name__ == "__main__":
    main()
