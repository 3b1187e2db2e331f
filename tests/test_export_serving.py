"""What a merged export writes for vLLM / SGLang besides the trained template (which the saved
processor carries, tests/test_export.py): the run's decoding in generation_config."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from peftvlm.export.serving import prepare_for_serving
from peftvlm.families import FAMILIES

TEMPLATED = [name for name, f in FAMILIES.items()
             if f.kind == "generative" and f.encode is None and f.tiny_name]


@pytest.mark.parametrize("name", TEMPLATED)
def test_merged_export_stops_and_decodes_as_the_run_was_scored(name):
    from transformers import GenerationConfig

    from peftvlm.models import load_processor_only
    from peftvlm.recipe.schema import EvalConfig, ModelConfig

    family = FAMILIES[name]
    processor, _ = load_processor_only(ModelConfig(id=family.tiny_name))
    model = SimpleNamespace(generation_config=GenerationConfig())
    report = prepare_for_serving(model, processor, family, EvalConfig(max_new_tokens=7))
    # the template that trained is saved as it is (tests/test_export.py checks the folder)
    assert ("deviation" in report["chat_template"]) == (family.chat_template is not None)
    config = model.generation_config
    assert config.max_new_tokens == 7 and config.do_sample is False
    stops = config.eos_token_id if isinstance(config.eos_token_id, list) else [
        config.eos_token_id]
    tok = processor.tokenizer
    assert tok.convert_tokens_to_ids(family.end_of_turn) in stops
    assert tok.eos_token_id in stops and config.pad_token_id == tok.pad_token_id
    assert report["generation_config"]["max_new_tokens"] == 7
