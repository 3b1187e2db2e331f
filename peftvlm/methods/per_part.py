"""Per-part methods on a generative VLM: one method per part, each with its own learning rate.

    method:
      name: per_part
      parts:
        vision: {name: vpt, num_tokens: 5, deep: true, learning_rate: 0.01}
        language: {name: lora, r: 16, learning_rate: 0.0002}

The vision tower gets VPT prompt tokens (Jia et al. 2022) and the language model a peft adapter
(LoRA, DoRA or VeRA); the optimiser holds one parameter group per part, so prompts and adapter
train at the rates their papers use (VPT ~1e-2, LoRA ~1e-4). Each part is written exactly as
the stand-alone method it is, plus `learning_rate` (default: train.learning_rate); the part's
key says where it goes, so a LoRA part needs no `target`.

Run folders hold peft's adapter files in `adapter/` (so `PeftModel.from_pretrained` loads the
LoRA part as usual) plus `peftvlm_prompts.json` + `peftvlm_prompts.safetensors` beside them;
`load_trained(base_model, adapter_dir)` rebuilds both. The torch side is
`peftvlm.methods.vision_prompts`.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field

from peftvlm._schema import Section
from peftvlm.methods.lora import DoraMethod, LoraMethod, VeraMethod
from peftvlm.methods.vpt import VptMethod
from peftvlm.registry import register

_LR = Field(None, gt=0, description="This part's learning rate; default: train.learning_rate.")
_LANGUAGE_ONLY = Field("language", description="Fixed: this part adapts the language model.")


class VptPart(VptMethod):
    """VPT prompts in the vision tower; deep sets stop at the layer the projector reads."""

    learning_rate: float | None = _LR


class LoraPart(LoraMethod):
    learning_rate: float | None = _LR
    target: Literal["language"] = _LANGUAGE_ONLY


class DoraPart(DoraMethod):
    learning_rate: float | None = _LR
    target: Literal["language"] = _LANGUAGE_ONLY


class VeraPart(VeraMethod):
    learning_rate: float | None = _LR
    target: Literal["language"] = _LANGUAGE_ONLY


LanguagePart = Annotated[Union[LoraPart, DoraPart, VeraPart],  # noqa: UP007
                         Field(discriminator="name")]


class Parts(Section):
    vision: VptPart = Field(..., description="Method on the vision tower (vpt).")
    language: LanguagePart = Field(..., description="Method on the language model (lora, dora "
                                                    "or vera; peft).")


class PerPartMethod(Section):
    """A different PEFT method on each part of a generative VLM, each at its own learning rate."""

    name: Literal["per_part"] = "per_part"
    parts: Parts = Field(..., description="One method per part: `vision` and `language`.")

    def learning_rates(self, default: float) -> dict[str, float]:
        """Part -> learning rate, `default` (train.learning_rate) where a part names none."""
        return {part: getattr(self.parts, part).learning_rate or default
                for part in ("vision", "language")}


def apply_per_part(model, family, cfg: PerPartMethod, *, quantized: bool = False,
                   gradient_checkpointing: bool = False):
    """The model with the language adapter and the vision prompts; only those two train."""
    from peftvlm.methods.vision_prompts import apply_parts

    return apply_parts(model, family, cfg, quantized=quantized,
                       gradient_checkpointing=gradient_checkpointing)


def load_trained(model, adapter_dir, is_trainable: bool = False):
    """A trained per-part model from a run's `adapter/` folder, on `model` (the same base)."""
    from peftvlm.methods.vision_prompts import PeftModelWithPrompts

    return PeftModelWithPrompts.from_pretrained(model, adapter_dir, is_trainable=is_trainable)


register("per_part", PerPartMethod, "peftvlm.methods.per_part:apply_per_part", ("generative",),
         "one method per part of a generative VLM, each at its own learning rate "
         "(VPT on the vision tower + LoRA/DoRA/VeRA on the language model)")


def export_adapter(run_dir, adapter_dir, out_dir, merge: bool) -> dict:
    """`peftvlm export` hook (see `peftvlm.export.export_custom_method`): adapter + prompts."""
    from peftvlm.methods.vision_prompts import export_per_part

    return export_per_part(run_dir, adapter_dir, out_dir, merge)
