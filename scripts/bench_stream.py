"""Benchmark streamed training data: time to the first row, rows/s and peak RSS while reading.

Writes the LLaVA-style JSONL of `bench_data.py` (N rows over 1,000 shared 32x32 images) and the
same rows as WebDataset shards (`make_shards.py`, images inside), then reads N rows of each with
`streaming: true` in a fresh process, as training does before collating: read, render, check
images, count tokens, drop over-long rows. Peak RSS is above the process's footprint once the
processor is loaded; bounded memory means it stays flat as N grows.

Run: python scripts/bench_stream.py [--rows 10000 100000 1000000] [--workdir DIR]
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "scripts")]


def child(recipe_path: str, rows: int) -> None:
    """Read `rows` streamed rows in this process; prints seconds and RSS (MB) as JSON."""
    import itertools
    import resource

    from peftvlm.data.report import processor_collator
    from peftvlm.data.stream.streaming import open_training_stream
    from peftvlm.recipe.load import load_recipe

    recipe = load_recipe(recipe_path)
    collator = processor_collator(recipe)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    stream = iter(open_training_stream(recipe, collator))
    next(stream)
    first = time.perf_counter() - start
    got = 1 + sum(1 for _ in itertools.islice(stream, rows - 1))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"first": first, "seconds": seconds, "rows": got, "base_mb": base,
                      "peak_mb": peak}))


def one_run(recipe: Path, rows: int, cache: Path) -> dict:
    env = {**os.environ, "PEFTVLM_CACHE": str(cache), "PYTHONPATH": str(REPO),
           "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, __file__, "--child", str(recipe), "--rows", str(rows)],
                         env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10000, 100000, 1000000])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.rows[0])
    from bench_data import write_llava_rows
    from make_shards import write_shards

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-stream-"))
    print("| rows | source | first row s | rows/s | peak RSS (MB above processor) |")
    print("| ---: | --- | ---: | ---: | ---: |")
    for n in args.rows:
        data = write_llava_rows(workdir / "data", n)
        shards = workdir / f"shards-{n}"
        if not shards.exists():
            write_shards(data, shards, rows_per_shard=10_000)
        for label, path in (("jsonl", str(data)), ("webdataset", str(shards / "train-*.tar"))):
            recipe = workdir / f"bench-{label}-{n}.yaml"
            recipe.write_text(json.dumps({
                "name": f"bench-stream-{n}", "model": {"id": "tiny-llava"},
                "method": {"name": "lora"}, "data": {"train": path, "streaming": True},
                "train": {"max_length": 256, "max_steps": 1}}))
            run = one_run(recipe, n, workdir / "cache")
            print(f"| {n:,} | {label} | {run['first']:.2f} | {run['rows'] / run['seconds']:,.0f} "
                  f"| {run['peak_mb'] - run['base_mb']:,.0f} |", flush=True)
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
