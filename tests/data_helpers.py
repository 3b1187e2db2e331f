"""Shared fixtures of the data tests: a tiny-LLaVA collator (processor only) and image files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """The session's peftvlm cache (conftest sets PEFTVLM_CACHE; tiny models are built once)."""
    if "PEFTVLM_CACHE" not in os.environ:
        os.environ["PEFTVLM_CACHE"] = str(tmp_path_factory.mktemp("peftvlm-data-cache"))
    return Path(os.environ["PEFTVLM_CACHE"])


@pytest.fixture(scope="session")
def llava_collator(data_cache):
    """The trainer's collator on the tiny LLaVA processor (no model weights loaded)."""
    from peftvlm.data.batch.collate import ConversationCollator
    from peftvlm.models import load_processor_only
    from peftvlm.recipe.schema import ModelConfig

    processor, family = load_processor_only(ModelConfig(id="tiny-llava"))
    return ConversationCollator(processor, family)


def save_image(path: Path, size=(40, 20), colour=(200, 0, 0)) -> str:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path.name


def run_cli(*args: str, cache: Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m peftvlm ...` through the real entry point."""
    env = {**os.environ, "PEFTVLM_CACHE": str(cache), "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "peftvlm", *args], capture_output=True,
                          text=True, env=env, cwd=cwd or REPO, timeout=300)


def recipe_file(folder: Path, data: dict, name: str = "r", **train) -> Path:
    """A minimal LoRA recipe on tiny-llava around a `data` section."""
    import yaml

    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "name": name, "model": {"id": "tiny-llava"}, "method": {"name": "lora", "r": 4},
        "data": data, "train": {"max_length": 256, **train}}))
    return path
