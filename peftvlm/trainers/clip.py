"""The training loop for CLIP-family methods (CoOp, VPT, CLIP-Adapter): few-shot image
classification with cross-entropy over CLIP's scaled cosine logits.

`train_dual_encoder(recipe, run_dir, resume)` reads top to bottom: load the frozen dual
encoder, build the (few-shot) task, score zero-shot CLIP, apply the method, train, score again,
write the run folder (adapter/, checkpoints/, loss.png, summary.json). One accelerate process
per device; with several processes each takes its slice of every global batch.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from peftvlm.errors import ModelError, RecipeError, RunError
from peftvlm.trainers import clip_data

ADAPTER_DIR, CHECKPOINT_DIR = "adapter", "checkpoints"


# --- model ------------------------------------------------------------------------------------

def tiny_model_dir(name: str) -> Path:
    """Folder of a built-in tiny model, built on first use (atomically, so never half-built)."""
    import tempfile

    from peftvlm.families import tiny_models

    folder = Path.home() / ".cache" / "peftvlm" / "tiny" / name
    if not (folder / "config.json").exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent))
        tiny_models()[name].build_tiny(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    return folder


def load_dual_encoder(model_cfg):
    """(model, processor, family) for a dual-encoder recipe; float32 unless dtype says else."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoProcessor

    from peftvlm.families import family_for_model_type, get_family, tiny_models

    source = str(tiny_model_dir(model_cfg.id)) if model_cfg.id in tiny_models() else model_cfg.id
    kwargs = dict(revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.id: cannot load {model_cfg.id!r} ({exc})") from exc
    family = get_family(model_cfg.family) if model_cfg.family else \
        family_for_model_type(config.model_type)
    if family.kind != "dual_encoder":
        raise RecipeError(f"model.id: {model_cfg.id!r} is a {family.name} model; CoOp, VPT and "
                          f"CLIP-Adapter need a dual encoder (CLIP)")
    # Prompts and adapters are tiny; full precision keeps SGD on them exact. "auto" = float32.
    dtype = torch.float32 if model_cfg.dtype == "auto" else getattr(torch, model_cfg.dtype)
    model = AutoModel.from_pretrained(source, dtype=dtype, **kwargs)
    processor = AutoProcessor.from_pretrained(source, **kwargs)
    return model, processor, family


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
class Tensors:
    pixels: object  # [N, 3, H, W]
    labels: object  # [N]


def to_tensors(split: clip_data.Split, processor) -> Tensors:
    """Preprocess every image once (few-shot sets are small)."""
    import torch

    pixels = processor.image_processor(images=split.images, return_tensors="pt")["pixel_values"]
    return Tensors(pixels, torch.tensor(split.labels, dtype=torch.long))


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


def accuracy(classifier, data: Tensors, batch_size: int = 256) -> float:
    """Top-1 accuracy of `classifier` on preprocessed images."""
    import torch

    was_training = classifier.training
    classifier.eval()
    device = next(classifier.parameters()).device
    correct = 0
    with torch.no_grad():
        for start in range(0, len(data.labels), batch_size):
            logits = classifier(data.pixels[start:start + batch_size].to(device))
            correct += (logits.argmax(-1).cpu() == data.labels[start:start + batch_size]).sum()
    classifier.train(was_training)
    return float(correct) / max(1, len(data.labels))


# --- evaluation sets --------------------------------------------------------------------------

@dataclass
class EvalSets:
    """Held-out images per class group: `base` (trained classes) and, base-to-new, `new`."""

    classnames: dict[str, list[str]]
    data: dict[str, Tensors]


def prepare_task(recipe, processor):
    """(training classes, training tensors, eval sets) for the recipe's task."""
    data = recipe.data
    task = clip_data.load_task(data, recipe.base_dir())
    groups = {"base": list(range(len(task.classnames)))}
    if data.base_to_new:
        groups["base"], groups["new"] = clip_data.base_new_classes(len(task.classnames))
    train = clip_data.keep_classes(task.train, groups["base"])
    if data.shots:
        train = clip_data.few_shot(train, data.shots, len(groups["base"]), data.seed)
    names = {g: [task.classnames[c] for c in cs] for g, cs in groups.items()}
    evals = {} if task.eval is None else {
        g: to_tensors(clip_data.keep_classes(task.eval, cs), processor) for g, cs in groups.items()}
    return names["base"], to_tensors(train, processor), EvalSets(names, evals)


def evaluate(classifier, sets: EvalSets) -> dict | None:
    """Accuracy per class group (+ harmonic mean for base-to-new); restores the classes."""
    if not sets.data:
        return None
    trained = classifier.classnames
    scores = {}
    for group, tensors in sets.data.items():
        classifier.set_classnames(sets.classnames[group])
        scores[group] = accuracy(classifier, tensors)
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

    from peftvlm.methods.dual_encoder import save_method

    folder = run_dir / CHECKPOINT_DIR / f"checkpoint-{state.step}"
    save_method(classifier, folder)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "step": state.step, "history": state.history,
                "rng": torch.get_rng_state()}, folder / "trainer_state.pt")
    for old in list_checkpoints(run_dir)[:-keep] if keep else []:
        shutil.rmtree(old)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders, oldest first."""
    folders = (run_dir / CHECKPOINT_DIR).glob("checkpoint-*")
    return sorted((f for f in folders if (f / "trainer_state.pt").exists()),
                  key=lambda f: int(f.name.split("-")[-1]))


def load_checkpoint(run_dir: Path, classifier, optimizer, scheduler) -> LoopState:
    """Restore the latest checkpoint into the live objects."""
    import torch
    from safetensors.torch import load_file

    from peftvlm.methods.dual_encoder.base import WEIGHTS_FILE

    found = list_checkpoints(run_dir)
    if not found:
        raise RunError(f"{run_dir}: nothing to resume (no {CHECKPOINT_DIR}/checkpoint-*)",
                       hint="start without --resume, or point at the run folder that has them")
    latest = found[-1]
    tensors = load_file(latest / WEIGHTS_FILE)
    classifier.load_state_dict(tensors, strict=False)
    saved = torch.load(latest / "trainer_state.pt", weights_only=False)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"])
    return LoopState(saved["step"], saved["history"])


# --- reporting --------------------------------------------------------------------------------

def start_wandb(recipe, run_dir: Path):
    """A W&B run when the recipe asks for one. Without an API key it runs offline (with a
    notice) instead of failing; a short init timeout keeps a dead network from hanging us."""
    cfg = recipe.tracking.wandb
    if cfg is None:
        return None
    import wandb

    mode = cfg.mode or ("online" if _wandb_key_available() else "offline")
    if cfg.mode is None and mode == "offline":
        print("W&B: no API key found, logging offline (sync later with `wandb sync`).")
    try:
        return wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name or recipe.name,
                          tags=cfg.tags, mode=mode, dir=str(run_dir),
                          config=recipe.model_dump(mode="json"),
                          settings=wandb.Settings(init_timeout=30))
    except Exception as exc:  # noqa: BLE001 - tracking must never stop training
        print(f"W&B: could not start ({exc}); training continues without it.")
        return None


def _wandb_key_available() -> bool:
    import netrc
    import os

    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def plot_loss(history: list[dict], path: Path) -> None:
    """loss.png: training loss against optimiser step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- the run ----------------------------------------------------------------------------------

