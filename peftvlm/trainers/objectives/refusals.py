"""What a TRL objective beyond SFT refuses at validate time, as data, and the one checker.

DPO and GRPO refuse the same things for objective-specific reasons: dual encoders (no replies
to prefer or reward), methods whose modules peft's `disable_adapter` does not switch off (the
reference would not be the base), what the family itself says it cannot do with the TRL
trainer, and a few recipe settings. Each objective states its reasons in a `Refusals`; the
order the checks run in (and so which reason a recipe is told first) is `Refusals.refusal`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# setting as the user is told it -> is it on in this recipe
SETTINGS = {
    "train.packing": lambda recipe: recipe.train.packing,
    "train.group_by_length": lambda recipe: recipe.train.group_by_length,
    "streaming": lambda recipe: recipe.data.streams(),
    "train.assistant_only_loss: false": lambda recipe: not recipe.train.assistant_only_loss,
}


@dataclass(frozen=True)
class Refusals:
    """One objective's refusals: the reasons, with `{family}` / `{method}` filled in."""

    objective: str
    trainer: str  # TRL's trainer class, named in a family's refusal
    dual_encoder_family: str
    dual_encoder_method: str
    adapter_not_switched: str
    settings: dict[str, str] = field(default_factory=dict)  # SETTINGS key -> why refused

    def refusal(self, recipe, family, method) -> str | None:
        """Why this recipe cannot train with the objective (no weights, no torch), or None."""
        if family is not None and not family.is_generative:
            return self.dual_encoder_family.format(family=family.name)
        if not method.trains_generative:
            return self.dual_encoder_method.format(method=method.name)
        if not method.apply_path.endswith(":apply_peft"):
            return self.adapter_not_switched.format(method=method.name)
        reason = family.objective_refusal(self.objective) if family is not None else None
        if reason:
            return f"the {family.name} family cannot train with TRL's {self.trainer}: {reason}"
        for setting, why in self.settings.items():
            if SETTINGS[setting](recipe):
                return f"{setting} is not available with {self.objective} ({why}): turn it off"
        return None
