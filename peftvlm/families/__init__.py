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
