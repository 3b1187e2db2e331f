"""Benchmark data preparation at scale: cold and warm start, rows/s and peak RSS.

Writes a LLaVA-style JSONL of N rows (1-3 turns, answers of 1-20 words, 1,000 shared images) and
runs what `peftvlm train` does before the model trains (`prepare_data`: read, render, check
images, count tokens incl. image tokens, drop over-long rows) in a fresh process: cold (empty
preprocessing cache) then warm (cache hit). Peak RSS is reported above the process's footprint
once the processor is loaded (the floor in issue 11 is measured above the model's own), for the
process itself and for the largest of the `data.num_proc` worker processes it forks (which
start as a copy of it, processor included).

Run: python scripts/bench_data.py [--rows 10000 100000 1000000] [--num-proc 2] [--workdir DIR]
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

WORDS = ("red green blue yellow small large round square shape image picture left right top "
         "bottom near far bright dark one two three many").split()


def write_llava_rows(folder: Path, rows: int, images: int = 1000, seed: int = 0) -> Path:
    """`rows` conversations over `images` shared 32x32 PNGs (written once)."""
    from PIL import Image

    rng = random.Random(seed)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    for i in range(images):
        path = folder / "img" / f"{i}.png"
        if not path.exists():
            Image.new("RGB", (32, 32), (i % 255, (7 * i) % 255, (13 * i) % 255)).save(path)
    path = folder / f"llava-{rows}.jsonl"
    if path.exists():
        return path
    with path.open("w") as f:
        for n in range(rows):
            messages = []
            for turn in range(rng.randint(1, 3)):
                question = "What is in the picture? " if turn == 0 else "And the "
                question += " ".join(rng.choices(WORDS, k=rng.randint(3, 12))) + "?"
                answer = " ".join(rng.choices(WORDS, k=rng.randint(1, 20)))
                messages += [{"role": "user", "content": question},
                             {"role": "assistant", "content": answer}]
            f.write(json.dumps({"id": n, "images": [f"img/{rng.randrange(images)}.png"],
                                "messages": messages}) + "\n")
    return path


def child(recipe_path: str) -> None:
    """One start in this process: prints seconds, rows and RSS (MB) as JSON."""
    import resource

    from peftvlm.data.pipeline import prepare_data
    from peftvlm.data.report import processor_collator
    from peftvlm.recipe.load import load_recipe

    recipe = load_recipe(recipe_path)
    collator = processor_collator(recipe)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start, cpu = time.perf_counter(), cpu_seconds()
    data = prepare_data(recipe, collator)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "rows": len(data.train),
                      "base_mb": base,
                      "peak_mb": peak, "worker_peak_mb": workers,
                      "cached": all(s["from_cache"] for s in data.sources)}))


def cpu_seconds() -> float:
    """CPU time of this process and its finished worker processes (user + system)."""
    import resource

    return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


def one_start(recipe: Path, cache: Path) -> dict:
    env = {**os.environ, "PEFTVLM_CACHE": str(cache), "PYTHONPATH": str(REPO),
           "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, __file__, "--child", str(recipe)], env=env,
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def above(peak_mb: float, base_mb: float) -> str:
    """MB above the processor's footprint; '-' when no worker process ran."""
    return f"{max(peak_mb - base_mb, 0):,.0f}" if peak_mb else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10000, 100000, 1000000])
    parser.add_argument("--num-proc", type=int, default=2, help="data.num_proc")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-data-"))
    models = workdir / "cache"  # tiny models are built once and kept
    print("| rows | cold s | cold rows/s | cold CPU s (all processes) | warm s | "
          "peak RSS cold (MB above processor) | largest worker, cold (MB above processor) | "
          "peak RSS warm (MB above processor) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for n in args.rows:
        data = write_llava_rows(workdir / "data", n)
        recipe = workdir / f"bench-{n}.yaml"
        recipe.write_text(json.dumps({
            "name": f"bench-data-{n}", "model": {"id": "tiny-llava"}, "method": {"name": "lora"},
            "data": {"train": str(data), "num_proc": args.num_proc},
            "train": {"max_length": 256}}))
        shutil.rmtree(models / "prepared", ignore_errors=True)
        cold = one_start(recipe, models)
        warm = one_start(recipe, models)
        assert warm["cached"] and warm["rows"] == cold["rows"], (cold, warm)
        print(f"| {n:,} | {cold['seconds']:.1f} | {n / cold['seconds']:,.0f} | "
              f"{cold['cpu_seconds']:.1f} | "
              f"{warm['seconds']:.2f} | {cold['peak_mb'] - cold['base_mb']:,.0f} | "
              f"{above(cold['worker_peak_mb'], cold['base_mb'])} | "
              f"{warm['peak_mb'] - warm['base_mb']:,.0f} |", flush=True)
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
