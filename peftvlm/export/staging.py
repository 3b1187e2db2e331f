"""Exports are written into a staging folder next to their target and renamed into place once
written, checked and reported, so the target never exists without its `export_report.json`.

A killed export (kill -9, out of memory, power loss) leaves only its staging folder,
`.NAME.partial-PID` beside NAME, and never blocks a re-export: the next export to the same
target removes it, saying so. While an export runs it holds an `fcntl.flock` on its staging
folder (the kernel drops it when the process dies), so that clean-up never removes the folder
of an export still writing. Replacing an earlier export renames it aside (`.NAME.old-PID`)
first, then removes it. POSIX only, as the run-folder lock (`peftvlm.runs`).
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
from pathlib import Path

from peftvlm.errors import ExportError


def _leftover_pattern(target: Path) -> re.Pattern:
    return re.compile(rf"\.{re.escape(target.name)}\.(partial|old)-\d+")


class Staging:
    """The staging folder of one export to `target`, locked while this process writes it."""

    def __init__(self, target: Path, log=print):
        self.target = Path(target)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(self.target, log)
        self.path = self.target.parent / f".{self.target.name}.partial-{os.getpid()}"
        self.path.mkdir()
        self._fd = os.open(self.path, os.O_RDONLY)
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def publish(self) -> Path:
        """Rename the written export into place (an earlier export at the target is replaced)
        and return the target."""
        old = None
        if self.target.exists():
            old = self.target.parent / f".{self.target.name}.old-{os.getpid()}"
            self.target.rename(old)
        self.path.rename(self.target)
        self._unlock()
        if old is not None:
            shutil.rmtree(old)
        return self.target

    def discard(self) -> None:
        """Remove what an export that did not finish wrote (nothing once published)."""
        if self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)
        self._unlock()

    def _unlock(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None


def remove_leftovers(target: Path, log=print) -> None:
    """Remove staging folders that interrupted exports to `target` left behind; refuse while
    another export to it is still writing."""
    pattern = _leftover_pattern(target)
    for path in sorted(target.parent.iterdir()):
        if not (pattern.fullmatch(path.name) and path.is_dir()):
            continue
        if _in_use(path):
            raise ExportError(f"another export is writing {target} right now ({path.name})",
                              hint="wait for it to finish, or export to another --out")
        shutil.rmtree(path)
        log(f"removed {path}: left by an export that was interrupted")


def _in_use(folder: Path) -> bool:
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
