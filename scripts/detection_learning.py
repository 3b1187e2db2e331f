"""Do the tiny twins learn detection? One coloured square per image, its box in the family's
own convention (or, Grounding DINO, the detector's own loss), held-out COCO mAP50 before and
after training, read against the score a model gets WITHOUT reading the class.

Each 64x64 image holds one square (side 32) near the centre (jitter up to 4 px, so one box has
IoU >= 0.6 with every one), coloured one of `--colours` colours (default 4: red, green, blue,
yellow) on grey; the answer is its box and colour (`[{"bbox_2d": [...], "label": "red"}]` for
Qwen2.5-VL, `red<loc_250><loc_250>...` for Florence-2, `<loc..> red` for PaliGemma; for
Grounding DINO the prompt "red . green . blue . yellow ." and the model's own loss). Where the
box is can be learnt without the image; which colour it is cannot. The script therefore
measures, on the same held-out images and with the same COCO evaluation, the *colour-blind
baseline*: the mAP50 of perfect boxes whose class is not read from the image:
- generative families write one label per box (scored 1.0): the better of "always the most
  frequent training colour" and "a random colour" (mean of 20 draws);
- Grounding DINO scores every class for every box: perfect boxes with every class scored at
  random (mean of 20 draws: ~1/K for K colours on many images, more on few: 0.33 on 64
  held-out images with 4 colours, 0.42 on 16).
A model has learnt the class only where its mAP50 rises clearly above that baseline.

Trains through `peftvlm train`'s own path (`api.train`: the `detection` template and eval with
`detection_map`, or the `detection` kind for Grounding DINO) and prints held-out mAP50 / parse
rate before -> after, the baseline and the loss curve's ends. tests/test_detection_data.py
runs a 50-step PaliGemma case as its learning test, tests/test_grounding_dino.py the default
`--lora-after-pretraining` run; numbers in docs/benchmarks.md.

LoRA on a pretrained detector (`--lora-after-pretraining`, Grounding DINO): a random twin has
no detector for LoRA to adapt, so the script first makes a "released checkpoint": the tiny twin
trained in full (plain AdamW on the model's own loss) on the 4 `COLOURS`, written with
`save_pretrained` (safetensors) and its processor. `peftvlm train` then loads that folder as
`model.id` (the real `from_pretrained` path) and trains LoRA alone, the family's `detector`
preset, on a NEW task: squares of colours and class names the pretraining never saw
(`NEW_COLOURS`: orange, purple, white, black), or with `--new-task positions` on squares of
the pretraining's colours moved `SHIFT` px (their boxes must move). The row's baseline is the
new task's.

Run: python scripts/detection_learning.py [--models tiny-qwen2.5-vl tiny-florence2
         tiny-paligemma tiny-grounding-dino] [--steps N] [--lr LR] [--colours 4]
         [--train 128] [--test 32]
     python scripts/detection_learning.py --lora-after-pretraining [--pretrain-steps 150]
         [--pretrain-batch 32]
         [--new-task colours|positions] [--train 64] [--test 32] [--steps N] [--lr LR]
(each model has its own default steps / lr / trainable modules: MODEL_DEFAULTS)
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from peftvlm.data.read.synthetic import COLOURS  # noqa: E402
from peftvlm.families import tiny_models  # noqa: E402
from peftvlm.metrics.detection import coco_evaluate  # noqa: E402

SIZE, SIDE, JITTER = 64, 32, 4
GUESSES = 20  # colour-blind guesses averaged for the baseline
# The new task of `--lora-after-pretraining`: colours (and names, all in the tiny twin's
# vocabulary) that the pretraining on `COLOURS` never saw.
NEW_COLOURS = {"orange": (250, 140, 0), "purple": (140, 40, 200), "white": (250, 250, 250),
               "black": (10, 10, 10)}
PALETTE = {**COLOURS, **NEW_COLOURS}
# `--new-task positions`: the squares 12 px right and down of the pretraining's (a box there
# has IoU < 0.3 with every pretraining box: the boxes themselves must move)
SHIFT = 12
# Full training of the twin that stands in for a released checkpoint: lr 1e-3 and DETR's
# clipping at 0.1 (what learns in the ablation of docs/benchmarks.md); batch 32, as 150 steps of
# 32 images cost less CPU than the 400 of 8 that read the colour as well.
PRETRAIN = {"lr": 1e-3, "max_grad_norm": 0.1, "batch": 32, "weight_decay": 1e-4, "steps": 150}

# Per model: what trains and how fast. The generative twins' random output heads cannot single
# out box tokens through LoRA alone (`modules_to_save: [lm_head]`); Grounding DINO: below (and
# docs/benchmarks.md).
MODEL_DEFAULTS = {
    # lr 0.01 blows up the twin's residual stream (hidden 64) within a few steps: the image's
    # share of the answer's hidden state vanishes and the colour is guessed from the prompt
    "tiny-qwen2.5-vl": {"steps": 200, "lr": 0.002, "target": "all", "modules_to_save": ["lm_head"]},
    # the colour reaches the decoder's first answer token at ~1% of its norm: at lr 0.02 training
    # settles on a constant answer that erases it, LoRA in the DaViT tower hurts, and the colour
    # is learnt late (after ~200 steps at lr 0.003-0.01)
    "tiny-florence2": {"steps": 300, "lr": 0.003, "target": ["language", "projector"],
                       "modules_to_save": ["lm_head"]},
    "tiny-paligemma": {"steps": 100, "lr": 0.01, "target": "all", "modules_to_save": ["lm_head"]},
    # the random twin has no pretrained detector for LoRA to adapt: its inner model trains in
    # full, and LoRA goes on the final box head (outside `model.`, its weights tied to the
    # decoder's copy); DETR's constant lr and gradient clipping at 0.1
    "tiny-grounding-dino": {"steps": 400, "lr": 0.001, "batch": 8, "target": "detector",
                            "train": {"lr_scheduler_type": "constant", "max_grad_norm": 0.1},
                            "target_regex": r"bbox_embed\.\d+\.layers\.\d+",
                            "modules_to_save": ["detector"]},
    # LoRA alone, the family's `detector` preset, on the pretrained twin (a folder: `model.id`)
    "pretrained-grounding-dino": {"steps": 150, "lr": 0.005, "batch": 32, "target": "detector",
                                  "train": {"lr_scheduler_type": "constant",
                                            "max_grad_norm": 0.1},
                                  "modules_to_save": []},
}


def write_rows(folder: Path, n: int, rng: random.Random, prefix: str,
               colours: list[str], categories: bool = True, shift: int = 0) -> list[dict]:
    """`n` images with one square each, and their detection rows (pixel xyxy boxes); `shift`
    moves every square right and down by that many pixels."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    centre = (SIZE - SIDE) // 2 + shift
    for i in range(n):
        colour = rng.choice(colours)
        x, y = centre + rng.randint(-JITTER, JITTER), centre + rng.randint(-JITTER, JITTER)
        image = Image.new("RGB", (SIZE, SIZE), (128, 128, 128))
        ImageDraw.Draw(image).rectangle([x, y, x + SIDE - 1, y + SIDE - 1],
                                        fill=PALETTE[colour])
        image.save(folder / f"{i}.png")
        # `categories`: every class, so a prompt that lists classes (PaliGemma's `detect a ;
        # b`) lists them all; from the image's own labels it would name the answer
        # (the detection kind prompts with every class of the data already)
        rows.append({"image": f"{prefix}{i}.png", "boxes": [[x, y, x + SIDE, y + SIDE]],
                     "labels": [colour], **({"categories": colours} if categories else {})})
    return rows


