"""Generative VLM training through TRL's `SFTTrainer`, with our assistant-only collator.

TRL's flags that trip people up on CPU (bf16 and `use_cpu`) are derived from the hardware; the
recipe's `train` section maps one-to-one onto `SFTConfig` fields of the same names.
"""

from __future__ import annotations

from pathlib import Path

import trl
from transformers import TrainerCallback

from peftvlm.checkpoints import (complete_checkpoints, describe_resume, last_complete_checkpoint,
                                 mark_complete)
from peftvlm.data.batch.packing import PackedRows, group_by_default, seeded_length_grouped_sampler
from peftvlm.data.prepare.table import Rows
from peftvlm.data.stream.streaming import StreamingRows
from peftvlm.trainers.lm_head import fit_fused_head, use_logits_head
from peftvlm.trainers.signals import Interrupted, StopSignals, any_rank

# Recipe `train` fields passed to SFTConfig unchanged (the names are Hugging Face's).
PASSTHROUGH = ("learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
               "gradient_accumulation_steps", "lr_scheduler_type", "warmup_steps", "weight_decay",
               "max_grad_norm", "optim", "optim_args", "logging_steps", "save_steps",
               "save_total_limit", "seed", "gradient_checkpointing", "dataloader_num_workers",
               "ddp_find_unused_parameters")


def sft_config(train_cfg, run_dir: Path, report_to: list[str], run_name: str | None,
               sharding: dict | None = None):
    """The SFTConfig for a recipe's `train` section on this machine's hardware; `sharding` holds
    the resolved fsdp / fsdp_config / deepspeed fields (`peftvlm.distributed.sharding_args`)."""
    import torch
    from trl import SFTConfig

    on_gpu = torch.cuda.is_available()
    bf16 = train_cfg.bf16 if train_cfg.bf16 is not None else (on_gpu and torch.cuda.is_bf16_supported())
    args = {k: getattr(train_cfg, k) for k in PASSTHROUGH}
    # train.group_by_length is transformers 4's flag; transformers 5 names the sampler instead.
    args["train_sampling_strategy"] = "group_by_length" if train_cfg.group_by_length else "random"
    return SFTConfig(
        output_dir=str(run_dir / "checkpoints"), use_cpu=not on_gpu, bf16=bf16 and on_gpu,
        report_to=report_to, run_name=run_name, remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True}, assistant_only_loss=False,
        max_length=None, save_only_model=False, disable_tqdm=False, **args,
        **(sharding or {}))


class StopOnInterrupt(TrainerCallback):
    """Ctrl-C or SIGTERM finishes the current step, saves a checkpoint and stops, so no work is
    lost; `SFTTrainer.train` then raises `Interrupted` naming the checkpoint
    (`peftvlm.trainers.signals`)."""

    def __init__(self):
        self.signals = StopSignals()
        self.stopped_at: int | None = None  # the step the run stopped after, on a signal

    @property
    def interrupted(self) -> bool:
        return self.stopped_at is not None or self.signals.received is not None

    def on_train_begin(self, args, state, control, **kwargs):
        self.signals.install()

    def on_step_end(self, args, state, control, **kwargs):
        if any_rank(self.signals.received is not None, args.device):
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.signals.uninstall()

    def raise_if_interrupted(self, output_dir: str | Path, step: int) -> None:
        """After training: `Interrupted` naming the checkpoint saved at the stop, if any."""
        if not self.interrupted:
            return
        found = complete_checkpoints(Path(output_dir).parent)
        raise Interrupted(self.signals.received, step, found[-1] if found else None)


class PeriodicEval(TrainerCallback):
    """Every `every` steps, score held-out generation metrics and log them as `eval_<metric>`
    through `log` (the trainer's `log`): they land in the log history, so in checkpoints and
    summary.json's eval_history, and W&B's callback shows them as `eval/<metric>`."""

    def __init__(self, scores, every: int, log):
        self.scores, self.every, self.log = scores, every, log

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0:
            values = self.scores(model)
            self.log({f"eval_{k}": v for k, v in values.items() if v is not None})
        return control


def last_checkpoint(run_dir: Path, log=print) -> str | None:
    """The newest complete checkpoint (torn ones are moved aside, see `peftvlm.checkpoints`),
    named in the log as the one the run resumes from."""
    found = last_complete_checkpoint(run_dir, log)
    if found:
        log(describe_resume(found))
    return str(found) if found else None


class MarkCheckpointComplete(TrainerCallback):
    """Once the trainer has written a checkpoint (on_save comes after every file), record it as
    complete, so --resume never picks one that a kill cut short."""

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if args.should_save and folder.is_dir():
            mark_complete(folder)
        return control


class StopsOnSignals:
    """A Trainer mixin (SFT, DPO...): a run stopped by Ctrl-C or SIGTERM raises `Interrupted`
    once every callback has seen the end of training."""

    def train(self, *args, **kwargs):
        stoppers = [c for c in self.callback_handler.callbacks if isinstance(c, StopOnInterrupt)]
        try:
            result = super().train(*args, **kwargs)
        finally:  # an error mid-training skips on_train_end: give the signals back all the same
            for stopper in stoppers:
                stopper.signals.uninstall()
        for stopper in stoppers:
            stopper.raise_if_interrupted(self.args.output_dir, self.state.global_step)
        return result


