#!/usr/bin/env python
"""DPO / GRPO training throughput: peftvlm vs TRL's own DPOTrainer / GRPOTrainer as TRL's
scripts configure them, on the same tiny model and data.

- `peftvlm`: `peftvlm train` (the API) on the shipped `dpo-tiny` / `grpo-tiny` recipe (tiny
  LLaVA, LoRA r16 on the language model, the synthetic colour rows), `--steps` steps, no
  evaluation.
- `trl`: TRL's stock trainer as `trl/scripts/dpo.py` and TRL's VLM GRPO example
  (`examples/scripts/grpo_vlm.py`) set it up: the trainer gets the model's path and a
  `LoraConfig` (same rank, alpha and target modules as the recipe's) and loads and wraps the
  model itself; its own collator and processing; the rows in TRL's VLM format (`images` +
  conversational `prompt` / `chosen` / `rejected`, or `prompt` + a `solution` column for the
  exact-match reward); the recipe's optimisation settings and objective fields (beta,
  loss_type, num_generations, max_completion_length, temperature), the same batch and steps,
  the same rewards (exact match and the one-word length reward, weights 1 and 0.1).

Each contender runs in its own process; rounds alternate contenders (`--repeats`, best kept),
so a drifting load falls on both. Prints samples/s (DPO: pairs; GRPO: completions), the steady
rate (end of step 1 to end of the last step: per-step cost only, the once-a-run set-up and
peftvlm's held-out preference scoring before and after training left out) and peftvlm / TRL.

    python scripts/bench_objectives.py --objective dpo [--steps 30] [--repeats 2]
    python scripts/bench_objectives.py --objective grpo [--steps 10] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

RECIPES = {"dpo": REPO / "recipes" / "dpo-tiny.yaml", "grpo": REPO / "recipes" / "grpo-tiny.yaml"}
STEP_ENDS: list[float] = []  # perf_counter at the end of each optimizer step


def step_clock():
    """A TrainerCallback noting when each optimizer step ends (the steady rate)."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            STEP_ENDS.append(time.perf_counter())

    return StepClock()


def bench_recipe(objective: str, steps: int):
    """The shipped tiny recipe of `objective`, `steps` steps, no generation-based evaluation
    and no checkpoint inside the run."""
    from peftvlm.recipe.load import load_recipe

    return load_recipe(RECIPES[objective], [
        f"train.max_steps={steps}", "train.save_steps=100000", "train.logging_steps=1",
        "eval.metrics=[]", "data.synthetic.eval_size=8"])


def run_peftvlm(objective: str, steps: int) -> float:
    from peftvlm import api

    out = Path(tempfile.mkdtemp(prefix="bench-objectives-")) / "run"
    summary = api.train(bench_recipe(objective, steps), out, log=lambda *_: None,
                        callbacks=[step_clock()])
    return summary["train_runtime_s"]


def lora_config(recipe):
    """TRL's script side: a LoraConfig with the recipe's rank, alpha, dropout and the target
    modules peftvlm's method resolves for this model (built on the meta device)."""
    from peft import LoraConfig

    from peftvlm.plan import build_on_meta, find_config

    model, *_ = build_on_meta(recipe, find_config(recipe.model))
    targets = model.peft_config["default"].target_modules
    return LoraConfig(r=recipe.method.r, lora_alpha=recipe.method.lora_alpha,
                      lora_dropout=recipe.method.lora_dropout, task_type="CAUSAL_LM",
                      target_modules=targets if isinstance(targets, str) else sorted(targets))


def stock_options(recipe) -> dict:
    """The recipe's optimisation settings under TRL's names, on CPU in fp32 as peftvlm runs."""
    train = recipe.train
    return {k: getattr(train, k) for k in (
        "learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "max_grad_norm",
        "optim", "seed", "max_steps", "per_device_train_batch_size",
        "gradient_accumulation_steps")} | {
        "output_dir": tempfile.mkdtemp(prefix="bench-objectives-trl-"), "use_cpu": True,
        "bf16": False, "report_to": [], "save_steps": 100000, "logging_steps": 1,
        "disable_tqdm": True, "gradient_checkpointing": False,
        "model_init_kwargs": {"dtype": "float32"}}


