"""Weights & Biases tracking: never crashes a run, never hangs on a missing network or key."""

from __future__ import annotations

import os
import re

SECRET_KEY = re.compile(r"(token|secret|password|api[_-]?key|auth)", re.IGNORECASE)


def scrub_secrets(data):
    """Drop any key that looks like a secret, at any depth (what goes to W&B config)."""
    if isinstance(data, dict):
        return {k: scrub_secrets(v) for k, v in data.items() if not SECRET_KEY.search(str(k))}
    if isinstance(data, list):
        return [scrub_secrets(v) for v in data]
    return data


def has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc
        return any(host.startswith("api.wandb.ai") for host in netrc.netrc().hosts)
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(mode: str | None, log) -> str:
    """The recipe's mode; with none, online only when a key exists, else offline with a notice."""
    if mode:
        return mode
    if os.environ.get("WANDB_MODE") in ("offline", "disabled", "online"):
        return os.environ["WANDB_MODE"]
    if has_wandb_key():
        return "online"
    log("W&B: no API key found, logging offline (sync later with `wandb sync`).")
    return "offline"


def start_wandb(recipe, run_dir, log=print):
    """Start a W&B run for the recipe (or return None when tracking is off)."""
    cfg = recipe.tracking.wandb
    if cfg is None:
        return None
    mode = resolve_mode(cfg.mode, log)
    if mode == "disabled":
        return None
    import wandb

    return wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name or recipe.name,
                      tags=cfg.tags, mode=mode, dir=str(run_dir),
                      config=scrub_secrets(recipe.model_dump(mode="json")))
