#!/usr/bin/env python
"""Training throughput: peftvlm vs TRL's stock SFTTrainer vs a bare PyTorch loop.

Same tiny LLaVA, same LoRA config, same synthetic colour-VQA rows and batch size. Each
contender runs in its own subprocess so peak RSS is its own. Prints samples/s, ratios to the
bare loop, peak RSS, and the wall time of `peftvlm --help`.

`--variable-length` trains instead on `--rows` LLaVA-style multi-turn rows of varied length
(1-3 turns, answers of 1-20 words; `scripts/bench_data.py` writes them) and adds peftvlm with
random batches (`train.group_by_length: false`; the default groups such rows), with
`train.group_by_length: true`, with `train.packing` and with both. For a fair comparison every
contender then trains ONE epoch over the same rows on the same tokens (every non-padding token,
as TRL's stock collator does: peftvlm runs with `train.assistant_only_loss: false`), and the
packed runs take `--packed-batch` packed rows of up to `max_length` (512) tokens per step,
by default as many as hold the tokens of `--batch` unpadded rows, so the steps are about as
large and as many as unpacked and the losses compare. Each line shows samples (conversations)
per second, steps, real tokens per step, padding share, trained tokens, and the mean and last
loss per token. "steady" rates run from the end of the first step to the end of the last
(per-step cost only: the trainer's once-a-run set-up, final checkpoint and end-of-train gc are
left out, as the bare loop has none); the plain rate is the whole `train()` call.

    python scripts/bench_train.py [--steps 60] [--batch 16] [--repeats 1]
    python scripts/bench_train.py --variable-length [--rows 1600] [--batch 16] [--packed-batch N]
    python scripts/bench_train.py --model-size 60m --steps 12 --batch 8  # compute matters
    python scripts/bench_train.py --variable-length --rows 320 --profile peftvlm  # cProfile

`--profile CONTENDER` runs one contender in this process with its training loop under cProfile
and prints its top functions by share of time (shares hold under load; seconds do not).
`--contenders` picks which contenders run (default: all).
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


VARIABLE = {"rows": None, "packed_batch": None}  # the variable-length JSONL, when asked
MAX_LENGTH = 512  # variable-length rows; also the packed rows' capacity
MODEL = {"id": "tiny-llava"}  # --model-size 60m: a local folder (bench_model)
# --model-size: tiny-llava's text model widened so compute matters (random weights, from config)
MODEL_SIZES = {"tiny": None,
               "60m": {"hidden_size": 640, "intermediate_size": 1728, "num_hidden_layers": 12,
                       "num_attention_heads": 10, "num_key_value_heads": 10, "head_dim": 64}}


def bench_model(size: str) -> str:
    """The model id for `--model-size`: tiny-llava, or a folder (built once in the cache) with
    tiny-llava's vision tower, tokenizer and processor and a larger text model."""
    import shutil

    from peftvlm.models import cache_dir, tiny_model_path

    text = MODEL_SIZES[size]
    if text is None:
        return "tiny-llava"
    folder = cache_dir() / "bench-models" / f"llava-{size}"
    if (folder / "model.safetensors").exists():
        return str(folder)
    import torch
    from transformers import AutoConfig, LlavaForConditionalGeneration

    source = tiny_model_path("tiny-llava")
    config = AutoConfig.from_pretrained(source)
    for key, value in text.items():
        setattr(config.text_config, key, value)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    folder.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():
        if f.is_file() and f.name not in ("config.json", "model.safetensors"):
            shutil.copy(f, folder / f.name)
    model.save_pretrained(folder)
    print(f"{size} twin: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters "
          f"in {folder}", file=sys.stderr)
    return str(folder)


def recipe_dict(steps: int, batch: int, **train) -> dict:
    data = {"synthetic": {"name": "colour-vqa", "train_size": 2000, "eval_size": 8}}
    length = {"max_steps": steps, "logging_steps": 10, "max_length": 64}
    if VARIABLE["rows"]:  # one epoch over the same rows, every token trained (as TRL stock)
        data = {"train": VARIABLE["rows"]}
        length = {"max_steps": -1, "num_train_epochs": 1, "logging_steps": 1,
                  "max_length": MAX_LENGTH, "assistant_only_loss": False}
    return {"name": "bench", "model": {"id": MODEL["id"]},
            "method": {"name": "lora", "r": 16, "lora_dropout": 0.0}, "data": data,
            "train": {"per_device_train_batch_size": batch, "save_steps": 10_000, **length,
                      **train},
            "eval": {"metrics": []}}


