"""The quickstart task on the 2026 twins: `peftvlm train recipes/quickstart.yaml
model.id=tiny-qwen3-vl` (and tiny-gemma3) reaches >= 0.95 held-out exact match."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli_in_process


@pytest.mark.slow
@pytest.mark.parametrize("tiny", ["tiny-qwen3-vl", "tiny-gemma3"])
def test_quickstart_learns_on_the_2026_twins(tmp_path, tiny):
    res = run_cli_in_process("train", "recipes/quickstart.yaml", f"model.id={tiny}", "-o",
                             tmp_path / "qs")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "qs" / "summary.json").read_text())
    assert summary["eval"]["exact_match"]["after"] >= 0.95
    assert summary["loss_curve"][-1][1] < summary["loss_curve"][0][1]
