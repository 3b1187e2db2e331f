"""Does GRPO with the IoU reward raise grounding Acc@0.5 on a tiny twin? SFT warm start, then
GRPO from that adapter, held-out Acc@0.5 (peftvlm's `grounding_accuracy`, greedy) after each.

Data: the grounding template's RefCOCO-style fixture (`data.synthetic.name: refcoco`, two
shapes per 32x32 image, `direction: locate`: "Where is the red circle?" -> its box in the
family's convention). The SFT stage trains on the same rows' reference boxes; GRPO then samples
`--generations` boxes per prompt and rewards them with `--rewards` (peftvlm.rewards). Prints
the SFT and GRPO held-out scores, the first predictions and the rollouts' logged rewards.
docs/objectives.md ("What the tiny models show") records what it measured and why.

Run: python scripts/grpo_grounding.py [--model tiny-llava] [--sft-steps 150] [--steps 60]
         [--rewards iou,box_accuracy] [--temperature 0.8] [--top-k 10]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-llava")
    p.add_argument("--target", default="language", help="LoRA target (language, all, ...)")
    p.add_argument("--train", type=int, default=200, help="training images (2 rows each)")
    p.add_argument("--sft-steps", type=int, default=150)
    p.add_argument("--sft-lr", type=float, default=2e-3)
    p.add_argument("--steps", type=int, default=60, help="GRPO steps")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--beta", type=float, default=0.0)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--batch", type=int, default=32, help="completions per step")
    p.add_argument("--max-completion-length", type=int, default=20)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--rewards", default="iou,box_accuracy")
    p.add_argument("--out", type=Path, default=Path("runs/grpo-grounding"))
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    from peftvlm.data.batch.collate import ConversationCollator
    from peftvlm.data.pipeline import prepare_data
    from peftvlm.eval.generate import evaluate_rows
    from peftvlm.recipe.load import validate_recipe_dict
    from peftvlm.registry import get_method
    from peftvlm.rewards import build_rewards
    from peftvlm.trainers.generative import load_model_with_method
    from peftvlm.trainers.objectives.grpo_trainer import build_grpo_trainer
    from peftvlm.trainers.sft import build_trainer, sft_config

    recipe = validate_recipe_dict({
        "model": {"id": args.model},
        "method": {"name": "lora", "r": 16, "lora_alpha": 32, "target": args.target},
        "data": {"synthetic": {"name": "refcoco", "train_size": args.train, "eval_size": 20},
                 "template": "grounding", "template_options": {
                     "box_input": "xywh", "direction": "locate", "precision": 1}},
        "eval": {"metrics": ["grounding_accuracy"], "max_new_tokens": 24, "batch_size": 40},
        "train": {"objective": "grpo", "max_steps": args.steps,
                  "per_device_train_batch_size": args.batch, "learning_rate": args.lr,
                  "logging_steps": 10, "save_steps": 100000, "max_length": 128,
                  "grpo": {"num_generations": args.generations, "beta": args.beta,
                           "max_completion_length": args.max_completion_length,
                           "temperature": args.temperature, "top_k": args.top_k},
                  "rewards": [{"name": r} for r in args.rewards.split(",")]}})
    torch.manual_seed(0)
    start = time.time()
    loaded, model = load_model_with_method(recipe, get_method("lora"))
    collator = ConversationCollator(loaded.processor, loaded.family, True)
    data = prepare_data(recipe, collator)

    def held_out(stage: str) -> None:
        result = evaluate_rows(model, loaded.processor, loaded.family, data.eval, recipe.eval)
        scores = {k: round(v, 3) for k, v in result["scores"].items()}
        print(f"{stage} ({time.time() - start:.0f} s): {scores}; first predictions "
              f"{result['predictions'][:4]}", flush=True)

    warm = recipe.train.model_copy(update={
        "objective": "sft", "grpo": None, "rewards": None, "max_steps": args.sft_steps,
        "per_device_train_batch_size": 16, "learning_rate": args.sft_lr})
    build_trainer(model, loaded.processor, collator, data.train,
                  sft_config(warm, args.out / "sft", [], "warm")).train()
    held_out(f"after {args.sft_steps} SFT steps")
    trainer = build_grpo_trainer(recipe, model, loaded.processor, loaded.family, data.train,
                                 args.out / "grpo", [], None, [],
                                 build_rewards(recipe.train.rewards, Path(".")))
    trainer.train()
    for entry in trainer.state.log_history:
        if "reward" in entry:
            print(entry["step"], {k: round(v, 3) for k, v in entry.items()
                                  if k.startswith("rewards/") and k.endswith("/mean")})
    held_out(f"after {args.steps} GRPO steps")


if __name__ == "__main__":
    main()