def packed_batch(batch: int) -> int:
    """Packed rows per step holding about the tokens of `batch` unpadded rows (the mean row
    length from the cached `length` column, which the run then reads warm)."""
    from peftvlm.data.batch.collate import ConversationCollator
    from peftvlm.data.pipeline import prepare_data
    from peftvlm.models import load_base
    from peftvlm.recipe.load import validate_recipe_dict

    if VARIABLE["packed_batch"]:
        return VARIABLE["packed_batch"]
    recipe = validate_recipe_dict(recipe_dict(1, batch))
    loaded = load_base(recipe.model)
    data = prepare_data(recipe, ConversationCollator(loaded.processor, loaded.family, False))
    return max(1, round(batch * float(data.train.lengths().mean()) / MAX_LENGTH))


def run_peftvlm(steps, batch, **train):
    from peftvlm import api
    from peftvlm.data.batch import packing
    from peftvlm.recipe.load import validate_recipe_dict

    if train.get("packing") and VARIABLE["rows"]:
        batch = packed_batch(batch)
    make = packing.train_collator  # count tokens and padding of what the trainer gets
    packing.train_collator = lambda *args: Counted(make(*args))
    out = Path(tempfile.mkdtemp()) / "run"
    summary = api.train(validate_recipe_dict(recipe_dict(steps, batch, **train)), out,
                        log=lambda *_: None, callbacks=[step_clock()])
    LOSSES[:] = [loss for _, loss in summary["loss_curve"]]
    return summary["train_runtime_s"]


LOSSES: list[float] = []  # logged losses of the contender that ran in this process
STEP_ENDS: list[float] = []  # perf_counter at the end of each optimizer step (steady rate)


def step_clock():
    """A TrainerCallback noting when each step ends: the steady rate (first step to last) leaves
    out the trainer's once-a-run costs (set-up, final checkpoint, accelerate's end-of-train
    gc), which the bare loop does not pay either."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            STEP_ENDS.append(time.perf_counter())

    return StepClock()
STATS = {"steps": 0, "samples": 0, "slots": 0, "real": 0, "targets": 0}


class Counted:
    """A collator that also counts, per batch: conversations, token slots, real (non-padding)
    tokens and trained targets (labels after the one-token shift)."""

    def __init__(self, collator):
        self.collator = collator

    def __getattr__(self, name):
        if name == "collator":
            raise AttributeError(name)
        return getattr(self.collator, name)

    def __call__(self, items):
        batch = self.collator(items)
        ids, labels = batch["input_ids"], batch["labels"]
        if "attention_mask" in batch:
            real = int(batch["attention_mask"].sum())
        else:  # packed: the padded tails are pad tokens that carry no label
            pad = self.collator.processor.tokenizer.pad_token_id
            real = ids.numel() - int(((ids == pad) & (labels == -100)).sum())
        STATS["steps"] += 1
        STATS["samples"] += sum(len(i.get("packed_rows", [i])) for i in items)
        STATS["slots"] += ids.numel()
        STATS["real"] += real
        STATS["targets"] += int((labels[:, 1:] != -100).sum())
        return batch


def lora_model_and_rows(steps, batch):
    from transformers import set_seed

    from peftvlm.trainers.generative import load_model_with_method
    from peftvlm.data.prepare.loading import load_rows
    from peftvlm.recipe.load import validate_recipe_dict
    from peftvlm.registry import get_method

    recipe = validate_recipe_dict(recipe_dict(steps, batch))
    set_seed(recipe.train.seed)  # the same LoRA initialisation as peftvlm's runs
    loaded, model = load_model_with_method(recipe, get_method("lora"))
    return recipe, loaded, model, load_rows(recipe).train


def run_trl_stock(steps, batch):
    """TRL's own VLM path: PIL images in the rows, its default vision collator."""
    from datasets import Dataset
    from PIL import Image
    from trl import SFTConfig, SFTTrainer

    recipe, loaded, model, rows = lora_model_and_rows(steps, batch)
    data = Dataset.from_list([{"images": [Image.open(p).convert("RGB") for p in r["images"]],
                               "messages": r["messages"]} for r in rows])
    options = {"max_steps": steps, "logging_steps": 10}
    if VARIABLE["rows"]:
        options = {"max_steps": -1, "num_train_epochs": 1, "logging_steps": 1}
    # the optimisation peftvlm's recipe sets (TRL's own default learning rate is 10x lower)
    options.update({k: getattr(recipe.train, k) for k in (
        "learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "max_grad_norm",
        "optim", "seed")})
    args = SFTConfig(output_dir=tempfile.mkdtemp(), use_cpu=True, bf16=False,
                     per_device_train_batch_size=batch, report_to=[], save_steps=10_000,
                     gradient_checkpointing=False, disable_tqdm=True, max_length=None, **options)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data,
                         processing_class=loaded.processor, callbacks=[step_clock()])
    trainer.data_collator = Counted(trainer.data_collator)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    LOSSES[:] = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return seconds


