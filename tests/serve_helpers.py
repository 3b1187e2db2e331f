"""Shared by the predict/serve/demo tests: one trained quickstart run per session, a predictor
on it, servers on 127.0.0.1 that stop by themselves, images as data URLs."""

from __future__ import annotations

import base64
import functools
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from conftest import run_cli, run_cli_in_process

COLOURS = ("red", "green", "blue", "yellow")


@functools.lru_cache(maxsize=None)
def quickstart_cli_run():
    """`peftvlm train recipes/quickstart.yaml` through the real entry point, exactly as the
    README says, once per test session: (run folder, the finished process). The quickstart
    test reads its promise from it and the serve/predict/demo tests serve it (it learns colour
    VQA to ~1.0 in its 300 steps), so the session trains it once, not twice."""
    run_dir = Path(tempfile.mkdtemp(prefix="serve-run-", dir=os.environ["PEFTVLM_CACHE"]))
    res = run_cli("train", "recipes/quickstart.yaml", "-o", run_dir / "quickstart")
    assert res.returncode == 0, res.stderr[-3000:]
    return run_dir / "quickstart", res


def trained_quickstart() -> Path:
    """The session's trained quickstart run folder (see quickstart_cli_run)."""
    run = quickstart_cli_run()[0]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval"]["exact_match"]["after"] >= 0.95, summary["eval"]
    return run


@functools.lru_cache(maxsize=None)
def quickstart_predictor():
    return quiet_predictor(trained_quickstart())


def cli_trained(run: Path, recipe, *overrides) -> Path:
    """`peftvlm train RECIPE -o RUN [overrides]` through the CLI's entry point (in-process: the
    serving tests need the run, not a separate training process); the run folder."""
    res = run_cli_in_process("train", recipe, *overrides, "-o", run)
    assert res.returncode == 0, res.stderr[-3000:]
    return run


def quiet_predictor(folder: Path):
    """The predictor of a run folder or export, loaded without logging."""
    from peftvlm.serving.predictor import open_predictor

    return open_predictor(folder, log=lambda *_: None)


def app_for(predictor, **options):
    """The OpenAI-compatible app serving `predictor` with `ServerOptions(**options)`."""
    from peftvlm.serving.openai_api import ServerOptions, build_app

    return build_app(predictor, ServerOptions(**options))


def held_out_by_colour() -> dict[str, Path]:
    """One held-out image file per colour, from the run's own test split."""
    import json

    from peftvlm.data.prepare.loading import recipe_sources

    recipe = quickstart_predictor().files.recipe
    test_file = Path(recipe_sources(recipe)[1][0].path)
    found = {}
    for line in test_file.read_text().splitlines():
        row = json.loads(line)
        colour = row["messages"][-1]["content"][0]["text"]
        found.setdefault(colour, test_file.parent / row["images"][0])
    assert set(found) == set(COLOURS), found
    return found


def data_url(path_or_bytes, mime: str = "image/png") -> str:
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def noise_png(side: int) -> bytes:
    """A PNG that does not compress (random pixels), for size limits."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextmanager
def served(app, timeout_s: float = 30):
    """Run an ASGI app with uvicorn in a thread on a free 127.0.0.1 port; stop it afterwards."""
    import uvicorn

    sock = free_socket()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=timeout_s)
        sock.close()


def serve_process(run, port: int, *args) -> subprocess.Popen:
    """`peftvlm serve RUN --port PORT ARGS` as a process (the real entry point), on 127.0.0.1."""
    from conftest import REPO

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a full pipe would stall the server
    proc = subprocess.Popen([sys.executable, "-m", "peftvlm", "serve", str(run), "--port",
                             str(port), *args], env=env, cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT, text=True)
    proc.log = log
    return proc


def server_output(proc) -> str:
    proc.log.seek(0)
    return proc.log.read()


def wait_healthy(proc, url: str, timeout: float = 120) -> None:
    """Wait until the server answers /health (failing with its stderr if it exits)."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, server_output(proc)[-2000:]
        assert time.monotonic() < deadline, "server did not start"
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.3)


def free_port() -> int:
    with free_socket() as sock:
        return sock.getsockname()[1]
