"""The README as a test: the commands of its "From recipe to served model, end to end" section
run as written (parsed from README.md, not copied here), in a fresh folder, with relative paths,
through the real entry point. `serve` gets a free `--port` (the README's 8000 may be taken) and
answers one request from the `openai` client, as the README says to ask it."""

from __future__ import annotations

import base64
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, run_cli

SECTION = "## From recipe to served model, end to end"


def readme_blocks() -> list[list[list[str]]]:
    """The section's bash blocks, each a list of commands (argv lists, comments dropped)."""
    text = (REPO / "README.md").read_text()
    assert SECTION in text, f"README.md lost its section {SECTION!r}"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    return [[shlex.split(line, comments=True) for line in block.splitlines()
             if shlex.split(line, comments=True)] for block in blocks]


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """One README line: `peftvlm ...` through the real entry point, `python ...` as itself."""
    if argv[0] == "peftvlm":
        res = run_cli(*argv[1:], cwd=cwd, timeout=1200)
    else:
        assert argv[0] == "python", f"the README runs something new: {argv}"
        res = subprocess.run([sys.executable, *argv[1:]], cwd=cwd, capture_output=True,
                             text=True, timeout=120)
    assert res.returncode == 0, f"{shlex.join(argv)} failed:\n{res.stdout[-2000:]}\n" \
                                f"{res.stderr[-3000:]}"
    return res


def serve_one_request(argv: list[str], cwd: Path, image: Path) -> str:
    """Start the README's `serve` line on a free port, ask it about `image`, stop it."""
    import os

    from openai import OpenAI
    from serve_helpers import free_socket

    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    server = subprocess.Popen([sys.executable, "-m", "peftvlm", *argv[1:], "--port", str(port)],
                              cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0)
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, f"serve exited:\n{server.stdout.read()[-3000:]}"
            try:
                model = client.models.list().data[0].id
                break
            except Exception:  # not listening yet
                assert time.monotonic() < deadline, "serve did not start in 300 s"
                time.sleep(1)
        url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
        reply = client.chat.completions.create(model=model, max_tokens=8, messages=[{
            "role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                        {"type": "text", "text": "What color is the shape?"}]}])
        return reply.choices[0].message.content
    finally:
        server.terminate()
        server.wait(timeout=60)


@pytest.mark.slow
def test_readme_quickstart_train_eval_export_predict_serve(tmp_path):
    quickstart = readme_blocks()[0]
    verbs = [argv[1] for argv in quickstart if argv[0] == "peftvlm"]
    assert verbs == ["train", "eval", "export", "export", "predict", "serve"], verbs
    for argv in quickstart:
        if argv[:2] == ["peftvlm", "serve"]:
            answer = serve_one_request(argv, tmp_path, tmp_path / "red.png")
            assert answer and answer.strip(), "serve answered nothing"
            continue
        res = run(argv, tmp_path)
        if argv[:2] == ["peftvlm", "predict"]:
            assert "red.png" in res.stdout, res.stdout
        if argv == ["peftvlm", "export", "runs/quickstart"]:
            assert_relative_run_path_exported(res, tmp_path, "runs/quickstart")
    run_dir = tmp_path / "runs" / "quickstart"
    assert (run_dir / "summary.json").is_file() and (run_dir / "eval").is_dir()
    assert (run_dir / "export" / "adapter_model.safetensors").is_file()
    assert (run_dir / "merged" / "config.json").is_file()


def assert_relative_run_path_exported(res, cwd: Path, run: str):
    """`peftvlm export runs/x` from the folder holding runs/ (it died with a TypeError on the
    model card after writing the weights): it says where it wrote, and the card names the run
    relative to its folder, not by this machine's path."""
    assert f"export ok: {run}/export" in res.stdout, res.stdout
    card = (cwd / run / "export" / "README.md").read_text()
    assert str(cwd) not in card


def test_quickstart_block_exports_a_relative_run_path():
    """The quickstart test above checks the relative-path export on its `export` line."""
    assert ["peftvlm", "export", "runs/quickstart"] in readme_blocks()[0]


@pytest.mark.slow
def test_readme_retrieval_train_eval_export_predict(tmp_path):
    """Every line of the retrieval block, as written: train, eval, export, then predict ranks
    the given captions."""
    block = readme_blocks()[1]
    assert [argv[1] for argv in block if argv[0] == "peftvlm"] == \
        ["train", "eval", "export", "predict"], block
    for argv in block:
        res = run(argv, tmp_path)
        if argv[:2] == ["peftvlm", "export"]:
            run_dir = tmp_path / "runs" / "clip-retrieval-tiny"
            assert (run_dir / "summary.json").is_file() and (run_dir / "eval").is_dir()
            assert (run_dir / "merged" / "config.json").is_file()
    assert argv[:2] == ["peftvlm", "predict"]
    assert "a red circle" in res.stdout and "a blue square" in res.stdout
