"""Do the tiny twins learn detection? One coloured square per image, its box in the family's
own convention, held-out COCO mAP50 before and after LoRA training.

Each 64x64 image holds one square (side 32), red or blue on grey; the answer is its box and
colour (`[{"bbox_2d": [...], "label": "red"}]` for Qwen2.5-VL, `red<loc_250><loc_250>...` for
Florence-2, `<loc..> red` for PaliGemma). `--task colour` (default): the square sits near the
centre (jitter up to 4 px, so one box has IoU >= 0.6 with every one): a model must learn the
family's box format, a box in the right place and the colour it sees; one that ignores the image
reaches at most mAP50 ~0.25 (always one colour). `--task corners`: the square sits in one of
four corners, so the box itself must be read from the image (image-ignorant ceiling ~0.06).
Trains through `peftvlm train`'s own path (`api.train`, the `detection` template, eval with
`detection_map`) and prints held-out mAP50 / parse rate before -> after and the loss curve's
ends. tests/test_detection_data.py runs the Florence-2 case as its slow test.

Run: python scripts/detection_learning.py [--models tiny-qwen2.5-vl tiny-florence2]
         [--steps 150] [--train 128] [--test 32]
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

SIZE, SIDE = 64, 32
COLOURS = {"red": (220, 30, 30), "blue": (40, 60, 220)}
CORNERS = [(0, 0), (SIZE - SIDE, 0), (0, SIZE - SIDE), (SIZE - SIDE, SIZE - SIDE)]


def write_rows(folder: Path, n: int, rng: random.Random, prefix: str,
               task: str = "colour") -> list[dict]:
    """`n` images with one square each, and their detection rows (pixel xyxy boxes)."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    centre = (SIZE - SIDE) // 2
    for i in range(n):
        colour = rng.choice(list(COLOURS))
        x, y = rng.choice(CORNERS) if task == "corners" else \
            (centre + rng.randint(-4, 4), centre + rng.randint(-4, 4))
        image = Image.new("RGB", (SIZE, SIZE), (128, 128, 128))
        ImageDraw.Draw(image).rectangle([x, y, x + SIDE - 1, y + SIDE - 1], fill=COLOURS[colour])
        image.save(folder / f"{i}.png")
        rows.append({"image": f"{prefix}{i}.png", "boxes": [[x, y, x + SIDE, y + SIDE]],
                     "labels": [colour]})
    return rows


def recipe_for(model_id: str, args, workdir: Path):
    from peftvlm.recipe.load import validate_recipe_dict

    recipe = validate_recipe_dict({
        "name": "squares", "model": {"id": model_id},
        "method": {"name": "lora", "r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
                   "target": "all", "modules_to_save": args.modules_to_save},
        "data": {"train": "train.jsonl", "eval": "test.jsonl", "template": "detection"},
        "train": {"max_steps": args.steps, "per_device_train_batch_size": 16,
                  "learning_rate": args.lr, "logging_steps": 10, "max_length": 256,
                  "save_steps": 100000, "seed": args.seed},
        "eval": {"metrics": ["detection_map"], "max_new_tokens": 64}})
    recipe.source_path = workdir / "r.yaml"
    return recipe


def run(model_id: str, args, workdir: Path) -> dict:
    """Train `model_id` on the squares; held-out mAP50 before / after, loss ends, seconds."""
    from peftvlm import api

    rng = random.Random(args.seed)
    for name, n, sub in (("train", args.train, ""), ("test", args.test, "test/")):
        rows = write_rows(workdir / sub, n, rng, sub, args.task)
        (workdir / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    start = time.perf_counter()
    summary = api.train(recipe_for(model_id, args, workdir), workdir / "run",
                        log=lambda *_: None)
    losses = [loss for _, loss in summary["loss_curve"]]
    scores = summary["eval"]
    return {"model": model_id, "map50": (scores["detection_mAP50"]["before"],
                                         scores["detection_mAP50"]["after"]),
            "parse": (scores["detection_parse_rate"]["before"],
                      scores["detection_parse_rate"]["after"]),
            "first_loss": losses[0], "last_loss": losses[-1],
            "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny-qwen2.5-vl", "tiny-florence2"])
    parser.add_argument("--task", choices=("colour", "corners"), default="colour")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--train", type=int, default=128)
    parser.add_argument("--test", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", help="write data and runs under this folder (kept)")
    parser.add_argument("--modules-to-save", nargs="*", default=["lm_head"],
                        help="trained in full beside the adapters (the tiny twins' random output "
                             "head cannot single out the box tokens otherwise)")
    args = parser.parse_args()
    results = []
    for model_id in args.models:
        if args.keep:  # the run folder stays, for `peftvlm eval` / predictions
            folder = Path(args.keep) / model_id
            folder.mkdir(parents=True, exist_ok=True)
            results.append(run(model_id, args, folder))
            continue
        with tempfile.TemporaryDirectory() as tmp:
            results.append(run(model_id, args, Path(tmp)))
    print("| model | task | steps | mAP50 before -> after | parse rate before -> after | "
          "loss first -> last | seconds |")
    print("| --- | --- | ---: | --- | --- | --- | ---: |")
    for r in results:
        print(f"| {r['model']} | {args.task} | {args.steps} | {r['map50'][0]:.2f} -> {r['map50'][1]:.2f} | "
              f"{r['parse'][0]:.2f} -> {r['parse'][1]:.2f} | "
              f"{r['first_loss']:.2f} -> {r['last_loss']:.2f} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
