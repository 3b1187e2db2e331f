"""The run folder: ours alone, locked while a training writes it, summarised at the end.

    runs/<name>/.peftvlm-run     marker: this folder is a peftvlm run (what --overwrite checks)
    runs/<name>/.peftvlm-lock    the pid of the training writing it (an flock held meanwhile)
    runs/<name>/recipe.yaml      the resolved recipe
    runs/<name>/adapter/         PEFT adapter + processor (loads with PeftModel.from_pretrained)
    runs/<name>/checkpoints/     trainer checkpoints (--resume continues from the last complete)
    runs/<name>/summary.json     parameters, runtime, final loss, eval before/after (and every
                                 train.eval_steps: eval_history)
    runs/<name>/loss.png         the training loss curve
    runs/<name>/eval/            `peftvlm eval` outputs: predictions, metrics.json, metrics.png

A training claims its folder before any model or data loads (`claim_run_dir`): the folder must
be new, empty, or a peftvlm run in the right state (finished runs need --overwrite, unfinished
ones --resume), it must be writable, and no other live process may hold its lock. The lock is an
`fcntl.flock` on `.peftvlm-lock`, which the kernel drops when its process dies, so a killed
training never leaves a lock that blocks the next one (POSIX only, like bitsandbytes/triton).
`--overwrite` clears the previous run's files only once the new run's model and data have
loaded (`prepare_run_dir`), so a recipe that fails to load does not cost the old run.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from peftvlm.errors import PeftVLMError, RunError
from peftvlm.recipe.load import validate_recipe_dict
from peftvlm.safe_yaml import AliasBombError, load_yaml

MARKER, LOCK = ".peftvlm-run", ".peftvlm-lock"
_HELD: dict[Path, int] = {}  # resolved run folder -> fd of the lock file this process holds
_LISTED = 5


def default_run_dir(recipe) -> Path:
    return Path("runs") / (recipe.name or "run")


def is_main_rank() -> bool:
    """Process 0 of a torchrun/accelerate launch (or a single process) owns the run folder;
    read from the launcher's RANK because the process group starts later, in the trainer."""
    return os.environ.get("RANK", "0") == "0"


def is_run_dir(path: Path) -> bool:
    return (Path(path) / MARKER).is_file()


def _listing(folder: Path) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    more = f" and {len(names) - _LISTED} more" if len(names) > _LISTED else ""
    return ", ".join(names[:_LISTED]) + more


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse, before anything loads, a folder that is not ours or is in the wrong state."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunError(f"output folder {run_dir} is a file, not a folder",
                       hint="choose another folder with -o/--output-dir")
    if run_dir.is_dir() and not is_run_dir(run_dir) and any(run_dir.iterdir()):
        raise RunError(f"output folder {run_dir} is not a peftvlm run folder (no {MARKER}) and "
                       f"is not empty: it holds {_listing(run_dir)}. peftvlm writes runs only "
                       "into new or empty folders, and --overwrite deletes only its own runs",
                       hint="choose a new folder with -o/--output-dir, or move those files away")
    if overwrite or not run_dir.is_dir():
        return
    finished = (run_dir / "summary.json").exists()
    has_checkpoints = any((run_dir / "checkpoints").glob("checkpoint-*"))
    if finished and not resume:
        raise RunError(f"run folder {run_dir} already holds a finished run",
                       hint="pass --overwrite to replace it, or --output-dir for a new folder")
    if finished and resume:
        raise RunError(f"run folder {run_dir} is already finished: nothing to resume",
                       hint="pass --overwrite to train again from scratch")
    if has_checkpoints and not resume:
        raise RunError(f"run folder {run_dir} holds checkpoints of an unfinished run",
                       hint="pass --resume to continue it, or --overwrite to start over")


def claim_run_dir(run_dir: Path, resume: bool, overwrite: bool, log=print) -> Path:
    """Check the folder, create and mark it, and take its lock (all before any model loads)."""
    run_dir = Path(run_dir)
    if not is_main_rank():
        return run_dir
    check_run_dir(run_dir, resume, overwrite)
    try:
        mark_run_dir(run_dir)
        stale = lock_run_dir(run_dir)
    except OSError as exc:
        raise RunError(f"cannot write the run folder {run_dir}: {exc.strerror or exc} "
                       f"({exc.filename or run_dir})",
                       hint="choose a writable folder with -o/--output-dir, or fix its "
                            "permissions") from None
    if stale:
        log(f"{run_dir}: the previous training (pid {stale.get('pid')}) stopped without "
            "finishing; its lock is released, continuing")
    return run_dir


