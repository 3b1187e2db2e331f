"""Held-out evaluation of generative models: batched greedy generation, then metrics."""

from __future__ import annotations

from peftvlm.data.collate import encode_prompts, last_answer
from peftvlm.metrics import get_metrics
from peftvlm.metrics.files import score_predictions


def generate_answers(model, processor, family, rows: list[dict], batch_size: int = 16,
                     max_new_tokens: int = 16, progress: bool = False) -> list[str]:
    """Greedy answers to the prompt of each row (all turns before its last answer)."""
    import torch
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    answers = []
    starts = range(0, len(rows), batch_size)
    for start in tqdm(starts, desc="generating", disable=not progress, leave=False):
        batch = encode_prompts(processor, family, rows[start:start + batch_size])
        batch = {k: v.to(model.device) if hasattr(v, "to") else v for k, v in batch.items()}
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=processor.tokenizer.pad_token_id)
        new_tokens = out[:, batch["input_ids"].shape[1]:]
        answers += [t.strip() for t in processor.batch_decode(new_tokens, skip_special_tokens=True)]
    model.train(was_training)
    return answers


def evaluate_rows(model, processor, family, rows: list[dict], eval_cfg) -> dict:
    """Generate on `rows` and score every metric of the recipe's `eval` section."""
    rows = rows[: eval_cfg.max_samples] if eval_cfg.max_samples else rows
    predictions = generate_answers(model, processor, family, rows, eval_cfg.batch_size,
                                   eval_cfg.max_new_tokens)
    references = [last_answer(r["messages"]) for r in rows]
    result = score_predictions(get_metrics(eval_cfg.metrics), predictions,
                               [[ref] for ref in references])
    return {"scores": result["scores"], "notes": result["notes"], "predictions": predictions,
            "references": references}
