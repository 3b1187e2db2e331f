"""Checkpoints that --resume can trust: completeness manifests, fallback, recipe changes.

Neither TRL's trainer nor our CLIP loop writes a checkpoint atomically: a process killed while
saving leaves a `checkpoint-N` folder with some files missing or cut short, which
`transformers.trainer_utils.get_last_checkpoint` would still pick. So once a checkpoint is fully
written (files flushed to disk), its folder gets a manifest, `peftvlm-complete.json`, listing
every file and its size. `--resume` only uses a checkpoint whose manifest exists and whose files
all still have those sizes; newer incomplete ones are moved aside (`incomplete-checkpoint-N`,
out of the trainer's `checkpoint-*` rotation) and the run falls back to the newest complete one,
saying so.

A resumed run must also train the same thing: `check_resume_recipe` compares the recipe with the
run's recipe.yaml and refuses changes to anything but the fields in `SAFE_TO_CHANGE`.
This module imports no torch.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import yaml

from peftvlm.errors import RunError

MANIFEST = "peftvlm-complete.json"
CHECKPOINT_DIR = "checkpoints"
_STEP = re.compile(r"^checkpoint-(\d+)$")

# Fields that change how long the run goes, how often it logs/saves/evaluates, or what happens
# after it: a resumed run trains the same model on the same data with any of these changed.
SAFE_TO_CHANGE = ("name", "description", "base_dir", "train.max_steps",
                  "train.num_train_epochs", "train.save_steps", "train.save_total_limit",
                  "train.logging_steps", "train.eval_steps", "train.dataloader_num_workers",
                  "data.num_proc", "data.cache", "eval", "tracking", "export")


def mark_complete(folder: Path) -> None:
    """Flush every file of a just-written checkpoint to disk, then record it as complete."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        with path.open("rb") as f:
            os.fsync(f.fileno())
        files[path.relative_to(folder).as_posix()] = path.stat().st_size
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"files": files}, indent=1))
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    tmp.replace(folder / MANIFEST)


def incomplete_reason(folder: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from, or None when it is complete."""
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"no {MANIFEST} (the save did not finish)"
    except (ValueError, KeyError, TypeError):
        return f"{MANIFEST} is damaged"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written"
    return None


def checkpoint_folders(run_dir: Path) -> list[Path]:
    """`checkpoints/checkpoint-N` folders, oldest first (complete or not)."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    found = [p for p in folder.iterdir() if p.is_dir() and _STEP.match(p.name)] \
        if folder.is_dir() else []
    return sorted(found, key=checkpoint_step)


def complete_checkpoints(run_dir: Path) -> list[Path]:
    return [p for p in checkpoint_folders(run_dir) if incomplete_reason(p) is None]


def last_complete_checkpoint(run_dir: Path, log=print) -> Path | None:
    """The newest complete checkpoint; newer incomplete ones are moved aside, saying so."""
    for folder in reversed(checkpoint_folders(run_dir)):
        reason = incomplete_reason(folder)
        if reason is None:
            return folder
        aside = folder.with_name(f"incomplete-{folder.name}")
        if aside.exists():
            shutil.rmtree(aside)
        folder.rename(aside)
        log(f"{folder} is incomplete ({reason}): moved to {aside.name}, falling back to the "
            "previous checkpoint (delete it once the run is done)")
    return None


def checkpoint_step(folder: Path) -> int:
    """The optimiser step a `checkpoint-N` folder was saved at."""
    return int(_STEP.match(Path(folder).name).group(1))


def describe_resume(folder: Path) -> str:
    """The log line that names the checkpoint a resumed run continues from."""
    return f"resuming from {folder} (step {checkpoint_step(folder)})"


def flat(data, prefix: str = "") -> dict:
    """{"method.r": 8, "data.train[0].path": ...} of a nested recipe dict."""
    if isinstance(data, dict):
        items = data.items()
    elif isinstance(data, list) and any(isinstance(v, (dict, list)) for v in data):
        items = ((f"[{i}]", v) for i, v in enumerate(data))
    else:
        return {prefix: data}
    out = {}
    for key, value in items:
        name = f"{prefix}{key}" if str(key).startswith("[") else \
            f"{prefix}.{key}" if prefix else str(key)
        out.update(flat(value, name))
    return out


def _safe(field: str) -> bool:
    return any(field == s or field.startswith((s + ".", s + "[")) for s in SAFE_TO_CHANGE)


def _shown(value) -> str:
    return "(unset)" if value is None else repr(value) if isinstance(value, str) else str(value)


def recipe_changes(old: dict, new: dict) -> list[str]:
    """`field old -> new` for each unsafe difference between two recipe dicts."""
    before, after = flat(old), flat(new)
    changed = [k for k in sorted(set(before) | set(after))
               if before.get(k) != after.get(k) and not _safe(k)]
    return [f"{k} {_shown(before.get(k))} -> {_shown(after.get(k))}" for k in changed]


def check_resume_recipe(recipe, run_dir: Path) -> None:
    """--resume with a recipe that differs from the run's (beyond SAFE_TO_CHANGE) is refused
    before anything loads, naming the changed fields."""
    saved = Path(run_dir) / "recipe.yaml"
    if not saved.is_file() or not complete_checkpoints(run_dir):
        return  # nothing to resume from: the run starts afresh
    try:
        old = yaml.safe_load(saved.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RunError(f"{saved} is damaged ({exc})", hint="restore it, or start over with "
                                                           "--overwrite") from None
    changes = recipe_changes(old, yaml.safe_load(recipe.to_yaml()))
    if changes:
        listed = ", ".join(changes[:8]) + (f" and {len(changes) - 8} more" if len(changes) > 8
                                            else "")
        raise RunError(f"the recipe changed since the checkpoints in {run_dir}: {listed}. "
                       "Resuming would continue training something else than what was saved",
                       hint=f"resume with the run's own recipe (peftvlm train {saved} --resume), "
                            "or train the new recipe into another folder (-o) or with "
                            "--overwrite; safe to change on resume: "
                            + ", ".join(SAFE_TO_CHANGE[3:]))
