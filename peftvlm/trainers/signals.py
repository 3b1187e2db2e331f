"""Stopping a training run on a signal without losing work.

Ctrl-C (SIGINT) and `docker stop`, Kubernetes or Slurm (SIGTERM) both ask a training run to
stop: the current optimiser step finishes, a resumable checkpoint is saved, and the run exits
with `Interrupted`, which names the checkpoint and says how to continue. The exit code is the
shell's for that signal (130 for SIGINT, 143 for SIGTERM), so schedulers see an interrupted run,
not a failed one. A second signal stops at once (the signal's usual behaviour).

Both trainers use `StopSignals`: the TRL path through `sft.StopOnInterrupt`, the dual-encoder
loop in `loop.fit`. With several processes, a signal seen by any rank stops every rank at the
same step (`any_rank`), so no rank waits for a collective the others skipped.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from peftvlm.errors import RunError

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(RunError):
    """Training stopped on a signal after saving `checkpoint` (`signum` None: another process
    of the run received it; SIGTERM is assumed, as launchers forward it)."""

    def __init__(self, signum: int | None, step: int, checkpoint: Path | None):
        signum = signum or signal.SIGTERM
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum  # what a shell reports for a process the signal ended
        saved = f"saved {checkpoint}" if checkpoint else "no checkpoint could be saved"
        super().__init__(f"interrupted by {signal.Signals(signum).name} after step {step}: "
                         f"{saved}",
                         hint="continue with the same command plus --resume")


class StopSignals:
    """Records the first SIGINT/SIGTERM instead of dying; the loop checks `received` between
    steps. Installed only in the main thread (Python's rule for signal handlers)."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def install(self) -> None:
        try:
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self.uninstall()

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None:  # a second signal: the user means now
            self.uninstall()
            signal.raise_signal(signum)
            return
        self.received = signum
        # os.write, not print: a handler may run in the middle of a print to the same stream
        os.write(2, f"\n{signal.Signals(signum).name} received: stopping after this step and "
                    "saving a checkpoint (send it again to stop at once)\n".encode())


def any_rank(flag: bool, device=None) -> bool:
    """True on every process when `flag` is true on any (a collective with several processes:
    every rank must call it at the same step)."""
    import torch

    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
