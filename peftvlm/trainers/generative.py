"""The generative kind's training: a VLM adapted by a peft method and trained with TRL.

`train(recipe, run_dir, ...)` reads top to bottom: load the base and apply the method, render
and check the data, score the held-out rows, train with TRL's SFTTrainer (resuming, streaming,
packing and FSDP/DeepSpeed handled here), score again, write the run folder (adapter/,
summary.json, loss.png). `dry_run(recipe)` stops after the data, showing one rendered example
with its loss mask.

What the model learns from is the recipe's `train.objective` (`trainers.objectives`: SFT,
DPO, ...): the flow asks it which rows it needs (`check_data`), for the TRL trainer
(`build_trainer`, in `run_trainer`) and for its summary fields; everything around stays the same.
"""

from __future__ import annotations

import gc
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import set_seed

from peftvlm.data.batch.collate import ConversationCollator
from peftvlm.data.batch.preview import render_example
from peftvlm.data.pipeline import prepare_data
from peftvlm.data.prepare.loading import count_skipped_rows, skipped_rows_file
from peftvlm.distributed import sharding_args, sharding_mode
from peftvlm.errors import RecipeError
from peftvlm.eval.generate import evaluate_rows
from peftvlm.families import method_refusal
from peftvlm.models import detect_family, load_base, resolve_model_path
from peftvlm.recipe.checks import check_packing
from peftvlm.recipe.schema import Recipe
from peftvlm.registry import get_method
from peftvlm.runs import eval_history, loss_history, plot_loss, prepare_run_dir, write_json
from peftvlm.summary import before_after, parameter_counts, run_summary
from peftvlm.tracking import active_run_info, start_wandb
from peftvlm.trainers.objectives import check_objective, objective_for
from peftvlm.trainers.sft import (MarkCheckpointComplete, PeriodicEval, StopOnInterrupt,
                                  full_state_dict as gather_state_dict, last_checkpoint)


def dry_run(recipe: Recipe, log=print) -> dict:
    """Show parameter counts and one rendered example with its loss mask; write nothing."""
    loaded, model, collator, data, _ = load_and_prepare(recipe)
    return print_dry_run(model, collator, data, loaded.family, log)


def train(recipe: Recipe, run_dir: Path, resume: bool = False, overwrite: bool = False,
          log=print, callbacks=(), on_saved=None) -> dict:
    """Load, adapt, check data, evaluate, train with TRL, evaluate, write the run folder;
    `on_saved(summary)` runs on the writing process once the folder is complete (export)."""
    loaded, model, collator, data, sharding = load_and_prepare(recipe)
    log_start(recipe, loaded, model, data, log)
    run_dir = prepare_run_dir(run_dir, resume, overwrite)
    (run_dir / "recipe.yaml").write_text(recipe.to_yaml())
    before = evaluate_if_asked(recipe, model, loaded, data, recipe.eval.before_training, log)
    collator.skipped_rows_file = skipped_rows_file(run_dir, resume)
    trainer, runtime = run_trainer(recipe, model, loaded, collator, data, run_dir, resume,
                                   callbacks, log, sharding)
    count_skipped_rows(data, collator.skipped_rows_file, log)
    after = evaluate_if_asked(recipe, trainer.model, loaded, data, True, log)
    summary = summarise(recipe, trainer, loaded, data, runtime, before, after)
    state_dict = gather_state_dict(trainer)  # a collective under FSDP: every rank takes part
    try:
        if trainer.is_world_process_zero():  # one writer when several processes train
            write_run_outputs(trainer, loaded.processor, summary, run_dir, recipe.name,
                              state_dict)
            if on_saved is not None:
                on_saved(summary)
    finally:
        finish_tracking(summary)
    return summary


