"""The 2026 families' own behaviour: registry-derived lists, validate-time refusals, anyres and
tile token counting, Llama 3.2 Vision's cross-attention targets, BLIP-2's Q-Former preset,
Gemma 3's token_type_ids, and the rows a family cannot take.

Run: PYTHONPATH=. python -m pytest tests/test_families_2026.py -q
"""

from __future__ import annotations

import random

import pytest
import torch
import yaml

from peftvlm.data.batch.collate import ConversationCollator
from peftvlm.data.prepare.lengths import LengthCounter, collator_lengths
from peftvlm.data.read.synthetic import draw_shape
from peftvlm.errors import DataError, RecipeError
from peftvlm.families import FAMILIES, tiny_models
from peftvlm.methods.lora import LoraMethod, apply_peft
from peftvlm.models import load_base
from peftvlm.recipe.load import load_recipe
from peftvlm.recipe.schema import ModelConfig

REFUSING = [n for n, s in FAMILIES.items() if s.refused_methods and s.tiny_name]


def row(size=(32, 32), question="What color is the shape?", answer="red", images=1,
        system=None):
    rng = random.Random(size[0] * 7 + size[1])
    pictures = [draw_shape(rng, (255, 0, 0), 32).resize(size) for _ in range(images)]
    messages = ([{"role": "system", "content": [{"type": "text", "text": system}]}]
                if system else [])
    messages += [{"role": "user", "content": [{"type": "image"}] * images
                  + [{"type": "text", "text": question}]},
                 {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    return {"messages": messages, "images": pictures}


def write_recipe(tmp_path, model_id, method):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": {"id": model_id}, "method": method,
                                    "data": {"synthetic": {"name": "colour-vqa"}}}))
    return path


# --- item 4: one file per family --------------------------------------------------------------

def test_cli_and_schema_list_every_registered_family_and_tiny_model(cli_in_process):
    out = cli_in_process("ls", "families").stdout  # the entry point: tests/test_recipe_cli.py
    assert all(name in out for name in FAMILIES)
    out = cli_in_process("ls", "models").stdout
    assert all(name in out for name in tiny_models())
    description = ModelConfig.model_fields["id"].description
    assert all(name in description for name in tiny_models())  # tiny-siglip included
    assert {"tiny-qwen3-vl", "tiny-gemma3", "tiny-mllama", "tiny-internvl", "tiny-llava-next",
            "tiny-llava-onevision", "tiny-blip2"} <= set(tiny_models())


# --- methods a family cannot take are refused by validate -------------------------------------

@pytest.mark.parametrize("name", REFUSING)
def test_validate_refuses_a_method_the_family_cannot_take(tmp_path, name):
    spec = FAMILIES[name]
    method, reason = spec.refused_methods[0]
    assert method == "per_part"
    path = write_recipe(tmp_path, spec.tiny_name, {"name": "per_part", "parts": {
        "vision": {"name": "vpt", "num_tokens": 2}, "language": {"name": "lora", "r": 4}}})
    with pytest.raises(RecipeError, match="does not apply to family") as err:
        load_recipe(path)
    assert reason in err.value.message and str(path) in err.value.message


def test_validate_refuses_parts_a_family_lacks_and_accepts_blip2_qformer(tmp_path):
    with pytest.raises(RecipeError, match="has no qformer part"):
        load_recipe(write_recipe(tmp_path, "tiny-llava", {"name": "lora", "target": "qformer"}))
    with pytest.raises(RecipeError, match="modules_to_save"):
        load_recipe(write_recipe(tmp_path, "tiny-gemma3", {"name": "lora",
                                                           "target": "projector"}))
    recipe = load_recipe(write_recipe(tmp_path, "tiny-blip2", {
        "name": "lora", "target": ["qformer", "language"]}))
    assert recipe.method.target == ["qformer", "language"]


# --- anyres / tiling: the length check counts image tokens exactly ---------------------------

SIZES = [(32, 32), (64, 32), (32, 64), (64, 64), (90, 40)]


@pytest.mark.parametrize("tiny", ["tiny-llava-next", "tiny-llava-onevision", "tiny-internvl",
                                  "tiny-mllama"])
def test_token_counts_follow_image_size_exactly(tiny):
    loaded = load_base(ModelConfig(id=tiny))
    collator = ConversationCollator(loaded.processor, loaded.family)
    rows = [row(size) for size in SIZES]
    exact = collator_lengths(collator, rows)
    assert LengthCounter(collator)(rows) == exact  # the fast per-size count is exact
    if tiny != "tiny-mllama":  # mllama: one <|image|> token, its tiles go to cross-attention
        assert len(set(exact)) >= 3, exact  # anyres / tiling: the count depends on the size
    batch = collator(rows)
    with torch.no_grad():  # the model itself checks image features against image tokens
        assert torch.isfinite(loaded.model(**batch).loss)


# --- LoRA presets on the new architectures ----------------------------------------------------

