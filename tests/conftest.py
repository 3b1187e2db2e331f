"""Shared fixtures: a fresh cache for tiny models and data per test session, CLI runner; and
how the suite splits over pytest-xdist workers (`-n 2`, as CI and the README run it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    # Each session builds the tiny models afresh (the real build + from_pretrained path), once.
    if "PEFTVLM_CACHE" not in os.environ:
        import tempfile

        os.environ["PEFTVLM_CACHE"] = tempfile.mkdtemp(prefix="peftvlm-test-cache-")
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    pin_threads_per_worker()


def pin_threads_per_worker():
    """Under xdist, each worker gets its share of the cores (one each on 2 cores), and so do
    the CLI subprocesses it starts (they inherit OMP_NUM_THREADS). The tiny models gain nothing
    from a second thread, while two workers on two threads each would fight for the cores.
    The controller set PEFTVLM_CACHE before starting the workers, so they share one cache:
    tiny models and synthetic data are built there atomically (a rename), once per session."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if not os.environ.get("PYTEST_XDIST_WORKER") or workers < 1:
        return
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    os.environ.setdefault("OMP_NUM_THREADS", threads)
    if "torch" in sys.modules:  # imported by a plugin before us: set it directly too
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def run_cli(*args, env=None, cwd=None, timeout=600):
    """Run `python -m peftvlm ARGS` in a subprocess: the real entry point."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "peftvlm", *map(str, args)], env=full_env,
                          cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout)


def run_cli_in_process(*args, env=None, cwd=None):
    """`peftvlm ARGS` through the same `peftvlm.cli:main` as `run_cli`, in this process, for
    tests of what a command does (its files, output, exit code) rather than of a fresh process
    (signals, start-up imports, the console script): the worker has torch and transformers
    imported already, where each subprocess pays seconds for them. Environment, argv and cwd
    are restored after; an exception that would end the process with a traceback gives exit
    code 1 and the traceback in stderr, as from a subprocess. Returns what `run_cli` does."""
    import contextlib
    import io
    import traceback

    from peftvlm.cli import main

    saved_env, saved_argv, saved_cwd = dict(os.environ), sys.argv, os.getcwd()
    out, err = io.StringIO(), io.StringIO()
    try:
        os.environ.update({key: str(value) for key, value in (env or {}).items()})
        sys.argv = ["peftvlm", *map(str, args)]
        os.chdir(cwd or REPO)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
                code = 0
            except SystemExit as exit_:  # click and main() end every command with sys.exit
                code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
            except Exception:  # noqa: BLE001 - what an uncaught error does to a real process
                traceback.print_exc()
                code = 1
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        sys.argv = saved_argv
        os.chdir(saved_cwd)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def tiny_llava_path():
    from peftvlm.models import tiny_model_path

    return tiny_model_path("tiny-llava")


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture
def cli_in_process(capsys, monkeypatch):
    """`peftvlm ARGS` through the same `peftvlm.cli:main`, in this process: for tests about what
    a command says and its exit code, where a new interpreter (~0.5 s of CPU each) adds nothing;
    each command keeps tests through the real entry point (`cli`). Returns what `run_cli` does."""
    from peftvlm.cli import main

    def run(*args, env=None):
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
        monkeypatch.setattr(sys, "argv", ["peftvlm", *map(str, args)])
        capsys.readouterr()  # drop anything printed before
        try:
            main()
            code = 0
        except SystemExit as exit_:  # click and main() end every command with sys.exit
            code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    return run


# Files that share one session-scoped trained run (serve_helpers.trained_quickstart) go to the
# same xdist worker, so that run is trained once per session, not once per worker.
SHARED_RUN_FILES = {"test_quickstart.py", "test_serve.py", "test_demo.py"}


# Files of independent CLI runs (one per family) with no shared fixture: each test is its own
# unit, so both workers share them.
PER_TEST_FILES = {"test_train_every_family.py"}


def work_unit(file_name: str, nodeid: str = "") -> str:
    """The xdist work unit of a test: its file, its shared-run group, or (PER_TEST_FILES) itself."""
    if file_name in PER_TEST_FILES and nodeid:
        return nodeid
    return "quickstart-run" if file_name in SHARED_RUN_FILES else file_name


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: absent without xdist
def pytest_xdist_make_scheduler(config, log):
    """`-n N`: one work unit per test file (module fixtures and trained runs are built once, on
    one worker), handed out in the collection order below (files with slow tests first), not
    xdist's by test count. xdist's own `--dist loadgroup` marks do not reach pytest 9's node
    ids, hence this scheduler (xdist's LoadScopeScheduling with our units)."""
    from xdist.scheduler import LoadScopeScheduling

    class FileUnits(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            return work_unit(nodeid.split("::", 1)[0].rsplit("/", 1)[-1], nodeid)

    config.option.loadscopereorder = False
    return FileUnits(config, log)


def pytest_collection_modifyitems(config, items):
    slow_units_first(items)
    skip_gpu_tests_without_cuda(items)


def slow_units_first(items):
    """Work units holding a `slow` test come first (stable sort: the order within and between
    the others stays), so no long unit starts last while the other worker idles."""
    slow = {work_unit(item.path.name) for item in items if "slow" in item.keywords}
    items.sort(key=lambda item: work_unit(item.path.name) not in slow)


def skip_gpu_tests_without_cuda(items):
    """`gpu` tests run only where CUDA is present (see scripts/gpu_check.sh)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
