"""LoRA / DoRA / VeRA on each family with a tiny model: right parameters train, step changes
exactly them, save -> reload and merge reproduce the adapter model's logits."""

from __future__ import annotations

import random

import pytest
import torch

from peftvlm.data.collate import ConversationCollator
from peftvlm.data.synthetic import COLOURS, draw_shape, vqa_row
from peftvlm.families import FAMILIES
from peftvlm.methods.lora import DoraMethod, LoraMethod, VeraMethod
from peftvlm.models import load_base, tiny_model_path
from peftvlm.recipe import ModelConfig
from peftvlm.registry import get_method

TINY_FAMILIES = [f.tiny_name for f in FAMILIES.values() if f.tiny_name and f.kind == "generative"]
METHODS = {"lora": LoraMethod(r=4), "dora": DoraMethod(r=4), "vera": VeraMethod(r=8)}


def colour_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        colour = rng.choice(list(COLOURS))
        row = vqa_row("unused.png", colour)
        row["images"] = [draw_shape(rng, COLOURS[colour], 32)]
        rows.append(row)
    return rows


def load(tiny: str):
    tiny_model_path(tiny)
    return load_base(ModelConfig(id=tiny))


def adapted(tiny: str, method_cfg):
    loaded = load(tiny)
    torch.manual_seed(0)
    model = get_method(method_cfg.name).apply(loaded.model, loaded.family, method_cfg)
    return loaded, model


def batch_for(loaded, n=4):
    return ConversationCollator(loaded.processor, loaded.family)(colour_rows(n))


def train_steps(model, batch, lr=0.5, steps=2, params=None):
    """SGD steps; two, because LoRA's A (and VeRA's d) get zero gradient while B (b) is zero.
    `params`: what SGD steps (parameters or groups; default: every trainable parameter)."""
    opt = torch.optim.SGD(params or [p for p in model.parameters() if p.requires_grad], lr=lr)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    return before


@pytest.mark.parametrize("tiny", TINY_FAMILIES)
@pytest.mark.parametrize("method", list(METHODS))
def test_training_changes_exactly_the_trainable_parameters(tiny, method):
    loaded, model = adapted(tiny, METHODS[method])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "nothing trains"
    language = loaded.family.language_module
    for name in trainable:
        assert language in name, f"{name} is outside the language model"
    before = train_steps(model, batch_for(loaded))
    for name, p in model.named_parameters():
        changed = not torch.equal(before[name], p.detach())
        if name in trainable:
            assert changed, f"trainable {name} did not change"
        elif name not in trainable:
            assert not changed, f"frozen {name} changed"


@pytest.mark.parametrize("tiny", TINY_FAMILIES)
@pytest.mark.parametrize("method", list(METHODS))
def test_save_reload_and_merge_reproduce_logits(tiny, method, tmp_path):
    from peft import PeftModel

    loaded, model = adapted(tiny, METHODS[method])
    batch = batch_for(loaded)
    train_steps(model, batch, lr=0.5)  # make the adapter non-zero
    model.eval()
    with torch.no_grad():
        reference = model(**batch).logits
        model.save_pretrained(tmp_path / "adapter")
        reloaded = PeftModel.from_pretrained(load(tiny).model, tmp_path / "adapter").eval()
        assert torch.equal(reloaded(**batch).logits, reference)
        base = load(tiny).model.eval()
        assert not torch.allclose(base(**batch).logits, reference, atol=1e-4), "adapter is a no-op"
        merged = model.merge_and_unload()
        assert (merged(**batch).logits - reference).abs().max() <= 1e-4


def test_target_presets_reach_the_named_parts():
    loaded, model = adapted("tiny-llava", LoraMethod(r=2, target="all",
                                                     modules_to_save=["projector"]))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    fam = loaded.family
    assert any(fam.vision_module in n and "lora_" in n for n in names)
    assert any(fam.language_module in n and "lora_" in n for n in names)
    assert any(fam.projector_module in n and "modules_to_save" in n for n in names)
    _, vision_only = adapted("tiny-llava", LoraMethod(r=2, target="vision"))
    names = [n for n, p in vision_only.named_parameters() if p.requires_grad]
    assert names and all(fam.vision_module in n for n in names)


def test_regex_that_matches_nothing_is_a_clear_error():
    from peftvlm.errors import RecipeError

    with pytest.raises(RecipeError, match="method.target"):
        adapted("tiny-llava", LoraMethod(target_regex=r"nothing\.here"))