def load_and_prepare(recipe: Recipe):
    """(loaded base, adapted model, collator, prepared data, sharding args) for a recipe."""
    set_seed(recipe.train.seed)
    sharding = resolve_sharding(recipe)  # refuses impossible set-ups before a model loads
    loaded, model = load_model_with_method(recipe, get_method(recipe.method.name))
    if recipe.train.packing:  # now that the family is known (a Hub id is not, at validate time)
        check_packing(recipe, loaded.family)
    collator = ConversationCollator(loaded.processor, loaded.family,
                                    recipe.train.assistant_only_loss)
    data = prepare_data(recipe, collator)
    objective_for(recipe).check_data(data)  # e.g. DPO: preference rows only
    return loaded, model, collator, data, sharding


def log_start(recipe: Recipe, loaded, model, data, log) -> None:
    trainable, total = parameter_counts(model)
    log(f"model: {recipe.model.id} ({loaded.family.name}), {recipe.method.name}: "
        f"{trainable:,} of {total:,} parameters train")
    log(data.describe() if data.streaming else
        f"data: {len(data.train)} training rows, {len(data.eval)} held-out rows, "
        f"{data.overflow.get('count', 0)} too long, "
        f"{sum(v['count'] for v in data.bad_rows.get('train', {}).values())} bad training rows, "
        f"{sum(v['count'] for v in data.bad_rows.get('eval', {}).values())} bad held-out rows")


def resolve_sharding(recipe: Recipe) -> dict:
    """The recipe's FSDP / DeepSpeed trainer fields, files read and set-ups checked."""
    return sharding_args(recipe.train, recipe.base_dir(), str(recipe.source_path or "recipe"),
                         torch.cuda.is_available())


def load_model_with_method(recipe: Recipe, method):
    """Load the base (quantized if the method asks; stored for sharding under FSDP/ZeRO) and
    apply the method to it."""
    refuse_unfit_method(recipe)
    loaded = load_base(recipe.model, recipe.method.name, sharding_mode(recipe.train) is not None)
    model = method.apply(loaded.model, loaded.family, recipe.method, quantized=loaded.quantized,
                         gradient_checkpointing=recipe.train.gradient_checkpointing)
    return loaded, model


def refuse_unfit_method(recipe: Recipe) -> None:
    """`validate`'s family check for Hub ids too, from their config alone (before weights load)."""
    family = detect_family(resolve_model_path(recipe.model.id), recipe.model)
    reason = method_refusal(family, recipe.method)
    if reason:
        raise RecipeError(reason, hint="pick another method (`peftvlm ls methods`) or model")
    check_objective(recipe, family, get_method(recipe.method.name))  # e.g. BLIP-2 and dpo


def print_dry_run(model, collator, data, family, log) -> dict:
    """Show parameter counts and one rendered example with its loss mask, then stop."""
    from rich.console import Console

    trainable, total = parameter_counts(model)
    first = data.first_row() if data.streaming else data.train[0]
    text, counts = render_example(collator, first, family.image_token)
    console = Console()
    console.print(f"trainable params: {trainable:,} / {total:,} ({100 * trainable / total:.3f}%)")
    console.print(f"train rows: {'streamed' if data.streaming else len(data.train)}, "
                  f"eval rows: {len(data.eval)}, "
                  f"dropped (too long): {data.overflow.get('count', 0)}")
    console.print(f"example 0 ({counts['tokens']} tokens, {counts['trained_tokens']} carry loss, "
                  f"[bold green]green[/]):")
    console.print(text)
    return {"trainable_params": trainable, "total_params": total, **counts, **data.report()}


def evaluate_if_asked(recipe, model, loaded, data, enabled: bool, log) -> dict | None:
    """The held-out scores of `model` when `enabled` and there is something to score."""
    if not (enabled and data.eval and recipe.eval.metrics):
        return None
    result = evaluate_rows(model, loaded.processor, loaded.family, data.eval, recipe.eval)
    log("eval: " + ", ".join(f"{k} = {v:.4f}" for k, v in result["scores"].items()))
    for name, note in result["notes"].items():  # e.g. VQA accuracy with fewer than 10 answers
        log(f"eval note ({name}): {note}")
    data.eval_notes.update(result["notes"])
    return result["scores"]


