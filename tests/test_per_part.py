"""`per_part` on LLaVA: VPT prompts in the CLIP vision tower + LoRA on the language model, each
part at its own learning rate, through TRL's trainer; save -> reload; the shipped recipe."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from peftvlm.data.batch.collate import ConversationCollator
from peftvlm.errors import RecipeError
from peftvlm.methods.per_part import PerPartMethod, load_trained
from peftvlm.methods.vision_prompts import PROMPTS_CONFIG, PROMPTS_WEIGHTS
from peftvlm.models import load_base, tiny_model_path
from peftvlm.recipe.load import load_recipe, validate_recipe_dict
from peftvlm.recipe.schema import ModelConfig
from peftvlm.registry import get_method
from test_methods_peft import colour_rows, train_steps

VISION_LAYERS = 3  # tiny-llava has 2; 3 leaves deep prompts for 2 layers below layer -2


def per_part_cfg(language="lora", deep=True, **language_extra) -> PerPartMethod:
    return PerPartMethod.model_validate({"parts": {
        "vision": {"name": "vpt", "num_tokens": 3, "deep": deep, "learning_rate": 0.01},
        "language": {"name": language, "r": 4, "learning_rate": 2e-4, **language_extra}}})


def load_llava(vision_layers=VISION_LAYERS):
    """tiny-llava, with a deeper vision tower rebuilt from its config when asked."""
    from transformers import LlavaForConditionalGeneration

    loaded = load_base(ModelConfig(id="tiny-llava"))
    if vision_layers != loaded.model.config.vision_config.num_hidden_layers:
        config = loaded.model.config
        config.vision_config.num_hidden_layers = vision_layers
        torch.manual_seed(0)
        loaded.model = LlavaForConditionalGeneration(config).eval()
    return loaded


@pytest.fixture(scope="module")
def llava_path():
    return tiny_model_path("tiny-llava")


def adapted(cfg=None, seed=0):
    loaded = load_llava()
    torch.manual_seed(seed)
    model = get_method("per_part").apply(loaded.model, loaded.family, cfg or per_part_cfg())
    return loaded, model


def batch_for(loaded, n=4, seed=0):
    return ConversationCollator(loaded.processor, loaded.family)(colour_rows(n, seed))


# --- recipe shape -------------------------------------------------------------------------------

def test_recipe_shape_and_defaults():
    recipe = validate_recipe_dict({
        "model": {"id": "tiny-llava"}, "data": {"synthetic": {"name": "colour-vqa"}},
        "method": {"name": "per_part", "parts": {"vision": {"name": "vpt"},
                                                 "language": {"name": "dora", "r": 8,
                                                              "learning_rate": 1e-4}}}})
    assert recipe.method.parts.language.name == "dora"
    assert recipe.method.learning_rates(2e-4) == {"vision": 2e-4, "language": 1e-4}


@pytest.mark.parametrize("parts, message", [
    ({"vision": {"name": "vpt"}}, "language"),
    ({"vision": {"name": "vpt"}, "language": {"name": "lora", "target": "vision"}}, "target"),
    ({"vision": {"name": "vpt", "lr": 1}, "language": {"name": "lora"}}, "lr"),
    ({"vision": {"name": "vpt"}, "language": {"name": "coop"}}, "coop"),
])
def test_recipe_errors_name_the_field(parts, message):
    with pytest.raises(RecipeError, match=message):
        validate_recipe_dict({"model": {"id": "tiny-llava"},
                              "data": {"synthetic": {"name": "colour-vqa"}},
                              "method": {"name": "per_part", "parts": parts}})


# --- the model ----------------------------------------------------------------------------------

def test_deep_prompts_stop_at_the_layer_llava_reads():
    _, model = adapted()
    # vision_feature_layer -2 of 3 layers: hidden_states[2] = the output of layer 2.
    assert model.visual_prompts.prompts.shape == (2, 3, 64)
    _, shallow = adapted(per_part_cfg(deep=False))
    assert shallow.visual_prompts.prompts.shape == (1, 3, 64)


def test_layers_see_prompts_and_the_image_token_count_is_unchanged():
    loaded, model = adapted()
    tower = model.get_base_model().get_submodule(loaded.family.vision_module)
    seen, returned = [], {}
    def record(_m, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).shape[1])

    handles = [layer.register_forward_pre_hook(record, with_kwargs=True)
               for layer in tower.encoder.layers]
    handles.append(tower.register_forward_hook(lambda _m, _i, out: returned.update(
        hidden=[h.shape[1] for h in out.hidden_states if h is not None],
        last=out.last_hidden_state.shape[1])))
    batch = batch_for(loaded)
    out = model(**batch)  # LLaVA raises if image features and image tokens do not match
    for h in handles:
        h.remove()
    patches = (32 // 8) ** 2
    assert seen == [1 + 3 + patches] * VISION_LAYERS
    assert returned["hidden"] == [1 + patches] and returned["last"] == 1 + patches
    image_id = model.get_base_model().config.image_token_index
    assert int((batch["input_ids"] == image_id).sum(1)[0]) == patches
    assert torch.isfinite(out.loss)


def test_prompts_change_the_output_and_detach_restores_the_base():
    loaded, model = adapted()
    batch = batch_for(loaded)
    model.eval()
    with torch.no_grad(), model.disable_adapter():
        with_prompts = model(**batch).logits
        model.detach_prompts()
        detached = model(**batch).logits
        base = loaded.model(**batch).logits  # the same module tree, its own forward again
    assert not torch.allclose(with_prompts, detached)
    assert torch.equal(detached, base)


def per_part_steps(model, batch):
    """`train_steps` over the method's own parameter groups (one per part)."""
    groups = model.optimizer_param_groups(1e-3, 0.0)
    for g in groups:
        g["lr"] = 0.5  # SGD steps large enough to move every parameter visibly
    return train_steps(model, batch, params=groups)


