"""YAML and path checks for the files users hand us (recipes, data templates, self-instruct
configs), so that a hostile or mistaken file fails in milliseconds with a clear message.

- `load_yaml` is `yaml.safe_load` with the alias expansion bounded. `safe_load` already refuses
  Python objects, but an alias shares one node many times ("billion laughs": nine levels of
  nine aliases make 387 million strings from a 1 kB file); PyYAML builds that cheaply as shared
  references, and whatever walks it next (pydantic validation, `yaml.safe_dump` of the run's
  recipe copy) expands it: 78 s and 11 GB in `peftvlm validate`. We count, on the composed node
  graph and before constructing anything, how many nodes the document expands to, and refuse
  past `ALIAS_EXPANSION_BUDGET` extra nodes.
- `regular_file_problem` says why a path is not a plain file to read (directory, FIFO,
  device, socket, symlink loop) without opening it: `open()` on a FIFO blocks forever.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import yaml

# Extra nodes that aliases may add beyond the document's own: far above any recipe or template
# that reuses a block by anchor (a few hundred), far below a bomb (millions).
ALIAS_EXPANSION_BUDGET = 10_000


class AliasBombError(ValueError):
    """A YAML document whose aliases expand past the budget (or refer to themselves)."""


def expanded_size(root) -> int:
    """Nodes of the composed graph `root` once every alias is expanded (each shared node
    counted each time it is referenced), computed once per distinct node."""
    sizes: dict[int, int] = {}
    in_progress: set[int] = set()

    def size(node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in in_progress:
            raise AliasBombError("an alias refers to a node that contains it (recursive YAML)")
        in_progress.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        in_progress.discard(key)
        sizes[key] = total
        if total > len(sizes) + ALIAS_EXPANSION_BUDGET:  # stop early: sizes grow geometrically
            raise AliasBombError(f"its aliases expand to over {ALIAS_EXPANSION_BUDGET:,} "
                                 "extra values (a YAML alias bomb?)")
        return total

    return size(root)


def load_yaml(text: str):
    """`yaml.safe_load(text)` with alias expansion bounded (raises `AliasBombError`)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        expanded_size(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def regular_file_problem(path: Path) -> str | None:
    """Why `path` cannot be read as a file (None when it is a regular file, or absent: the
    caller says "does not exist" in its own words). Never opens it."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "is a symlink loop"
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return None
        return f"cannot be read ({exc.strerror})"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a directory, not a file"
    if stat.S_ISFIFO(mode):
        return "is a FIFO (named pipe), not a file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device, not a file"
    if stat.S_ISSOCK(mode):
        return "is a socket, not a file"
    return "is not a regular file"