def _map50(rows: list[dict], colours: list[str], detections) -> float:
    """COCO mAP50 of `detections(i, row)` -> [(label, score)] placed on each row's true box."""
    gt = {"images": [{"id": i + 1} for i in range(len(rows))],
          "categories": [{"id": k + 1, "name": c} for k, c in enumerate(colours)],
          "annotations": []}
    results = []
    for i, row in enumerate(rows):
        (x1, y1, x2, y2), label = row["boxes"][0], row["labels"][0]
        box = [x1, y1, x2 - x1, y2 - y1]
        gt["annotations"].append({"id": i + 1, "image_id": i + 1, "iscrowd": 0, "bbox": box,
                                  "category_id": colours.index(label) + 1})
        results += [{"image_id": i + 1, "category_id": colours.index(c) + 1, "score": s,
                     "bbox": box} for c, s in detections(i, row)]
    return coco_evaluate(gt, results)["mAP50"]


def colour_blind_baseline(train: list[dict], test: list[dict], colours: list[str],
                          scores_every_class: bool, seed: int = 0) -> float:
    """The held-out mAP50 of perfect boxes whose colour is not read from the image (see the
    module doc): what learning the format and the place alone can reach."""
    rng = random.Random(seed)

    def guessing(_):  # every class scored at random (detector) or one random label (generative)
        if scores_every_class:
            scores = [[(c, rng.random()) for c in colours] for _ in test]
        else:
            scores = [[(rng.choice(colours), 1.0)] for _ in test]
        return _map50(test, colours, lambda i, row: scores[i])

    at_random = sum(map(guessing, range(GUESSES))) / GUESSES
    if scores_every_class:
        return at_random
    common = Counter(r["labels"][0] for r in train).most_common(1)[0][0]
    return max(at_random, _map50(test, colours, lambda i, row: [(common, 1.0)]))


