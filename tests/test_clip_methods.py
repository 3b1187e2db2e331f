"""CLIP-family methods (CoOp, VPT, CLIP-Adapter) and their trainer, on a tiny random CLIP.

Checks the papers' parameter formulas, where prompts sit, exactness properties (ctx_init,
alpha = 0), save/reload, which parameters a step updates, and that each method beats zero-shot
CLIP on the synthetic colour classes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from peftvlm.errors import RecipeError
from peftvlm.families import family_for_model_type
from peftvlm.families.clip import SPEC
from peftvlm.methods.clip_adapter import ClipAdapterMethod, apply_clip_adapter
from peftvlm.methods.coop import CoopMethod, apply_coop
from peftvlm.methods.dual_encoder import DualEncoderClassifier, load_method, save_method
from peftvlm.methods.vpt import VptMethod, apply_vpt
from peftvlm.recipe.load import load_recipe, validate_recipe_dict
from peftvlm.summary import parameter_counts

CLASSES = ["red", "green", "blue", "yellow"]
TEMPLATES = ["a photo of a {}."]
RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.fixture(scope="session")
def tiny_clip_dir() -> Path:
    """Built once per session into the test cache (see conftest), like `model.id: tiny-clip`."""
    from peftvlm.models import tiny_model_path

    return tiny_model_path("tiny-clip")


@pytest.fixture
def clip(tiny_clip_dir):
    """A fresh (model, tokenizer) per test, so methods never share a mutated model."""
    from transformers import AutoProcessor, CLIPModel

    return CLIPModel.from_pretrained(tiny_clip_dir), AutoProcessor.from_pretrained(tiny_clip_dir).tokenizer


def build(method_cfg, clip, classnames=CLASSES):
    model, tok = clip
    apply = {"coop": apply_coop, "vpt": apply_vpt, "clip_adapter": apply_clip_adapter}
    return apply[method_cfg.name](model, SPEC, method_cfg, tokenizer=tok, classnames=classnames,
                                  templates=TEMPLATES)


def trainable(classifier) -> dict:
    return {n: p for n, p in classifier.named_parameters() if p.requires_grad}


def pixels(n=6, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# --- tiny model --------------------------------------------------------------------------------

def test_tiny_clip_reloads_with_clip_conventions(tiny_clip_dir, clip):
    model, tok = clip
    ids = tok("a photo of a red.")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert model.config.text_config.eos_token_id == tok.eos_token_id != 2  # first-EOS pooling
    assert family_for_model_type(model.config.model_type).kind == "dual_encoder"
    assert (model.text_model.config.hidden_size, model.vision_model.config.hidden_size,
            model.config.projection_dim) == (48, 64, 32)


# --- CoOp --------------------------------------------------------------------------------------

@pytest.mark.parametrize("csc,n_ctx", [(False, 16), (True, 4)])
def test_coop_trains_only_context(clip, csc, n_ctx):
    coop = build(CoopMethod(n_ctx=n_ctx, csc=csc), clip)
    d = 48  # text encoder width
    expected = (len(CLASSES) if csc else 1) * n_ctx * d
    assert list(trainable(coop)) == ["ctx"]
    assert parameter_counts(coop)[0] == expected
    assert 0.01 < coop.ctx.std().item() < 0.03  # N(0, 0.02)


@pytest.mark.parametrize("position,slots", [("end", [1, 2, 3, 4]), ("middle", [1, 2, 4, 5]),
                                            ("front", [2, 3, 4, 5])])
def test_coop_class_token_position(clip, position, slots):
    _, tok = clip
    coop = build(CoopMethod(n_ctx=4, class_token_position=position), clip)
    ids = coop.prompt_ids[0].tolist()
    red = tok(" red", add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id  # after the start token
    assert coop.ctx_slots[0].tolist() == slots
    name_at = [i for i in range(len(ids)) if i not in slots][1:1 + len(red)]
    assert [ids[i] for i in name_at] == red


def test_coop_ctx_init_reproduces_hand_written_prompt(clip):
    model, tok = clip
    coop = build(CoopMethod(ctx_init="a photo of a", n_ctx=16), clip)
    assert coop.n_ctx == len(tok("a photo of a", add_special_tokens=False)["input_ids"])
    reference = tok([f"a photo of a {c}." for c in CLASSES], padding=True, return_tensors="pt")
    # Same token layout, context slots aside, as the tokenizer gives the written prompt.
    slots = coop.ctx_slots[0]
    expected_ids = reference["input_ids"].clone()
    expected_ids[:, slots] = coop.prompt_ids[:, slots]
    assert torch.equal(coop.prompt_ids, expected_ids)
    with torch.no_grad():
        written = model.get_text_features(**reference).pooler_output
        assert torch.equal(coop.class_text_features(), written)


def test_coop_context_changes_text_features_only_through_hook(clip):
    model, _ = clip
    coop = build(CoopMethod(n_ctx=4), clip)
    with torch.no_grad():
        before = coop.class_text_features().clone()
        coop.ctx.add_(1.0)
        assert not torch.allclose(coop.class_text_features(), before)
        # No hook stays behind on the base model.
        assert not model.text_model.get_input_embeddings()._forward_hooks


# --- VPT ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("deep", [False, True])
def test_vpt_trains_only_prompts(clip, deep):
    vpt = build(VptMethod(num_tokens=5, deep=deep), clip)
    layers, d = 2, 64
    assert list(trainable(vpt)) == ["visual_prompts.prompts"]
    assert parameter_counts(vpt)[0] == (layers if deep else 1) * 5 * d
    bound = (6 / (3 * 8 * 8 + d)) ** 0.5
    assert vpt.visual_prompts.prompts.abs().max() <= bound


def layer_inputs(vpt, x):
    """The hidden states entering each encoder layer, captured after VPT's own hooks."""
    seen = []
    with vpt.visual_prompts.attached(vpt.vision_encoder):
        handles = [layer.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
                   for layer in vpt.vision_encoder.encoder.layers]
        vpt.vision_encoder(pixel_values=x)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("deep", [False, True])
