"""The top-level flows: train, evaluate, validate. Each step is one function; read `train`
top to bottom."""

from __future__ import annotations

import time
from pathlib import Path

from peftvlm.recipe import Recipe, load_recipe
from peftvlm.runs import (claimed_run_dir, default_run_dir, plot_loss, prepare_run_dir,
                          write_json)
from peftvlm.trainers.objectives import objective_for


def validate(paths: list[str], overrides: list[str] | None = None) -> list[Recipe]:
    """Check recipes without importing torch: schema, methods, files they name."""
    return [load_recipe(p, overrides) for p in paths]


def evaluate(recipe: Recipe, run_dir: str | Path, *, split: str = "test",
             max_samples: int | None = None, with_base: bool = True, log=print) -> dict:
    """Score a finished run's base and fine-tuned model on a split; writes RUN/eval/."""
    from peftvlm.eval_run import evaluate_run

    return evaluate_run(recipe, run_dir, split, max_samples, with_base, log)


def train(recipe: Recipe, output_dir: str | Path | None = None, *, resume: bool = False,
          overwrite: bool = False, dry_run: bool = False, log=print, callbacks=()) -> dict:
    """Train the recipe's method on its data; return the run summary (also in summary.json)."""
    from peftvlm.registry import get_method

    method = get_method(recipe.method.name)
    run_dir = Path(output_dir) if output_dir else default_run_dir(recipe)
    if dry_run:  # loads and shows, writes no run folder
        return dispatch_train(recipe, method, run_dir, resume, overwrite, True, log, callbacks)
    with claimed_run_dir(run_dir, resume, overwrite, log):  # refusals before anything loads
        if resume and not overwrite:
            from peftvlm.checkpoints import check_resume_recipe

            check_resume_recipe(recipe, run_dir)
        return dispatch_train(recipe, method, run_dir, resume, overwrite, False, log, callbacks)


def dispatch_train(recipe, method, run_dir: Path, resume, overwrite, dry_run, log, callbacks):
    """The generative (TRL) training, or the dual-encoder loop with the task of the run's kind."""
    from peftvlm.kinds import run_kind

    kind = run_kind(recipe)
    if kind != "generative" and recipe.data.streams():  # a Hub id's family is known only now
        from peftvlm.recipe import refuse_dual_encoder_stream

        refuse_dual_encoder_stream(recipe.source_path or "recipe", recipe.model.id)
    if kind != "generative":  # dual encoders: one shared loop, one task per kind
        from peftvlm.trainers import clip, contrastive

        dry, fit = {"classification": (clip.dry_run_dual_encoder, clip.train_dual_encoder),
                    "retrieval": (contrastive.dry_run_contrastive,
                                  contrastive.train_contrastive)}[kind]
        if dry_run:
            return dry(recipe, log)
        summary = fit(recipe, prepare_run_dir(run_dir, resume, overwrite), resume, log)
        export_if_asked(recipe, run_dir, summary, log)
        return summary
    return train_generative(recipe, method, run_dir, resume, overwrite, dry_run, log, callbacks)


def train_generative(recipe, method, run_dir: Path, resume, overwrite, dry_run, log, callbacks):
    """Load, adapt, check data, evaluate, train with TRL, evaluate, write the run folder."""
    from transformers import set_seed

    from peftvlm.data.collate import ConversationCollator
    from peftvlm.data.loading import count_skipped_rows, prepare_data, skipped_rows_file

    set_seed(recipe.train.seed)
    sharding = resolve_sharding(recipe)  # refuses impossible set-ups before a model loads
    loaded, model = load_model_with_method(recipe, method)
    if recipe.train.packing:  # now that the family is known (a Hub id is not, at validate time)
        from peftvlm.recipe import check_packing

        check_packing(recipe, loaded.family)
    collator = ConversationCollator(loaded.processor, loaded.family,
                                    recipe.train.assistant_only_loss)
    data = prepare_data(recipe, collator)
    objective_for(recipe).check_data(data)  # e.g. DPO: preference rows only
    if dry_run:
        return print_dry_run(model, collator, data, loaded.family, log)
    trainable, total = parameter_counts(model)
    log(f"model: {recipe.model.id} ({loaded.family.name}), {recipe.method.name}: "
        f"{trainable:,} of {total:,} parameters train")
    log(data.describe() if data.streaming else
        f"data: {len(data.train)} training rows, {len(data.eval)} held-out rows, "
        f"{data.overflow.get('count', 0)} too long, "
        f"{sum(v['count'] for v in data.bad_rows.get('train', {}).values())} bad training rows, "
        f"{sum(v['count'] for v in data.bad_rows.get('eval', {}).values())} bad held-out rows")
    run_dir = prepare_run_dir(run_dir, resume, overwrite)
    (run_dir / "recipe.yaml").write_text(recipe.to_yaml())
    before = evaluate_if_asked(recipe, model, loaded, data, recipe.eval.before_training, log)
    collator.skipped_rows_file = skipped_rows_file(run_dir, resume)
    trainer, runtime = run_trainer(recipe, model, loaded, collator, data, run_dir, resume,
                                   callbacks, log, sharding)
    count_skipped_rows(data, collator.skipped_rows_file, log)
    after = evaluate_if_asked(recipe, trainer.model, loaded, data, True, log)
    summary = summarise(recipe, trainer, loaded, data, runtime, before, after)
    state_dict = full_state_dict(trainer)  # a collective under FSDP: every rank takes part
    try:
        if trainer.is_world_process_zero():  # one writer when several processes train
            write_run_outputs(trainer, loaded.processor, summary, run_dir, recipe.name,
                              state_dict)
            export_if_asked(recipe, run_dir, summary, log)
    finally:
        finish_tracking(trainer, summary)
    return summary


