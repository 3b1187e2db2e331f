"""The training loop every dual-encoder task shares (CLIP-family classification, contrastive
retrieval), built on the same library primitives as the generative side.

- optimiser: `transformers.Trainer.get_optimizer_cls_and_kwargs`, so `train.optim` (and
  `train.optim_args`) name exactly what TRL's SFTTrainer would build (`adamw_bnb_8bit` is
  bitsandbytes' 8-bit AdamW here too);
- schedule: `transformers.get_scheduler` (CoOp's paper preset adds its constant warm-up in
  front with torch's `ConstantLR` + `SequentialLR`);
- checkpoints: `accelerate`'s `save_state` / `load_state` (optimiser, schedule, and the RNG
  states of Python, NumPy, torch and every GPU); a pre-hook writes only the task's learned
  tensors instead of the frozen base model.

A task (classification or retrieval) gives the loop its example count, a loss over a batch of
example indices, periodic scores, and how to save/load its learned tensors (`Task`).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from peftvlm.checkpoints import (complete_checkpoints, describe_resume, last_complete_checkpoint,
                                 mark_complete)
from peftvlm.errors import RecipeError, RunError
from peftvlm.runs import plot_loss, write_json
from peftvlm.summary import before_after
from peftvlm.tracking import start_wandb
from peftvlm.trainers.signals import Interrupted, StopSignals, any_rank

ADAPTER_DIR, CHECKPOINT_DIR = "adapter", "checkpoints"
LOOP_STATE = "loop_state.json"


class Task(Protocol):
    """What one kind of dual-encoder training gives the loop."""

    n_examples: int

    def loss(self, model, index, epoch: int, device):
        """The mean loss over the examples at `index` (a LongTensor) in `epoch`."""

    def scores(self) -> dict | None:
        """Held-out scores for periodic evaluation ({name: value}), or None."""

    def save_learned(self, folder: Path) -> None:
        """Write the trained tensors (never the frozen base) to `folder`."""

    def load_learned(self, folder: Path) -> None:
        """Read what `save_learned` wrote back into the live model."""


class PeftAdapterState:
    """`save_learned` / `load_learned` of a task whose learned state is its model's peft
    adapter (retrieval, detection): the adapter's own files, read back in place."""

    ADAPTER_WEIGHTS = "adapter_model.safetensors"

    def save_learned(self, folder: Path) -> None:
        self.model.save_pretrained(folder)

    def load_learned(self, folder: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        device = next(self.model.parameters()).device
        set_peft_model_state_dict(self.model, load_file(folder / self.ADAPTER_WEIGHTS,
                                                        device=str(device)))



def fit_scored(recipe, session: Session, task: Task, model, run_dir: Path, resume: bool, log,
               held_out) -> tuple[FitResult, dict]:
    """Fit a peft adapter on `task`, scored by `task.scores()` with the adapter off before
    training (`eval.before_training`, when there is a `held_out` set) and on after: (the fit,
    the summary's `eval`, {metric: {before, after}}) (retrieval and detection)."""
    before = None
    if recipe.eval.before_training and held_out:
        with model.disable_adapter():
            before = task.scores()
    done = fit(recipe, session, task, model, run_dir, resume, log)
    return done, before_after(before, task.scores())


def write_peft_run(recipe, model, processor, done, summary: dict, run_dir: Path) -> None:
    """A loop-trained peft run's folder: adapter/ (peft format + processor), summary.json,
    loss.png; the W&B summary (retrieval and detection write the same files)."""
    model.save_pretrained(run_dir / ADAPTER_DIR)
    processor.save_pretrained(run_dir / ADAPTER_DIR)
    plot_loss(done.state.history, run_dir / "loss.png", title=f"{recipe.method.name} loss")
    write_json(run_dir / "summary.json", summary)
    if done.tracker is not None:
        done.tracker.summary.update({f"eval/{k}": v["after"] for k, v in summary["eval"].items()})
        done.tracker.finish()

# --- optimisation -----------------------------------------------------------------------------

@dataclass
class OptimSettings:
    """What the loop needs to build its optimiser and schedule."""

    optim: str
    optim_args: str | None
    learning_rate: float
    weight_decay: float
    lr_scheduler_type: str
    warmup_steps: int
    warmup_lr: float | None  # constant warm-up at this lr (CoOp's paper); None = transformers'
    batch_size: int
    total_steps: int
    steps_per_epoch: int


def optim_settings(recipe, n_train: int, world_size: int) -> OptimSettings:
    """The recipe's train section, or the method's paper preset where it asks for one (the
    method config's `optimisation_preset()`, so this module names no method)."""
    train = recipe.train
    preset_of = getattr(recipe.method, "optimisation_preset", None)
    preset = preset_of() if preset_of else None
    values = dict(optim=train.optim, optim_args=train.optim_args,
                  learning_rate=train.learning_rate, weight_decay=train.weight_decay,
                  lr_scheduler_type=train.lr_scheduler_type,
                  per_device_train_batch_size=train.per_device_train_batch_size)
    if preset:
        values.update({k: v for k, v in preset.items() if k in values})
    batch = values["per_device_train_batch_size"]
    per_step = batch * world_size * train.gradient_accumulation_steps
    steps_per_epoch = max(1, math.ceil(n_train / per_step))
    total = train.max_steps if train.max_steps > 0 else \
        max(1, math.ceil(train.num_train_epochs * steps_per_epoch))
    if preset:
        warmup, warmup_lr = preset["warmup_epochs"] * steps_per_epoch, preset["warmup_lr"]
    else:
        w = train.warmup_steps
        warmup, warmup_lr = (int(w * total) if w < 1 else int(w)), None
    return OptimSettings(values["optim"], values["optim_args"], values["learning_rate"],
                         values["weight_decay"], values["lr_scheduler_type"],
                         min(warmup, total), warmup_lr, batch, total, steps_per_epoch)


def optimizer_class_and_kwargs(s: OptimSettings) -> tuple[type, dict]:
    """transformers' own mapping of an optimiser name (+ optim_args) to a class and kwargs."""
    from transformers import Trainer, TrainingArguments

    try:
        args = TrainingArguments(output_dir="unused", optim=s.optim, optim_args=s.optim_args,
                                 learning_rate=s.learning_rate, weight_decay=s.weight_decay,
                                 report_to="none", use_cpu=True)
        return Trainer.get_optimizer_cls_and_kwargs(args)
    except (ValueError, ImportError) as exc:
        raise RecipeError(f"train.optim: {s.optim!r} (optim_args {s.optim_args!r}): "
                          f"{str(exc).splitlines()[0]}",
                          hint="use a transformers optimizer name such as adamw_torch, sgd or "
                               "adamw_bnb_8bit; SGD momentum: train.optim_args='momentum=0.9'"
                          ) from exc


def build_optimizer(named_params, s: OptimSettings, cls_and_kwargs: tuple | None = None):
    """The optimiser over the trainable parameters; weight decay on matrices only (as
    Trainer skips biases and norm weights)."""
    cls, kwargs = cls_and_kwargs or optimizer_class_and_kwargs(s)
    params = [(n, p) for n, p in named_params if p.requires_grad]
    groups = [{"params": [p for _, p in params if p.ndim >= 2], "weight_decay": s.weight_decay},
              {"params": [p for _, p in params if p.ndim < 2], "weight_decay": 0.0}]
    return cls([g for g in groups if g["params"]], **kwargs)


def build_scheduler(optimizer, s: OptimSettings):
    """transformers' schedule over the run; a constant warm-up first when the preset has one."""
    from torch.optim.lr_scheduler import ConstantLR, SequentialLR
    from transformers import get_scheduler

    if s.warmup_lr is None or s.warmup_steps == 0:
        return get_scheduler(s.lr_scheduler_type, optimizer, num_warmup_steps=s.warmup_steps,
                             num_training_steps=s.total_steps)
    warm = ConstantLR(optimizer, factor=s.warmup_lr / s.learning_rate, total_iters=s.warmup_steps)
    main = get_scheduler(s.lr_scheduler_type, optimizer, num_warmup_steps=0,
                         num_training_steps=s.total_steps - s.warmup_steps)
    return SequentialLR(optimizer, [warm, main], milestones=[s.warmup_steps])


# --- data order -------------------------------------------------------------------------------

def batches(n: int, batch: int, seed: int, rank: int, world: int, skip: int):
    """Endless per-rank index batches; epoch e is a permutation seeded by seed + e, so a run
    resumed after `skip` micro-batches sees the same order as an uninterrupted one."""
    import torch

    global_batch = batch * world
    per_epoch = math.ceil(n / global_batch)
    epoch, i = divmod(skip, per_epoch)
    while True:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        for start in range(i * global_batch, n, global_batch):
            chunk = order[start:start + global_batch]
            yield epoch, chunk[rank::world] if len(chunk) >= world else chunk
        epoch, i = epoch + 1, 0


# --- checkpoints ------------------------------------------------------------------------------

@dataclass
class LoopState:
    step: int = 0
    history: list = field(default_factory=list)  # {"step", "epoch", "loss", "learning_rate"}


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders (with a matching manifest: `peftvlm.checkpoints`), oldest
    first."""
    return complete_checkpoints(run_dir)


def register_learned_state(accelerator, task: Task) -> None:
    """accelerate checkpoints the task's learned tensors instead of the whole (frozen) model."""
    def save(models, weights, output_dir):
        if accelerator.is_main_process:
            task.save_learned(Path(output_dir))
        weights.clear()  # accelerate's documented way to skip its own model files

    def load(models, input_dir):
        task.load_learned(Path(input_dir))
        models.clear()

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def save_checkpoint(accelerator, run_dir: Path, state: LoopState, keep: int | None) -> None:
    """checkpoints/checkpoint-<step>/: learned tensors, optimiser, schedule, RNG states (all
    processes write their own), then the loop's step and history (last: marks it complete)."""
    folder = Path(run_dir) / CHECKPOINT_DIR / f"checkpoint-{state.step}"
    accelerator.save_state(str(folder))
    accelerator.wait_for_everyone()  # every rank's RNG file is written before the manifest
    if accelerator.is_main_process:
        (folder / LOOP_STATE).write_text(json.dumps({"step": state.step,
                                                     "history": state.history}))
        mark_complete(folder)  # a folder without it is torn: --resume skips it
        for old in list_checkpoints(run_dir)[:-keep] if keep else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator, run_dir: Path, log=print) -> LoopState:
    """Restore the latest complete checkpoint into the live objects (accelerate's load_state),
    naming it; newer torn ones are moved aside, saying so."""
    latest = last_complete_checkpoint(run_dir, log)
    if latest is None:
        raise RunError(f"{run_dir}: nothing to resume (no complete {CHECKPOINT_DIR}/checkpoint-*)",
                       hint="start without --resume, or point at the run folder that has them")
    log(describe_resume(latest))
    accelerator.load_state(str(latest))
    saved = json.loads((latest / LOOP_STATE).read_text())
    return LoopState(saved["step"], saved["history"])