def test_vpt_sequence_layout(clip, deep):
    model, _ = clip
    n, patches = 5, 16
    vpt = build(VptMethod(num_tokens=n, deep=deep), clip).eval()
    x = pixels(2)
    inputs = layer_inputs(vpt, x)
    vision = model.vision_model
    with torch.no_grad():
        plain = vision.pre_layrnorm(vision.embeddings(x))  # [CLS, patches], with positions
        prompts = vision.pre_layrnorm(vpt.visual_prompts.prompts[0])  # no position embedding
    first = inputs[0]
    assert first.shape == (2, 1 + n + patches, 64)  # replaced, never accumulated, from here on
    assert all(h.shape == first.shape for h in inputs)
    torch.testing.assert_close(first[:, 0], plain[:, 0])  # CLS first
    torch.testing.assert_close(first[:, 1:1 + n], prompts.expand(2, -1, -1))
    torch.testing.assert_close(first[:, 1 + n:], plain[:, 1:])
    if deep:  # layer 2 sees its own fresh prompt set in the prompt slots
        assert torch.equal(inputs[1][:, 1:1 + n], vpt.visual_prompts.prompts[1].detach().expand(2, -1, -1))
    else:  # shallow: layer 2 sees layer 1's outputs there
        assert not torch.equal(inputs[1][:, 1:1 + n], first[:, 1:1 + n])


def test_vpt_backbone_stays_in_eval_mode(clip):
    vpt = build(VptMethod(dropout=0.1), clip)
    vpt.train()
    assert vpt.training and vpt.visual_prompts.dropout.training
    assert not any(m.training for m in vpt.model.modules())
    assert not vpt.vision_encoder.embeddings._forward_hooks  # hooks only live during a forward


# --- CLIP-Adapter ------------------------------------------------------------------------------

@pytest.mark.parametrize("side,n_adapters", [("image", 1), ("text", 1), ("both", 2)])
def test_clip_adapter_parameter_count(clip, side, n_adapters):
    adapter = build(ClipAdapterMethod(side=side, reduction=4), clip)
    d = 32  # joint embedding width
    assert parameter_counts(adapter)[0] == n_adapters * 2 * d * d // 4
    assert all(n.endswith("weight") for n in trainable(adapter))  # no biases


def test_clip_adapter_alpha_zero_is_zero_shot_exactly(clip):
    model, tok = clip
    adapter = build(ClipAdapterMethod(alpha=0.0, side="both"), clip)
    zero_shot = DualEncoderClassifier(model, SPEC, None, tok, CLASSES, TEMPLATES)
    with torch.no_grad():
        assert torch.equal(adapter(pixels()), zero_shot(pixels()))