def settings(model_id: str, args) -> dict:
    """The model's defaults, overridden by what the command line gives."""
    out = dict(MODEL_DEFAULTS.get(model_id, MODEL_DEFAULTS["tiny-qwen2.5-vl"]))
    for key in ("steps", "lr", "batch", "target", "target_regex", "modules_to_save"):
        if getattr(args, key) is not None:
            out[key] = getattr(args, key)
    return out


def recipe_for(model_id: str, args, workdir: Path, detector: bool, model_path: str | None = None):
    from peftvlm.recipe.load import validate_recipe_dict

    s = settings(model_id, args)
    data = {"train": "train.jsonl", "eval": "test.jsonl"}
    if not detector:
        data["template"] = "detection"
    recipe = validate_recipe_dict({
        "name": "squares", "model": {"id": model_path or model_id},
        "method": {"name": "lora", "r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
                   "target": s["target"], "target_regex": s.get("target_regex"),
                   "modules_to_save": s["modules_to_save"]},
        "data": data,
        "train": {"max_steps": s["steps"], "per_device_train_batch_size": s.get("batch", 16),
                  "learning_rate": s["lr"], "logging_steps": 10, "max_length": 256,
                  "save_steps": 100000, "seed": args.seed, **s.get("train", {})},
        "eval": {"metrics": ["detection_map"], "max_new_tokens": 64}})
    recipe.source_path = workdir / "r.yaml"
    return recipe


def write_task(workdir: Path, args, colours: list[str], categories: bool,
               shift: int = 0) -> dict:
    """train.jsonl and test.jsonl (and their images) under `workdir`; their rows by split."""
    rng = random.Random(args.seed)
    data = {}
    for name, n, sub in (("train", args.train, ""), ("test", args.test, "test/")):
        data[name] = write_rows(workdir / sub, n, rng, sub, colours, categories, shift)
        (workdir / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n"
                                                       for r in data[name]))
    return data


