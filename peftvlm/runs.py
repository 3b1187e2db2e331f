"""The run folder: created safely, never overwritten by accident, summarised at the end.

    runs/<name>/recipe.yaml      the resolved recipe
    runs/<name>/adapter/         PEFT adapter + processor (loads with PeftModel.from_pretrained)
    runs/<name>/checkpoints/     trainer checkpoints (--resume continues from the last)
    runs/<name>/summary.json     parameters, runtime, final loss, eval before/after (and every
                                 train.eval_steps: eval_history)
    runs/<name>/loss.png         the training loss curve
    runs/<name>/eval/            `peftvlm eval` outputs: predictions, metrics.json, metrics.png
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from peftvlm.errors import RunError


def default_run_dir(recipe) -> Path:
    return Path("runs") / (recipe.name or "run")


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> Path:
    """Refuse to clobber finished or unfinished runs unless told; `--overwrite` starts afresh."""
    finished = (run_dir / "summary.json").exists()
    has_checkpoints = any((run_dir / "checkpoints").glob("checkpoint-*"))
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    elif finished and not resume:
        raise RunError(f"run folder {run_dir} already holds a finished run",
                       hint="pass --overwrite to replace it, or --output-dir for a new folder")
    elif finished and resume:
        raise RunError(f"run folder {run_dir} is already finished: nothing to resume",
                       hint="pass --overwrite to train again from scratch")
    elif has_checkpoints and not resume:
        raise RunError(f"run folder {run_dir} holds checkpoints of an unfinished run",
                       hint="pass --resume to continue it, or --overwrite to start over")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def read_summary(run_dir: Path) -> dict:
    """A finished run's summary.json; a missing or damaged one is a RunError."""
    path = Path(run_dir) / "summary.json"
    if not path.exists():
        raise RunError(f"{run_dir} has no summary.json: the run is missing or unfinished",
                       hint="finish it with `peftvlm train RECIPE --resume`")
    try:
        summary = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunError(f"{path} is damaged (not valid JSON: {exc})",
                       hint="train the run again with --overwrite") from None
    if not isinstance(summary, dict):
        raise RunError(f"{path} is damaged (not a JSON object)",
                       hint="train the run again with --overwrite")
    return summary


def loss_history(log_history: list[dict]) -> tuple[list[int], list[float]]:
    steps = [e["step"] for e in log_history if "loss" in e]
    return steps, [e["loss"] for e in log_history if "loss" in e]


def eval_history(log_history: list[dict]) -> list[list]:
    """[[step, {metric: value}], ...] of the `train.eval_steps` evaluations in a trainer log."""
    prefix = "eval_"
    return [[e["step"], {k[len(prefix):]: v for k, v in e.items() if k.startswith(prefix)}]
            for e in log_history if any(k.startswith(prefix) for k in e)]


def plot_loss(log_history: list[dict], path: Path, title: str = "training loss") -> Path | None:
    """Save the loss curve as a PNG (None when nothing was logged)."""
    steps, losses = loss_history(log_history)
    if not steps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(steps, losses, marker="o", markersize=3)
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
