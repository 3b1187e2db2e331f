"""Does GRPO with the IoU reward raise grounding Acc@0.5 on a tiny twin? A short SFT warm start,
then GRPO from that adapter; held-out Acc@0.5 (peftvlm's `grounding_accuracy`, greedy) after each.

Data, through the grounding template (`direction: locate`: "Where is the red circle?" -> its
box in the family's convention: PaliGemma's `<locY1><locX1><locY2><locX2> expression`, one
token per coordinate; LLaVA's norm1 `[x1, y1, x2, y2]`, ~17 text tokens):
- `--data one-shape` (default): 32x32 images written here, one shape each, in one cell of a
  `--grid` x `--grid` layout (default 2: a quadrant); the script prints the held-out Acc@0.5 of
  the best single box (what ignoring the image reaches);
- `--data refcoco`: the RefCOCO-style fixture (two shapes per image, any place and size).
The warm start (SFT on the same rows, constant lr) stops once greedy Acc@0.5 on training rows
reaches `--sft-until`, so it grounds some rows and its samples differ in localisation; GRPO
then samples `--generations` boxes per prompt and rewards them with `--rewards`
(peftvlm.rewards). `--compare-sft` also continues the warm start with SFT for as many steps
(the control); `--warm-start shuffled` starts instead from SFT on the rows with their boxes
shuffled among them (a start that writes boxes but ignores the image). Prints held-out scores
and first predictions after each stage and the rollouts' logged rewards; `--sft-eval-every N`
prints the warm start's held-out curve. `run(parse_args([...]))` returns the numbers
(tests/test_grpo.py's IoU learning test runs it at the defaults).
Numbers: docs/benchmarks.md ("DPO and GRPO learning proofs"); why: docs/objectives.md.

Run: python scripts/grpo_grounding.py [--model tiny-paligemma] [--seed 0] [--compare-sft]
         [--steps N] [--lr LR] [--rewards iou,box_accuracy,format] [--data one-shape]
(each model has its own defaults: MODEL_DEFAULTS)
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from peftvlm.data.read.synthetic import COLOURS, SHAPES, paint  # noqa: E402
from peftvlm.metrics.grounding import box_iou  # noqa: E402

UNTIL_EVERY, UNTIL_ROWS = 20, 80  # --sft-until: how often, and on how many training rows
SIZE, SIDES = 32, (8, 14)  # one-shape images: side of the image, range of the shape's side

# Per model. LLaVA's norm1 boxes are long text (see docs/objectives.md: its warm start writes
# one box for every image). PaliGemma's random output head cannot single out <loc> tokens
# through LoRA alone (as in scripts/detection_learning.py): lm_head trains in full.
MODEL_DEFAULTS = {
    "tiny-llava": {"target": "language", "modules_to_save": None, "sft_steps": 150,
                   "sft_until": 0.0, "sft_lr": 2e-3, "steps": 60, "lr": 1e-3, "batch": 32,
                   "max_completion_length": 20,
                   "temperature": 0.8, "top_k": 10,
                   "format_pattern": r"\[[0-9.]+, [0-9.]+, [0-9.]+, [0-9.]+\]"},
    "tiny-paligemma": {"target": "all", "modules_to_save": ["lm_head"], "sft_steps": 600,
                       "sft_until": 0.4, "sft_lr": 3e-3, "steps": 200, "lr": 5e-4, "batch": 64,
                       "max_completion_length": 12,
                       # below 1: samples nearer the greedy answer, so what GRPO reinforces
                       # moves the greedy box sooner (docs/benchmarks.md: 1.0 vs 0.7 vs 0.5)
                       "temperature": 0.7, "top_k": 0,
                       # the whole answer: four <loc> tokens and the expression, then EOS
                       # (a reply cut at max_completion_length by a run of <loc> fails it)
                       "format_pattern": r"(<loc\d{4}>){4} the \w+ \w+"},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-paligemma", choices=list(MODEL_DEFAULTS))
    p.add_argument("--target", help="LoRA target (language, all, ...); default: MODEL_DEFAULTS")
    p.add_argument("--modules-to-save", nargs="*", help="default: MODEL_DEFAULTS")
    p.add_argument("--data", default="one-shape", choices=["one-shape", "refcoco"],
                   help="one shape per image anywhere in it, or the refcoco fixture (two shapes "
                        "per image, 2 rows each)")
    p.add_argument("--grid", type=int, default=2,
                   help="one-shape: the shape sits in one cell of a GRID x GRID layout (0: "
                        "anywhere, side 8-14 px)")
    p.add_argument("--train", type=int, default=400, help="training images")
    p.add_argument("--eval-size", type=int, default=80, help="held-out images")
    p.add_argument("--warm-start", default="grounding", choices=["grounding", "shuffled"],
                   help="SFT on the rows as they are, or on the rows with their boxes shuffled "
                        "among them (teaches the answer's form and where boxes lie, nothing "
                        "about which image has which: the start ignores the image)")
    p.add_argument("--sft-steps", type=int)
    p.add_argument("--sft-lr", type=float)
    p.add_argument("--sft-until", type=float,
                   help="stop the warm start (at most --sft-steps) once greedy Acc@0.5 on "
                        "training rows reaches this; default: MODEL_DEFAULTS")
    p.add_argument("--sft-eval-every", type=int, default=0,
                   help="print held-out Acc@0.5 every N SFT steps (0: off)")
    p.add_argument("--steps", type=int,
                   help="GRPO steps (0: the warm start only); default: MODEL_DEFAULTS")
    p.add_argument("--compare-sft", action="store_true",
                   help="also continue the warm start with SFT for --steps steps (then GRPO "
                        "starts from the warm start again)")
    p.add_argument("--lr", type=float)
    p.add_argument("--beta", type=float, default=0.0)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--batch", type=int, help="completions per step; default: MODEL_DEFAULTS")
    p.add_argument("--max-completion-length", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--rewards", default="iou,box_accuracy,format",
                   help="peftvlm.rewards names, NAME:WEIGHT for a weight other than 1 (format's "
                        "pattern: --format-pattern)")
    p.add_argument("--format-pattern", help="default: MODEL_DEFAULTS")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/grpo-grounding"))
    args = p.parse_args(argv)
    for key, value in MODEL_DEFAULTS[args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def place(rng: random.Random, grid: int) -> tuple[int, int, int]:
    """(x, y, side) of a shape: in a random cell of a grid x grid layout (side 3-5 px below the
    cell's, a few px of jitter inside it), or, grid 0, of side SIDES anywhere."""
    if not grid:
        side = rng.randint(*SIDES)
        return rng.randint(0, SIZE - side), rng.randint(0, SIZE - side), side
    cell = SIZE // grid
    side = cell - rng.randint(3, 5)
    col, row = rng.randrange(grid), rng.randrange(grid)
    return (col * cell + rng.randint(0, cell - side), row * cell + rng.randint(0, cell - side),
            side)


def write_one_shape(folder: Path, n: int, rng: random.Random, prefix: str,
                    grid: int) -> list[dict]:
    """`n` 32x32 images, each with one shape (`place`), and their grounding rows (pixel xyxy
    box, expression "the <colour> <shape>")."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        x, y, side = place(rng, grid)
        grey = rng.randint(90, 160)
        image = Image.new("RGB", (SIZE, SIZE), (grey, grey, grey))
        paint(ImageDraw.Draw(image), shape, x, y, side, COLOURS[colour])
        image.save(folder / f"{i}.png")
        rows.append({"image": f"{prefix}{i}.png", "expression": f"the {colour} {shape}",
                     "box": [x, y, x + side, y + side]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def shuffled_boxes(rows: list[dict], rng: random.Random) -> list[dict]:
    """The rows, each with another row's box (a permutation): SFT on them learns the answer's
    form and where boxes lie, and nothing about where this image's shape is."""
    boxes = [r["box"] for r in rows]
    rng.shuffle(boxes)
    return [{**r, "box": box} for r, box in zip(rows, boxes)]


def constant_box_baseline(train: list[dict], test: list[dict]) -> float:
    """Held-out Acc@0.5 of the best single box (any training box, written for every image):
    what a model that ignores the image can reach."""
    def accuracy(box):
        return sum(box_iou(box, r["box"]) >= 0.5 for r in test) / len(test)
    return max(accuracy(r["box"]) for r in train)


def data_section(args, workdir: Path) -> tuple[dict, float | None]:
    """The recipe's `data` (refcoco fixture or one-shape rows written to `workdir`) and, for
    one-shape, the constant-box baseline."""
    options = {"direction": "locate", "precision": 1}
    if args.data == "refcoco":
        return ({"synthetic": {"name": "refcoco", "train_size": args.train,
                               "eval_size": args.eval_size},
                 "template": "grounding", "template_options": {**options, "box_input": "xywh"}},
                None)
    rng = random.Random(args.seed)
    rows = {}
    for name, n, sub in (("train", args.train, ""), ("test", args.eval_size, "test/")):
        rows[name] = write_one_shape(workdir / sub, n, rng, sub, args.grid)
        write_jsonl(workdir / f"{name}.jsonl", rows[name])
    write_jsonl(workdir / "train-shuffled.jsonl", shuffled_boxes(rows["train"], rng))
    return ({"train": "train.jsonl", "eval": "test.jsonl", "template": "grounding",
             "template_options": options}, constant_box_baseline(rows["train"], rows["test"]))


def build_recipe(args, data: dict):
    from peftvlm.recipe.load import validate_recipe_dict

    return validate_recipe_dict({
        "model": {"id": args.model},
        "method": {"name": "lora", "r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
                   "target": args.target, "modules_to_save": args.modules_to_save},
        "data": data,
        "eval": {"metrics": ["grounding_accuracy"], "max_new_tokens": 24, "batch_size": 80},
        "train": {"objective": "grpo", "max_steps": max(args.steps, 1), "seed": args.seed,
                  "per_device_train_batch_size": args.batch, "learning_rate": args.lr,
                  "lr_scheduler_type": "constant", "logging_steps": 10, "save_steps": 100000,
                  "max_length": 128,
                  "grpo": {"num_generations": args.generations, "beta": args.beta,
                           "max_completion_length": args.max_completion_length,
                           "temperature": args.temperature, "top_k": args.top_k},
                  "rewards": [reward_spec(r, args) for r in args.rewards.split(",")]}})


def reward_spec(text: str, args) -> dict:
    """`name` or `name:weight` -> a `train.rewards` entry (format with the model's pattern)."""
    name, _, weight = text.partition(":")
    spec = {"name": name, "weight": float(weight or 1)}
    return {**spec, "pattern": args.format_pattern} if name == "format" else spec


def continue_sft_then_restore(model, make_trainer, score) -> None:
    """The control: train the warm start with SFT for as many steps as GRPO will take, score
    it, then put the trainable weights back (GRPO starts from the same warm start)."""
    import torch

    saved = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    make_trainer().train()
    score()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in saved:
                param.copy_(saved[name])


def warm_start_rows(args, recipe, data_cfg: dict, collator, data):
    """The warm start's training rows: the data's own, or (`--warm-start shuffled`) the same
    images with each other's boxes."""
    from peftvlm.data.pipeline import prepare_data

    if args.warm_start == "grounding":
        return data.train
    if args.data != "one-shape":
        sys.exit("--warm-start shuffled needs --data one-shape")
    shuffled = build_recipe(args, {**data_cfg, "train": "train-shuffled.jsonl"})
    shuffled.source_path = recipe.source_path
    return prepare_data(shuffled, collator).train


def rollout_means(log_history: list[dict]) -> list[dict]:
    """Per logging step of GRPO: the step and each reward's mean over the rollouts."""
    return [{"step": entry["step"], **{key.split("/")[1]: round(value, 3)
                                       for key, value in entry.items()
                                       if key.startswith("rewards/") and key.endswith("/mean")}}
            for entry in log_history if "reward" in entry]


def run(args) -> dict:
    """The warm start, the control (`--compare-sft`) and GRPO; prints each stage and returns
    `baseline` (best single box), `sft_steps`, held-out scores `warm_start`, `sft_control`
    (None without --compare-sft) and `grpo`, and `rollouts`: the logged mean of each reward
    per logging step."""
    import torch
    from transformers import TrainerCallback

    from peftvlm.data.batch.collate import ConversationCollator
    from peftvlm.data.pipeline import prepare_data
    from peftvlm.eval.generate import evaluate_rows
    from peftvlm.registry import get_method
    from peftvlm.rewards import build_rewards
    from peftvlm.trainers.generative import load_model_with_method
    from peftvlm.trainers.objectives.grpo_trainer import build_grpo_trainer
    from peftvlm.trainers.sft import build_trainer, sft_config

    args.out.mkdir(parents=True, exist_ok=True)
    data_cfg, baseline = data_section(args, args.out / "data")
    recipe = build_recipe(args, data_cfg)
    recipe.source_path = args.out / "data" / "recipe.yaml"  # rows' paths are relative to it
    if baseline is not None:
        print(f"constant-box baseline (best single box, held-out Acc@0.5): {baseline:.3f}")
    torch.manual_seed(args.seed)
    start = time.time()
    loaded, model = load_model_with_method(recipe, get_method("lora"))
    collator = ConversationCollator(loaded.processor, loaded.family, True)
    data = prepare_data(recipe, collator)

    def held_out(stage: str) -> dict:
        result = evaluate_rows(model, loaded.processor, loaded.family, data.eval, recipe.eval)
        scores = {k: round(v, 3) for k, v in result["scores"].items()}
        print(f"{stage} ({time.time() - start:.0f} s): {scores}; first predictions "
              f"{result['predictions'][:4]}", flush=True)
        return scores

    class SFTCurve(TrainerCallback):
        """Prints the held-out curve (--sft-eval-every); stops the warm start once greedy
        Acc@0.5 on training rows reaches --sft-until (held-out rows play no part in it)."""

        def on_step_end(self, _args, state, control, **kwargs):
            step = state.global_step
            if args.sft_eval_every and step % args.sft_eval_every == 0:
                held_out(f"SFT step {step}")
            if args.sft_until and step % UNTIL_EVERY == 0:
                seen = evaluate_rows(model, loaded.processor, loaded.family,
                                     data.train[:UNTIL_ROWS], recipe.eval)["scores"]
                if seen["grounding_accuracy"] >= args.sft_until:
                    print(f"SFT stops at step {step}: Acc@0.5 on {UNTIL_ROWS} training rows "
                          f"{seen['grounding_accuracy']:.3f}", flush=True)
                    control.should_training_stop = True

    warm = recipe.train.model_copy(update={
        "objective": "sft", "grpo": None, "rewards": None, "max_steps": args.sft_steps,
        "per_device_train_batch_size": 16, "learning_rate": args.sft_lr})
    sft = build_trainer(model, loaded.processor, collator,
                        warm_start_rows(args, recipe, data_cfg, collator, data),
                        sft_config(warm, args.out / "sft", [], "warm"))
    sft.add_callback(SFTCurve())
    sft.train()
    result = {"baseline": baseline, "sft_steps": sft.state.global_step, "sft_control": None,
              "warm_start": held_out(f"after {sft.state.global_step} SFT steps")}
    if not args.steps:
        return result
    if args.compare_sft:
        def control() -> None:
            result["sft_control"] = held_out(f"SFT instead: {args.steps} more SFT steps")

        continue_sft_then_restore(model, lambda: build_trainer(
            model, loaded.processor, collator, data.train,
            sft_config(warm.model_copy(update={"max_steps": args.steps}), args.out / "sft2", [],
                       "more")), control)
    trainer = build_grpo_trainer(recipe, model, loaded.processor, loaded.family, data.train,
                                 args.out / "grpo", [], None, [],
                                 build_rewards(recipe.train.rewards, Path(".")))
    trainer.train()
    result["rollouts"] = rollout_means(trainer.state.log_history)
    for entry in result["rollouts"]:
        print(entry)
    result["grpo"] = held_out(f"after {args.steps} GRPO steps")
    return result


if __name__ == "__main__":
    run(parse_args())
