"""Group relative policy optimisation: for each prompt, `num_generations` replies are sampled
from the adapted policy, scored by the recipe's verifiable rewards (`train.rewards`, built from
`peftvlm.metrics` by `peftvlm.rewards`), and each reply is made more or less likely by how its
reward compares with its group's (TRL's GRPOTrainer, Shao et al. 2024).

Rows are the SFT rows the data layer reads (any format, the vqa / doc_qa / caption / grounding
templates): the prompt is every turn before the last answer, the references the row's
`references` or that last answer. Rollouts use transformers' `generate` (vLLM with
`train.grpo.use_vllm` on a CUDA GPU); the reference, when `beta` > 0, is the base with the
adapter disabled. The guards are in `grpo_trainer`.
"""

from __future__ import annotations

import re

from peftvlm.errors import DataError
from peftvlm.trainers.objectives.refusals import Refusals


class GRPOObjective:
    name = "grpo"

    refusals = Refusals(
        objective="grpo", trainer="GRPOTrainer",
        dual_encoder_family="{family} is a dual encoder, which samples no replies to reward: "
                            "only generative VLMs train with grpo",
        dual_encoder_method="method {method!r} trains dual encoders (use objective: sft)",
        adapter_not_switched="method {method!r} adds modules that peft's disable_adapter does "
                             "not switch off, so neither TRL's rollouts nor its reference (the "
                             "base with the adapter disabled) would be what they claim: use "
                             "lora, qlora, dora or vera",
        settings={"train.packing": "rollouts are generated per prompt",
                  "train.group_by_length": "TRL samples prompts in groups of num_generations",
                  "streaming": "TRL's sampler repeats rows by index"})

    def refusal(self, recipe, family, method) -> str | None:
        """What GRPO cannot run on, from the recipe alone (no weights, no torch)."""
        return self.refusals.refusal(recipe, family, method)

    def check_data(self, data) -> None:
        """Every training row needs a reference: a last assistant turn (or `references`)."""
        rows = data.train
        for i in range(len(rows)):
            row = rows[i]
            if not any(m["role"] == "assistant" for m in row["messages"]):
                raise DataError(f"{row.get('row_id') or f'row {i + 1}'}: GRPO needs a reference "
                                "answer (a last assistant turn, or `references`), and this row "
                                "has no reply", hint="end each conversation with the reference "
                                                     "answer the rewards compare replies with")

    def build_trainer(self, recipe, model, processor, collator, data, run_dir, report_to,
                      sharding, callbacks, log=print):
        # lazy: `validate` asks an objective for its refusal; its trainer imports TRL
        from peftvlm.rewards import build_rewards
        from peftvlm.trainers.objectives.grpo_trainer import build_grpo_trainer

        rewards = build_rewards(recipe.train.rewards, recipe.base_dir(),
                                recipe.train.allow_custom_rewards)
        log("grpo: rewards " + ", ".join(f"{f.__name__} x {s.weight:g}"
                                         for f, s in zip(rewards, recipe.train.rewards)))
        return build_grpo_trainer(recipe, model, processor, collator.family, data.train, run_dir,
                                  report_to, sharding, callbacks, rewards)

    def preview_row(self, collator, row: dict, index: int, console) -> dict:
        """`data preview`: the prompt as rollouts see it (the chat template's generation
        prompt included, image runs counted) and the references the rewards compare with."""
        from rich.rule import Rule
        from rich.text import Text

        from peftvlm.data.collate import encode_prompts
        from peftvlm.eval.generate import row_references

        ids = encode_prompts(collator.processor, collator.family, [row])["input_ids"][0].tolist()
        token = collator.family.image_token
        text = collator.processor.tokenizer.decode(ids)
        count = text.count(token) if token else 0
        if token:  # each image's run of tokens, shown counted
            text = re.sub(f"(?:{re.escape(token)}){{4,}}",
                          lambda m: f"{token}x{len(m.group(0)) // len(token)}", text)
        references = row_references(row)
        named = f" ({row['row_id']})" if row.get("row_id") else ""
        console.print(Rule(f"example {index}{named}: GRPO prompt, {len(ids)} tokens, {count} "
                           f"image tokens ({len(row['images'])} image(s))", align="left"))
        console.print(Text(text, style="dim"))
        console.print(Text("references: ", style="bold") + Text(" | ".join(references),
                                                                 style="bold green"))
        return {"row_id": row.get("row_id"), "prompt_tokens": len(ids), "image_tokens": count,
                "images": len(row["images"]), "references": references}

    def summary(self, log_history: list[dict]) -> dict:
        """The last logged mean of each reward and the summed reward per logged step."""
        logged = [e for e in log_history if "reward" in e]
        if not logged:
            return {"grpo": {}}
        last = logged[-1]
        return {"grpo": {
            "rewards": {k.split("/")[1]: round(v, 6) for k, v in last.items()
                        if k.startswith("rewards/") and k.endswith("/mean") and v is not None},
            "reward": round(last["reward"], 6),
            "reward_curve": [[e["step"], round(e["reward"], 6)] for e in logged]}}


GRPO = GRPOObjective()
