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

Part = Literal["language", "text", "vision", "qformer", "projector", "detector", "all"]
# The same as families.base.PARTS, spelled out: recipe/schema.py imports this module.
PARTS = ("vision", "qformer", "projector", "detector", "language")
# Dual encoders (CLIP, SigLIP) call their language part the text tower.
ALIASES = {"text": "language"}


class TargetSelection(Section):
    target: Part | list[Part] = Field("language", description="Parts whose linear layers get "
                                                              "adapters; `all` = every part the "
                                                              "model has; `text` = `language` "
                                                              "(a dual encoder's text tower).")
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
    parts = [ALIASES.get(p, p) for p in parts]
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
    check_targets(model, config.target_modules, "method.target_regex" if cfg.target_regex
                  else "method.target")
    return (wrap or get_peft_model)(model, config)


def adaptable_types() -> tuple[type, ...]:
    """Layer types peft's LoRA/VeRA can wrap (bitsandbytes' 4/8-bit layers are nn.Linear)."""
    import torch.nn as nn
    from transformers.pytorch_utils import Conv1D

    return nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention, Conv1D


def layer_name_examples(model, limit: int = 6) -> list[str]:
    """Distinct linear-layer names of `model` with layer indices written as `\d+`."""
    import torch.nn as nn

    seen: dict[str, None] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            seen.setdefault(re.sub(r"\.\d+\.", r".\\d+.", name))
    names = list(seen)
    step = max(1, len(names) // limit)  # spread over the model: vision, projector, language
    return names[::step][:limit]


def check_targets(model, regex: str, field: str) -> None:
    """The target regex must full-match (as peft matches it) at least one module, and only
    layers peft can adapt: a match on a container (a decoder layer, an attention block) would
    make peft fail with a dump of the module tree."""
    pattern = re.compile(regex)
    matched = [(n, m) for n, m in model.named_modules() if n and pattern.fullmatch(n)]
    examples = ", ".join(layer_name_examples(model))
    if not matched:
        raise RecipeError(f"{field}: no module of this model matches {regex!r} (full match over "
                          f"module names); its linear layers are named like: {examples}",
                          hint="write method.target_regex over those names, or use "
                               "method.target: language | vision | projector | all")
    kinds = adaptable_types()
    bad = [(n, m) for n, m in matched if not isinstance(m, kinds)]
    if bad:
        listed = ", ".join(f"{n} ({type(m).__name__})" for n, m in bad[:3]) + \
            (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        inside = [n for n, m in bad[0][1].named_modules(prefix=bad[0][0])
                  if isinstance(m, kinds)][:4]
        raise RecipeError(f"{field}: {regex!r} matches {len(bad)} module(s) that are not layers "
                          f"an adapter can wrap: {listed}. Adapters go on linear layers such "
                          f"as: {examples}",
                          hint="end the regex at the layers inside those modules"
                               + (f", e.g. {', '.join(inside)}" if inside else ""))


_SUMMARY = {
    "lora": "LoRA low-rank adapters (peft)",
    "qlora": "LoRA on a 4-bit nf4 quantized base (peft + bitsandbytes)",
    "dora": "DoRA weight-decomposed LoRA (peft)",
    "vera": "VeRA shared random projections with trained scaling vectors (peft)",
}
for _cls in (LoraMethod, QloraMethod, DoraMethod, VeraMethod):
    _name = _cls.model_fields["name"].default
    # qlora stays generative-only: dual encoders are small enough to adapt unquantized.
    kinds = ("generative",) if _name == "qlora" else ("generative", "dual_encoder")
    register(_name, _cls, "peftvlm.methods.lora:apply_peft", kinds, _SUMMARY[_name])
