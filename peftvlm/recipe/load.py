"""Loading a recipe: YAML file -> `key=value` overrides -> validated `Recipe` -> file checks,
every problem worded as one `RecipeError` naming the file and the dotted field."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from peftvlm._schema import describe_validation_error
from peftvlm.errors import RecipeError
from peftvlm.recipe.checks import check_recipe_files
from peftvlm.recipe.schema import Recipe
from peftvlm.safe_yaml import AliasBombError, load_yaml, regular_file_problem


def apply_overrides(data: dict, overrides: list[str], file: str = "<recipe>") -> dict:
    """Apply `dotted.key=value` overrides; values are parsed as YAML scalars/lists."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"{file}: override `{item}` is not of the form key=value",
                              hint="write e.g. train.learning_rate=1e-4")
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = _override_value(item, raw, file)
    return data


def _override_value(item: str, raw: str, file: str):
    """An override's value parsed as YAML (`1e-4`, `[a, b]`, `{k: v}`); empty means null."""
    try:
        return load_yaml(raw) if raw.strip() else None
    except AliasBombError as exc:
        raise RecipeError(f"{file}: override `{item}`: {exc}",
                          hint="write the value out without aliases") from None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"{file}: override `{item}`: the value `{raw}` is not valid YAML "
                          f"({problem})", hint="write a YAML value (1e-4, [a, b], {k: v}), or "
                                               "quote text: key='[1'") from None


def read_recipe_yaml(path: Path, what: str = "recipe",
                     start_from: str = "`peftvlm cp quickstart my.yaml`") -> dict:
    """Read a YAML config (a recipe by default) into a dict, with clear errors for
    missing/empty/invalid files."""
    problem = regular_file_problem(path)  # before opening: open() on a FIFO never returns
    if problem:
        raise RecipeError(f"{what} file {path} {problem}",
                          hint=f"give the path of a YAML file (e.g. {path}/recipe.yaml)"
                          if path.is_dir() else "give the path of a YAML file")
    if not path.exists():
        raise RecipeError(f"{what} file {path} does not exist",
                          hint="check the path, or list the shipped ones: `peftvlm ls recipes`")
    try:
        data = load_yaml(path.read_text())
    except AliasBombError as exc:
        raise RecipeError(f"{path}: refused: {exc}",
                          hint="write repeated values out, or use fewer nested aliases") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"{path}: invalid YAML{where}: {problem}",
                          hint="check indentation and quoting around that line") from exc
    if data is None:
        raise RecipeError(f"{path}: the {what} is empty", hint=f"start from {start_from}")
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a {what} must be a mapping of sections, "
                          f"got {type(data).__name__}", hint=f"start from {start_from}")
    return data


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe; every problem becomes one `RecipeError`."""
    path = Path(path)
    data = apply_overrides(read_recipe_yaml(path), overrides or [], str(path))
    recipe = validate_recipe_dict(data, str(path))
    recipe.source_path = path.resolve()
    if recipe.name is None:
        recipe.name = path.stem
    check_recipe_files(recipe)
    return recipe


def validate_recipe_dict(data: dict, file: str = "<recipe>") -> Recipe:
    """Validate a dict against the schema, turning pydantic errors into one clear message."""
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(describe_validation_error(exc, file, Recipe)) from exc
