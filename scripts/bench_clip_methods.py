"""Benchmark the CLIP-family methods: accuracy gain over zero-shot CLIP and training cost.

Trains every shipped CLIP recipe (CoOp, VPT-deep, CLIP-Adapter on the tiny CLIP, 16-shot
synthetic colour classes) in one run and prints, per method, the trainable parameters,
zero-shot (baseline) and trained accuracy, their ratio, and seconds per optimiser step.

    python scripts/bench_clip_methods.py                  # the shipped recipes as written
    python scripts/bench_clip_methods.py --steps 40 --set train.seed=1
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

RECIPES = ("clip-coop", "clip-vpt", "clip-adapter")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="override train.max_steps")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra recipe override, repeatable")
    args = parser.parse_args()

    from peftvlm import api
    from peftvlm.recipe.load import load_recipe

    root = Path(__file__).resolve().parents[1] / "recipes"
    overrides = args.set + ([f"train.max_steps={args.steps}"] if args.steps else [])
    print(f"{'method':14} {'trainable':>9} {'zero-shot':>9} {'trained':>8} {'ratio':>6} "
          f"{'s/step':>7}")
    for name in RECIPES:
        recipe = load_recipe(root / f"{name}.yaml", overrides + ["tracking.wandb=null"])
        with tempfile.TemporaryDirectory() as tmp:
            s = api.train(recipe, Path(tmp) / "run", log=lambda *_: None)
        acc = s["eval"]["accuracy"]
        print(f"{s['method']:14} {s['trainable_params']:>9,} {acc['before']:>9.3f} "
              f"{acc['after']:>8.3f} {acc['after'] / max(acc['before'], 1e-9):>5.2f}x "
              f"{s['train_runtime_s'] / s['global_step']:>7.3f}")


if __name__ == "__main__":
    main()
