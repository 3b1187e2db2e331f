"""Weights & Biases tracking: never crashes a run, never hangs on a missing network or key."""

from __future__ import annotations

import os
import re

# Whole words only, so `max_new_tokens` or `author` survive while `hub_token` or `api_key` go.
SECRET_KEY = re.compile(r"(^|[_-])(token|secret|password|api[_-]?key|auth|credentials?)([_-]|$)",
                        re.IGNORECASE)


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


# W&B's own variable, so a user (or a test) can wait more or less; W&B's default is 90 s.
ONLINE_TIMEOUT_S = 20


def online_timeout_s() -> float:
    """Seconds an online start may take before the run falls back to offline."""
    try:
        return float(os.environ.get("WANDB_INIT_TIMEOUT") or ONLINE_TIMEOUT_S)
    except ValueError:
        return ONLINE_TIMEOUT_S


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

    kwargs = dict(project=cfg.project, entity=cfg.entity, name=cfg.name or recipe.name,
                  tags=cfg.tags, dir=str(run_dir),
                  config=scrub_secrets(recipe.model_dump(mode="json")))
    if mode != "online":
        return wandb.init(mode=mode, **kwargs)
    try:  # an unreachable server must cost seconds, not the ~2 minutes of W&B's default
        return wandb.init(mode="online", settings=wandb.Settings(init_timeout=online_timeout_s()),
                          **kwargs)
    except Exception as exc:  # noqa: BLE001 - any W&B failure falls back, never kills the run
        log(f"W&B: online start failed ({type(exc).__name__}); logging offline instead "
            "(sync later with `wandb sync`).")
        return wandb.init(mode="offline", **kwargs)


def active_run_info() -> dict | None:
    """Where the active W&B run lives (for summary.json and the model card); None without one."""
    import sys

    wandb = sys.modules.get("wandb")
    run = getattr(wandb, "run", None) if wandb is not None else None
    if run is None:
        return None
    offline = bool(getattr(run, "offline", False)) or \
        getattr(getattr(run, "settings", None), "mode", None) == "offline"
    return {"id": run.id, "project": run.project, "entity": run.entity or None,
            "url": None if offline else run.url, "mode": "offline" if offline else "online",
            "dir": str(run.dir)}


def log_export_artifacts(recipe, run_dir, folders: dict, log=print) -> list[str]:
    """Log each folder (`adapter`, `merged`) as a W&B model artifact.

    Inside `train` the training run is still active and receives them; a standalone export opens
    a short `export` job run in the same project. Returns the artifact names.
    """
    cfg = recipe.tracking.wandb
    mode = resolve_mode(cfg.mode, log)
    if mode == "disabled":
        return []
    try:
        return _log_artifacts(recipe, cfg, mode, run_dir, folders, log)
    except Exception as exc:  # tracking never fails an export that already passed its checks
        log(f"W&B: could not log the export artifacts ({type(exc).__name__}: {exc})")
        return []


def _log_artifacts(recipe, cfg, mode: str, run_dir, folders: dict, log) -> list[str]:
    import wandb

    own_run = wandb.run is None
    run = wandb.run or wandb.init(project=cfg.project, entity=cfg.entity, mode=mode,
                                  name=f"{cfg.name or recipe.name}-export", job_type="export",
                                  tags=cfg.tags, dir=str(run_dir))
    names = []
    for kind, folder in folders.items():
        artifact = wandb.Artifact(re.sub(r"[^\w.-]", "-", f"{recipe.name}-{kind}"), type="model",
                                  metadata={"method": recipe.method.name, "base": recipe.model.id})
        artifact.add_dir(str(folder))
        run.log_artifact(artifact)
        names.append(artifact.name)
    if own_run:
        run.finish()
    log(f"W&B: logged {', '.join(names)} ({mode})")
    return names