def run_trainer(recipe, model, loaded, collator, data, run_dir, resume, callbacks, log,
                sharding=None):
    """Train with TRL (resuming from the last checkpoint if asked); SIGINT/SIGTERM save and stop.
    The objective's seam: it builds the TRL trainer (SFTTrainer, DPOTrainer...) over the data."""
    wandb_run = start_wandb(recipe, run_dir, log)
    stopper = StopOnInterrupt()
    trainer = objective_for(recipe).build_trainer(
        recipe, model, loaded.processor, collator, data, run_dir, ["wandb"] if wandb_run else [],
        sharding, [stopper, MarkCheckpointComplete(), *callbacks], log)
    add_periodic_eval(trainer, recipe, loaded, data)
    checkpoint = last_checkpoint(run_dir, log) if resume else None
    if resume and checkpoint is None:
        log(f"no checkpoint in {run_dir / 'checkpoints'}: starting from scratch")
    if checkpoint and data.streaming:  # continue at the saved row; the trainer replays nothing
        data.train.restore(checkpoint, log)
        trainer.args.ignore_data_skip = True
    started = time.perf_counter()
    with gc_skips_what_exists():
        # a signal raises `Interrupted` after saving
        trainer.train(resume_from_checkpoint=checkpoint)
    return trainer, time.perf_counter() - started


@contextmanager
def gc_skips_what_exists():
    """While training, Python's cyclic garbage collector leaves alone the objects that exist
    before it (the loaded libraries, model, processor and data: `gc.freeze`): its full
    collections, its own every so often and accelerate's at the end of `train`, then walk only
    what training creates (that one end-of-train `gc.collect` was 5-8% of a 60-step tiny-model
    run's training loop, docs/benchmarks.md). Nothing is freed later than it would be but the
    cycles among those older objects, which are collected again once training returns."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def add_periodic_eval(trainer, recipe, loaded, data) -> None:
    """With `train.eval_steps`, score the held-out metrics every N steps into the trainer log."""
    if not (recipe.train.eval_steps and data.eval and recipe.eval.metrics):
        return

    def scores(model) -> dict:
        return evaluate_rows(model, loaded.processor, loaded.family, data.eval,
                             recipe.eval)["scores"]

    trainer.add_callback(PeriodicEval(scores, recipe.train.eval_steps, trainer.log))


def write_run_outputs(trainer, processor, summary: dict, run_dir: Path, name: str,
                      state_dict=None) -> None:
    """The adapter in PEFT format with the processor beside it, summary.json and loss.png
    (`state_dict`: the gathered full one under FSDP; peft keeps the adapter's tensors)."""
    model = trainer.accelerator.unwrap_model(trainer.model) if state_dict else trainer.model
    model.save_pretrained(run_dir / "adapter", state_dict=state_dict)
    processor.save_pretrained(run_dir / "adapter")
    write_json(run_dir / "summary.json", summary)
    plot_loss(trainer.state.log_history, run_dir / "loss.png", f"{name}: training loss")


def summarise(recipe, trainer, loaded, data, runtime, before, after) -> dict:
    """The shared summary (`peftvlm.summary`) plus the generative kind's fields."""
    log_history = trainer.state.log_history
    steps, losses = loss_history(log_history)
    # the last logged loss; with fewer steps than logging_steps, the run's mean loss
    final = losses[-1] if losses else log_history[-1].get("train_loss") if log_history else None
    return run_summary(
        recipe, loaded.family, parameter_counts(trainer.model), runtime_s=runtime,
        global_step=trainer.state.global_step, final_loss=final,
        loss_curve=list(zip(steps, losses)), eval=before_after(before, after),
        eval_history=eval_history(log_history),
        eval_notes=data.eval_notes,  # what the scores mean where a metric's assumptions fail
        data=data.report(), wandb=active_run_info(),
        **objective_for(recipe).summary(log_history))  # e.g. DPO's margins and accuracy


def finish_tracking(summary: dict) -> None:
    """The run's eval scores into the W&B run's summary, then close it (if W&B is on)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.run.summary.update({f"eval/{k}_{when}": v for k, d in summary["eval"].items()
                                  for when, v in d.items() if v is not None})
        wandb.finish()
