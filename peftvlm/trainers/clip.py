"""The training loop for CLIP-family methods (CoOp, VPT, CLIP-Adapter): few-shot image
classification with cross-entropy over CLIP's scaled cosine logits.

`train_dual_encoder(recipe, run_dir, resume)` reads top to bottom: load the frozen dual
encoder, build the (few-shot) task, score zero-shot CLIP, apply the method, train, score again,
write the run folder (adapter/, checkpoints/, loss.png, summary.json). One accelerate process
per device; with several processes each takes its slice of every global batch.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from peftvlm.errors import RecipeError, RunError
from peftvlm.trainers import clip_data

ADAPTER_DIR, CHECKPOINT_DIR = "adapter", "checkpoints"


# --- model ------------------------------------------------------------------------------------

def load_dual_encoder(recipe):
    """The recipe's base model (frozen later by the method), processor and family."""
    from peftvlm.models import load_base

    loaded = load_base(recipe.model, recipe.method.name)
    if loaded.family.kind != "dual_encoder":
        raise RecipeError(f"model.id: {recipe.model.id!r} is a {loaded.family.name} model; "
                          f"{recipe.method.name} needs a dual encoder such as CLIP",
                          hint="use model.id=tiny-clip or a CLIP checkpoint")
    return loaded


# --- optimisation -----------------------------------------------------------------------------

@dataclass
class OptimSettings:
    """What the loop needs to build its optimiser and schedule."""

    optim: str
    learning_rate: float
    weight_decay: float
    momentum: float
    lr_scheduler_type: str
    warmup_steps: int
    warmup_lr: float | None  # constant warm-up at this lr (CoOp); None = linear from 0
    batch_size: int
    total_steps: int
    steps_per_epoch: int


def optim_settings(recipe, n_train: int, world_size: int) -> OptimSettings:
    """The recipe's train section, or the method's paper preset where it asks for one."""
    train = recipe.train
    values = dict(optim=train.optim, learning_rate=train.learning_rate,
                  weight_decay=train.weight_decay, momentum=0.9,
                  lr_scheduler_type=train.lr_scheduler_type,
                  per_device_train_batch_size=train.per_device_train_batch_size)
    preset = None
    if getattr(recipe.method, "optim_preset", "recipe") == "paper":
        from peftvlm.methods.coop import PAPER_OPTIM
        preset = PAPER_OPTIM
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
    return OptimSettings(values["optim"], values["learning_rate"], values["weight_decay"],
                         values["momentum"], values["lr_scheduler_type"], min(warmup, total),
                         warmup_lr, batch, total, steps_per_epoch)


def build_optimizer(params, s: OptimSettings):
    """SGD (with momentum) or AdamW over the trainable parameters."""
    import torch

    if s.optim.lower().startswith("sgd"):
        return torch.optim.SGD(params, lr=s.learning_rate, momentum=s.momentum,
                               weight_decay=s.weight_decay)
    if s.optim.lower().startswith("adamw"):
        return torch.optim.AdamW(params, lr=s.learning_rate, weight_decay=s.weight_decay)
    raise RecipeError(f"train.optim: {s.optim!r} is not supported by the CLIP trainer",
                      hint="use adamw_torch or sgd")


def lr_factor(step: int, s: OptimSettings) -> float:
    """Multiplier of the peak lr at `step`: warm-up, then the schedule over the rest."""
    if step < s.warmup_steps:
        if s.warmup_lr is not None:
            return s.warmup_lr / s.learning_rate
        if s.lr_scheduler_type != "constant":
            return (step + 1) / (s.warmup_steps + 1)
    done = (step - s.warmup_steps) / max(1, s.total_steps - s.warmup_steps)
    if s.lr_scheduler_type == "cosine":
        return 0.5 * (1 + math.cos(math.pi * done))
    if s.lr_scheduler_type == "linear":
        return max(0.0, 1 - done)
    return 1.0


# --- data -------------------------------------------------------------------------------------

@dataclass
class ImageSet:
    """Images with label ids; pixels are made per batch by the model's image processor."""

    images: list
    labels: object  # LongTensor [N]
    processor: object

    def pixels(self, index) -> object:
        """Preprocessed pixel values [len(index), 3, H, W] of the images at `index`."""
        chosen = [clip_data.open_image(self.images[i]) for i in index.tolist()]
        return self.processor.image_processor(images=chosen, return_tensors="pt")["pixel_values"]


