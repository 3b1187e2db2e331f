"""What a merged export writes for vLLM / SGLang: the training chat template without its loss
markers (same rendered text), and the run's decoding in generation_config (every family)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from peftvlm.export_serving import prepare_for_serving, serving_chat_template
from peftvlm.families import FAMILIES

TEMPLATED = [name for name, f in FAMILIES.items() if f.training_chat_template and f.tiny_name]
CONVERSATION = [
    {"role": "system", "content": [{"type": "text", "text": "Answer in one word."}]},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
    {"role": "user", "content": [{"type": "text", "text": "And now?"}]},
]


def test_generation_markers_are_removed_and_nothing_else():
    template = "{% for m in messages %}{% generation %}{{ m }}{%- endgeneration -%}{% endfor %}"
    assert serving_chat_template(template) == "{% for m in messages %}{{ m }}{% endfor %}"


@pytest.mark.parametrize("name", TEMPLATED)
def test_serving_template_renders_what_training_rendered(name):
    from transformers import GenerationConfig

    from peftvlm.models import load_processor_only
    from peftvlm.recipe import EvalConfig, ModelConfig

    family = FAMILIES[name]
    processor, _ = load_processor_only(ModelConfig(id=family.tiny_name))
    trained = processor.apply_chat_template(CONVERSATION, chat_template=family
                                            .training_chat_template, add_generation_prompt=True,
                                            tokenize=False)
    model = SimpleNamespace(generation_config=GenerationConfig())
    report = prepare_for_serving(model, processor, family, EvalConfig(max_new_tokens=7))
    assert "endgeneration" not in processor.chat_template
    assert processor.apply_chat_template(CONVERSATION, add_generation_prompt=True,
                                         tokenize=False) == trained
    config = model.generation_config
    assert config.max_new_tokens == 7 and config.do_sample is False
    stops = config.eos_token_id if isinstance(config.eos_token_id, list) else [
        config.eos_token_id]
    tok = processor.tokenizer
    assert tok.convert_tokens_to_ids(family.end_of_turn) in stops
    assert tok.eos_token_id in stops and config.pad_token_id == tok.pad_token_id
    assert report["generation_config"]["max_new_tokens"] == 7
