"""Everything else works on DPO and GRPO runs, through the CLI: a GRPO run (trained once, one
step) is exported merged and verified, predicted from and served (one chat completion); a DPO
run (one step) is served (test_dpo.py exports and predicts one); a run of either killed by
SIGKILL resumes to the very weights of an uninterrupted run. The learning proofs, guards and
the SIGTERM resume are in test_dpo.py / test_grpo.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import REPO
from serve_helpers import data_url, free_port, serve_process, server_output, wait_healthy

QUESTION = "What color is the shape?"
# the shipped tiny recipes, one optimizer step on a few rows, no generation-based evaluation
RUNS = {
    "dpo": ("dpo-tiny", "train.per_device_train_batch_size=2",
            "train.warmup_steps=0", "data.synthetic.train_size=8", "data.synthetic.eval_size=2"),
    "grpo": ("grpo-tiny", "train.per_device_train_batch_size=4",
             "data.synthetic.train_size=8", "data.synthetic.eval_size=2"),
}


def cli_here(*args) -> int:
    """`peftvlm ARGS` through `peftvlm.cli:main` in this process (no new interpreter to import
    torch and TRL again); its exit code."""
    from peftvlm.cli import main

    argv, sys.argv = sys.argv, ["peftvlm", *map(str, args)]
    try:
        main()
        return 0
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    finally:
        sys.argv = argv


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """objective -> its finished run folder, trained once (on first use) by `peftvlm train`."""
    runs = {}

    def run_of(objective: str):
        if objective not in runs:
            recipe, *overrides = RUNS[objective]
            run = tmp_path_factory.mktemp(objective) / "run"
            code = cli_here("train", recipe, "-o", run, "train.max_steps=1",
                            "train.save_steps=1", "eval.metrics=[]", *overrides)
            assert code == 0  # the trainer's output is in the captured stdout/stderr
            summary = json.loads((run / "summary.json").read_text())
            assert summary["global_step"] == 1 and objective in summary, summary
            runs[objective] = run
        return runs[objective]

    return run_of


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    from PIL import Image, ImageDraw

    path = tmp_path_factory.mktemp("image") / "red.png"
    picture = Image.new("RGB", (64, 64), (128, 128, 128))
    ImageDraw.Draw(picture).ellipse((16, 16, 48, 48), fill=(220, 30, 30))
    picture.save(path)
    return path


def ask_served(folder, image) -> dict:
    """`peftvlm serve FOLDER` (the real entry point), one chat completion with an image; the
    reply's JSON."""
    import httpx

    port = free_port()
    server = serve_process(folder, port)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(server, url, timeout=300)  # a loaded machine starts it slowly
        model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
        reply = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
            "model": model, "max_tokens": 3, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": data_url(image)}},
                {"type": "text", "text": QUESTION}]}]})
        assert reply.status_code == 200, (reply.text, server_output(server)[-2000:])
        return reply.json()
    finally:
        server.terminate()
        server.wait(timeout=30)


def assert_one_completion(reply: dict) -> None:
    choice = reply["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)  # one step from random weights
    assert choice["finish_reason"] in ("stop", "length")
    assert reply["usage"]["prompt_tokens"] > 16  # the image's tokens + the question


@pytest.mark.slow
def test_a_grpo_run_is_exported_merged_predicted_and_served(trained, image, tmp_path,
                                                           cli_in_process):
    run, merged = trained("grpo"), tmp_path / "merged"
    exported = cli_in_process("export", run, "--merge", "--out", merged)
    assert exported.returncode == 0 and "export ok" in exported.stdout, exported.stderr[-3000:]
    report = json.loads((merged / "export_report.json").read_text())
    assert report["passed"] and report["kind"] == "merged", report
    assert report["checks"] and all(check["passed"] for check in report["checks"].values())
    assert not (merged / "adapter_config.json").exists()  # merged weights, not an adapter
    assert any(merged.glob("*.safetensors"))

    answers = tmp_path / "answers.jsonl"
    predicted = cli_in_process("predict", merged, "-i", image, "-o", answers)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    answer = json.loads(answers.read_text().splitlines()[0])
    assert answer["prompt"] == QUESTION  # the run's own question, from its held-out data
    assert isinstance(answer["answer"], str)  # one step from random weights: any text

    assert_one_completion(ask_served(merged, image))


@pytest.mark.slow
def test_a_dpo_run_is_served(trained, image):
    """test_dpo.py exports a DPO run merged and predicts from it; serving is what it leaves:
    here the run folder itself (its adapter on the base)."""
    assert_one_completion(ask_served(trained("dpo"), image))


# `peftvlm train ARGS`, killed by SIGKILL right after its third optimizer step: checkpoint-2 is
# complete, step 3 is done and saved nowhere, nothing is cleaned up (no lock release, no summary)
KILLED_AFTER_STEP_3 = textwrap.dedent("""
    import os, signal, sys
    from transformers import Trainer
    from peftvlm.cli import main

    after_step = Trainer._maybe_log_save_evaluate

    def killed_after_step_3(self, *args, **kwargs):
        after_step(self, *args, **kwargs)
        if self.state.global_step == 3:
            os.kill(os.getpid(), signal.SIGKILL)

    Trainer._maybe_log_save_evaluate = killed_after_step_3
    sys.argv = ["peftvlm", *sys.argv[1:]]
    main()
""")


def adapter_weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "adapter" / "adapter_model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("objective", sorted(RUNS))
def test_a_run_killed_by_sigkill_resumes_to_the_uninterrupted_weights(objective, tmp_path,
                                                                      cli_in_process):
    """kill -9 after step 3 of 4, then --resume: checkpoint-2's optimizer, scheduler, data
    position and RNG (GRPO samples its rollouts from it) give steps 3-4 again, bit for bit."""
    recipe, *overrides = RUNS[objective]
    settings = ("train.max_steps=4", "train.save_steps=2", "train.logging_steps=1",
                "eval.metrics=[]", *overrides)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert cli_here("train", recipe, "-o", straight, *settings) == 0

    res = subprocess.run([sys.executable, "-c", KILLED_AFTER_STEP_3, "train", recipe, "-o",
                          str(killed), *settings], env={**os.environ, "PYTHONPATH": str(REPO)},
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    assert not (killed / "summary.json").exists()
    assert not (killed / "checkpoints" / "checkpoint-4").exists()

    resumed = cli_in_process("train", recipe, "-o", killed, "--resume", *settings)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {killed / 'checkpoints' / 'checkpoint-2'} (step 2)" in resumed.stdout
    first, second = (json.loads((run / "summary.json").read_text()) for run in (straight, killed))
    assert second["global_step"] == first["global_step"] == 4
    losses = dict(second["loss_curve"])
    assert set(losses) >= {3, 4}  # the two steps trained again after the resume
    for step, loss in first["loss_curve"]:
        if step in losses:
            assert losses[step] == pytest.approx(loss, abs=1e-6), step
    expected, got = adapter_weights(straight), adapter_weights(killed)
    assert expected.keys() == got.keys()
    for key in expected:
        assert (expected[key] - got[key]).abs().max() <= 1e-6, key
