"""Does a tiny twin learn from video? "Which colour appears last?" over synthetic GIF clips.

Each clip shows two of four colours, two frames each; the answer is the colour shown last, so a
text-only guess is capped at 1/4. Trains `peftvlm train`'s own path (`api.train`) with LoRA on
each model given and reports held-out exact match before / after and the loss curve's ends.
The same task is CI's slow test on tiny-qwen2-vl (tests/test_data_video.py); this script runs it
by hand for the other video families.

Run: python scripts/video_learning.py [--models tiny-qwen3-vl tiny-llava-onevision]
         [--steps 50] [--train 64] [--test 32]
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (40, 60, 220),
           "yellow": (240, 220, 30)}


def write_clips(folder: Path, n: int, rng: random.Random, prefix: str = "") -> list[dict]:
    """`n` GIF clips (first colour twice, last colour twice) and their rows."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        first, last = rng.sample(list(COLOURS), 2)
        frames = [Image.new("RGB", (32, 32), COLOURS[c]) for c in (first, first, last, last)]
        frames[0].save(folder / f"{i}.gif", save_all=True, append_images=frames[1:],
                       duration=500, loop=0)
        rows.append({"messages": [{"role": "user", "content": "<video>Which colour appears last?"},
                                  {"role": "assistant", "content": last}],
                     "videos": [f"{prefix}{i}.gif"]})
    return rows


def run(model_id: str, args, workdir: Path) -> dict:
    from peftvlm import api
    from peftvlm.recipe.load import validate_recipe_dict

    rng = random.Random(0)
    for name, n, sub in (("train", args.train, ""), ("test", args.test, "test/")):
        rows = write_clips(workdir / sub, n, rng, sub)
        (workdir / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = validate_recipe_dict({
        "name": "clips", "model": {"id": model_id},
        "method": {"name": "lora", "r": 8, "lora_dropout": 0.0},
        # 4 frames per clip everywhere, so LLaVA-OneVision's equal-frames rule holds too
        "data": {"train": "train.jsonl", "eval": "test.jsonl", "video_num_frames": 4},
        "train": {"max_steps": args.steps, "per_device_train_batch_size": 8,
                  "learning_rate": 1e-2, "logging_steps": 10, "max_length": 256,
                  "save_steps": 100000},
        "eval": {"metrics": ["exact_match"], "max_new_tokens": 2}})
    recipe.source_path = workdir / "r.yaml"
    start = time.perf_counter()
    summary = api.train(recipe, workdir / "run", log=lambda *_: None)
    losses = [loss for _, loss in summary["loss_curve"]]
    match = summary["eval"]["exact_match"]
    return {"model": model_id, "before": match["before"], "after": match["after"],
            "first_loss": losses[0], "last_loss": losses[-1],
            "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny-qwen3-vl"])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--train", type=int, default=64)
    parser.add_argument("--test", type=int, default=32)
    args = parser.parse_args()
    results = []
    for model_id in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            results.append(run(model_id, args, Path(tmp)))
    print("| model | steps | exact match before -> after | loss first -> last | seconds |")
    print("| --- | ---: | --- | --- | ---: |")
    for r in results:
        print(f"| {r['model']} | {args.steps} | {r['before']:.2f} -> {r['after']:.2f} | "
              f"{r['first_loss']:.2f} -> {r['last_loss']:.2f} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
