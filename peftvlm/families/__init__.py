"""Model families: the only place that knows architecture quirks (see `base.FamilySpec`).

Adding a family is one module here: every public module of this package is imported and each
`FamilySpec` it defines at module level is registered, so `peftvlm ls families`, the tiny-model
names (recipe schema, `peftvlm ls models`) and the tests' family matrices all follow from it.
"""

from __future__ import annotations

import importlib
import pkgutil

from peftvlm.errors import ModelError
from peftvlm.families.base import FamilySpec

def _discover() -> dict[str, FamilySpec]:
    """Specs of every public module, by module name, then in the order each module defines them."""
    names = sorted(m.name for m in pkgutil.iter_modules(__path__)
                   if not m.name.startswith("_") and m.name != "base")
    specs: dict[str, FamilySpec] = {}
    for module_name in names:
        module = importlib.import_module(f"{__name__}.{module_name}")
        for value in vars(module).values():
            if isinstance(value, FamilySpec) and value.name not in specs:
                specs[value.name] = value
    return specs


FAMILIES: dict[str, FamilySpec] = _discover()


def get_family(name: str) -> FamilySpec:
    if name not in FAMILIES:
        raise ModelError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}",
                         hint="set model.family to one of those, or leave it out to detect it")
    return FAMILIES[name]


def family_for_model_type(model_type: str) -> FamilySpec:
    """The family whose spec lists this `config.model_type`."""
    for spec in FAMILIES.values():
        if model_type in spec.model_types:
            return spec
    raise ModelError(f"model_type {model_type!r} is not a supported family "
                     f"({', '.join(FAMILIES)})",
                     hint="set model.family explicitly if the architecture matches one of them")


def tiny_models() -> dict[str, FamilySpec]:
    """Built-in tiny model name -> its family."""
    return {spec.tiny_name: spec for spec in FAMILIES.values() if spec.tiny_name}


def known_family(model_cfg) -> FamilySpec | None:
    """The family of a recipe's model when it is known without loading anything: `model.family`,
    a built-in tiny model, or a local folder's config.json `model_type`; None for Hub ids."""
    import json
    from pathlib import Path

    if model_cfg.family:
        return FAMILIES.get(model_cfg.family)
    if model_cfg.id in tiny_models():
        return tiny_models()[model_cfg.id]
    config = Path(model_cfg.id) / "config.json"
    if config.is_file():
        try:
            model_type = json.loads(config.read_text()).get("model_type")
        except (OSError, ValueError):
            return None
        return next((f for f in FAMILIES.values() if model_type in f.model_types), None)
    return None


def method_refusal(family: FamilySpec, method_cfg) -> str | None:
    """Why `method_cfg` (a recipe's method section) cannot apply to `family`, or None.

    Checked by `peftvlm validate` (and before loading weights), so a run never starts on a
    combination that would fail or silently train the wrong thing."""
    reason = family.refusal(method_cfg.name)
    if reason:
        return f"method {method_cfg.name!r} does not apply to family {family.name!r}: {reason}"
    if getattr(method_cfg, "target_regex", None) is None and hasattr(method_cfg, "target"):
        targets = [method_cfg.target] if isinstance(method_cfg.target, str) else method_cfg.target
        for part in targets:
            if part == "all":
                continue
            if family.module_prefix(part) is None:
                return (f"method.target: family {family.name!r} has no {part} part (it has: "
                        f"{', '.join(family.parts())})")
            if not family.part_targets(part):
                return (f"method.target: the {part} of family {family.name!r} has no linear "
                        f"layer for adapters; train it in full with method.modules_to_save: "
                        f"[{part}]")
    return None
