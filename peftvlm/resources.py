"""Files shipped inside the package: recipes (`peftvlm/recipes/`) and data templates
(`peftvlm/data_templates/`), found with importlib.resources so a wheel install (`pip install .`,
a package index, a container) has them just as an editable install does.

They live in the package, not beside it, because a wheel only carries package data; the
repository keeps top-level `recipes` and `data_templates` symlinks to them, so the paths in the
README and the recipes' headers (`peftvlm train recipes/quickstart.yaml`) work in a checkout.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def shipped_dir(name: str) -> Path:
    """The folder of shipped files `name` inside the installed package.

    pip installs packages as plain folders, so the resource is a real directory; Path() makes
    that explicit for the callers that glob and read it (a zipped install would fail here)."""
    return Path(str(files("peftvlm") / name))
