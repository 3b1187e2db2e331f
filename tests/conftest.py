"""Shared fixtures: a fresh cache for tiny models and data per test session, CLI runner."""

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


def run_cli(*args, env=None, cwd=None, timeout=600):
    """Run `python -m peftvlm ARGS` in a subprocess: the real entry point."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "peftvlm", *map(str, args)], env=full_env,
                          cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def tiny_llava_path():
    from peftvlm.models import tiny_model_path

    return tiny_model_path("tiny-llava")


@pytest.fixture
def cli():
    return run_cli


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run only where CUDA is present (see scripts/gpu_check.sh)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