def test_clip_adapter_rejects_reduction_not_dividing_width(clip):
    with pytest.raises(RecipeError, match="method.reduction"):
        build(ClipAdapterMethod(reduction=5), clip)


# --- shared behaviour --------------------------------------------------------------------------

METHODS = [CoopMethod(n_ctx=4), CoopMethod(n_ctx=4, csc=True), VptMethod(deep=True),
           VptMethod(), ClipAdapterMethod(side="both")]


@pytest.mark.parametrize("cfg", METHODS, ids=lambda c: f"{c.name}")
def test_one_step_updates_every_trainable_and_no_frozen_param(clip, cfg):
    classifier = build(cfg, clip).train()
    before = {n: p.detach().clone() for n, p in classifier.named_parameters()}
    optimizer = torch.optim.SGD([p for p in classifier.parameters() if p.requires_grad], lr=0.5)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    torch.nn.functional.cross_entropy(classifier(pixels()), labels).backward()
    optimizer.step()
    for name, p in classifier.named_parameters():
        changed = not torch.equal(before[name], p.detach())
        assert changed == p.requires_grad, name


@pytest.mark.parametrize("cfg", METHODS, ids=lambda c: f"{c.name}")
def test_save_then_reload_gives_identical_logits(clip, tiny_clip_dir, tmp_path, cfg):
    from transformers import CLIPModel

    classifier = build(cfg, clip).eval()
    with torch.no_grad():
        for p in classifier.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)  # as if trained
        expected = classifier(pixels())
    save_method(classifier, tmp_path)
    reloaded = load_method(CLIPModel.from_pretrained(tiny_clip_dir), SPEC, clip[1], tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(pixels()), expected)
    assert reloaded.classnames == CLASSES


# --- trainer -----------------------------------------------------------------------------------

def recipe_for(tiny_clip_dir, method: dict, **train):
    data = {"synthetic": {"name": "colour-classes", "train_size": 80, "eval_size": 60},
            "shots": 8}
    settings = {"max_steps": 40, "per_device_train_batch_size": 16, "learning_rate": 0.02,
                "logging_steps": 5, "save_steps": 1000, "seed": 0, **train}
    recipe = validate_recipe_dict({"model": {"id": str(tiny_clip_dir)}, "method": method,
                                   "data": data, "train": settings})
    recipe.name = "test"
    return recipe


@pytest.mark.parametrize("method,lr", [({"name": "coop"}, 0.02), ({"name": "vpt"}, 0.05),
                                       ({"name": "clip_adapter"}, 0.02)])
def test_each_method_beats_zero_shot_few_shot(tiny_clip_dir, tmp_path, method, lr):
    from peftvlm.trainers.clip import train_dual_encoder

    recipe = recipe_for(tiny_clip_dir, method, learning_rate=lr, lr_scheduler_type="constant")
    summary = train_dual_encoder(recipe, tmp_path, resume=False)
    acc = summary["eval"]["accuracy"]
    assert acc["after"] >= acc["before"] + 0.25, acc
    assert summary["train_examples"] == 8 * 4
    assert 0 < summary["trainable_params"] < summary["total_params"]
    assert summary["final_loss"] < 1.2
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["eval"] == summary["eval"]
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert (tmp_path / "adapter" / "peftvlm_method.safetensors").exists()


def test_resume_continues_exactly(tiny_clip_dir, tmp_path):
    from safetensors.torch import load_file

    from peftvlm.trainers.clip import train_dual_encoder

    recipe = recipe_for(tiny_clip_dir, {"name": "coop", "n_ctx": 4}, max_steps=6, save_steps=3,
                        per_device_train_batch_size=8, lr_scheduler_type="cosine",
                        logging_steps=1)
    first = train_dual_encoder(recipe, tmp_path, resume=False)
    weights = tmp_path / "adapter" / "peftvlm_method.safetensors"
    uninterrupted = load_file(weights)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == \
        ["checkpoint-3", "checkpoint-6"]
    shutil.rmtree(tmp_path / "checkpoints" / "checkpoint-6")  # as if killed after step 3
    resumed = train_dual_encoder(recipe, tmp_path, resume=True)
    assert torch.equal(load_file(weights)["ctx"], uninterrupted["ctx"])
    assert resumed["final_loss"] == pytest.approx(first["final_loss"])
    assert resumed["global_step"] == 6


