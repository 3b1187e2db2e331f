"""TRL's GRPOTrainer on a peftvlm model: rollouts sampled with transformers' `generate` from the
adapted policy, scored by the recipe's rewards (`peftvlm.rewards`), with guards against the
ways VLM GRPO is known to go silently wrong.

- Prompt padding (trl#5785): TRL left-pads the rollout prompts, then re-runs the processor on
  them for the pixel inputs; with a right-padding tokenizer the image-token types no longer
  line up with the prompt ids. The processor pads left here, and every generated batch is
  checked: each prompt carries exactly its own images' tokens, at the positions its token types
  mark (`check_rollout_prompts`), or the run stops with the row named.
- One decoder (trl#6401): images are decoded by `peftvlm.data.read.images` (as for SFT and eval),
  once per row, before TRL sees them.
- Reference: the base with the adapter disabled; TRL's "ref" copy of the adapter is dropped.
- A family with no chat template (PaliGemma) renders rollout prompts with its
  `rollout_template` (on a copy of the processor, so nothing saved carries it); a prefix-LM
  family's generated tokens get its `answer_token_type` in the loss's forward (TRL gives them 0,
  which would let every completion token attend to the ones after it).
- Rewards: each one is checked finite per completion (`finite_rewards`) and logged by TRL as
  `rewards/<name>/mean`; with W&B on, a table of sampled completions is logged too.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import trl

from peftvlm.data.batch.collate import open_image, process_texts, prompt_messages
from peftvlm.data.boxes import box_format_for
from peftvlm.data.prepare.table import image_struct
from peftvlm.errors import DataError, RecipeError, RunError
from peftvlm.eval.generate import row_references
from peftvlm.families.base import read_template
from peftvlm.recipe.schema import GRPOConfig as GRPOSettings
from peftvlm.trainers.lm_head import fit_fused_head
from peftvlm.trainers.sft import PASSTHROUGH, StopsOnSignals


class GRPOTrainer(StopsOnSignals, trl.GRPOTrainer):
    """TRL's GRPOTrainer with left-padded prompts, the base as the reference, and each
    generated batch's image tokens checked against its rows' images. Ctrl-C / SIGTERM save a
    checkpoint and raise `Interrupted`, as SFT's trainer does."""

    def __init__(self, *args, image_token: str | None = None,
                 answer_token_type: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.answer_token_type = answer_token_type
        drop_reference_adapter(self.model)
        self.processing_class.tokenizer.padding_side = "left"  # see the module's docstring
        tokenizer = self.processing_class.tokenizer
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token) if image_token else None
        self._expected_tokens: dict[str, int] = {}  # row id -> its prompt's image tokens

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self.image_token_id is not None:
            expected = [self.expected_image_tokens(x) for x in inputs]
            check_rollout_prompts(output, self.image_token_id, expected,
                                  [x.get("row_id", "?") for x in inputs],
                                  prefix_lm=self.answer_token_type is not None)
        return output

    def _tokenize_prompts(self, prompts: list):
        prompt_ids, images, fields = super()._tokenize_prompts(prompts)
        fields.pop("labels", None)  # PaliGemma's processor adds them (all -100 with no answer)
        return prompt_ids, images, fields

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask,
                                           logits_to_keep, *args, token_type_ids=None, **kwargs):
        # every log-probability TRL computes (policy, old, reference) passes here: the
        # completion is the last `logits_to_keep` tokens
        kwargs.pop("labels", None)  # the processor's prompt-only labels (PaliGemma): not inputs
        if token_type_ids is not None and self.answer_token_type is not None:
            token_type_ids = token_type_ids.clone()
            token_type_ids[:, -logits_to_keep:] = self.answer_token_type
        return super()._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, logits_to_keep, *args,
            token_type_ids=token_type_ids, **kwargs)

    def expected_image_tokens(self, row: dict) -> int:
        """The image tokens the processor writes for this row's prompt alone (cached per row)."""
        key = row.get("row_id") or json.dumps(row["prompt"], default=str)
        if key not in self._expected_tokens:
            prompt = trl.data_utils.prepare_multimodal_messages(row["prompt"], row["images"])
            text = self.processing_class.apply_chat_template(prompt, add_generation_prompt=True,
                                                             tokenize=False)
            ids = process_texts(self.processing_class, [text], [row["images"]])["input_ids"][0]
            self._expected_tokens[key] = int((ids == self.image_token_id).sum())
        return self._expected_tokens[key]


def drop_reference_adapter(model) -> None:
    """Remove the "ref" adapter TRL copies from "default" when beta > 0: `use_adapter(model,
    None)` then disables the adapter and the base is the reference (no second copy to hold,
    nothing extra saved beside the trained adapter)."""
    if "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")
        model.set_adapter("default")


def check_rollout_prompts(output: dict, image_token_id: int, expected: list[int],
                          row_ids: list, prefix_lm: bool = False) -> None:
    """Each rollout prompt (left-padded) holds exactly the image tokens its own images need,
    and where the batch carries token types (Gemma's token_type_ids, Qwen's mm_token_type_ids),
    the image type marks exactly those positions (`prefix_lm`: PaliGemma's types mark the
    answer, so every prompt token is 0); else a RunError naming the row."""
    ids, mask = output["prompt_ids"], output["prompt_mask"].bool()
    is_image = (ids == image_token_id) & mask
    for i, count in enumerate(is_image.sum(dim=1).tolist()):
        if count != expected[i]:
            raise RunError(f"GRPO rollout of row {row_ids[i]}: its prompt holds {count} image "
                           f"tokens where its images need {expected[i]}: the rollout would see "
                           "another row's pixels or none",
                           hint="report this with the model id; train with objective: sft "
                                "meanwhile")
    for key in ("token_type_ids", "mm_token_type_ids"):
        if key in output:
            types = output[key][:, : ids.shape[1]]
            marked = is_image & (not prefix_lm)  # a prefix-LM prompt has no token of type 1
            wrong = ((types == 1) & mask) != marked
            if wrong.any():
                row = int(wrong.any(dim=1).nonzero()[0])
                raise RunError(f"GRPO rollout of row {row_ids[row]}: {key} mark other positions "
                               "than the prompt's image tokens (padding sides disagree: "
                               "trl#5785), so logits, KL and gradients would be wrong",
                               hint="the processor must pad left for GRPO; report this with "
                                    "the model id")


