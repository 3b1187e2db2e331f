"""The README's promise: the shipped quickstart learns colour VQA offline to >= 0.95."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli
from serve_helpers import quickstart_cli_run


@pytest.mark.slow
def test_quickstart_reaches_095_held_out_exact_match():
    # `peftvlm train recipes/quickstart.yaml`, run once per session and shared with the serve
    # and demo tests (which only read the run folder, and write only under merged/)
    run, res = quickstart_cli_run()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval"]["exact_match"]["after"] >= 0.95
    assert summary["eval"]["exact_match"]["before"] < 0.5
    assert summary["loss_curve"][-1][1] < summary["loss_curve"][0][1]
    # a loss curve a newcomer believes: clearly low, not a plateau near ln(vocab) ~ 6.4
    assert summary["final_loss"] < 1.0
    assert "exact_match" in res.stdout and "run folder" in res.stdout
    assert "Traceback" not in res.stderr

    # `peftvlm eval` on the same run reproduces the summary's numbers exactly.
    res = run_cli("eval", "recipes/quickstart.yaml", "--run", run)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((run / "eval" / "metrics.json").read_text())["metrics"]
    assert metrics["exact_match"]["fine_tuned"] == summary["eval"]["exact_match"]["after"]
    assert metrics["exact_match"]["base"] == summary["eval"]["exact_match"]["before"]