def run(model_id: str, args, workdir: Path, model_path: str | None = None,
        colours: list[str] | None = None, shift: int = 0) -> dict:
    """Train `model_id` (its weights read from the folder `model_path` if given: a Grounding
    DINO checkpoint, as `pretrain_twin` writes) on the squares of `colours` (default: the first
    `--colours` of COLOURS): held-out mAP50 before / after, the colour-blind baseline, parse
    rate, loss ends, trainable parameters, seconds."""
    from peftvlm import api

    detector = model_path is not None or tiny_models()[model_id].is_detector
    colours = colours or list(COLOURS)[:args.colours]
    data = write_task(workdir, args, colours, not detector, shift)
    baseline = colour_blind_baseline(data["train"], data["test"], colours, detector, args.seed)
    start = time.perf_counter()
    summary = api.train(recipe_for(model_id, args, workdir, detector, model_path),
                        workdir / "run", log=lambda *_: None)
    losses = [loss for _, loss in summary["loss_curve"]]
    scores = summary["eval"]
    parse = scores.get("detection_parse_rate", {"before": float("nan"), "after": float("nan")})
    return {"model": model_id, "steps": summary["global_step"], "baseline": baseline,
            "map50": (scores["detection_mAP50"]["before"], scores["detection_mAP50"]["after"]),
            "parse": (parse["before"], parse["after"]),
            "first_loss": losses[0], "last_loss": losses[-1],
            "trainable": summary["trainable_params"], "seconds": time.perf_counter() - start}


def pretrain_twin(out: Path, workdir: Path, steps: int, train: int = 64, test: int = 16,
                  seed: int = 0, batch: int = PRETRAIN["batch"]) -> dict:
    """The stand-in for a released checkpoint: the tiny Grounding DINO trained in full on the
    squares of the 4 COLOURS, written to `out` with save_pretrained (safetensors) beside its
    processor, so that a recipe loads it as `model.id: <out>`. Returns its held-out mAP50 on
    that task, the task's colour-blind baseline, the last loss and the seconds taken."""
    import torch

    from peftvlm.data.prepare.detection import DetectionData
    from peftvlm.recipe.schema import ModelConfig
    from peftvlm.trainers.detection import detection_scores, encode, load_detector

    start = time.perf_counter()
    colours = list(COLOURS)
    rng = random.Random(seed + 1)  # other images than the new task's
    rows = {name: write_rows(workdir / name, n, rng, f"{name}/", colours, categories=False)
            for name, n in (("train", train), ("test", test))}
    records = {name: [{"image": str(workdir / r["image"]), "boxes": r["boxes"],
                       "labels": r["labels"], "crowd": [0], "width": SIZE, "height": SIZE}
                      for r in split] for name, split in rows.items()}
    torch.manual_seed(seed)
    loaded = load_detector(ModelConfig(id="tiny-grounding-dino"))
    model, processor = loaded.model, loaded.processor
    optimiser = torch.optim.AdamW(model.parameters(), lr=PRETRAIN["lr"],
                                  weight_decay=PRETRAIN["weight_decay"])
    model.train()
    order = random.Random(seed)
    for _ in range(steps):
        loss = model(**encode(processor, order.sample(records["train"], batch),
                              colours, "cpu")).loss
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), PRETRAIN["max_grad_norm"])
        optimiser.step()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    held_out = DetectionData(records["test"], colours)
    return {"map50": detection_scores(model, processor, held_out, colours)["detection_mAP50"],
            "baseline": colour_blind_baseline(rows["train"], rows["test"], colours, True, seed),
            "last_loss": loss.item(), "steps": steps, "seconds": time.perf_counter() - start}