def finite_rewards(func):
    """A reward function whose scores are checked: a NaN or infinite score stops the run,
    naming the reward (None, TRL's "not scored", passes)."""

    def reward(prompts, completions, **columns):
        scores = func(prompts=prompts, completions=completions, **columns)
        bad = [s for s in scores if s is not None and not math.isfinite(s)]
        if bad:
            raise RunError(f"reward {func.__name__} gave non-finite scores {bad[:3]}",
                           hint="rewards must return finite floats (or None: not scored)")
        return scores

    reward.__name__ = reward.__qualname__ = func.__name__
    return reward


def grpo_config(recipe, run_dir: Path, report_to: list[str], sharding: dict | None):
    """TRL's GRPOConfig from the recipe's `train` (shared fields as SFT's), `train.grpo` and
    the rewards' weights; vLLM rollouts are refused without a CUDA device."""
    import torch
    from trl import GRPOConfig

    train = recipe.train
    settings = train.grpo or GRPOSettings()
    on_gpu = torch.cuda.is_available()
    if settings.use_vllm and not on_gpu:
        raise RecipeError("train.grpo.use_vllm: vLLM rollouts need a CUDA GPU, and this machine "
                          "has none", hint="set train.grpo.use_vllm: false (rollouts with "
                                           "transformers' generate)")
    bf16 = train.bf16 if train.bf16 is not None else (on_gpu and torch.cuda.is_bf16_supported())
    fields = settings.model_dump(exclude={"log_completions"})
    log_completions = settings.log_completions
    if log_completions is None:
        log_completions = "wandb" in report_to
    return GRPOConfig(
        output_dir=str(run_dir / "checkpoints"), use_cpu=not on_gpu, bf16=bf16 and on_gpu,
        report_to=report_to, run_name=recipe.name, remove_unused_columns=False,
        save_only_model=False, disable_tqdm=False, log_completions=log_completions,
        num_completions_to_print=4, reward_weights=[r.weight for r in train.rewards],
        **{k: getattr(train, k) for k in PASSTHROUGH}, **fields, **(sharding or {}))


def grpo_record(row: dict, box_format: str | None) -> dict:
    """A GRPO row: the prompt (every turn before the last answer), the images' paths, the
    references (the row's `references`, else its last answer) and the family's box format."""
    if not any(m["role"] == "assistant" for m in row["messages"]):
        raise DataError(f"row {row.get('row_id', '?')}: GRPO needs a reference answer (a last "
                        "assistant turn, or `references`), and this row has no reply",
                        hint="end each conversation with the reference answer")
    if row.get("videos"):
        raise DataError(f"row {row.get('row_id', '?')}: GRPO rollouts take images, not videos",
                        hint="drop video rows from GRPO data (SFT trains on them)")
    return {"prompt": json.dumps(prompt_messages(row["messages"])),
            # paths, bytes or PIL images, as one Arrow type (decoded per batch)
            "images": [image_struct(str(i) if isinstance(i, Path) else i) for i in row["images"]],
            "references": row_references(row), "box_format": box_format,
            "row_id": str(row.get("row_id") or "")}


def decode_records(batch: dict) -> dict:
    """The dataset's transform: prompts as messages, images opened by peftvlm's one decoder."""
    return {**batch, "prompt": [json.loads(p) for p in batch["prompt"]],
            "images": [[open_image(i) for i in images] for images in batch["images"]]}


def grpo_dataset(rows, box_format: str | None):
    """A `datasets.Dataset` of GRPO rows (TRL's `prompt` + `images` + reference columns)."""
    from datasets import Dataset

    dataset = Dataset.from_list([grpo_record(rows[i], box_format) for i in range(len(rows))])
    dataset.set_transform(decode_records)
    return dataset


def build_grpo_trainer(recipe, model, processor, family, train_rows, run_dir: Path,
                       report_to: list[str], sharding, callbacks, reward_funcs: list):
    """A GRPOTrainer over the training rows, rewarded by `reward_funcs` (`build_rewards`)."""
    dataset = grpo_dataset(train_rows, box_format_for(family, processor))
    trainer = GRPOTrainer(model=model, args=grpo_config(recipe, run_dir, report_to, sharding),
                          reward_funcs=[finite_rewards(f) for f in reward_funcs],
                          train_dataset=dataset,
                          processing_class=rollout_processor(processor, family),
                          callbacks=list(callbacks), image_token=family.image_token,
                          answer_token_type=family.answer_token_type)
    fit_fused_head(trainer.args.device)
    return trainer


def rollout_processor(processor, family):
    """The processor TRL renders rollout prompts with: the family's own, or, for a family with
    a `rollout_template`, a shallow copy carrying it (the run's saved processor stays as the
    checkpoint ships it)."""
    if not family.rollout_template:
        return processor
    rollout = copy.copy(processor)
    rollout.chat_template = read_template(family.rollout_template)
    return rollout