def test_base_to_new_reports_harmonic_mean(tiny_clip_dir, tmp_path):
    from peftvlm.trainers.clip import train_dual_encoder

    recipe = recipe_for(tiny_clip_dir, {"name": "coop", "n_ctx": 4}, max_steps=3)
    recipe.data.base_to_new = True
    summary = train_dual_encoder(recipe, tmp_path, resume=False)
    assert summary["classnames"] == ["blue", "green"]  # first half of the sorted labels
    after = summary["eval"]["base_to_new"]["after"]
    b, n = after["base"], after["new"]
    assert after["harmonic_mean"] == pytest.approx(2 * b * n / (b + n) if b + n else 0.0)
    assert summary["eval"]["accuracy"]["after"] == b


def test_base_to_new_rejects_class_specific_context(tiny_clip_dir, tmp_path):
    from peftvlm.trainers.clip import train_dual_encoder

    recipe = recipe_for(tiny_clip_dir, {"name": "coop", "n_ctx": 4, "csc": True}, max_steps=1)
    recipe.data.base_to_new = True
    with pytest.raises(RecipeError, match="csc"):
        train_dual_encoder(recipe, tmp_path, resume=False)
    assert not (tmp_path / "summary.json").exists()  # refused before training


def test_coop_paper_preset(tiny_clip_dir):
    from peftvlm.trainers.loop import build_optimizer, build_scheduler, optim_settings

    recipe = recipe_for(tiny_clip_dir, {"name": "coop", "optim_preset": "paper"}, max_steps=-1,
                        num_train_epochs=10)
    s = optim_settings(recipe, n_train=64, world_size=1)
    assert (s.optim, s.optim_args, s.learning_rate, s.batch_size) == \
        ("sgd", "momentum=0.9", 0.002, 32)
    assert (s.steps_per_epoch, s.total_steps, s.warmup_steps) == (2, 20, 2)
    optimizer = build_optimizer([("ctx", torch.nn.Parameter(torch.zeros(4, 8)))], s)
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.param_groups[0]["momentum"] == 0.9
    assert optimizer.param_groups[0]["weight_decay"] == 5e-4
    scheduler, lrs = build_scheduler(optimizer, s), []
    for _ in range(20):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:2] == pytest.approx([1e-5, 1e-5])  # constant warm-up epoch
    assert lrs[2] == pytest.approx(0.002)  # cosine starts at the peak
    assert lrs[19] < 0.002 * 0.02


def test_wandb_offline_run_and_periodic_eval(tiny_clip_dir, tmp_path):
    from peftvlm.trainers.clip import train_dual_encoder

    recipe = recipe_for(tiny_clip_dir, {"name": "clip_adapter"}, max_steps=2, eval_steps=1)
    recipe.tracking = type(recipe.tracking).model_validate({"wandb": {"mode": "offline"}})
    train_dual_encoder(recipe, tmp_path, resume=False)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs and (tmp_path / "recipe.yaml").exists()


def test_dry_run_counts_parameters_and_writes_nothing(tmp_path):
    from peftvlm import api

    recipe = load_recipe(RECIPES / "clip-vpt.yaml")
    result = api.train(recipe, tmp_path / "run", dry_run=True, log=lambda *_: None)
    assert result["trainable_params"] == 2 * 5 * 64  # deep, 2 layers, 5 tokens, width 64
    assert not (tmp_path / "run").exists()


def test_dual_encoder_method_on_a_generative_model_is_refused(tiny_llava_path, tmp_path):
    from peftvlm.trainers.clip import train_dual_encoder

    recipe = recipe_for(tiny_llava_path, {"name": "coop"}, max_steps=1)
    with pytest.raises(RecipeError, match="dual encoder"):
        train_dual_encoder(recipe, tmp_path, resume=False)


# --- recipes -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["clip-coop", "clip-vpt", "clip-adapter"])
def test_shipped_clip_recipes_validate(name):
    recipe = load_recipe(RECIPES / f"{name}.yaml")
    assert recipe.model.id == "tiny-clip"
    assert recipe.data.synthetic.name == "colour-classes"


def test_prompt_template_needs_a_class_slot():
    with pytest.raises(RecipeError, match="prompt_templates"):
        validate_recipe_dict({"model": {"id": "tiny-clip"}, "method": {"name": "coop"},
                              "data": {"synthetic": {"name": "colour-classes"},
                                       "prompt_templates": ["a photo"]}})


