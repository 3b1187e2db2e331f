"""What a merged export needs to be served by vLLM / SGLang / `transformers serve` as trained.

Those servers render prompts with the folder's own chat template and take default sampling
settings from `generation_config.json`:

- `chat_template.jinja`: the processor saved beside the merged weights already carries the
  template training rendered conversations with (the checkpoint's own, or the family's stated
  deviation: `peftvlm.models.load_processor`), so served prompts are the trained ones; nothing
  to change here, the report says which template it is.
- `generation_config.json`: the recipe's `eval` decoding (what the run was scored with:
  max_new_tokens, greedy or sampling settings), the pad token, and every end-of-turn token as
  `eos_token_id`, so generation stops where training taught it to.
"""

from __future__ import annotations


def prepare_for_serving(model, processor, family, eval_cfg) -> dict:
    """Set the run's generation settings on `model` (saved afterwards by the caller, with the
    processor and its trained template); returns what was set, for the report."""
    report = {}
    if getattr(processor, "chat_template", None):
        override = family.chat_template
        report["chat_template"] = (f"peftvlm's {override} (the family's stated deviation)"
                                   if override else "the checkpoint's own")
    tokenizer = processor.tokenizer
    stop_ids = [tokenizer.eos_token_id]
    if family.end_of_turn:
        stop_ids.append(tokenizer.convert_tokens_to_ids(family.end_of_turn))
    stop_ids = sorted({i for i in stop_ids if i is not None and i != tokenizer.unk_token_id})
    config = model.generation_config
    config.max_new_tokens = eval_cfg.max_new_tokens
    config.do_sample, config.num_beams = eval_cfg.do_sample, eval_cfg.num_beams
    if eval_cfg.do_sample:
        config.temperature, config.top_p = eval_cfg.temperature, eval_cfg.top_p
    else:  # greedy: transformers warns about sampling settings left on a greedy config
        config.temperature = config.top_p = config.top_k = None
    config.eos_token_id = stop_ids[0] if len(stop_ids) == 1 else stop_ids
    config.pad_token_id = tokenizer.pad_token_id
    report["generation_config"] = {k: getattr(config, k) for k in (
        "max_new_tokens", "do_sample", "num_beams", "temperature", "top_p", "eos_token_id",
        "pad_token_id") if getattr(config, k) is not None}
    return report
