"""TRL's DPOTrainer on a peftvlm model: our collator, our recipe's settings, the reference
being the base with the adapter disabled, and a stop on a non-finite margin."""

from __future__ import annotations

import math
import types
from pathlib import Path

import trl
from transformers import TrainerCallback

from peftvlm.data.prepare.table import Rows
from peftvlm.data.read.preference import PreferenceCollator, is_preference_row
from peftvlm.errors import RunError
from peftvlm.recipe.schema import DPOConfig as DPOSettings
from peftvlm.trainers.lm_head import fit_fused_head, outputs_from_logits
from peftvlm.trainers.sft import PASSTHROUGH, StopsOnSignals


class DPOTrainer(StopsOnSignals, trl.DPOTrainer):
    """TRL's DPOTrainer without the reference copy of the adapter it adds to a peft model:
    `use_adapter(model, None)` then disables the adapter, and the base is the reference.
    Ctrl-C / SIGTERM save a checkpoint and raise `Interrupted`, as SFT's trainer does."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        drop_reference_adapter(self.model)


def use_logits_head(model) -> None:
    """For a family TRL's fused LM head cannot run on (`FamilySpec.unfused_lm_head`: BLIP-2),
    TRL's head outputs derived from the model's own logits (`trainers.lm_head`), plus the
    per-token mean logit DPO's `logits/chosen` metrics read."""
    trl_forward = model.forward  # TRL's patch: the model's forward unless fused_lm_head=True

    def forward(self, *args, fused_lm_head=False, labels=None, **kwargs):
        if not fused_lm_head:
            return trl_forward(*args, **kwargs, **({} if labels is None else {"labels": labels}))
        logits = trl_forward(*args, **{**kwargs, "use_cache": False}).logits
        out = outputs_from_logits(logits, labels)
        out.mean_logits = logits[:, :-1].detach().mean(-1).masked_fill(~out.label_mask, 0)
        return out

    model.forward = types.MethodType(forward, model)


def drop_reference_adapter(model) -> None:
    """Remove the "ref" adapter TRL copies from "default" (a fresh adapter's copy is the base
    anyway; kept, it would be saved beside the trained one and double the checkpoints)."""
    if "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")
        model.set_adapter("default")


class FiniteDPOMetrics(TrainerCallback):
    """Stop with a clear error when DPO's loss, margin or rewards stop being finite: a run that
    goes on would report numbers that mean nothing."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        bad = {k: v for k, v in (logs or {}).items()
               if (k == "loss" or k.startswith(("rewards/", "logps/")))
               and isinstance(v, float) and not math.isfinite(v)}
        if bad:
            raise RunError(f"DPO at step {state.global_step}: {', '.join(bad)} not finite "
                           f"({bad})", hint="lower train.learning_rate, or raise train.dpo.beta")
        return control


class HeldOutPreferenceAccuracy(TrainerCallback):
    """Before and after training, the share of held-out pairs whose chosen reply the model
    finds more likely than the rejected one (summed log-probabilities of the reply tokens),
    logged as `eval_preference_accuracy` (and `eval_preference_margin`, the mean difference)."""

    def __init__(self, rows: list[dict], collator: PreferenceCollator, batch_size: int):
        self.rows, self.collator, self.batch_size = rows, collator, batch_size
        self.trainer = None  # set once the trainer exists: its `log` writes the history

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.trainer.log(preference_scores(model, self.collator, self.rows, self.batch_size))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.trainer.log(preference_scores(model, self.collator, self.rows, self.batch_size))


def preference_scores(model, collator: PreferenceCollator, rows: list[dict],
                      batch_size: int = 8) -> dict:
    """Held-out preference accuracy and mean log-probability margin of `model` on `rows`."""
    import torch

    was_training = model.training
    model.eval()
    margins = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = collator(rows[start:start + batch_size])
            chosen, rejected = reply_logps(model, batch).chunk(2)
            margins.extend((chosen - rejected).tolist())
    model.train(was_training)
    return {"eval_preference_accuracy": sum(m > 0 for m in margins) / len(margins),
            "eval_preference_margin": sum(margins) / len(margins)}


def reply_logps(model, batch: dict):
    """Summed log-probabilities of each row's reply tokens (`completion_mask`)."""
    import torch

    mask = batch.pop("completion_mask").to(model.device)
    inputs = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v
              for k, v in batch.items()}
    logits = model(**inputs, use_cache=False).logits[:, :-1].float()
    targets = inputs["input_ids"][:, 1:]
    logps = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    return (logps * mask[:, 1:]).sum(-1)


def dpo_config(recipe, run_dir: Path, report_to: list[str], sharding: dict | None):
    """TRL's DPOConfig from the recipe's `train` (shared fields as SFT's) and `train.dpo`."""
    import torch
    from trl import DPOConfig

    train = recipe.train
    on_gpu = torch.cuda.is_available()
    bf16 = train.bf16 if train.bf16 is not None else (on_gpu and torch.cuda.is_bf16_supported())
    return DPOConfig(
        output_dir=str(run_dir / "checkpoints"), use_cpu=not on_gpu, bf16=bf16 and on_gpu,
        report_to=report_to, run_name=recipe.name, remove_unused_columns=False,
        max_length=None,  # rows over train.max_length were dropped (or refused) already
        save_only_model=False, disable_tqdm=False,
        **{k: getattr(train, k) for k in PASSTHROUGH},
        **(train.dpo or DPOSettings()).model_dump(), **(sharding or {}))


def build_dpo_trainer(recipe, model, processor, collator, data, run_dir: Path, report_to,
                      sharding, callbacks):
    """A DPOTrainer over `data.train`'s preference rows (a `table.Rows` view or a list of
    dicts); held-out preference rows, if any, are scored before and after training."""
    from datasets import Dataset

    rows = data.train
    dataset = rows.dataset if isinstance(rows, Rows) else Dataset.from_list(list(rows))
    pairs = PreferenceCollator(collator)
    held_out = [r for r in data.eval if is_preference_row(r)]
    scorer = HeldOutPreferenceAccuracy(held_out, pairs, recipe.eval.batch_size) if held_out else None
    trainer = DPOTrainer(model=model, args=dpo_config(recipe, run_dir, report_to, sharding),
                         train_dataset=dataset, data_collator=pairs, processing_class=processor,
                         callbacks=[*callbacks, FiniteDPOMetrics(), *filter(None, [scorer])])
    if scorer is not None:
        scorer.trainer = trainer
    fit_fused_head(trainer.args.device)
    if collator.family.loss_head == "logits":
        use_logits_head(trainer.model.get_base_model())
    return trainer
