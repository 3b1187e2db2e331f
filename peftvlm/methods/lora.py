"""LoRA, QLoRA, DoRA and VeRA through `peft`, with per-part target presets.

A recipe picks the parts to adapt (`language`, `vision`, `projector`, `all`) or a regex; the
family spec turns parts into module-name regexes, so a bare `q_proj` never leaks into the
vision tower by accident. QLoRA's quantization happens at load time (see `models.py`).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from peftvlm._schema import Section
from peftvlm.errors import RecipeError
from peftvlm.registry import register

Part = Literal["language", "vision", "qformer", "projector", "all"]
# The same as families.base.PARTS, spelled out: recipe.py imports this module.
PARTS = ("vision", "qformer", "projector", "language")


class TargetSelection(Section):
    target: Part | list[Part] = Field("language", description="Parts whose linear layers get "
                                                              "adapters; `all` = every part.")
    target_regex: str | None = Field(None, description="Full-match regex over module names; "
                                                       "overrides `target`.")
    modules_to_save: list[str] = Field(default_factory=list, description="Modules trained in "
                                       "full: a part name (`projector`) or a module name.")

    @field_validator("target_regex")
    @classmethod
    def _compiles(cls, v):
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"not a valid regex: {exc}") from exc
        return v


class LoraMethod(TargetSelection):
    """Low-rank adapters (Hu et al. 2021)."""

    name: Literal["lora"] = "lora"
    r: int = Field(16, ge=1, description="Adapter rank.")
    lora_alpha: float = Field(32, gt=0, description="Scaling numerator (scale = alpha / r).")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Biases to train.")
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha / sqrt(r).")


class DoraMethod(LoraMethod):
    """Weight-decomposed LoRA (Liu et al. 2024): magnitude + LoRA direction."""

    name: Literal["dora"] = "dora"


class QloraMethod(LoraMethod):
    """LoRA on a 4-bit nf4 base (Dettmers et al. 2023); quantization set in `model.quantization`."""

    name: Literal["qlora"] = "qlora"


class VeraMethod(TargetSelection):
    """Vector-based random matrix adaptation (Kopiczko et al. 2024): shared frozen random
    projections, trained scaling vectors."""

    name: Literal["vera"] = "vera"
    r: int = Field(256, ge=1, description="Rank of the shared random projections.")
    vera_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input.")
    d_initial: float = Field(0.1, gt=0, description="Initial value of the d vector.")
    projection_prng_key: int = Field(0, description="Seed of the shared random projections.")


def target_regex(family, cfg: TargetSelection) -> str:
    """The full-match regex of module names to adapt, from the recipe's parts or regex."""
    if cfg.target_regex:
        return cfg.target_regex
    parts = [cfg.target] if isinstance(cfg.target, str) else list(cfg.target)
    if "all" in parts:  # every part that has linear layers
        parts = [p for p in family.parts() if family.part_targets(p)]
    alternatives = []
    for part in parts:
        check_part(family, part)
        prefix, targets = re.escape(family.module_prefix(part)), family.part_targets(part)
        names = "|".join(map(re.escape, (t for t in targets if t)))
        if names:
            # `(?:.*\.)?`: a layer may sit directly under the prefix (LLaVA's projector.linear_1)
            alternatives.append(rf"{prefix}\.(?:.*\.)?(?:{names})")
        if "" in targets:  # the part is itself one Linear (mllama's, BLIP-2's projector)
            alternatives.append(prefix)
    return "^(?:" + "|".join(alternatives) + ")$"


def check_part(family, part: str) -> None:
    """A recipe's `method.target` part must exist in the family and have linear layers."""
    usable = ", ".join(p for p in family.parts() if family.part_targets(p))
    if family.module_prefix(part) is None:
        raise RecipeError(f"method.target: family {family.name!r} has no {part} module",
                          hint=f"use one of: {usable}")
    if not family.part_targets(part):
        raise RecipeError(f"method.target: the {part} of family {family.name!r} has no linear "
                          f"layer for adapters",
                          hint=f"train it in full with method.modules_to_save: [{part}], or "
                               f"target one of: {usable}")


def modules_to_save(family, cfg: TargetSelection) -> list[str] | None:
    """Part names become their module prefixes; other names pass through."""
    out = [family.module_prefix(m) if m in PARTS else m for m in cfg.modules_to_save]
    return [m for m in out if m] or None


def peft_config(family, cfg):
    """The `peft` config object for a LoRA-family recipe method."""
    from peft import LoraConfig, VeraConfig

    common = dict(target_modules=target_regex(family, cfg),
                  modules_to_save=modules_to_save(family, cfg))
    if cfg.name == "vera":
        return VeraConfig(r=cfg.r, vera_dropout=cfg.vera_dropout, d_initial=cfg.d_initial,
                          projection_prng_key=cfg.projection_prng_key, **common)
    return LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      bias=cfg.bias, use_rslora=cfg.use_rslora, use_dora=cfg.name == "dora",
                      **common)


def apply_peft(model, family, cfg, *, quantized: bool = False, gradient_checkpointing=False,
               wrap=None):
    """Wrap `model` with the adapter; only adapter (and modules_to_save) parameters train.

    `wrap(model, peft_config)` builds the peft model (default `peft.get_peft_model`; `per_part`
    passes a PeftModel subclass that also carries vision prompts)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing)
    config = peft_config(family, cfg)
    try:
        return (wrap or get_peft_model)(model, config)
    except ValueError as exc:
        if "not found in the base model" in str(exc) or "Target modules" in str(exc):
            raise RecipeError(f"method.target: no module of this model matches "
                              f"{config.target_modules!r}",
                              hint="list module names with `peftvlm train RECIPE --dry-run`, "
                                   "or set method.target_regex") from exc
        raise


_SUMMARY = {
    "lora": "LoRA low-rank adapters (peft)",
    "qlora": "LoRA on a 4-bit nf4 quantized base (peft + bitsandbytes)",
    "dora": "DoRA weight-decomposed LoRA (peft)",
    "vera": "VeRA shared random projections with trained scaling vectors (peft)",
}
for _cls in (LoraMethod, QloraMethod, DoraMethod, VeraMethod):
    _name = _cls.model_fields["name"].default
    register(_name, _cls, "peftvlm.methods.lora:apply_peft", ("generative",), _SUMMARY[_name])