def run_bare_torch(steps, batch):
    """The floor: our collator + AdamW, no trainer."""
    import torch

    from peftvlm.data.batch.collate import ConversationCollator

    recipe, loaded, model, rows = lora_model_and_rows(steps, batch)
    collator = Counted(ConversationCollator(loaded.processor, loaded.family,
                                            recipe.train.assistant_only_loss))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                            lr=recipe.train.learning_rate)
    model.train()
    if VARIABLE["rows"]:  # one epoch, in order
        steps = -(-len(rows) // batch)
    start = time.perf_counter()
    for step in range(steps):
        i = (step * batch) % (len(rows) - batch) if not VARIABLE["rows"] else step * batch
        loss = model(**collator(rows[i:i + batch])).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        LOSSES.append(float(loss))
        STEP_ENDS.append(time.perf_counter())
    return time.perf_counter() - start


CONTENDERS = {"peftvlm": run_peftvlm, "trl": run_trl_stock, "torch": run_bare_torch}
VARIABLE_CONTENDERS = {
    # `peftvlm` runs the defaults: on these rows `train.group_by_length` unset groups them
    "peftvlm-random": lambda steps, batch: run_peftvlm(steps, batch, group_by_length=False),
    "peftvlm+group": lambda steps, batch: run_peftvlm(steps, batch, group_by_length=True),
    "peftvlm+packing": lambda steps, batch: run_peftvlm(steps, batch, packing=True),
    "peftvlm+both": lambda steps, batch: run_peftvlm(steps, batch, packing=True,
                                                     group_by_length=True)}


def profiled(fn, *args, top: int = 25):
    """`fn(*args)` with its training loop (`Trainer._inner_training_loop`; the whole call for
    the bare loop) under cProfile; prints the `top` functions by own time, as shares of the
    profile's total (shares, not seconds: they hold under load), to stderr."""
    import cProfile
    import pstats

    from transformers import Trainer

    profiler = cProfile.Profile()
    loop = Trainer._inner_training_loop

    def inner(*a, **k):
        return profiler.runcall(loop, *a, **k)

    Trainer._inner_training_loop = inner
    try:
        result = fn(*args) if fn is not run_bare_torch else profiler.runcall(fn, *args)
    finally:
        Trainer._inner_training_loop = loop
    stats = pstats.Stats(profiler)
    if os.environ.get("BENCH_PROFILE_FILE"):  # for pstats / snakeviz
        stats.dump_stats(os.environ["BENCH_PROFILE_FILE"])
    total = sum(v[2] for v in stats.stats.values()) or 1.0
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    print("| own time | cumulative | calls | function |\n| ---: | ---: | ---: | --- |",
          file=sys.stderr)
    for (file, line, func), (_, calls, own, cumulative, _) in rows:
        where = f"{Path(file).name}:{line}({func})" if line else func
        print(f"| {own / total:.1%} | {cumulative / total:.1%} | {calls} | `{where}` |",
              file=sys.stderr)
    return result


def child(name, steps, batch, profile=False):
    run = {**CONTENDERS, **VARIABLE_CONTENDERS}[name]
    seconds = profiled(run, steps, batch) if profile else run(steps, batch)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tail = LOSSES[-max(1, len(LOSSES) // 10):]
    batches = max(STATS["steps"], 1)  # collated batches: with max_steps, one fetched ahead
    if not VARIABLE["rows"]:
        STATS["samples"], STATS["steps"] = steps * batch, steps
    steady = None  # samples/s from the end of step 1 to the end of the last step
    if len(STEP_ENDS) > 1:
        steady = STATS["samples"] * (len(STEP_ENDS) - 1) / len(STEP_ENDS) / (
            STEP_ENDS[-1] - STEP_ENDS[0])
    print(json.dumps({"name": name, "seconds": seconds, "samples_per_s": STATS["samples"] / seconds,
                      "steady_samples_per_s": steady,
                      "peak_rss_mb": rss_mb, "steps": STATS["steps"],
                      "tokens_per_step": STATS["real"] / batches,
                      "padding": 1 - STATS["real"] / max(STATS["slots"], 1),
                      "targets": STATS["targets"],
                      "mean_loss": sum(LOSSES) / len(LOSSES) if LOSSES else None,
                      "loss": sum(tail) / len(tail) if LOSSES else None}))


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
    parser.add_argument("--rows", type=int, default=1600,
                        help="--variable-length: rows, each trained once (one epoch)")
    parser.add_argument("--packed-batch", type=int,
                        help="--variable-length: packed rows per step (default: as many as "
                             "hold the tokens of --batch rows)")
    parser.add_argument("--contenders", help="comma-separated contenders to run (default: all; "
                                             "torch and trl are needed for the ratios)")
    parser.add_argument("--profile", metavar="CONTENDER",
                        help="run only CONTENDER, in this process, under cProfile; print its "
                             "top functions by share of time (then its result line)")
    parser.add_argument("--model-size", choices=list(MODEL_SIZES), default="tiny",
                        help="tiny (tiny-llava, ~0.3 M parameters) or 60m (tiny-llava's vision "
                             "tower with a 12-layer, 640-wide text model, ~60 M, random weights)")
    parser.add_argument("--model-id", help=argparse.SUPPRESS)
    parser.add_argument("--rows-file", help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=[*CONTENDERS, *VARIABLE_CONTENDERS],
                        help=argparse.SUPPRESS)
    parser.set_defaults(profile=None)
    args = parser.parse_args()
    VARIABLE["rows"], VARIABLE["packed_batch"] = args.rows_file, args.packed_batch
    if args.child:
        MODEL["id"] = args.model_id or MODEL["id"]
        return child(args.child, args.steps, args.batch)
    os.environ.setdefault("PEFTVLM_CACHE", tempfile.mkdtemp(prefix="peftvlm-bench-"))
    MODEL["id"] = bench_model(args.model_size)
    extra, names = ["--model-id", MODEL["id"]], list(CONTENDERS)
    if args.variable_length:
        from bench_data import write_llava_rows

        rows = write_llava_rows(Path(os.environ["PEFTVLM_CACHE"]) / "bench-rows", args.rows, 200)
        extra += ["--rows-file", str(rows)]
        names = [*CONTENDERS, *VARIABLE_CONTENDERS]
        if args.packed_batch:
            extra += ["--packed-batch", str(args.packed_batch)]
        VARIABLE["rows"] = str(rows)
    if args.profile:
        return child(args.profile, args.steps, args.batch, profile=True)
    if args.contenders:
        names = [n for n in names if n in args.contenders.split(",")]
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
    floor = results.get("torch", {}).get("samples_per_s")
    trl = results.get("trl", {}).get("samples_per_s")
    ratio = lambda value, base: f"{value / base:.2f}" if base else "-"  # noqa: E731
    steady_floor = results.get("torch", {}).get("steady_samples_per_s")
    print("| contender | samples/s | vs bare loop | vs TRL stock | steady samples/s | steady vs "
          "bare loop | steps | tokens/step | padding | trained tokens | mean loss | last loss | "
          "peak RSS MB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | "
          "---: |")
    for name, res in results.items():
        mean, last = (f"{res[k]:.4f}" if res.get(k) is not None else "-"
                      for k in ("mean_loss", "loss"))
        print(f"| {name} | {res['samples_per_s']:.1f} | {ratio(res['samples_per_s'], floor)} | "
              f"{ratio(res['samples_per_s'], trl)} | {res['steady_samples_per_s'] or 0:.1f} | "
              f"{ratio(res['steady_samples_per_s'] or 0, steady_floor)} | {res['steps']} | "
              f"{res['tokens_per_step']:.0f} | {res['padding']:.1%} | {res['targets']} | "
              f"{mean} | {last} | {res['peak_rss_mb']:.0f} |")
    print(f"peftvlm --help wall time: {help_wall_time():.3f} s")


if __name__ == "__main__":
    main()