def mark_run_dir(run_dir: Path) -> Path:
    """Create the folder if needed and mark it as a run (a new or empty folder only)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if not is_run_dir(run_dir) and not any(run_dir.iterdir()):
        write_json(run_dir / MARKER, {"tool": "peftvlm", "created": time.time(),
                                      "note": "a peftvlm run folder: `peftvlm train "
                                              "--overwrite` may delete it"})
    return run_dir


def lock_run_dir(run_dir: Path) -> dict | None:
    """Take the folder's lock (re-entrant within this process). Returns the holder a dead
    process left recorded, if any; a live holder is a RunError naming its pid."""
    import fcntl

    key = run_dir.resolve()
    if key in _HELD:
        return None
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    recorded = _read_holder(fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(recorded.get("started", 0)))
        raise RunError(f"run folder {run_dir} is in use by another training: pid "
                       f"{recorded.get('pid', '?')} on {recorded.get('host', '?')}, since "
                       f"{since}", hint="wait for it to finish (or stop it), or train into "
                                        "another folder with -o/--output-dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                              "started": time.time()}).encode(), 0)
    _HELD[key] = fd
    return recorded or None


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}


def release_run_dir(run_dir: Path) -> None:
    """Drop this process's lock; the emptied lock file says the run was left cleanly."""
    import fcntl

    fd = _HELD.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextmanager
def claimed_run_dir(run_dir: Path, resume: bool, overwrite: bool, log=print):
    """`claim_run_dir` for the length of a `with` block."""
    run_dir = claim_run_dir(run_dir, resume, overwrite, log)
    try:
        yield run_dir
    finally:
        release_run_dir(run_dir)


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> Path:
    """Claim the folder (see `claim_run_dir`); with `overwrite`, clear the previous run's files
    (the marker and lock stay). Call it once model and data have loaded."""
    run_dir = claim_run_dir(run_dir, resume, overwrite)
    if overwrite and is_main_rank():
        for child in run_dir.iterdir():
            if child.name in (MARKER, LOCK):
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    return run_dir


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def read_summary(run_dir: Path) -> dict:
    """A finished run's summary.json; a missing or damaged one is a RunError."""
    path = Path(run_dir) / "summary.json"
    if not path.exists():
        raise RunError(f"{run_dir} has no summary.json: the run is unfinished (or not a run)",
                       hint="finish it with `peftvlm train RECIPE --resume`")
    try:
        summary = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f", line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise RunError(f"{path} is not valid JSON ({getattr(exc, 'msg', exc)}{where}): the run "
                       "folder is damaged", hint="train the run again with --overwrite") from None
    if not isinstance(summary, dict):
        raise RunError(f"{path} is damaged (not a JSON object)",
                       hint="train the run again with --overwrite")
    return summary


# --- reading a run folder (or an export of one) back ----------------------------------------

RUN, MERGED, ADAPTER = "run", "merged", "adapter"  # what a folder holds: `RunFolder.layout`


@dataclass
class RunFolder:
    """A folder read back: a finished run (`layout` "run": summary.json, recipe.yaml, adapter/),
    a merged export ("merged": config.json + *.safetensors, inside its run folder when known) or
    an adapter export ("adapter": adapter_config.json). The one reader of run folders: export,
    eval, predict, serve and the demo all open them with `read_run_folder`."""

    path: Path
    layout: str
    summary: dict = field(default_factory=dict)
    export_report: dict = field(default_factory=dict)
    _recipe: object = field(default=None, repr=False)

    @property
    def dir(self) -> Path:
        return self.path

    @property
    def run_dir(self) -> Path | None:
        """The run folder (for an export: the run it was written into, when it is there)."""
        if self.layout == RUN:
            return self.path
        parent = self.path.resolve().parent
        return parent if (parent / "summary.json").exists() else None

    @property
    def adapter_dir(self) -> Path | None:
        return self.path / "adapter" if self.layout == RUN else None

    @property
    def recipe(self):
        """The run's recipe.yaml, validated (read once, on first use); None for an export whose
        run folder is not around it."""
        if self._recipe is None and self.run_dir is not None:
            self._recipe = read_run_recipe(self.run_dir)
        return self._recipe

    @recipe.setter
    def recipe(self, value) -> None:
        self._recipe = value

    @property
    def name(self) -> str:
        if self.recipe is not None and self.recipe.name:
            return self.recipe.name + ("-merged" if self.layout == MERGED else "")
        return self.path.resolve().name


