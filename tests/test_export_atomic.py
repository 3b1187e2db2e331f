"""Exports are atomic: written into a staging folder beside the target and renamed into place
once reported, so an export that fails or is killed mid-write never leaves a target without
its report (which would block every re-export); what a killed one leaves is removed by the next."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import REPO
from peftvlm.errors import ExportError
from peftvlm.export.staging import Staging
from test_export import make_run

QUIET = {"log": lambda *_: None}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("runs") / "lora", "lora")


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def assert_reported(target, run):
    """The target holds a whole export: weights and the report that vouches for them, which
    names the target (not the staging folder it was written in)."""
    report = json.loads((target / "export_report.json").read_text())
    assert report["passed"] and report["out"] == os.path.relpath(target, run)
    assert ".partial" not in (target / "README.md").read_text()
    assert list(target.glob("*.safetensors"))


def test_a_failure_after_the_weights_are_written_leaves_the_earlier_export_intact(
        run, tmp_path, monkeypatch):
    import peftvlm.export as export

    target = tmp_path / "merged"
    export.export_run(run, merge=True, out=target, **QUIET)
    assert_reported(target, run)
    before = {p.name: p.stat().st_mtime_ns for p in target.iterdir()}

    def disk_full(folder, *args, **kwargs):  # the merged weights are on disk by now
        assert list(folder.glob("*.safetensors")) and folder.name.startswith(".merged.partial-")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "reload_merged", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export.export_run(run, merge=True, out=target, **QUIET)
    assert {p.name: p.stat().st_mtime_ns for p in target.iterdir()} == before
    assert leftovers(tmp_path) == []  # the partial export is gone too
    monkeypatch.undo()
    export.export_run(run, merge=True, out=target, **QUIET)
    assert_reported(target, run)


def test_a_failure_mid_write_of_a_first_export_leaves_no_target(run, tmp_path, monkeypatch):
    import peftvlm.export as export

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C while the processor files are being written

    monkeypatch.setattr(export, "check_adapter_files", crash)
    with pytest.raises(KeyboardInterrupt):
        export.export_run(run, out=tmp_path / "export", **QUIET)
    assert not (tmp_path / "export").exists() and leftovers(tmp_path) == []


KILL_MID_EXPORT = """
import os, signal, sys
import peftvlm.export as export
def killed(folder, *args, **kwargs):  # after the merged weights are written: kill -9
    os.kill(os.getpid(), signal.SIGKILL)
export.reload_merged = killed
export.export_run(sys.argv[1], merge=True, out=sys.argv[2], log=print)
"""


@pytest.mark.slow
def test_sigkill_mid_merge_leaves_no_target_and_the_next_export_cleans_up(run, tmp_path,
                                                                         cli_in_process):
    target = tmp_path / "merged"
    res = subprocess.run([sys.executable, "-c", KILL_MID_EXPORT, run, target], cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    assert not target.exists()
    partial = tmp_path / leftovers(tmp_path)[0]
    assert partial.name.startswith(".merged.partial-") and list(partial.glob("*.safetensors"))

    result = cli_in_process("export", run, "--merge", "--out", target)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"removed {partial}: left by an export that was interrupted" in result.stdout
    assert_reported(target, run)
    assert leftovers(tmp_path) == []


def test_an_export_still_writing_is_not_cleaned_up_under_it(tmp_path):
    writing = Staging(tmp_path / "merged", **QUIET)
    (writing.path / "model.safetensors").write_bytes(b"x")
    try:
        with pytest.raises(ExportError, match=r"another export is writing .*merged right now"):
            Staging(tmp_path / "merged", **QUIET)
        assert (writing.path / "model.safetensors").exists()
    finally:
        writing.discard()
    notes = []
    stale = tmp_path / ".merged.old-1"  # a replaced export a kill left aside
    stale.mkdir()
    Staging(tmp_path / "merged", log=notes.append).discard()
    assert notes == [f"removed {stale}: left by an export that was interrupted"]
    assert leftovers(tmp_path) == []