# --- the loop ---------------------------------------------------------------------------------

@dataclass
class Parts:
    """What one training run moves: the (possibly wrapped) model and its optimisation."""

    accelerator: object
    wrapped: object  # what the forward runs through (DDP-wrapped with several processes)
    module: object  # the plain module: parameters for clipping
    optimizer: object
    scheduler: object
    settings: OptimSettings


@dataclass
class Session:
    """The Accelerator of one run and the optimiser class it will use."""

    accelerator: object
    optimizer_cls_and_kwargs: tuple


def start_session(recipe) -> Session:
    """Resolve `train.optim` first (transformers' TrainingArguments resets accelerate's global
    state, so it must run before the Accelerator exists), then create the Accelerator: one
    process per device; cpu=True on CPU-only machines, so torchrun ranks join one gloo group."""
    import torch
    from accelerate import Accelerator

    resolved = optimizer_class_and_kwargs(optim_settings(recipe, 1, 1))
    return Session(Accelerator(cpu=not torch.cuda.is_available()), resolved)


@dataclass
class FitResult:
    state: LoopState
    runtime_s: float
    tracker: object


def fit(recipe, session: Session, task: Task, module, run_dir: Path, resume: bool,
        log) -> FitResult:
    """Optimise `module`'s trainable parameters on `task` as the recipe's train section says;
    resumes from the last checkpoint when asked; writes recipe.yaml and starts W&B."""
    accelerator = session.accelerator
    settings = optim_settings(recipe, task.n_examples, accelerator.num_processes)
    optimizer = build_optimizer(module.named_parameters(), settings,
                                session.optimizer_cls_and_kwargs)
    scheduler = build_scheduler(optimizer, settings)
    wrapped, optimizer = accelerator.prepare(module, optimizer)
    # Registered, not prepared: a prepared scheduler steps once per process per step.
    accelerator.register_for_checkpointing(scheduler)
    register_learned_state(accelerator, task)
    state = LoopState()
    if resume and list_checkpoints(run_dir):
        state = load_checkpoint(accelerator, run_dir, log)
    elif resume:  # as the generative trainer does: nothing saved yet, so start afresh
        log(f"no checkpoint in {run_dir / CHECKPOINT_DIR}: starting from scratch")
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(recipe.to_yaml())
    tracker = start_wandb(recipe, run_dir, log) if accelerator.is_main_process else None
    started = time.time()
    parts = Parts(accelerator, wrapped, module, optimizer, scheduler, settings)
    stop = StopSignals()  # Ctrl-C / SIGTERM: finish the step, save, raise Interrupted
    stop.install()
    try:
        run_loop(recipe, parts, task, state, run_dir, tracker, stop)
    finally:
        stop.uninstall()
    return FitResult(state, time.time() - started, tracker)


