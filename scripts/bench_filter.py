"""Benchmark `peftvlm data filter`: CLIP-score throughput (pairs/s) at several batch sizes.

Writes a COCO-captions-style fixture of N images x 3 captions, then times a full scoring run
(reading the source, image decoding, CLIP forward, writing scores and kept pairs; the
model is loaded once beforehand) per batch size into a fresh folder, and
prints a markdown table. Timing: run on a quiet machine (`uptime` load below 1).

    python scripts/bench_filter.py                      # tiny CLIP, 2,000 images
    python scripts/bench_filter.py --images 500 --batch-sizes 16,64
    python scripts/bench_filter.py --model openai/clip-vit-base-patch32   # needs the Hub
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="fixture images (3 captions each)")
    parser.add_argument("--batch-sizes", default="16,64,256", help="comma-separated")
    parser.add_argument("--model", default="tiny-clip", help="CLIP model that scores")
    args = parser.parse_args()

    from peftvlm.data.prepare import filter as data_filter
    from peftvlm.recipe.load import validate_recipe_dict

    # Load the scorer once, outside the timings (imports and weights are not throughput).
    scorer = data_filter.load_scorer(args.model)
    data_filter.load_scorer = lambda _model_id: scorer

    recipe = validate_recipe_dict({
        "model": {"id": args.model}, "method": {"name": "lora"},
        "data": {"synthetic": {"name": "coco-captions", "train_size": args.images,
                               "eval_size": 1}}})
    recipe.name = "bench-filter"
    print("| model | batch size | pairs | seconds | pairs/s |\n|---|---:|---:|---:|---:|")
    for batch in map(int, args.batch_sizes.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            report = data_filter.run_filter(recipe, clipscore=0.5, model=args.model,
                                            batch_size=batch, output=str(Path(tmp) / "out"),
                                            log=lambda *_: None)
            seconds = time.perf_counter() - started
        print(f"| {args.model} | {batch} | {report['pairs']:,} | {seconds:.1f} | "
              f"{report['pairs'] / seconds:,.0f} |")


if __name__ == "__main__":
    main()
