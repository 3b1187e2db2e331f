"""Which seam a recipe runs through: one name per kind of training, decided in one place.

- `generative`: a generative VLM trained with TRL's SFTTrainer (`api.train_generative`);
- `classification`: a CLIP-family method (CoOp, VPT, CLIP-Adapter) on a dual encoder, few-shot
  classification (`peftvlm.trainers.clip`);
- `retrieval`: a peft method (lora, dora, vera) on a dual encoder, trained contrastively on
  image-caption pairs (`peftvlm.trainers.contrastive`).

train, eval and export all ask `run_kind(recipe)`, so a method and a model family are matched
the same way everywhere. The model's family comes from its config (no weights are loaded).
"""

from __future__ import annotations

from typing import Literal

from peftvlm.errors import RecipeError

RunKind = Literal["generative", "classification", "retrieval"]


def model_family(model_cfg):
    """The family of a recipe's model, from `model.family` or its config's model_type."""
    from peftvlm.models import detect_family, resolve_model_path

    return detect_family(resolve_model_path(model_cfg.id), model_cfg)


def run_kind(recipe) -> RunKind:
    """The kind of training `recipe` asks for, or a RecipeError when method and model clash."""
    from peftvlm.registry import get_method

    method = get_method(recipe.method.name)
    if "generative" not in method.kinds:
        return "classification"
    family = model_family(recipe.model)
    if family.kind == "generative":
        return "generative"
    if "dual_encoder" not in method.kinds:
        raise RecipeError(f"method.name: {method.name!r} does not train dual encoders such as "
                          f"{family.name} ({recipe.model.id!r})",
                          hint="use lora, dora or vera (contrastive retrieval), or coop, vpt "
                               "or clip_adapter (few-shot classification)")
    return "retrieval"