# --- user data ---------------------------------------------------------------------------------

def write_image_folder(root: Path, per_class: int = 3) -> None:
    from PIL import Image

    for name, rgb in (("cat", (200, 50, 50)), ("dog", (50, 50, 200))):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (40, 40), rgb).save(root / name / f"{i}.png")


def test_trains_from_image_folders(tiny_clip_dir, tmp_path):
    from peftvlm.trainers.clip import train_dual_encoder

    write_image_folder(tmp_path / "train")
    write_image_folder(tmp_path / "val", per_class=2)
    recipe = validate_recipe_dict({
        "model": {"id": str(tiny_clip_dir)}, "method": {"name": "clip_adapter"},
        "data": {"train": str(tmp_path / "train"), "eval": str(tmp_path / "val"), "shots": 2},
        "train": {"max_steps": 2, "per_device_train_batch_size": 2}})
    summary = train_dual_encoder(recipe, tmp_path / "run", resume=False)
    assert summary["classnames"] == ["cat", "dog"] and summary["train_examples"] == 4
    assert summary["eval"]["accuracy"]["after"] in (0.0, 0.25, 0.5, 0.75, 1.0)


def test_jsonl_label_outside_classnames_names_the_row(tiny_clip_dir, tmp_path):
    from peftvlm.errors import DataError
    from peftvlm.trainers.clip import train_dual_encoder

    write_image_folder(tmp_path)
    rows = [{"image": "cat/0.png", "label": "cat"}, {"image": "dog/0.png", "label": "bird"}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = validate_recipe_dict({
        "model": {"id": str(tiny_clip_dir)}, "method": {"name": "coop"},
        "data": {"train": str(tmp_path / "train.jsonl"), "classnames": ["cat", "dog"]},
        "train": {"max_steps": 1}})
    with pytest.raises(DataError, match="'bird' is not in data.classnames"):
        train_dual_encoder(recipe, tmp_path / "run", resume=False)


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    import os
    import subprocess
    import sys

    import yaml

    from conftest import REPO, run_cli_in_process

    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun not installed beside this python")
    for name, per_device in (("one", 8), ("two", 4)):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({
            "model": {"id": "tiny-clip"}, "method": {"name": "vpt", "deep": True},
            "data": {"synthetic": {"name": "colour-classes", "train_size": 64, "eval_size": 16},
                     "shots": 8},
            "train": {"max_steps": 4, "per_device_train_batch_size": per_device,
                      "logging_steps": 1, "learning_rate": 0.05}}))
    res = run_cli_in_process("train", tmp_path / "one.yaml", "-o", tmp_path / "run1")
    assert res.returncode == 0, res.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", "29519", "-m",
                          "peftvlm", "train", str(tmp_path / "two.yaml"), "-o",
                          str(tmp_path / "run2")], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    curves = [json.loads((tmp_path / r / "summary.json").read_text())["loss_curve"]
              for r in ("run1", "run2")]
    assert [s for s, _ in curves[0]] == [s for s, _ in curves[1]] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(*curves):
        assert abs(a - b) < 1e-4, curves


def test_classification_reads_parquet_bytes_with_the_bad_row_policy(tmp_path):
    """The shared readers: image bytes in parquet, a corrupt image skipped (or an error)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from peftvlm.errors import DataError
    from peftvlm.trainers.clip_data import load_task

    def png(colour):
        buffer = io.BytesIO()
        Image.new("RGB", (32, 32), colour).save(buffer, format="PNG")
        return buffer.getvalue()

    images = [{"bytes": png(c), "path": None} for c in ("red", "blue", "red")]
    images.append({"bytes": b"not an image", "path": None})
    pq.write_table(pa.table({"img": images, "kind": ["cat", "dog", "cat", "dog"]}),
                   tmp_path / "train.parquet")

    def data(policy):
        return validate_recipe_dict({
            "model": {"id": "tiny-clip"}, "method": {"name": "coop"},
            "data": {"train": [{"path": str(tmp_path / "train.parquet"),
                                "columns": {"image": "img", "label": "kind"}}],
                     "on_bad_row": policy}}).data

    task = load_task(data("skip"), tmp_path)
    assert task.classnames == ["cat", "dog"] and task.train.labels == [0, 1, 0]
    with pytest.raises(DataError, match="1 bad row"):
        load_task(data("error"), tmp_path)
