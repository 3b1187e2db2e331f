"""Layering rules, read from the source (imports inside functions included): methods never
reach up into trainers or exports, the data layer never into trainers, trainers never into the
api, the data layers import only the ones below them (leaves, read, render, prepare, stream /
batch), the dual-encoder loop names no method, and each method lives in one package."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "peftvlm"


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n for n in names if n.startswith("peftvlm")}


def modules_under(folder: str) -> list[Path]:
    return sorted((PACKAGE / folder).rglob("*.py"))


FORBIDDEN = {
    "methods": ("peftvlm.trainers", "peftvlm.export", "peftvlm.api", "peftvlm.kinds",
                "peftvlm.eval.run"),
    "data": ("peftvlm.trainers", "peftvlm.api", "peftvlm.export"),
    "trainers": ("peftvlm.api", "peftvlm.export", "peftvlm.eval.run"),
}
# The data stage's own layers (peftvlm/data/__init__.py): leaves, read, render, prepare, then
# stream and batch; pipeline.py and report.py on top.
_DATA_ABOVE = ["peftvlm.data.render", "peftvlm.data.prepare", "peftvlm.data.stream",
               "peftvlm.data.batch", "peftvlm.data.pipeline", "peftvlm.data.report"]
FORBIDDEN.update({
    "data/read": tuple(_DATA_ABOVE),
    "data/render": tuple(_DATA_ABOVE[1:]),
    "data/prepare": tuple(_DATA_ABOVE[2:]),
    "data/stream": tuple(_DATA_ABOVE[3:]),
    "data/batch": ("peftvlm.data.stream", *_DATA_ABOVE[4:]),
})


def test_the_data_leaves_import_no_other_data_module():
    for leaf in ("rows.py", "boxes.py"):
        used = imports_of(PACKAGE / "data" / leaf)
        assert not [i for i in used if i.startswith("peftvlm.data") and i != "peftvlm.data.rows"]


# Known exception, to move out in its own change: per_part's exporter (a generative method's
# hook) lives beside its prompts and reuses the export helpers.
ALLOWED = {"methods/vision_prompts.py": {"peftvlm.export", "peftvlm.export.checks"}}


@pytest.mark.parametrize("layer", list(FORBIDDEN))
def test_no_upward_imports(layer):
    offenders = {}
    for path in modules_under(layer):
        name = str(path.relative_to(PACKAGE))
        offenders[name] = sorted(i for i in imports_of(path) if i.startswith(FORBIDDEN[layer])
                                 and i not in ALLOWED.get(name, set()))
    assert not {k: v for k, v in offenders.items() if v}


def test_the_dual_encoder_loop_names_no_method():
    from peftvlm.registry import METHODS, method_config_classes

    method_config_classes()
    for name in ("loop.py", "clip.py", "contrastive.py"):
        used = imports_of(PACKAGE / "trainers" / name)
        assert not [i for i in used if any(i.startswith(f"peftvlm.methods.{m}")
                                           for m in METHODS)], name


def test_each_clip_family_method_is_one_package_without_twins():
    from peftvlm.registry import METHODS, method_config_classes

    method_config_classes()
    for info in METHODS.values():
        if "generative" in info.kinds:
            continue
        package = PACKAGE / "methods" / info.name
        assert {"__init__.py", "config.py", "model.py"} <= {p.name for p in package.iterdir()}
        assert not list(PACKAGE.rglob(f"{info.name}.py")), f"a second {info.name}.py exists"
        config_imports = imports_of(package / "config.py")
        assert not [i for i in config_imports if i.startswith("peftvlm.methods")]
        assert "import torch" not in (package / "config.py").read_text()


# --- kind names -------------------------------------------------------------------------------

KIND_NAMES = {"generative", "classification", "retrieval", "dual_encoder"}
KIND_HOMES = ("kinds/", "families/", "registry.py")  # where run kinds may be named and compared


def kind_name_constants(node) -> list[str]:
    """The run-kind names among `node`'s string constants (a tuple/list/set is looked into)."""
    items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return [i.value for i in items if isinstance(i, ast.Constant) and i.value in KIND_NAMES]