def image_set(split: clip_data.Split, processor) -> ImageSet:
    import torch

    return ImageSet(split.images, torch.tensor(split.labels, dtype=torch.long), processor)


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


def accuracy(classifier, data: ImageSet, batch_size: int = 64) -> float:
    """Top-1 accuracy of `classifier` on `data`."""
    import torch

    was_training = classifier.training
    classifier.eval()
    device = next(classifier.parameters()).device
    correct = 0
    with torch.no_grad():
        for index in torch.arange(len(data.labels)).split(batch_size):
            predicted = classifier(data.pixels(index).to(device)).argmax(-1).cpu()
            correct += int((predicted == data.labels[index]).sum())
    classifier.train(was_training)
    return correct / max(1, len(data.labels))


# --- evaluation sets --------------------------------------------------------------------------

@dataclass
class EvalSets:
    """Held-out images per class group: `base` (trained classes) and, base-to-new, `new`."""

    classnames: dict[str, list[str]]
    data: dict[str, ImageSet]
    batch_size: int = 64


def prepare_task(recipe, processor):
    """(training class names, training images, held-out sets) for the recipe's task."""
    data = recipe.data
    task = clip_data.load_task(data, recipe.base_dir())
    groups = {"base": list(range(len(task.classnames)))}
    if data.base_to_new:
        groups["base"], groups["new"] = clip_data.base_new_classes(len(task.classnames))
    train = clip_data.keep_classes(task.train, groups["base"])
    if data.shots:
        train = clip_data.few_shot(train, data.shots, len(groups["base"]), data.seed)
    names = {g: [task.classnames[c] for c in cs] for g, cs in groups.items()}
    evals = {}
    if task.eval is not None:  # no held-out data: accuracies are reported as null
        limit = recipe.eval.max_samples
        for group, classes in groups.items():
            held_out = clip_data.keep_classes(task.eval, classes)
            held_out = clip_data.Split(held_out.images[:limit], held_out.labels[:limit])
            evals[group] = image_set(held_out, processor)
    sets = EvalSets(names, evals, recipe.eval.batch_size)
    return names["base"], image_set(train, processor), sets


def evaluate(classifier, sets: EvalSets) -> dict | None:
    """Accuracy per class group (+ harmonic mean for base-to-new); restores the classes."""
    if not sets.data:
        return None
    trained = classifier.classnames
    scores = {}
    for group, tensors in sets.data.items():
        classifier.set_classnames(sets.classnames[group])
        scores[group] = accuracy(classifier, tensors, sets.batch_size)
    classifier.set_classnames(trained)
    if "new" in scores:
        b, n = scores["base"], scores["new"]
        scores["harmonic_mean"] = 2 * b * n / (b + n) if b + n else 0.0
    return scores


# --- checkpoints ------------------------------------------------------------------------------

@dataclass
class LoopState:
    step: int = 0
    history: list = field(default_factory=list)  # {"step", "epoch", "loss", "learning_rate"}


