"""Direct preference optimisation: each row's chosen reply is made more likely than its
rejected one, relative to a reference model (TRL's DPOTrainer, Rafailov et al. 2023).

The reference is the base model with the adapter disabled: no second copy of the model is held
(TRL would add a "ref" copy of the adapter, which for a fresh adapter equals the base; it is
dropped, so the adapter saved is the one trained and nothing else). Rows are preference rows
(`peftvlm.data.preference`); chosen and rejected are collated together and see the same
pixels. The margins, rewards and preference accuracy TRL logs go to the trainer log, W&B and
summary.json (`dpo`), and a non-finite one stops the run.
"""

from __future__ import annotations

from peftvlm.data.preference import require_preference_rows
from peftvlm.trainers.objectives.refusals import Refusals

# TRL's DPO metrics kept in summary.json (the last logged values) and checked to be finite.
LOGGED = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
          "logps/chosen", "logps/rejected")


class DPOObjective:
    name = "dpo"

    refusals = Refusals(
        objective="dpo", trainer="DPOTrainer",
        dual_encoder_family="{family} is a dual encoder, which has no replies to prefer: only "
                            "generative VLMs train with dpo (dual encoders train with objective: "
                            "sft)",
        dual_encoder_method="method {method!r} trains dual encoders, which have no replies to "
                            "prefer (use objective: sft)",
        adapter_not_switched="method {method!r} adds modules that peft's disable_adapter does "
                             "not switch off, so the reference (the base with the adapter "
                             "disabled) would not be the base: use lora, qlora, dora or vera",
        settings={"train.packing": "chosen and rejected must stay whole rows",
                  "train.group_by_length": "rows are grouped by their chosen reply's length only",
                  "streaming": "pairs are read whole",
                  "train.assistant_only_loss: false": "DPO scores only the replies"})

    def refusal(self, recipe, family, method) -> str | None:
        """What DPO cannot run on, from the recipe alone (no weights, no torch)."""
        return self.refusals.refusal(recipe, family, method)

    def check_data(self, data) -> None:
        require_preference_rows(data.train, "data.train", data.sources)

    def build_trainer(self, recipe, model, processor, collator, data, run_dir, report_to,
                      sharding, callbacks, log=print):
        # lazy: `validate` asks an objective for its refusal; its trainer imports TRL
        from peftvlm.trainers.objectives.dpo_trainer import build_dpo_trainer

        return build_dpo_trainer(recipe, model, processor, collator, data, run_dir, report_to,
                                 sharding, callbacks)

    def summary(self, log_history: list[dict]) -> dict:
        """The last logged DPO metrics, the margin and accuracy per logged step, and the
        held-out preference accuracy before and after training."""
        logged = [e for e in log_history if "rewards/margins" in e]
        scored = [e for e in log_history if "eval_preference_accuracy" in e]
        held_out = {"held_out_preference_accuracy": {
            "before": scored[0]["eval_preference_accuracy"],
            "after": scored[-1]["eval_preference_accuracy"]}} if len(scored) > 1 else {}
        if not logged:
            return {"dpo": held_out}
        last = logged[-1]
        return {"dpo": {**held_out,**{k.replace("/", "_"): round(last[k], 6) for k in LOGGED if k in last},
                        "margin_curve": [[e["step"], round(e["rewards/margins"], 6)]
                                         for e in logged],
                        "accuracy_curve": [[e["step"], round(e["rewards/accuracies"], 6)]
                                           for e in logged if "rewards/accuracies" in e]}}


DPO = DPOObjective()