def run_loop(recipe, parts: Parts, task: Task, state: LoopState, run_dir: Path,
             tracker, stop: StopSignals | None = None) -> None:
    """Optimiser steps from `state.step` to the end, logging, scoring every train.eval_steps,
    checkpointing every train.save_steps; updates `state` in place. Once `stop` has received
    a signal, the step ends with a checkpoint and `Interrupted`."""
    from tqdm.auto import tqdm

    train, acc, s = recipe.train, parts.accelerator, parts.settings
    stream = batches(task.n_examples, s.batch_size, train.seed, acc.process_index,
                     acc.num_processes, state.step * train.gradient_accumulation_steps)
    bar = tqdm(total=s.total_steps, initial=state.step, desc="training",
               disable=not acc.is_main_process)
    parts.wrapped.train()
    since_log = []
    while state.step < s.total_steps:
        epoch, loss = optimizer_step(parts, task, stream, train)
        since_log.append(loss)
        state.step += 1
        bar.update(1)
        logs = {}
        if state.step % train.logging_steps == 0 or state.step == s.total_steps:
            entry = {"step": state.step, "epoch": epoch, "loss": sum(since_log) / len(since_log),
                     "learning_rate": parts.scheduler.get_last_lr()[0]}
            state.history.append(entry)
            since_log = []
            bar.set_postfix(loss=f"{entry['loss']:.4f}")
            logs.update({"train/loss": entry["loss"],
                         "train/learning_rate": entry["learning_rate"]})
        if train.eval_steps and state.step % train.eval_steps == 0:
            logs.update({f"eval/{k}": v for k, v in (task.scores() or {}).items()})
            parts.wrapped.train()
        if tracker is not None and logs:
            tracker.log(logs, step=state.step)
        if state.step % train.save_steps == 0:
            save_checkpoint(acc, run_dir, state, train.save_total_limit)
        if stop is not None and any_rank(stop.received is not None, acc.device):
            bar.close()
            stop_here(acc, run_dir, state, train, stop.received)
    bar.close()


