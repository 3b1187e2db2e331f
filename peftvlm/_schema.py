"""The base class of every recipe section (shared by the recipe and method configs)."""

import typing

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A recipe section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


MAX_LISTED_ERRORS = 3


def describe_validation_error(exc, file: str, root: type[BaseModel]) -> str:
    """One line per problem: file, dotted field, what is wrong and what is allowed.

    Works for any schema built from `Section`s: tagged-union branch names that pydantic puts in
    error locations are dropped from the dotted path and used to find the allowed keys."""
    lines = []
    for err in exc.errors()[:MAX_LISTED_ERRORS]:
        dotted, section = _walk(err["loc"], root)
        lines.append(f"{file}: {dotted or '(top level)'}: {_explain(err, section)}")
    more = len(exc.errors()) - MAX_LISTED_ERRORS
    if more > 0:
        lines.append(f"... and {more} more problem(s)")
    return "\n".join(lines)


def _explain(err: dict, section: type[BaseModel] | None) -> str:
    kind, ctx = err["type"], err.get("ctx", {})
    if kind == "extra_forbidden":
        allowed = sorted(f.alias or k for k, f in (section.model_fields if section else {}).items()
                         if not f.exclude)
        return f"unknown key `{err['loc'][-1]}`" + (f"; allowed: {', '.join(allowed)}"
                                                    if allowed else "")
    if kind == "union_tag_invalid":
        expected = ctx.get("expected_tags", "").replace("'", "")
        return f"unknown {ctx.get('discriminator', 'kind').strip(chr(39))} " \
               f"{ctx.get('tag')!r}; available: {expected}"
    if kind == "union_tag_not_found":
        return f"{ctx.get('discriminator', 'a tag').strip(chr(39))} is required"
    if kind == "missing":
        return "required field is missing"
    if kind == "literal_error":
        return f"{err['msg'].replace('Input should be', 'must be')} (got {err['input']!r})"
    return f"{err['msg']} (got {err.get('input')!r})"


def _walk(loc, root: type[BaseModel]) -> tuple[str, type[BaseModel] | None]:
    """The dotted path of `loc` and the section class its last key belongs in."""
    parts: list[str] = []
    options: list[type[BaseModel]] = [root]
    container = None
    for part in loc:
        if isinstance(part, int):
            parts[-1:] = [f"{parts[-1]}[{part}]"] if parts else [f"[{part}]"]
            continue
        branch = next((c for c in options if _tag_of(c) == part), None)
        if branch is not None and not any(_field(c, part) for c in options):
            options = [branch]  # a tagged-union branch name, not a key
            continue
        container = options[0] if len(options) == 1 else None
        holder = next((c for c in options if _field(c, part)), None)
        parts.append(str(part))
        field = _field(holder, part)
        options = _sections(field.annotation) if field else []
    return ".".join(parts), container


def _field(section, name):
    if section is None:
        return None
    return section.model_fields.get(name) or next(
        (f for f in section.model_fields.values() if f.alias == name), None)


def _tag_of(section: type[BaseModel]):
    """The Literal default that tags a union member (`name`, `type`), if it has one."""
    for field in section.model_fields.values():
        args = typing.get_args(field.annotation)
        if typing.get_origin(field.annotation) is typing.Literal and len(args) == 1:
            return args[0]
    return None


def _sections(annotation) -> list[type[BaseModel]]:
    """Every Section class inside an annotation (Optional, list, Union, Annotated...)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found = []
    for arg in typing.get_args(annotation):
        found += _sections(arg)
    return found