def trl_rows(recipe):
    """The recipe's rows in TRL's VLM format (PIL images, conversational messages)."""
    from PIL import Image

    from peftvlm.data.prepare.loading import load_rows

    rows = []
    for row in load_rows(recipe).train:
        *prompt, answer = row["messages"]
        item = {"images": [Image.open(p).convert("RGB") for p in row["images"]],
                "prompt": prompt}
        if "rejected" in row:
            item.update(chosen=[answer], rejected=[row["rejected"]])
        else:
            item["solution"] = answer["content"][0]["text"]
        rows.append(item)
    return rows


def exact_match(completions, solution, **_):
    return [float(c[0]["content"].strip().lower() == s.strip().lower())
            for c, s in zip(completions, solution)]


def one_word(completions, **_):
    return [float(len(c[0]["content"].split()) <= 1) for c in completions]


def run_trl(objective: str, steps: int) -> float:
    import trl
    from datasets import Dataset

    from peftvlm.models import resolve_model_path

    recipe = bench_recipe(objective, steps)
    model_path = str(resolve_model_path(recipe.model.id))
    dataset = Dataset.from_list(trl_rows(recipe))
    options = stock_options(recipe)
    if objective == "dpo":
        settings = recipe.train.dpo
        args = trl.DPOConfig(beta=settings.beta, loss_type=settings.loss_type, **options)
        trainer = trl.DPOTrainer(model=model_path, args=args, train_dataset=dataset,
                                 peft_config=lora_config(recipe), callbacks=[step_clock()])
    else:
        settings = recipe.train.grpo
        weights = [r.weight for r in recipe.train.rewards]
        args = trl.GRPOConfig(num_generations=settings.num_generations,
                              max_completion_length=settings.max_completion_length,
                              temperature=settings.temperature, beta=settings.beta,
                              reward_weights=weights, **options)
        trainer = trl.GRPOTrainer(model=model_path, reward_funcs=[exact_match, one_word],
                                  args=args, train_dataset=dataset,
                                  peft_config=lora_config(recipe), callbacks=[step_clock()])
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start


CONTENDERS = {"peftvlm": run_peftvlm, "trl": run_trl}


def child(name: str, objective: str, steps: int) -> None:
    seconds = CONTENDERS[name](objective, steps)
    batch = bench_recipe(objective, steps).train.per_device_train_batch_size
    samples = steps * batch
    steady = None
    if len(STEP_ENDS) > 1:
        steady = batch * (len(STEP_ENDS) - 1) / (STEP_ENDS[-1] - STEP_ENDS[0])
    print(json.dumps({"name": name, "seconds": seconds, "samples_per_s": samples / seconds,
                      "steady_samples_per_s": steady, "steps": len(STEP_ENDS)}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objective", choices=sorted(RECIPES), required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=1, help="rounds (best kept)")
    parser.add_argument("--child", choices=sorted(CONTENDERS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.objective, args.steps)
    os.environ.setdefault("PEFTVLM_CACHE", tempfile.mkdtemp(prefix="peftvlm-bench-"))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    results = {}
    for name in [n for _ in range(args.repeats) for n in CONTENDERS]:  # alternating rounds
        out = subprocess.run([sys.executable, __file__, "--child", name, "--objective",
                              args.objective, "--steps", str(args.steps)],
                             capture_output=True, text=True, env=env)
        if out.returncode:
            raise SystemExit(f"{name} failed:\n{out.stderr[-4000:]}")
        res = json.loads(out.stdout.strip().splitlines()[-1])
        if name not in results or res["samples_per_s"] > results[name]["samples_per_s"]:
            results[name] = res
    unit = "pairs" if args.objective == "dpo" else "completions"
    print(f"{args.objective}: {args.steps} steps, best of {args.repeats} alternating round(s); "
          f"samples = {unit}")
    print(f"| contender | {unit}/s | steady {unit}/s | steps |")
    print("| --- | ---: | ---: | ---: |")
    for name, res in results.items():
        print(f"| {name} | {res['samples_per_s']:.2f} | {res['steady_samples_per_s'] or 0:.2f} | "
              f"{res['steps']} |")
    ours, theirs = results["peftvlm"], results["trl"]
    steady = (f"{ours['steady_samples_per_s'] / theirs['steady_samples_per_s']:.2f}"
              if ours["steady_samples_per_s"] and theirs["steady_samples_per_s"] else "-")
    print(f"peftvlm / TRL stock: {ours['samples_per_s'] / theirs['samples_per_s']:.2f} "
          f"(steady {steady})")


if __name__ == "__main__":
    main()
