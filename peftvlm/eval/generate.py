"""Held-out evaluation of generative models: batched generation, then the recipe's metrics.

Used before/after training, every `train.eval_steps` during it, and by `peftvlm eval`; all three
go through `evaluate_rows`, so the same rows and settings give the same numbers.
"""

from __future__ import annotations

from peftvlm.data.batch.collate import encode_prompts, last_answer
from peftvlm.data.boxes import box_format_for
from peftvlm.metrics import get_metrics
from peftvlm.metrics.files import score_predictions


def generation_kwargs(eval_cfg) -> dict:
    """`generate()` options from a recipe's `eval` section (greedy unless it asks otherwise)."""
    kwargs = {"max_new_tokens": eval_cfg.max_new_tokens, "num_beams": eval_cfg.num_beams,
              "do_sample": eval_cfg.do_sample}
    if eval_cfg.do_sample:
        kwargs.update(temperature=eval_cfg.temperature, top_p=eval_cfg.top_p)
    return kwargs


def generate_answers(model, processor, family, rows: list[dict], batch_size: int = 16,
                     max_new_tokens: int = 16, progress: bool = False,
                     generation: dict | None = None) -> list[str]:
    """Answers to the prompt of each row (all turns before its last answer), generated in
    left-padded batches; `generation` overrides `generate()` options (default: greedy)."""
    import torch
    from tqdm.auto import tqdm

    options = {"max_new_tokens": max_new_tokens, "do_sample": False, **(generation or {})}
    was_training = model.training
    model.eval()
    answers = []
    starts = range(0, len(rows), batch_size)
    for start in tqdm(starts, desc="generating", disable=not progress, leave=False):
        batch = encode_prompts(processor, family, rows[start:start + batch_size])
        batch = {k: v.to(model.device) if hasattr(v, "to") else v for k, v in batch.items()}
        with torch.no_grad():
            out = model.generate(**batch, **options,
                                 pad_token_id=processor.tokenizer.pad_token_id)
        if family.decode is not None:
            answers += family.decode(processor, out, batch)
            continue
        new_tokens = out[:, batch["input_ids"].shape[1]:]
        answers += [t.strip() for t in processor.batch_decode(new_tokens, skip_special_tokens=True)]
    model.train(was_training)
    return answers


def row_references(row: dict) -> list[str]:
    """A row's `references` (e.g. VQA's 10 answers) when it has them, else its last answer."""
    refs = row.get("references")
    return [str(r) for r in refs] if refs else [last_answer(row["messages"])]


def evaluate_rows(model, processor, family, rows: list[dict], eval_cfg,
                  progress: bool = False) -> dict:
    """Generate on `rows` (the first `eval.max_samples`) and score every metric of the recipe's
    `eval` section; rows' `question_type` gives per-type scores (`vqa_accuracy/number`)."""
    rows = rows[: eval_cfg.max_samples] if eval_cfg.max_samples else rows
    predictions = generate_answers(model, processor, family, rows, eval_cfg.batch_size,
                                   eval_cfg.max_new_tokens, progress, generation_kwargs(eval_cfg))
    references = [row_references(r) for r in rows]
    box_format = box_format_for(family, processor)  # how grounding answers write boxes
    result = score_predictions(get_metrics(eval_cfg.metrics), predictions, references,
                               [{**{k: r[k] for k in ("question_type", "crowd") if k in r},
                                 "box_format": box_format} for r in rows])
    return {"scores": result["scores"], "notes": result["notes"],
            "higher_is_better": result["higher_is_better"], "predictions": predictions,
            "references": references}