def lora_after_pretraining(args, workdir: Path) -> tuple[dict, dict]:
    """Pretrain the twin in full on COLOURS, then train LoRA alone (the `detector` preset) on
    NEW_COLOURS through `api.train` with `model.id` = the saved folder: (pretraining, LoRA
    run) results."""
    pretrained = workdir / "pretrained-twin"
    pre = pretrain_twin(pretrained, workdir / "pretraining", args.pretrain_steps,
                        seed=args.seed, batch=args.pretrain_batch)
    task = workdir / "new-task"
    task.mkdir(parents=True, exist_ok=True)
    if args.new_task == "positions":  # the pretraining's colours, boxes moved
        return pre, run("pretrained-grounding-dino", args, task, model_path=str(pretrained),
                        colours=list(COLOURS), shift=SHIFT)
    return pre, run("pretrained-grounding-dino", args, task, model_path=str(pretrained),
                    colours=list(NEW_COLOURS))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=[m for m in MODEL_DEFAULTS
                                                         if m.startswith("tiny-")])
    parser.add_argument("--colours", type=int, default=4, choices=range(2, len(COLOURS) + 1))
    parser.add_argument("--steps", type=int, help="default: MODEL_DEFAULTS")
    parser.add_argument("--lr", type=float, help="default: MODEL_DEFAULTS")
    parser.add_argument("--target", nargs="+", help="LoRA parts (default: MODEL_DEFAULTS)")
    parser.add_argument("--target-regex", help="overrides --target (default: MODEL_DEFAULTS)")
    parser.add_argument("--modules-to-save", nargs="*",
                        help="trained in full beside the adapters (default: MODEL_DEFAULTS)")
    parser.add_argument("--batch", type=int, help="default: MODEL_DEFAULTS, else 16")
    parser.add_argument("--train", type=int, default=128)
    parser.add_argument("--test", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", help="write data and runs under this folder (kept)")
    parser.add_argument("--lora-after-pretraining", action="store_true",
                        help="Grounding DINO: pretrain the twin in full on COLOURS, save it, "
                             "then LoRA (the detector preset) on NEW_COLOURS; --steps, --lr, "
                             "--train, --test are the LoRA run's")
    parser.add_argument("--pretrain-steps", type=int, default=PRETRAIN["steps"])
    parser.add_argument("--pretrain-batch", type=int, default=PRETRAIN["batch"])
    parser.add_argument("--new-task", choices=("colours", "positions"), default="colours",
                        help="colours: NEW_COLOURS; positions: COLOURS moved by SHIFT px")
    return parser.parse_args(argv)


def print_lora_after_pretraining(args, workdir: Path) -> None:
    pre, r = lora_after_pretraining(args, workdir)
    print(f"pretrained twin: {pre['steps']} full-training steps of {args.pretrain_batch} on "
          f"{', '.join(COLOURS)}: "
          f"held-out mAP50 {pre['map50']:.2f} (colour-blind baseline {pre['baseline']:.2f}), "
          f"{pre['seconds']:.0f} s")
    task = ', '.join(NEW_COLOURS) if args.new_task == "colours" else \
        f"{', '.join(COLOURS)} moved {SHIFT} px"
    print(f"LoRA ({r['trainable']:,} parameters) on {task}, {args.train} training / "
          f"{args.test} held-out images")
    print("| steps | colour-blind baseline | mAP50 before -> after | loss first -> last | "
          "seconds |")
    print("| ---: | ---: | --- | --- | ---: |")
    print(f"| {r['steps']} | {r['baseline']:.2f} | {r['map50'][0]:.2f} -> {r['map50'][1]:.2f} "
          f"| {r['first_loss']:.2f} -> {r['last_loss']:.2f} | {r['seconds']:.0f} |")


def main() -> None:
    args = parse_args()
    if args.lora_after_pretraining:
        if args.keep:
            return print_lora_after_pretraining(args, Path(args.keep))
        with tempfile.TemporaryDirectory() as tmp:
            return print_lora_after_pretraining(args, Path(tmp))
    results = []
    for model_id in args.models:
        if args.keep:  # the run folder stays, for `peftvlm eval` / predictions
            folder = Path(args.keep) / model_id
            folder.mkdir(parents=True, exist_ok=True)
            results.append(run(model_id, args, folder))
            continue
        with tempfile.TemporaryDirectory() as tmp:
            results.append(run(model_id, args, Path(tmp)))
    print(f"{args.colours} colours, {args.train} training / {args.test} held-out images")
    print("| model | steps | colour-blind baseline | mAP50 before -> after | "
          "parse rate before -> after | loss first -> last | seconds |")
    print("| --- | ---: | ---: | --- | --- | --- | ---: |")
    for r in results:
        print(f"| {r['model']} | {r['steps']} | {r['baseline']:.2f} | "
              f"{r['map50'][0]:.2f} -> {r['map50'][1]:.2f} | "
              f"{r['parse'][0]:.2f} -> {r['parse'][1]:.2f} | "
              f"{r['first_loss']:.2f} -> {r['last_loss']:.2f} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