def save_checkpoint(run_dir: Path, classifier, optimizer, scheduler, state: LoopState,
                    keep: int | None) -> None:
    """checkpoints/checkpoint-<step>/: the method files + optimiser, schedule, RNG, history."""
    import torch

    from peftvlm.checkpoints import mark_complete
    from peftvlm.methods.dual_encoder import save_method

    folder = run_dir / CHECKPOINT_DIR / f"checkpoint-{state.step}"
    save_method(classifier, folder)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "step": state.step, "history": state.history,
                "rng": torch.get_rng_state()}, folder / "trainer_state.pt")
    mark_complete(folder)
    for old in list_checkpoints(run_dir)[:-keep] if keep else []:
        shutil.rmtree(old)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first (see `peftvlm.checkpoints`)."""
    from peftvlm.checkpoints import complete_checkpoints

    return complete_checkpoints(run_dir)


def load_checkpoint(run_dir: Path, classifier, optimizer, scheduler, log=print) -> LoopState:
    """Restore the latest complete checkpoint into the live objects."""
    import torch
    from safetensors.torch import load_file

    from peftvlm.checkpoints import last_complete_checkpoint
    from peftvlm.methods.dual_encoder.base import WEIGHTS_FILE

    latest = last_complete_checkpoint(run_dir, log)
    if latest is None:
        raise RunError(f"{run_dir}: nothing to resume (no complete {CHECKPOINT_DIR}/checkpoint-*)",
                       hint="start without --resume, or point at the run folder that has them")
    tensors = load_file(latest / WEIGHTS_FILE)
    classifier.load_state_dict(tensors, strict=False)
    saved = torch.load(latest / "trainer_state.pt", weights_only=False)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"])
    return LoopState(saved["step"], saved["history"])


# --- the run ----------------------------------------------------------------------------------

def build_classifier(recipe, loaded, classnames: list[str]):
    """Apply the recipe's method to the frozen base, over `classnames`."""
    from peftvlm.registry import get_method

    method = get_method(recipe.method.name)
    if "dual_encoder" not in method.kinds:
        raise RecipeError(f"method.name: {method.name!r} is not a CLIP-family method",
                          hint="use coop, vpt or clip_adapter with a CLIP model")
    classifier = method.apply(loaded.model, loaded.family, recipe.method,
                              tokenizer=loaded.processor.tokenizer, classnames=classnames,
                              templates=recipe.data.prompt_templates)
    if recipe.data.base_to_new and not classifier.transfers_to_new_classes:
        raise RecipeError(f"data.base_to_new: method {method.name!r} as configured learns "
                          f"per-class parameters and cannot score new classes",
                          hint="for CoOp set method.csc=false")
    return classifier


def dry_run_dual_encoder(recipe, log=print) -> dict:
    """Load, apply the method and report parameter counts; trains and writes nothing."""
    loaded = load_dual_encoder(recipe)
    classnames, train_data, eval_sets = prepare_task(recipe, loaded.processor)
    trainable, total = build_classifier(recipe, loaded, classnames).parameter_counts()
    log(f"trainable params: {trainable:,} / {total:,} ({100 * trainable / total:.3f}%)")
    log(f"classes: {', '.join(classnames)}; train images: {len(train_data.labels)}")
    return {"trainable_params": trainable, "total_params": total,
            "train_examples": len(train_data.labels), "classnames": classnames}