def export_if_asked(recipe, run_dir: Path, summary: dict, log) -> None:
    """The recipe's `export` section: merge and/or push once training has finished."""
    if recipe.export.merge or recipe.export.push_to_hub:
        from peftvlm.export import export_run

        summary["export"] = export_run(run_dir, log=log)


def resolve_sharding(recipe: Recipe) -> dict:
    """The recipe's FSDP / DeepSpeed trainer fields, files read and set-ups checked."""
    import torch

    from peftvlm.distributed import sharding_args

    return sharding_args(recipe.train, recipe.base_dir(), str(recipe.source_path or "recipe"),
                         torch.cuda.is_available())


def full_state_dict(trainer):
    from peftvlm.trainers.sft import full_state_dict as gather

    return gather(trainer)


def load_model_with_method(recipe: Recipe, method):
    """Load the base (quantized if the method asks; stored for sharding under FSDP/ZeRO) and
    apply the method to it."""
    from peftvlm.distributed import sharding_mode
    from peftvlm.models import load_base

    refuse_unfit_method(recipe)
    loaded = load_base(recipe.model, recipe.method.name, sharding_mode(recipe.train) is not None)
    model = method.apply(loaded.model, loaded.family, recipe.method, quantized=loaded.quantized,
                         gradient_checkpointing=recipe.train.gradient_checkpointing)
    return loaded, model


def refuse_unfit_method(recipe: Recipe) -> None:
    """`validate`'s family check for Hub ids too, from their config alone (before weights load)."""
    from peftvlm.errors import RecipeError
    from peftvlm.families import method_refusal
    from peftvlm.models import detect_family, resolve_model_path
    from peftvlm.registry import get_method
    from peftvlm.trainers.objectives import check_objective

    family = detect_family(resolve_model_path(recipe.model.id), recipe.model)
    reason = method_refusal(family, recipe.method)
    if reason:
        raise RecipeError(reason, hint="pick another method (`peftvlm ls methods`) or model")
    check_objective(recipe, family, get_method(recipe.method.name))


def parameter_counts(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def print_dry_run(model, collator, data, family, log) -> dict:
    """Show parameter counts and one rendered example with its loss mask, then stop."""
    from rich.console import Console

    from peftvlm.data.preview import render_example

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
    if not (enabled and data.eval and recipe.eval.metrics):
        return None
    from peftvlm.evaluate import evaluate_rows

    result = evaluate_rows(model, loaded.processor, loaded.family, data.eval, recipe.eval)
    log("eval: " + ", ".join(f"{k} = {v:.4f}" for k, v in result["scores"].items()))
    for name, note in result["notes"].items():  # e.g. VQA accuracy with fewer than 10 answers
        log(f"eval note ({name}): {note}")
    data.eval_notes.update(result["notes"])
    return result["scores"]


def run_trainer(recipe, model, loaded, collator, data, run_dir, resume, callbacks, log,
                sharding=None):
    """Train with TRL (resuming from the last checkpoint if asked); Ctrl-C saves and stops."""
    from peftvlm.errors import RunError
    from peftvlm.tracking import start_wandb
    from peftvlm.trainers.sft import MarkCheckpointComplete, StopOnInterrupt, last_checkpoint

    wandb_run = start_wandb(recipe, run_dir, log)
    stopper = StopOnInterrupt()
    # the objective's seam: SFTTrainer, DPOTrainer... over the prepared data
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
    trainer.train(resume_from_checkpoint=checkpoint)
    if stopper.interrupted:
        raise RunError(f"interrupted: progress saved in {run_dir / 'checkpoints'}",
                       hint="continue with the same command plus --resume")
    return trainer, time.perf_counter() - started


def add_periodic_eval(trainer, recipe, loaded, data) -> None:
    """With `train.eval_steps`, score the held-out metrics every N steps into the trainer log."""
    if not (recipe.train.eval_steps and data.eval and recipe.eval.metrics):
        return
    from peftvlm.evaluate import evaluate_rows
    from peftvlm.trainers.sft import PeriodicEval

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
    import torch

    from peftvlm.runs import eval_history, loss_history
    from peftvlm.tracking import active_run_info

    trainable, total = parameter_counts(trainer.model)
    steps, losses = loss_history(trainer.state.log_history)
    metrics = sorted(set(before or {}) | set(after or {}))
    return {
        "name": recipe.name, "method": recipe.method.name, "model": recipe.model.id,
        "family": loaded.family.name, "trainable_params": trainable, "total_params": total,
        "train_runtime_s": round(runtime, 2), "global_step": trainer.state.global_step,
        # the last logged loss; with fewer steps than logging_steps, the run's mean loss
        "final_loss": losses[-1] if losses else trainer.state.log_history[-1].get("train_loss")
        if trainer.state.log_history else None,
        "loss_curve": [[s, round(l, 6)] for s, l in zip(steps, losses)],
        "eval": {m: {"before": (before or {}).get(m), "after": (after or {}).get(m)}
                 for m in metrics},
        "eval_history": eval_history(trainer.state.log_history),
        "eval_notes": data.eval_notes,  # what the scores mean where a metric's assumptions fail
        "data": data.report(),
        "hardware": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "wandb": active_run_info(),
        **objective_for(recipe).summary(trainer.state.log_history),  # e.g. DPO's margins
    }


def finish_tracking(trainer, summary: dict) -> None:
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.run.summary.update({f"eval/{k}_{when}": v for k, d in summary["eval"].items()
                                  for when, v in d.items() if v is not None})
        wandb.finish()
