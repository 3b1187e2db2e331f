"""Benchmark contrastive PEFT for retrieval: R@K before and after training, per method/model.

Trains the shipped offline recipe `clip-retrieval-tiny` (LoRA on both towers of the tiny CLIP,
synthetic COCO-captions pairs) with each dual-encoder peft method, on CLIP and SigLIP, and
prints a markdown table of image->text / text->image Recall@1/5/10, rsum and mean rank before
(the base) and after (the adapter) on the held-out pairs. Accuracy, not timing: it may run on a
busy machine.

    python scripts/bench_retrieval.py                        # lora/dora/vera x clip/siglip
    python scripts/bench_retrieval.py --methods lora --models tiny-clip --steps 40
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

SHOWN = ("image_to_text_recall@1", "image_to_text_recall@5", "text_to_image_recall@1",
         "text_to_image_recall@5", "rsum", "text_to_image_mean_rank")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="lora,dora,vera", help="comma-separated")
    parser.add_argument("--models", default="tiny-clip,tiny-siglip", help="comma-separated")
    parser.add_argument("--steps", type=int, default=None, help="override train.max_steps")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra recipe override, repeatable")
    args = parser.parse_args()

    from peftvlm import api
    from peftvlm.recipe.load import load_recipe

    recipe_path = Path(__file__).resolve().parents[1] / "recipes" / "clip-retrieval-tiny.yaml"
    print("| model | method | trainable | " + " | ".join(SHOWN) + " |")
    print("|---|---|---:|" + "---:|" * len(SHOWN))
    for model in args.models.split(","):
        for method in args.methods.split(","):
            overrides = [f"model.id={model}", f"method.name={method}", "tracking.wandb=null",
                         *args.set] + ([f"train.max_steps={args.steps}"] if args.steps else [])
            if method == "vera":  # VeRA has no lora_alpha / lora_dropout: a whole section
                overrides += ["method={name: vera, r: 64, target: all}",
                              "train.learning_rate=0.01"]
            recipe = load_recipe(recipe_path, overrides)
            with tempfile.TemporaryDirectory() as tmp:
                s = api.train(recipe, Path(tmp) / "run", log=lambda *_: None)
            cells = [f"{s['eval'][k]['before']:.3f} -> {s['eval'][k]['after']:.3f}"
                     for k in SHOWN]
            print(f"| {model} | {method} | {s['trainable_params']:,} | " + " | ".join(cells)
                  + " |")


if __name__ == "__main__":
    main()