def stop_here(accelerator, run_dir: Path, state: LoopState, train, signum: int | None) -> None:
    """Save the step just finished (unless its checkpoint exists) and raise `Interrupted`."""
    if state.step % train.save_steps:
        save_checkpoint(accelerator, run_dir, state, train.save_total_limit)
    raise Interrupted(signum, state.step,
                      Path(run_dir) / CHECKPOINT_DIR / f"checkpoint-{state.step}")


def optimizer_step(parts: Parts, task: Task, stream, train) -> tuple[int, float]:
    """One optimiser step over gradient_accumulation_steps micro-batches: (epoch, mean loss)."""
    accum, device, losses = train.gradient_accumulation_steps, parts.accelerator.device, []
    for _ in range(accum):
        epoch, idx = next(stream)
        loss = task.loss(parts.wrapped, idx, epoch, device)
        parts.accelerator.backward(loss / accum)
        # Each process sees a slice of the global batch: log the mean over all of them.
        losses.append(parts.accelerator.reduce(loss.detach(), reduction="mean").item())
    parts.accelerator.clip_grad_norm_(parts.module.parameters(), train.max_grad_norm)
    parts.optimizer.step()
    parts.scheduler.step()
    parts.optimizer.zero_grad()
    return epoch, sum(losses) / len(losses)
