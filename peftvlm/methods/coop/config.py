"""The recipe config of coop (pydantic, no torch: the recipe schema imports it)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from peftvlm._schema import Section

# Paper defaults (CoOp's configs/trainers on Dassl); applied by the CLIP trainer.
PAPER_OPTIM = {"optim": "sgd", "optim_args": "momentum=0.9", "learning_rate": 0.002,
               "weight_decay": 5e-4,
               "lr_scheduler_type": "cosine", "warmup_epochs": 1, "warmup_lr": 1e-5,
               "per_device_train_batch_size": 32}


class CoopMethod(Section):
    """Learnable prompt context for CLIP's text encoder (CoOp)."""

    name: Literal["coop"] = "coop"
    n_ctx: int = Field(16, ge=1, description="Number of context vectors M (16 in the paper); "
                                             "ignored when ctx_init is set.")
    ctx_init: str | None = Field(None, description="Initialise the context from these words "
                                 "(e.g. 'a photo of a'); n_ctx becomes their token count. "
                                 "Default: random N(0, 0.02).")
    csc: bool = Field(False, description="Class-specific context (one set per class) instead "
                                         "of one unified context shared by all classes.")
    class_token_position: Literal["end", "middle", "front"] = Field(
        "end", description="Where the class name sits relative to the context.")
    optim_preset: Literal["recipe", "paper"] = Field(
        "recipe", description="`paper`: SGD lr 0.002, momentum 0.9, weight decay 5e-4, cosine, "
                              "1 warm-up epoch at constant 1e-5, batch 32 (overrides those "
                              "train.* fields); `recipe`: use the train section as written.")

    def optimisation_preset(self) -> dict | None:
        """The paper's optimisation (read by the dual-encoder loop), or None: the recipe's."""
        return PAPER_OPTIM if self.optim_preset == "paper" else None

    @model_validator(mode="after")
    def _init_words(self):
        if self.ctx_init is not None and not self.ctx_init.strip():
            raise ValueError("ctx_init must contain words, or be left out")
        return self