class SFTTrainer(StopsOnSignals, trl.SFTTrainer):
    """TRL's SFTTrainer; a model that names its own optimiser parameter groups
    (`optimizer_param_groups(lr, weight_decay)`, e.g. `per_part`: one group per part, each at
    its own learning rate) gets them, in the optimiser `train.optim` names."""

    row_lengths: list[int] | None = None  # token lengths of the training rows (cached column)
    loss_head = "fused"  # the family's `FamilySpec.loss_head`
    stream = None  # streaming.StreamingRows: batches come from it (train_dataset: its source)

    def get_train_dataloader(self):
        if self.stream is None:
            return super().get_train_dataloader()
        return self.stream.dataloader(self._train_batch_size, self.data_collator,
                                      self.args.device)

    def _get_train_sampler(self, train_dataset=None):
        # Give LengthGroupedSampler the counted lengths: it would otherwise read the `length`
        # column through the dataset's decoding transform, or tokenise every row itself.
        if self.args.train_sampling_strategy == "group_by_length" and self.row_lengths:
            return seeded_length_grouped_sampler(
                self.args.train_batch_size * self.args.gradient_accumulation_steps,
                self.row_lengths, self.args.data_seed if self.args.data_seed is not None
                else self.args.seed)
        return super()._get_train_sampler(train_dataset)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.loss_head == "own":  # `FamilySpec.own_loss` says why (Florence-2)
            import transformers

            return transformers.Trainer.compute_loss(self, model, inputs, return_outputs,
                                                     num_items_in_batch)
        counted = getattr(self, "_total_train_tokens", 0)
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.model.training and "attention_mask" not in inputs and "position_ids" in inputs:
            # Packed rows (`train.packing`) carry no attention mask, and TRL then counts
            # `position_ids.size(1)`: one row's length, or the batch size for Qwen-VL's
            # (4, rows, tokens). Count the real tokens: all but the rows' padded tails.
            pad = self.processing_class.tokenizer.pad_token_id
            tail = (inputs["input_ids"] == pad) & (inputs["labels"] == -100)
            real = inputs["input_ids"].new_tensor(inputs["input_ids"].numel() - int(tail.sum()))
            real = int(self.accelerator.gather_for_metrics(real).sum())
            self._total_train_tokens = counted + real
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
        return result

    _flos_params: int | None = None  # the model's non-embedding parameters, counted once

    def floating_point_ops(self, inputs) -> int:
        """Trainer's estimate (6 x tokens x non-embedding parameters) for `total_flos`, with the
        parameters counted once: transformers recounts them every step, a walk over every
        module of the model (~10k `named_modules` calls a step on tiny-llava with LoRA)."""
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if main_input not in inputs or not hasattr(self.model, "num_parameters"):
            return 0
        if self._flos_params is None:
            self._flos_params = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs[main_input].numel() * self._flos_params

    def create_optimizer(self, model=None):
        groups_of = getattr(self.model, "optimizer_param_groups", None)
        if self.optimizer is None and groups_of is not None:
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
            self.optimizer = cls(groups_of(self.args.learning_rate, self.args.weight_decay),
                                 **kwargs)
        return super().create_optimizer(model)


def full_state_dict(trainer):
    """Under FSDP the full (unsharded) state dict, gathered collectively: call on every rank.
    None elsewhere, where `save_pretrained` reads the model itself."""
    if getattr(trainer, "is_fsdp_enabled", False):
        return trainer.accelerator.get_state_dict(trainer.model)
    return None


def build_trainer(model, processor, collator, train_rows, args, callbacks=(), family=None,
                  group_by_length: bool | None = False):
    """An SFTTrainer over conversation rows (a `table.Rows` Arrow view, decoded per batch, a
    list of dicts, `streaming.StreamingRows`, or with `train.packing` the rows' bins,
    `packing.PackedRows`), collated by `collator`. A `family` that TRL's fused LM head cannot
    run on (`FamilySpec.unfused_lm_head`) gets the loss from its logits (`lm_head`); one that
    trains on its own loss (`FamilySpec.own_loss`: Florence-2) gets that.
    `group_by_length` None (the recipe left `train.group_by_length` unset) groups rows by
    length when their cached lengths vary (`packing.group_by_default`); the trainer's
    `grouped_by_length` says what was decided."""
    from datasets import Dataset

    lengths = None
    if isinstance(train_rows, StreamingRows):  # TRL checks its raw records; batches: the rows
        dataset = train_rows.stream
    elif isinstance(train_rows, PackedRows):  # items are bins; group_by_length groups bins
        dataset, lengths = train_rows.dataset, train_rows.lengths
    elif isinstance(train_rows, Rows):
        dataset = train_rows.dataset
        if "length" in train_rows.table.column_names:
            lengths = train_rows.lengths().tolist()
    else:
        dataset = Dataset.from_list(train_rows)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                         processing_class=processor, callbacks=list(callbacks))
    trainer.loss_head = family.loss_head if family is not None else "fused"
    fit_fused_head(trainer.args.device)
    if trainer.loss_head == "logits":
        from accelerate.utils import is_peft_model

        use_logits_head(trainer.model.get_base_model() if is_peft_model(trainer.model)
                        else trainer.model)  # where TRL installed its head
    trainer.row_lengths = lengths
    if group_by_length is None and lengths and group_by_default(
            lengths, args.train_batch_size * args.gradient_accumulation_steps):
        trainer.args.train_sampling_strategy = "group_by_length"
    trainer.grouped_by_length = trainer.args.train_sampling_strategy == "group_by_length"
    if isinstance(train_rows, StreamingRows):
        trainer.stream = train_rows
    return trainer