def folder_layout(path: Path) -> str | None:
    """What `path` holds, from its files alone: RUN, MERGED, ADAPTER, "unfinished" or None."""
    if (path / "summary.json").exists():
        return RUN
    if (path / "config.json").exists() and any(path.glob("*.safetensors")):
        return MERGED
    if (path / "adapter_config.json").exists():
        return ADAPTER
    if is_run_dir(path) or (path / "recipe.yaml").exists() or (path / "adapter").is_dir():
        return "unfinished"
    return None


def read_run_folder(path: str | Path, accept: tuple[str, ...] = (RUN,)) -> RunFolder:
    """Read `path` as one of the `accept`ed layouts, or a RunError saying what it is instead.
    A run's summary and adapter/ are checked here; its recipe when first used."""
    path = Path(path)
    if not path.exists():
        raise RunError(f"run folder {path} does not exist",
                       hint="give the folder `peftvlm train` wrote (runs/<name> by default), "
                            "or train it first: peftvlm train RECIPE -o RUN_DIR")
    if not path.is_dir():
        raise RunError(f"{path} is not a folder", hint="give a run folder (runs/<name>)" + (
            " or a merged export (runs/<name>/merged)" if MERGED in accept else ""))
    layout = folder_layout(path)
    if layout not in accept:
        raise wrong_layout(path, layout, accept)
    if layout == RUN:
        summary = read_summary(path)
        if not (path / "adapter").is_dir():
            raise RunError(f"{path} has no adapter/ folder",
                           hint="the run folder is incomplete: train it again with --overwrite")
        return RunFolder(path, RUN, summary)
    report = path / "export_report.json"
    folder = RunFolder(path, layout,
                       export_report=json.loads(report.read_text()) if report.exists() else {})
    if folder.run_dir is not None:
        folder.summary = read_summary(folder.run_dir)
    return folder


def wrong_layout(path: Path, layout: str | None, accept: tuple[str, ...]) -> RunError:
    if layout == "unfinished" or (layout is None and accept == (RUN,)):
        return RunError(f"{path} has no summary.json: the run is unfinished (or not a run)",
                        hint="finish it with `peftvlm train RECIPE --resume`")
    if layout == ADAPTER and MERGED in accept:
        return RunError(f"{path} is an adapter-only export: give the run folder it came from, "
                        "or a merged export", hint="merge it: peftvlm export RUN --merge")
    if layout in (MERGED, ADAPTER):
        return RunError(f"{path} is a{' merged' if layout == MERGED else 'n adapter'} export, "
                        "not a run folder", hint=f"give the run folder it came from "
                                                 f"({path.resolve().parent})")
    return RunError(f"{path} is neither a run folder (summary.json) nor a merged export "
                    "(config.json + *.safetensors)",
                    hint="train with `peftvlm train`, or export with `peftvlm export RUN --merge`")


def read_run_recipe(run_dir: Path):
    """The run's recipe.yaml, validated; missing, unreadable or invalid is a RunError."""
    path = Path(run_dir) / "recipe.yaml"
    if not path.exists():
        raise RunError(f"{run_dir} has no recipe.yaml", hint="the run folder is incomplete")
    try:  # a run folder may come from elsewhere: alias expansion bounded
        return validate_recipe_dict(load_yaml(path.read_text()), str(path))
    except AliasBombError as exc:
        raise RunError(f"{path}: refused: {exc}", hint="the run folder is damaged") from None
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise RunError(f"{path} cannot be read: {exc}", hint="the run folder is damaged") from None
    except PeftVLMError as exc:
        raise RunError(f"{path} does not validate: {exc.message}", hint=exc.hint) from exc


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