def lora_names(model):
    return [n for n, m in model.named_modules() if hasattr(m, "lora_A")]


def test_mllama_language_preset_covers_the_cross_attention_layers():
    loaded = load_base(ModelConfig(id="tiny-mllama"))
    names = lora_names(apply_peft(loaded.model, loaded.family, LoraMethod(r=2)))
    cross = {n.rsplit(".", 1)[-1] for n in names if ".cross_attn." in n}
    assert cross == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert any(".self_attn." in n for n in names)


def test_blip2_qformer_preset_trains_the_qformer_and_or_the_language_model():
    loaded = load_base(ModelConfig(id="tiny-blip2"))
    names = lora_names(apply_peft(loaded.model, loaded.family, LoraMethod(r=2, target="qformer")))
    assert names and all(".qformer." in f".{n}" for n in names)
    assert any("crossattention" in n for n in names)  # the queries' view of the image
    loaded = load_base(ModelConfig(id="tiny-blip2"))
    model = apply_peft(loaded.model, loaded.family,
                       LoraMethod(r=2, target=["qformer", "language"], lora_dropout=0.0))
    names = lora_names(model)
    assert any(".qformer." in n for n in names) and any(".language_model." in n for n in names)
    assert not any(".vision_model." in n for n in names)  # the ViT stays frozen
    batch = ConversationCollator(loaded.processor, loaded.family)([row(), row(answer="blue")])
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    for name, value in before.items():
        assert not torch.equal(value, dict(model.named_parameters())[name].detach()), name


def test_gemma3_token_type_ids_reach_the_model_and_matter():
    loaded = load_base(ModelConfig(id="tiny-gemma3"))
    batch = ConversationCollator(loaded.processor, loaded.family)([row()])
    image_id = loaded.processor.tokenizer.convert_tokens_to_ids("<image_soft_token>")
    assert torch.equal(batch["token_type_ids"] == 1, batch["input_ids"] == image_id)
    with torch.no_grad():
        with_types = loaded.model(**batch).logits
        causal = dict(batch, token_type_ids=torch.zeros_like(batch["token_type_ids"]))
        # image tokens attend to each other both ways only when the types reach the model
        assert not torch.allclose(loaded.model(**causal).logits, with_types)


# --- rows a family cannot take are bad rows, not crashes --------------------------------------

def test_unfit_rows_are_dropped_and_counted_or_an_error():
    from peftvlm.data.prepare.loading import drop_unfit_rows

    blip2, mllama = FAMILIES["blip_2"], FAMILIES["mllama"]
    rows = [row(), row(images=0), row(images=2)]
    report = {}
    assert drop_unfit_rows(rows, blip2, "skip", "data.train", report) == rows[:1]
    assert report == {"blip_2_needs_1_image": {"count": 2, "first_rows": ["row 1", "row 2"]}}
    with pytest.raises(DataError, match="exactly one image"):
        drop_unfit_rows(rows, blip2, "error", "data.train", {})
    rows = [row(system="Be brief."), row(), row(images=0, system="Be brief.")]
    assert drop_unfit_rows(rows, mllama, "skip", "data.train", {}) == rows[1:]


# --- QLoRA on every generative family (the rest of the method matrix: test_methods_peft.py) ---

QLORA_TINIES = [s.tiny_name for s in FAMILIES.values() if s.kind == "generative" and s.tiny_name]


@pytest.mark.parametrize("tiny", QLORA_TINIES)
def test_qlora_quantizes_the_language_model_only_and_its_adapters_train(tiny):
    import bitsandbytes as bnb

    from peftvlm.methods.lora import QloraMethod
    from test_methods_peft import batch_for, train_steps

    loaded = load_base(ModelConfig(id=tiny), "qlora")
    family = loaded.family
    model = apply_peft(loaded.model, family, QloraMethod(r=4, lora_dropout=0.0), quantized=True)
    quantized = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    kept = [family.module_prefix(p) for p in family.parts() if p != "language"]
    assert quantized and all(f".{family.language_module}." in f".{n}." for n in quantized)
    assert not any(f".{k}." in f".{n}." for k in kept for n in quantized)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    before = train_steps(model, batch_for(loaded), lr=0.05)
    for name, p in model.named_parameters():
        assert torch.equal(before[name], p.detach()) == (name not in trainable), name


# --- export: merged model reproduces the adapter model, on every generative family -----------

@pytest.mark.parametrize("tiny", QLORA_TINIES)
def test_merged_export_matches_the_adapter_on_every_family(tiny, tmp_path):
    from peftvlm.export import export_run
    from test_export import make_run

    run = make_run(tmp_path / "run", "lora", model={"id": tiny})
    report = export_run(run, merge=True, out=tmp_path / "out", log=lambda m: None)
    assert report["passed"], report
    assert report["checks"]["logits"]["max_abs_diff"] <= 1e-4
    assert report["checks"]["generation"]["new_tokens"] > 0
