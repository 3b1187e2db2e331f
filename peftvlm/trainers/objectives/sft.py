"""Supervised fine-tuning: the replies are imitated token by token (TRL's SFTTrainer, with
peftvlm's assistant-only collator, packing, streaming and several-process batches)."""

from __future__ import annotations


class SFTObjective:
    name = "sft"

    def refusal(self, recipe, family, method) -> str | None:
        return None  # every model and method peftvlm trains, trains with SFT

    def check_data(self, data) -> None:
        return None  # conversations; preference rows train on their chosen reply

    def build_trainer(self, recipe, model, processor, collator, data, run_dir, report_to,
                      sharding, callbacks, log=print):
        # lazy: `validate` asks an objective for its refusal; its trainer imports TRL
        from peftvlm.data.batch.mixed import for_training
        from peftvlm.data.batch.packing import describe_bins, train_collator, train_items
        from peftvlm.trainers.sft import build_trainer, sft_config

        args = sft_config(recipe.train, run_dir, report_to, recipe.name, sharding)
        # several processes: text-only batches carry a zero-weighted image, so no rank hangs
        # (with packing, the blank image's tokens are a block of their own that nothing
        # attends to)
        collator = for_training(train_collator(collator, recipe.train.packing, model))
        items = train_items(data.train, recipe.train.packing, recipe.train.max_length)
        if data.streaming:  # a stream's position goes into each checkpoint, before it is
            # marked complete
            from peftvlm.data.stream.streaming import StreamCheckpoint, StreamCollator

            collator = StreamCollator(collator, data.train)
            callbacks = [callbacks[0], StreamCheckpoint(data.train, log), *callbacks[1:]]
        if recipe.train.packing:
            log(describe_bins(items))
        trainer = build_trainer(model, processor, collator, items, args, callbacks,
                                family=collator.family,
                                group_by_length=recipe.train.group_by_length)
        if recipe.train.group_by_length is None and trainer.grouped_by_length:
            log("rows vary in length: batching rows of similar length (train.group_by_length "
                "unset; set it to false for random batches)")
        return trainer

    def summary(self, log_history: list[dict]) -> dict:
        return {}


SFT = SFTObjective()
