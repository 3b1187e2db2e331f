"""Objectives of the generative kind: what a generative run learns from, one module each.

- `sft` (`sft.py`): imitate the replies (TRL's SFTTrainer over conversations);
- `dpo` (`dpo.py`): prefer each row's chosen reply over its rejected one (TRL's DPOTrainer
  over preference rows, the reference being the base with the adapter disabled);
- `grpo` (`grpo.py`): sampled replies scored by verifiable rewards (TRL's GRPOTrainer, rewards
  from `peftvlm.rewards`, the guards in `grpo_trainer.py`).

The generative flow (load, prepare data, evaluate, train, write the run folder) is the same for
every objective; it asks the recipe's objective, an `Objective`, for the three things that
differ: which rows it needs (`check_data`), the TRL trainer (`build_trainer`) and what the run
summary adds (`summary`). `refusal` is `peftvlm validate`'s check (no torch imported); DPO
and GRPO state theirs as data in a `refusals.Refusals`, checked by one function.
"""

from __future__ import annotations

import importlib
from typing import Protocol

from peftvlm.errors import RecipeError

# objective name -> "module:attribute" of its `Objective`, imported when a run uses it.
OBJECTIVES = {
    "sft": "peftvlm.trainers.objectives.sft:SFT",
    "dpo": "peftvlm.trainers.objectives.dpo:DPO",
    "grpo": "peftvlm.trainers.objectives.grpo:GRPO",
}


class Objective(Protocol):
    """What one objective adds to the generative kind's flow."""

    name: str

    def refusal(self, recipe, family, method) -> str | None:
        """Why this recipe cannot train with the objective (validate time), or None."""

    def check_data(self, data) -> None:
        """Refuse prepared data the objective cannot learn from (`DataError`)."""

    def build_trainer(self, recipe, model, processor, collator, data, run_dir, report_to,
                      sharding, callbacks, log=print):
        """The TRL trainer over `data.train` (`callbacks[0]` stops on Ctrl-C; insert the
        objective's own before `callbacks[1]`, which marks checkpoints complete)."""

    def summary(self, log_history: list[dict]) -> dict:
        """Fields the run's summary.json adds for this objective (e.g. DPO's margins)."""


def get_objective(name: str) -> Objective:
    """The registered objective `name`, or a RecipeError listing those there are."""
    if name not in OBJECTIVES:
        raise RecipeError(f"train.objective: {name!r} is not available in this version "
                          f"(available: {', '.join(OBJECTIVES)})",
                          hint="see docs/objectives.md")
    module, _, attribute = OBJECTIVES[name].partition(":")
    return getattr(importlib.import_module(module), attribute)


def objective_for(recipe) -> Objective:
    """The objective of a recipe's `train.objective`."""
    return get_objective(recipe.train.objective)


def check_objective(recipe, family, method) -> None:
    """`peftvlm validate`'s objective check: the objective exists and fits model and method
    (`family`: None when only known once loaded: checked again then)."""
    if recipe.train.objective not in OBJECTIVES:
        raise RecipeError(f"{recipe.source_path or 'recipe'}: train.objective: "
                          f"{recipe.train.objective!r} is not available in this version "
                          f"(available: {', '.join(OBJECTIVES)})", hint="see docs/objectives.md")
    reason = objective_for(recipe).refusal(recipe, family, method)
    if reason:
        raise RecipeError(f"{recipe.source_path or 'recipe'}: train.objective: "
                          f"{recipe.train.objective}: {reason}",
                          hint="see docs/objectives.md for what each objective runs on")