def train_dual_encoder(recipe, run_dir: Path, resume: bool = False, log=print) -> dict:
    """Train the recipe's CLIP-family method; returns (and writes) the run summary."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from peftvlm.methods.dual_encoder import DualEncoderClassifier, save_method
    from peftvlm.runs import plot_loss, write_json
    from peftvlm.tracking import start_wandb

    # cpu=True on CPU-only machines: torchrun ranks then join one gloo process group.
    run_dir, accelerator = Path(run_dir), Accelerator(cpu=not torch.cuda.is_available())
    set_seed(recipe.train.seed)
    loaded = load_dual_encoder(recipe)
    loaded.model.to(accelerator.device)
    classnames, train_data, eval_sets = prepare_task(recipe, loaded.processor)
    zero_shot = DualEncoderClassifier(loaded.model, loaded.family, None, loaded.processor.tokenizer,
                                      classnames, recipe.data.prompt_templates)
    before = evaluate(zero_shot, eval_sets) if recipe.eval.before_training else None
    classifier = build_classifier(recipe, loaded, classnames)
    trainable, total = classifier.parameter_counts()

    settings = optim_settings(recipe, len(train_data.labels), accelerator.num_processes)
    optimizer = build_optimizer([p for p in classifier.parameters() if p.requires_grad], settings)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, settings))
    state = LoopState()
    if resume and list_checkpoints(run_dir):
        state = load_checkpoint(run_dir, classifier, optimizer, scheduler, log)
    elif resume:  # as the generative trainer does: nothing saved yet, so start afresh
        log(f"no checkpoint in {run_dir / CHECKPOINT_DIR}: starting from scratch")
    wrapped, optimizer = accelerator.prepare(classifier, optimizer)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(recipe.to_yaml())
    tracker = start_wandb(recipe, run_dir, log) if accelerator.is_main_process else None

    started = time.time()
    parts = Parts(accelerator, wrapped, classifier, optimizer, scheduler, settings)
    run_loop(recipe, parts, train_data, eval_sets, state, run_dir, tracker)
    summary = {
        "name": recipe.name, "method": recipe.method.name, "kind": "dual_encoder",
        "model": recipe.model.id, "family": loaded.family.name,
        "trainable_params": trainable, "total_params": total,
        "train_runtime_s": round(time.time() - started, 3), "global_step": state.step,
        "final_loss": state.history[-1]["loss"] if state.history else None,
        "loss_curve": [[h["step"], round(h["loss"], 6)] for h in state.history],
        "train_examples": len(train_data.labels), "classnames": classnames,
        "eval": eval_summary(before, evaluate(classifier, eval_sets), recipe.data.base_to_new),
        "hardware": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }
    if accelerator.is_main_process:
        save_method(classifier, run_dir / ADAPTER_DIR)
        plot_loss(state.history, run_dir / "loss.png", title=f"{recipe.method.name} loss")
        write_json(run_dir / "summary.json", summary)
        if tracker is not None:
            tracker.summary.update({"eval/accuracy": summary["eval"]["accuracy"]["after"]})
            tracker.finish()
    return summary


def eval_summary(before: dict | None, after: dict | None, base_to_new: bool) -> dict:
    """`accuracy` {before, after} on the trained (base) classes; base/new/harmonic mean too."""
    out = {"accuracy": {"before": before and before["base"], "after": after and after["base"]}}
    if base_to_new:
        out["base_to_new"] = {"before": before, "after": after}
    return out


@dataclass
class Parts:
    """What one training run moves: the (possibly wrapped) classifier and its optimisation."""

    accelerator: object
    wrapped: object  # what the forward runs through (DDP-wrapped with several processes)
    classifier: object  # the plain classifier: parameters, checkpoints, evaluation
    optimizer: object
    scheduler: object
    settings: OptimSettings


def run_loop(recipe, parts: Parts, data: ImageSet, eval_sets: EvalSets, state: LoopState,
             run_dir: Path, tracker) -> None:
    """Optimiser steps from `state.step` to the end, logging, evaluating every
    train.eval_steps, checkpointing every train.save_steps; updates `state` in place."""
    from tqdm.auto import tqdm

    train, acc, s = recipe.train, parts.accelerator, parts.settings
    stream = batches(len(data.labels), s.batch_size, train.seed, acc.process_index,
                     acc.num_processes, state.step * train.gradient_accumulation_steps)
    bar = tqdm(total=s.total_steps, initial=state.step, desc="training",
               disable=not acc.is_main_process)
    parts.wrapped.train()
    since_log = []
    while state.step < s.total_steps:
        epoch, loss = optimizer_step(parts, data, stream, train)
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
            logs.update({"train/loss": entry["loss"], "train/learning_rate": entry["learning_rate"]})
        if train.eval_steps and state.step % train.eval_steps == 0 and eval_sets.data:
            scores = evaluate(parts.classifier, eval_sets)
            logs.update({f"eval/accuracy_{k}": v for k, v in scores.items()})
        if tracker is not None and logs:
            tracker.log(logs, step=state.step)
        if state.step % train.save_steps == 0 and acc.is_main_process:
            save_checkpoint(run_dir, parts.classifier, parts.optimizer, parts.scheduler, state,
                            train.save_total_limit)
    bar.close()


def optimizer_step(parts: Parts, data: ImageSet, stream, train) -> tuple[int, float]:
    """One optimiser step over gradient_accumulation_steps micro-batches: (epoch, mean loss)."""
    import torch.nn.functional as F

    accum, device, losses = train.gradient_accumulation_steps, parts.accelerator.device, []
    for _ in range(accum):
        epoch, idx = next(stream)
        logits = parts.wrapped(data.pixels(idx).to(device))
        loss = F.cross_entropy(logits, data.labels[idx].to(device))
        parts.accelerator.backward(loss / accum)
        # Each process sees a slice of the global batch: log the mean over all of them.
        losses.append(parts.accelerator.reduce(loss.detach(), reduction="mean").item())
    parts.accelerator.clip_grad_norm_(parts.classifier.parameters(), train.max_grad_norm)
    parts.optimizer.step()
    parts.scheduler.step()
    parts.optimizer.zero_grad()
    return epoch, sum(losses) / len(losses)
