#!/usr/bin/env python
"""Evaluation throughput: batched left-padded generation (what `peftvlm eval` and training's
held-out eval do) vs one prompt at a time, on the quickstart's held-out rows and model.

Batch size 1 is the baseline, measured in the same process on the same rows. Prints rows/s,
the speed-up over batch 1 and the fraction of answers identical to batch 1's (left padding
must not change greedy answers).

    python scripts/bench_eval.py [--rows 200] [--batch-sizes 1,16,50] [--repeat 2] [--run RUN]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200, help="held-out rows to generate on")
    parser.add_argument("--batch-sizes", default="1,16,50", help="comma-separated; first = base")
    parser.add_argument("--run", type=Path, help="a quickstart run folder: bench its adapter")
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=2, help="best of N timings per size")
    args = parser.parse_args()

    from peftvlm.eval.run import load_adapter, load_base_and_rows
    from peftvlm.eval.generate import generate_answers
    from peftvlm.recipe.load import load_recipe

    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml")
    loaded, rows = load_base_and_rows(recipe, "test", args.rows)
    model = load_adapter(loaded.model, args.run) if args.run else loaded.model
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    baseline_answers, baseline_rate = None, None
    print(f"{len(rows)} rows, max_new_tokens={args.max_new_tokens}, "
          f"model: {'adapter of ' + str(args.run) if args.run else 'tiny-llava base'}")
    print(f"{'batch':>6} {'seconds':>8} {'rows/s':>8} {'speed-up':>9} {'same answers':>13}")
    for size in sizes:
        seconds = float("inf")
        for _ in range(args.repeat):
            started = time.perf_counter()
            answers = generate_answers(model, loaded.processor, loaded.family, rows, size,
                                       args.max_new_tokens)
            seconds = min(seconds, time.perf_counter() - started)
        rate = len(rows) / seconds
        if baseline_answers is None:
            baseline_answers, baseline_rate = answers, rate
        same = sum(a == b for a, b in zip(answers, baseline_answers)) / len(rows)
        print(f"{size:>6} {seconds:>8.2f} {rate:>8.1f} {rate / baseline_rate:>8.1f}x "
              f"{same:>13.3f}")


if __name__ == "__main__":
    main()