@pytest.mark.parametrize("language", ["lora", "dora", "vera"])
def test_both_parts_train_and_nothing_else_does(language):
    loaded, model = adapted(per_part_cfg(language, **({"r": 8} if language == "vera" else {})))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    vision = {n for n in trainable if n.startswith("visual_prompts.")}
    assert vision == {"visual_prompts.prompts"}
    for name in trainable - vision:
        assert loaded.family.language_module in name, f"{name} is outside the language model"
    before = per_part_steps(model, batch_for(loaded))
    for name, p in model.named_parameters():
        changed = not torch.equal(before[name], p.detach())
        assert changed == (name in trainable), f"{name}: changed={changed}"


def test_trainer_gets_one_param_group_per_part_and_trains_both(tmp_path):
    from peftvlm.recipe.schema import TrainConfig
    from peftvlm.trainers.sft import build_trainer, sft_config

    loaded, model = adapted()
    collator = ConversationCollator(loaded.processor, loaded.family)
    train_cfg = TrainConfig(max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3,
                            lr_scheduler_type="constant", logging_steps=1, save_steps=100)
    args = sft_config(train_cfg, tmp_path, [], None)
    args.disable_tqdm = True
    trainer = build_trainer(model, loaded.processor, collator, colour_rows(8), args)
    prompts = model.visual_prompts.prompts.detach().clone()
    lora = {n: p.detach().clone() for n, p in model.named_parameters()
            if p.requires_grad and "lora_" in n}
    trainer.train()
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert set(groups) == {"vision", "language"}
    assert groups["vision"]["lr"] == pytest.approx(0.01)
    assert groups["language"]["lr"] == pytest.approx(2e-4)
    assert groups["vision"]["params"] == [model.visual_prompts.prompts]
    n_adapter = sum(1 for p in model.parameters() if p.requires_grad) - 1
    assert len(groups["language"]["params"]) == n_adapter
    assert type(trainer.optimizer.optimizer).__name__ == "AdamW"  # inside accelerate's wrapper
    assert not torch.equal(prompts, model.visual_prompts.prompts.detach())
    assert all(not torch.equal(v, model.get_parameter(n).detach()) for n, v in lora.items())


# --- saving and loading -------------------------------------------------------------------------

