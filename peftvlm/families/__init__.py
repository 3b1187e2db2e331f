"""Model families: the only place that knows architecture quirks (see `base.FamilySpec`)."""

from __future__ import annotations

from peftvlm.errors import ModelError
from peftvlm.families import clip, idefics3, llava, paligemma, qwen2_vl, siglip
from peftvlm.families.base import FamilySpec

FAMILIES: dict[str, FamilySpec] = {spec.name: spec for spec in (
    llava.SPEC, qwen2_vl.QWEN2_VL_SPEC, qwen2_vl.QWEN2_5_VL_SPEC, idefics3.SPEC, paligemma.SPEC,
    clip.SPEC, siglip.SPEC)}


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