def kind_comparisons(tree) -> list[tuple[int, str]]:
    """(line, name) of every comparison, `match` case or inline dict dispatch on a kind name."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            found += [(node.lineno, n) for side in sides for n in kind_name_constants(side)]
        elif isinstance(node, ast.MatchValue):
            found += [(node.lineno, n) for n in kind_name_constants(node.value)]
        elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Dict):
            found += [(node.lineno, n) for key in node.value.keys if key is not None
                      for n in kind_name_constants(key)]
    return found


def test_kind_comparisons_finds_what_it_looks_for():
    source = ('a = kind == "retrieval"\nb = "generative" not in m.kinds\n'
              'c = {"classification": 1}[k]\nd = x in ("dual_encoder", "y")\n'
              'match k:\n    case "retrieval": pass\ne = {"retrieval": f}\nf = k == "caption"\n')
    assert [line for line, _ in kind_comparisons(ast.parse(source))] == [1, 2, 3, 4, 6]


def test_no_kind_name_comparison_outside_the_kinds_package():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = path.relative_to(PACKAGE).as_posix()
        if name.startswith(KIND_HOMES):
            continue
        offenders += [f"{name}:{line} compares {kind!r}"
                      for line, kind in kind_comparisons(ast.parse(path.read_text()))]
    assert not offenders, ("ask the kind (peftvlm.kinds.kind_for), the family "
                           "(is_generative) or the method (trains_generative) instead:\n"
                           + "\n".join(offenders))


def test_kind_wiring_is_reached_only_through_the_registry():
    """kinds/<name>.py import the stages they wire; no stage imports them back (the registry
    names them by path), so the stages may ask `kind_for` without an import cycle."""
    from peftvlm.kinds import KINDS

    wiring = {path.partition(":")[0] for path in KINDS.values()}
    offenders = {str(p.relative_to(PACKAGE)): sorted(imports_of(p) & wiring)
                 for p in PACKAGE.rglob("*.py") if not str(p.relative_to(PACKAGE)).startswith(
                     "kinds/")}
    assert not {k: v for k, v in offenders.items() if v}


def module_graph() -> tuple[dict[str, set[str]], int, int]:
    """Our modules and the modules of ours each imports (every import statement, those inside
    functions too; `from pkg import name` points at the submodule `name` when it is one), with
    the count of internal import statements and of those inside functions."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("peftvlm",) + path.relative_to(PACKAGE).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph, total, in_functions = {}, 0, 0
    for name, path in modules.items():
        tree, edges = ast.parse(path.read_text()), set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef,
                                                                  ast.AsyncFunctionDef))]
        nested = {id(n) for f in functions for n in ast.walk(f) if n is not f}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found = {resolve(a.name) for a in node.names if a.name.startswith("peftvlm")}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                if not base.startswith("peftvlm"):
                    continue
                found = {resolve(f"{base}.{a.name}") for a in node.names}
            else:
                continue
            if not found:
                continue
            total += 1
            in_functions += id(node) in nested
            edges |= found - {None, name}
        graph[name] = edges
    return graph, total, in_functions


def test_no_import_cycles_counting_imports_inside_functions():
    graph, _, _ = module_graph()
    state, cycles = {}, []

    def visit(module, trail):
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(trail[trail.index(target):] + [target])
            elif target not in state:
                visit(target, trail + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, [" -> ".join(c) for c in cycles[:5]]


def test_our_modules_are_imported_at_module_top():
    """Lazy imports of our own modules are start-up guards only (cli.py, api.py, objectives,
    method packages: docs/architecture.md), at most a fifth of them."""
    _, total, in_functions = module_graph()
    assert in_functions <= 0.2 * total, f"{in_functions} of {total} inside functions"