def test_save_then_reload_gives_identical_logits(tmp_path):
    loaded, model = adapted()
    per_part_steps(model, batch_for(loaded))  # so LoRA B and the prompts are non-trivial
    model.eval()
    batch = batch_for(loaded, seed=1)
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path / "adapter")
    assert {PROMPTS_CONFIG, PROMPTS_WEIGHTS, "adapter_config.json",
            "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "adapter").iterdir()}
    settings = json.loads((tmp_path / "adapter" / PROMPTS_CONFIG).read_text())
    assert settings == {"num_tokens": 3, "deep": True, "dropout": 0.0, "deep_layers": 2,
                        "vision_module": "model.vision_tower"}

    reloaded = load_trained(load_llava().model, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, expected)
    assert not any(p.requires_grad for p in reloaded.parameters())

    # Plain peft still loads the LoRA part (without the prompts, so logits differ).
    plain = PeftModel.from_pretrained(load_llava().model, tmp_path / "adapter")
    with torch.no_grad():
        assert not torch.allclose(plain(**batch).logits, expected)


def test_incomplete_prompt_files_are_one_clear_error(tmp_path):
    from peftvlm.errors import RunError

    _, model = adapted()
    model.save_pretrained(tmp_path / "adapter")
    (tmp_path / "adapter" / PROMPTS_CONFIG).unlink()
    with pytest.raises(RunError, match=PROMPTS_CONFIG):
        load_trained(load_llava().model, tmp_path / "adapter")


def test_vpt_part_refuses_a_tower_without_a_cls_layout():
    from peftvlm.errors import ModelError
    from peftvlm.methods.vision_prompts import find_vision_transformer

    with pytest.raises(ModelError, match="ViT-style"):
        find_vision_transformer(torch.nn.Sequential(torch.nn.Linear(2, 2)), "0")


# --- the whole run ------------------------------------------------------------------------------

def test_api_train_runs_and_reloads(tmp_path, llava_path):
    from peftvlm import api

    recipe = load_recipe("recipes/llava-vpt-lora-tiny.yaml", [
        "train.max_steps=3", "train.per_device_train_batch_size=4", "data.synthetic.train_size=16",
        "data.synthetic.eval_size=8", "train.save_steps=2", "tracking.wandb=null"])
    summary = api.train(recipe, tmp_path / "run", log=lambda *_: None)
    assert summary["method"] == "per_part" and summary["global_step"] == 3
    assert summary["eval"]["exact_match"]["before"] is not None
    adapter = tmp_path / "run" / "adapter"
    assert (adapter / PROMPTS_WEIGHTS).exists()
    assert (tmp_path / "run" / "checkpoints" / "checkpoint-2" / PROMPTS_WEIGHTS).exists()
    model = load_trained(load_base(recipe.model).model, adapter)
    assert model.visual_prompts.prompts.shape == (1, 5, 64)  # tiny-llava: 2 layers, reads -2

    from peftvlm.errors import ExportError
    from peftvlm.export import export_run

    report = export_run(tmp_path / "run", out=tmp_path / "export", log=lambda *_: None)
    assert report["passed"] and report["checks"]["logits"]["max_abs_diff"] == 0
    assert {PROMPTS_CONFIG, PROMPTS_WEIGHTS, "adapter_model.safetensors", "README.md"} <= {
        p.name for p in (tmp_path / "export").iterdir()}
    assert "load_trained(base" in (tmp_path / "export" / "README.md").read_text()
    with pytest.raises(ExportError, match="cannot be merged"):
        export_run(tmp_path / "run", merge=True, out=tmp_path / "merged", log=lambda *_: None)

    # `peftvlm eval` reloads the prompts too (peft alone would silently drop them).
    from peftvlm.eval.run import load_adapter

    reloaded = load_adapter(load_base(recipe.model).model, tmp_path / "run", "per_part")
    assert torch.equal(reloaded.visual_prompts.prompts, model.visual_prompts.prompts)
    result = api.evaluate(recipe, tmp_path / "run", with_base=False, log=lambda *_: None)
    assert result["metrics"]["exact_match"]["fine_tuned"] == summary["eval"]["exact_match"]["after"]


@pytest.mark.slow
def test_shipped_recipe_improves_held_out_exact_match(tmp_path):
    from conftest import run_cli_in_process

    res = run_cli_in_process("train", "recipes/llava-vpt-lora-tiny.yaml", "-o", tmp_path / "run")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    em = summary["eval"]["exact_match"]
    assert em["after"] >= 0.9 and em["after"] > em["before"]


def test_resume_restores_the_prompts_and_ends_as_an_uninterrupted_run(tmp_path):
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    from peftvlm import api

    class CrashAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:
                raise SystemExit("simulated kill")

    recipe = load_recipe("recipes/llava-vpt-lora-tiny.yaml", [
        "train.max_steps=6", "train.save_steps=3", "train.per_device_train_batch_size=4",
        "train.warmup_steps=0", "data.synthetic.train_size=32", "data.synthetic.eval_size=4",
        "eval.before_training=false"])
    api.train(recipe, tmp_path / "straight", log=lambda *_: None)
    with pytest.raises(SystemExit):
        api.train(recipe, tmp_path / "crashed", callbacks=[CrashAt()], log=lambda *_: None)
    api.train(recipe, tmp_path / "crashed", resume=True, log=lambda *_: None)
    for name in (PROMPTS_WEIGHTS, "adapter_model.safetensors"):
        straight = load_file(tmp_path / "straight" / "adapter" / name)
        resumed = load_file(tmp_path / "crashed" / "adapter" / name)
        assert straight.keys() == resumed.keys()
        for key in straight:
            torch.testing.assert_close(resumed[key], straight[key], rtol=1e-5, atol=1e-6)
