#!/usr/bin/env python
"""Training throughput: peftvlm vs TRL's stock SFTTrainer vs a bare PyTorch loop.

Same tiny LLaVA, same LoRA config, same synthetic colour-VQA rows and batch size. Each
contender runs in its own subprocess so peak RSS is its own. Prints samples/s, ratios to the
bare loop, peak RSS, and the wall time of `peftvlm --help`.

`--variable-length` trains instead on LLaVA-style multi-turn rows of varied length (1-3 turns,
answers of 1-20 words; `scripts/bench_data.py` writes them) and adds peftvlm with
`train.group_by_length` and with `train.packing`; each line also shows its last logged loss.

    python scripts/bench_train.py [--steps 60] [--batch 16] [--repeats 1] [--variable-length]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


VARIABLE = {"rows": None}  # the variable-length JSONL, when --variable-length


def recipe_dict(steps: int, batch: int, **train) -> dict:
    data = {"synthetic": {"name": "colour-vqa", "train_size": 2000, "eval_size": 8}}
    if VARIABLE["rows"]:
        data = {"train": VARIABLE["rows"]}
    return {"name": "bench", "model": {"id": "tiny-llava"},
            "method": {"name": "lora", "r": 16, "lora_dropout": 0.0}, "data": data,
            "train": {"max_steps": steps, "per_device_train_batch_size": batch,
                      "logging_steps": 10, "save_steps": 10_000,
                      "max_length": 512 if VARIABLE["rows"] else 64, **train},
            "eval": {"metrics": []}}


def run_peftvlm(steps, batch, **train):
    from peftvlm import api
    from peftvlm.recipe import validate_recipe_dict

    out = Path(tempfile.mkdtemp()) / "run"
    summary = api.train(validate_recipe_dict(recipe_dict(steps, batch, **train)), out,
                        log=lambda *_: None)
    LAST_LOSS["value"] = summary["final_loss"]
    return summary["train_runtime_s"]


LAST_LOSS = {"value": None}


def lora_model_and_rows(steps, batch):
    from peftvlm.api import load_model_with_method
    from peftvlm.data.loading import load_rows
    from peftvlm.recipe import validate_recipe_dict
    from peftvlm.registry import get_method

    recipe = validate_recipe_dict(recipe_dict(steps, batch))
    loaded, model = load_model_with_method(recipe, get_method("lora"))
    return recipe, loaded, model, load_rows(recipe).train


def run_trl_stock(steps, batch):
    """TRL's own VLM path: PIL images in the rows, its default vision collator."""
    from datasets import Dataset
    from PIL import Image
    from trl import SFTConfig, SFTTrainer

    _, loaded, model, rows = lora_model_and_rows(steps, batch)
    data = Dataset.from_list([{"images": [Image.open(p).convert("RGB") for p in r["images"]],
                               "messages": r["messages"]} for r in rows])
    args = SFTConfig(output_dir=tempfile.mkdtemp(), max_steps=steps, use_cpu=True, bf16=False,
                     per_device_train_batch_size=batch, report_to=[], save_steps=10_000,
                     logging_steps=10, gradient_checkpointing=False, disable_tqdm=True,
                     max_length=None)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data,
                         processing_class=loaded.processor)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    LAST_LOSS["value"] = losses[-1] if losses else None  # note: TRL stock trains on all tokens
    return seconds


def run_bare_torch(steps, batch):
    """The floor: our collator + AdamW, no trainer."""
    import torch

    from peftvlm.data.collate import ConversationCollator

    _, loaded, model, rows = lora_model_and_rows(steps, batch)
    collator = ConversationCollator(loaded.processor, loaded.family)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        i = (step * batch) % (len(rows) - batch)
        loss = model(**collator(rows[i:i + batch])).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return time.perf_counter() - start


CONTENDERS = {"peftvlm": run_peftvlm, "trl": run_trl_stock, "torch": run_bare_torch}
VARIABLE_CONTENDERS = {
    "peftvlm+group": lambda steps, batch: run_peftvlm(steps, batch, group_by_length=True),
    "peftvlm+packing": lambda steps, batch: run_peftvlm(steps, batch, packing=True),
    "peftvlm+both": lambda steps, batch: run_peftvlm(steps, batch, packing=True,
                                                     group_by_length=True)}


def child(name, steps, batch):
    seconds = {**CONTENDERS, **VARIABLE_CONTENDERS}[name](steps, batch)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"name": name, "seconds": seconds, "samples_per_s": steps * batch / seconds,
                      "peak_rss_mb": rss_mb, "loss": LAST_LOSS["value"]}))


def help_wall_time(repeats=5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "peftvlm", "--help"], capture_output=True,
                       check=True, cwd=REPO)
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1, help="runs per contender (best kept)")
    parser.add_argument("--variable-length", action="store_true",
                        help="multi-turn rows of varied length; adds grouping/packing runs")
    parser.add_argument("--rows-file", help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=[*CONTENDERS, *VARIABLE_CONTENDERS],
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    VARIABLE["rows"] = args.rows_file
    if args.child:
        return child(args.child, args.steps, args.batch)
    os.environ.setdefault("PEFTVLM_CACHE", tempfile.mkdtemp(prefix="peftvlm-bench-"))
    extra, names = [], list(CONTENDERS)
    if args.variable_length:
        from bench_data import write_llava_rows

        rows = write_llava_rows(Path(os.environ["PEFTVLM_CACHE"]) / "bench-rows", 4000, 200)
        extra, names = ["--rows-file", str(rows)], [*CONTENDERS, *VARIABLE_CONTENDERS]
    results = {}
    # Round-robin (every contender once per round), so a load that drifts during the benchmark
    # falls on every contender alike instead of on whichever ran its repeats first.
    for name in [n for _ in range(args.repeats) for n in names]:
        out = subprocess.run([sys.executable, __file__, "--child", name, "--steps",
                              str(args.steps), "--batch", str(args.batch), *extra],
                             capture_output=True, text=True, check=True)
        res = json.loads(out.stdout.strip().splitlines()[-1])
        if name not in results or res["samples_per_s"] > results[name]["samples_per_s"]:
            results[name] = res
    floor = results["torch"]["samples_per_s"]
    trl = results["trl"]["samples_per_s"]
    print("| contender | samples/s | vs bare loop | vs TRL stock | peak RSS MB | last loss |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, res in results.items():
        loss = f"{res['loss']:.4f}" if res.get("loss") is not None else "-"
        print(f"| {name} | {res['samples_per_s']:.1f} | {res['samples_per_s'] / floor:.2f} | "
              f"{res['samples_per_s'] / trl:.2f} | {res['peak_rss_mb']:.0f} | {loss} |")
    print(f"peftvlm --help wall time: {help_wall_time():.3f} s")


if __name__ == "__main__":
    main()