def train_dual_encoder(recipe, run_dir: Path, resume: bool = False) -> dict:
    """Train the recipe's CLIP-family method; returns (and writes) the run summary."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from peftvlm.methods.dual_encoder import DualEncoderClassifier, save_method
    from peftvlm.registry import get_method

    run_dir = Path(run_dir)
    accelerator = Accelerator()
    set_seed(recipe.train.seed)
    model, processor, family = load_dual_encoder(recipe.model)
    model.to(accelerator.device)
    classnames, train_data, eval_sets = prepare_task(recipe, processor)
    templates, tokenizer = recipe.data.prompt_templates, processor.tokenizer

    zero_shot = DualEncoderClassifier(model, family, None, tokenizer, classnames, templates)
    before = evaluate(zero_shot, eval_sets)
    method = get_method(recipe.method.name)
    if "dual_encoder" not in method.kinds:
        raise RecipeError(f"method.name: {method.name!r} is not a CLIP-family method",
                          hint="use coop, vpt or clip_adapter with a CLIP model")
    classifier = method.apply(model, family, recipe.method, tokenizer=tokenizer,
                              classnames=classnames, templates=templates)
    if recipe.data.base_to_new and not classifier.transfers_to_new_classes:
        raise RecipeError(f"data.base_to_new: method {method.name!r} as configured learns "
                          f"per-class parameters and cannot score new classes",
                          hint="for CoOp set method.csc=false")
    trainable, total = classifier.parameter_counts()

    settings = optim_settings(recipe, len(train_data.labels), accelerator.num_processes)
    optimizer = build_optimizer([p for p in classifier.parameters() if p.requires_grad], settings)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, settings))
    state = load_checkpoint(run_dir, classifier, optimizer, scheduler) if resume else LoopState()
    wrapped, optimizer = accelerator.prepare(classifier, optimizer)

    tracker = start_wandb(recipe, run_dir) if accelerator.is_main_process else None
    started = time.time()
    run_loop(recipe, accelerator, wrapped, classifier, optimizer, scheduler, settings,
             train_data, state, run_dir, tracker)
    runtime = time.time() - started

    after = evaluate(classifier, eval_sets)
    summary = {
        "method": recipe.method.name, "kind": "dual_encoder", "model": recipe.model.id,
        "trainable_params": trainable, "total_params": total,
        "train_runtime_s": round(runtime, 3), "global_step": state.step,
        "final_loss": state.history[-1]["loss"] if state.history else None,
        "train_examples": len(train_data.labels), "classnames": classnames,
        "eval": {"accuracy": {"before": before and before["base"],
                              "after": after and after["base"]}},
    }
    if recipe.data.base_to_new:
        summary["eval"]["base_to_new"] = {"before": before, "after": after}
    if accelerator.is_main_process:
        save_method(classifier, run_dir / ADAPTER_DIR)
        plot_loss(state.history, run_dir / "loss.png")
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if tracker is not None:
            tracker.summary.update({"accuracy_before": summary["eval"]["accuracy"]["before"],
                                    "accuracy_after": summary["eval"]["accuracy"]["after"]})
            tracker.finish()
    return summary


def run_loop(recipe, accelerator, wrapped, classifier, optimizer, scheduler, settings,
             data: Tensors, state: LoopState, run_dir: Path, tracker) -> None:
    """Optimiser steps from `state.step` to the end, logging, checkpointing and updating
    `state` in place."""
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    train, accum = recipe.train, recipe.train.gradient_accumulation_steps
    stream = batches(len(data.labels), settings.batch_size, recipe.train.seed,
                     accelerator.process_index, accelerator.num_processes, state.step * accum)
    bar = tqdm(total=settings.total_steps, initial=state.step, desc="training",
               disable=not accelerator.is_main_process)
    wrapped.train()
    since_log = []
    while state.step < settings.total_steps:
        for _ in range(accum):
            epoch, idx = next(stream)
            pixels = data.pixels[idx].to(accelerator.device)
            loss = F.cross_entropy(wrapped(pixels), data.labels[idx].to(accelerator.device))
            accelerator.backward(loss / accum)
            since_log.append(loss.item())
        accelerator.clip_grad_norm_(classifier.parameters(), train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        state.step += 1
        bar.update(1)
        if state.step % train.logging_steps == 0 or state.step == settings.total_steps:
            entry = {"step": state.step, "epoch": epoch,
                     "loss": sum(since_log) / len(since_log),
                     "learning_rate": scheduler.get_last_lr()[0]}
            state.history.append(entry)
            since_log = []
            bar.set_postfix(loss=f"{entry['loss']:.4f}")
            if tracker is not None:
                tracker.log({"train/loss": entry["loss"],
                             "train/learning_rate": entry["learning_rate"]}, step=state.step)
        if state.step % train.save_steps == 0 and accelerator.is_main_process:
            save_checkpoint(run_dir, classifier, optimizer, scheduler, state,
                            train.save_total_limit)
    bar.close()
