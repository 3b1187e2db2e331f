"""Benchmark `peftvlm data stats` on a VQAv2-layout file of N questions (default 10,000).

Measures, in one run on the same data: preprocessing + token lengths the way `data stats` does
them (fast lengths; cold = no preprocessing cache, warm = cache hit), the whole CLI command as
a user runs it, and the baseline: running the training collator on every row to count tokens
(measured on a subsample and scaled to N). Prints seconds and ratios.

Run: python scripts/bench_data_stats.py [--rows 10000] [--baseline-rows 300] [--workdir DIR]
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
sys.path.insert(0, str(REPO))


def write_data(workdir: Path, rows: int) -> Path:
    """VQAv2 questions + annotations (two questions per image) and a recipe reading them."""
    from peftvlm.data.read.fixtures import write_fixture

    files = write_fixture("vqav2", workdir / "vqav2", train_size=rows // 2, eval_size=10)["train"]
    recipe = workdir / "bench.yaml"
    recipe.write_text(json.dumps({
        "name": "bench-data-stats", "model": {"id": "tiny-llava"}, "method": {"name": "lora"},
        "data": {"template": "vqa", "train": [{
            "path": str(files["path"]), "format": "vqav2",
            "annotations": str(files["annotations"]),
            "image_pattern": "images/{image_id:06d}.png"}]},
        "train": {"max_length": 128}}))
    return recipe


CPU = {}


def timed(fn):
    """(result, wall seconds); the process CPU seconds go to CPU[fn's line] for the report."""
    start, cpu = time.perf_counter(), time.process_time()
    result = fn()
    CPU[fn.__code__.co_firstlineno] = time.process_time() - cpu
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=10000, help="questions in the data file")
    parser.add_argument("--baseline-rows", type=int, default=300,
                        help="rows the collator baseline runs on (scaled to --rows)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="folder for data and cache (default: a temporary folder)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="peftvlm-bench-"))
    os.environ["PEFTVLM_CACHE"] = str(workdir / "cache")
    recipe_path, t_write = timed(lambda: write_data(workdir, args.rows))

    from peftvlm.data.prepare.lengths import collator_lengths
    from peftvlm.data.prepare.loading import load_rows
    from peftvlm.data.report import processor_collator, stats
    from peftvlm.recipe.load import load_recipe

    recipe = load_recipe(recipe_path)
    collator, t_proc = timed(lambda: processor_collator(recipe))
    shutil.rmtree(workdir / "cache" / "prepared", ignore_errors=True)
    cold, t_cold = timed(lambda: stats(recipe, workdir / "cold.png"))
    warm, t_warm = timed(lambda: stats(recipe, workdir / "warm.png"))
    rows = load_rows(recipe, collator.family.box_format).train
    sample = rows[:args.baseline_rows]
    _, t_sample = timed(lambda: collator_lengths(collator, sample))
    t_baseline = t_sample * len(rows) / len(sample)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cli, t_cli = timed(lambda: subprocess.run(
        [sys.executable, "-m", "peftvlm", "data", "stats", str(recipe_path), "--json",
         "--plot", str(workdir / "cli.png")], capture_output=True, text=True, env=env))
    assert cli.returncode == 0, cli.stderr
    cpu = list(CPU.values())  # write, processor, cold, warm, baseline sample, (cli: subprocess)
    n = cold["train_rows"]
    print(f"rows: {n} conversations from {args.rows} questions (data written in {t_write:.1f} s)")
    print(f"load average now: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (wall / cpu s)")
    print(f"processor load (no weights):          {t_proc:6.2f} s / {cpu[1]:.2f}")
    print(f"data stats, cold (no prep cache):     {t_cold:6.2f} s / {cpu[2]:.2f}")
    print(f"data stats, warm (prep cache hit):    {t_warm:6.2f} s / {cpu[3]:.2f}  "
          f"({warm['sources'][0]['from_cache'] and 'from cache' or 'NOT cached'})")
    print(f"`peftvlm data stats` CLI, end to end: {t_cli:6.2f} s")
    print(f"baseline, collator on every row:      {t_baseline:6.2f} s / "
          f"{cpu[4] * len(rows) / len(sample):.2f}  (measured on {len(sample)} rows, scaled)")
    print(f"ratio baseline / cold stats: {t_baseline / t_cold:.1f}x; "
          f"cold / warm: {t_cold / t_warm:.1f}x")


if __name__ == "__main__":
    main()
