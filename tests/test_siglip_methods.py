"""CLIP-family methods on SigLIP (tiny random `SiglipModel`): CLIP-Adapter and CoOp apply, VPT
and the merged export are refused with their reasons.

Checks the parameter formulas, SigLIP's own scoring (zero-shot SigLIP is the exact baseline),
CoOp's ctx_init reproducing the written prompt under SigLIP's max-length padding, save/reload,
and that each supported method beats zero-shot SigLIP through the recipe path.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from peftvlm.errors import ExportError, RecipeError
from peftvlm.families import family_for_model_type
from peftvlm.families.siglip import SPEC
from peftvlm.methods.clip_adapter import ClipAdapterMethod, apply_clip_adapter
from peftvlm.methods.coop import CoopMethod, apply_coop
from peftvlm.methods.dual_encoder import DualEncoderClassifier, load_method, save_method
from peftvlm.methods.vpt import VptMethod, apply_vpt
from peftvlm.recipe.load import load_recipe
from peftvlm.summary import parameter_counts

CLASSES = ["red", "green", "blue", "yellow"]
TEMPLATES = ["a photo of a {}."]
RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.fixture(scope="session")
def tiny_siglip_dir() -> Path:
    from peftvlm.models import tiny_model_path

    return tiny_model_path("tiny-siglip")


@pytest.fixture
def siglip(tiny_siglip_dir):
    from transformers import AutoProcessor, SiglipModel

    return (SiglipModel.from_pretrained(tiny_siglip_dir),
            AutoProcessor.from_pretrained(tiny_siglip_dir).tokenizer)


def build(method_cfg, siglip, classnames=CLASSES):
    model, tok = siglip
    apply = {"coop": apply_coop, "vpt": apply_vpt, "clip_adapter": apply_clip_adapter}
    return apply[method_cfg.name](model, SPEC, method_cfg, tokenizer=tok, classnames=classnames,
                                  templates=TEMPLATES)


def pixels(n=6, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def written_prompts(tok, texts):
    """How SigLIP encodes text: padded to max_length (64), no attention mask."""
    return {"input_ids": tok(texts, padding="max_length", max_length=64,
                             return_tensors="pt")["input_ids"]}


def test_tiny_siglip_reloads_with_siglip_conventions(siglip):
    model, tok = siglip
    ids = tok("a photo of a red.")["input_ids"]
    assert tok.bos_token_id is None and ids[-1] == tok.eos_token_id == tok.pad_token_id
    assert family_for_model_type(model.config.model_type) is SPEC
    assert SPEC.joint_dim(model.config) == 64 == model.config.text_config.projection_size
    assert model.logit_bias.item() == -10.0


def test_zero_shot_uses_siglip_scoring_exactly(siglip):
    model, tok = siglip
    zero_shot = DualEncoderClassifier(model, SPEC, None, tok, CLASSES, TEMPLATES)
    with torch.no_grad():
        out = model(pixel_values=pixels(), **written_prompts(tok, [f"a photo of a {c}."
                                                                   for c in CLASSES]))
        assert torch.allclose(zero_shot(pixels()), out.logits_per_image, atol=1e-5)


# --- CLIP-Adapter ------------------------------------------------------------------------------

@pytest.mark.parametrize("side,n_adapters", [("image", 1), ("text", 1), ("both", 2)])
def test_adapter_parameter_count(siglip, side, n_adapters):
    adapter = build(ClipAdapterMethod(side=side, reduction=4), siglip)
    assert parameter_counts(adapter)[0] == n_adapters * 2 * 64 * 64 // 4  # d = 64


def test_adapter_alpha_zero_is_zero_shot_siglip_exactly(siglip):
    model, tok = siglip
    adapter = build(ClipAdapterMethod(alpha=0.0, side="both"), siglip)
    zero_shot = DualEncoderClassifier(model, SPEC, None, tok, CLASSES, TEMPLATES)
    with torch.no_grad():
        assert torch.equal(adapter(pixels()), zero_shot(pixels()))


# --- CoOp --------------------------------------------------------------------------------------

@pytest.mark.parametrize("csc,n_ctx", [(False, 16), (True, 4)])
def test_coop_parameter_count_and_front_context(siglip, csc, n_ctx):
    coop = build(CoopMethod(n_ctx=n_ctx, csc=csc), siglip)
    assert parameter_counts(coop)[0] == (len(CLASSES) if csc else 1) * n_ctx * 48
    # No start token: the context opens the sequence; every prompt is padded to 64.
    assert coop.ctx_slots[0].tolist() == list(range(n_ctx))
    assert coop.prompt_ids.shape == (len(CLASSES), 64) and coop.prompt_mask is None


def test_coop_ctx_init_reproduces_hand_written_prompt(siglip):
    model, tok = siglip
    coop = build(CoopMethod(ctx_init="a photo of a"), siglip)
    reference = written_prompts(tok, [f"a photo of a {c}." for c in CLASSES])
    expected_ids = reference["input_ids"].clone()
    expected_ids[:, coop.ctx_slots[0]] = coop.prompt_ids[:, coop.ctx_slots[0]]
    assert torch.equal(coop.prompt_ids, expected_ids)
    with torch.no_grad():
        written = model.get_text_features(**reference).pooler_output
        assert torch.equal(coop.class_text_features(), written)


# --- shared ------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [CoopMethod(n_ctx=4), ClipAdapterMethod(side="both")],
                         ids=lambda c: c.name)
def test_save_then_reload_gives_identical_logits(siglip, tiny_siglip_dir, tmp_path, cfg):
    from transformers import SiglipModel

    classifier = build(cfg, siglip).eval()
    with torch.no_grad():
        for p in classifier.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
        expected = classifier(pixels())
    save_method(classifier, tmp_path)
    reloaded = load_method(SiglipModel.from_pretrained(tiny_siglip_dir), SPEC, siglip[1],
                           tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(pixels()), expected)


def test_vpt_is_refused_with_the_reason(siglip):
    with pytest.raises(RecipeError, match="no CLS token"):
        build(VptMethod(), siglip)


def test_merged_export_is_refused_with_the_reason(siglip):
    from peftvlm.export.classification import class_head

    with pytest.raises(ExportError, match="logit bias"):
        class_head(build(CoopMethod(n_ctx=4), siglip))


@pytest.mark.parametrize("method", [{"name": "clip_adapter"}, {"name": "coop"}])
def test_each_method_beats_zero_shot_siglip_then_evals_and_exports(tmp_path, method):
    """Recipe path end to end: train, `peftvlm eval` reproduces the run's accuracies, the
    adapter export reloads with the run's logits, --merge is refused."""
    from peftvlm import api
    from peftvlm.export import export_run

    recipe = load_recipe(RECIPES / "siglip-adapter.yaml", [
        f"method={{name: {method['name']}}}", "data.synthetic.train_size=80",
        "data.synthetic.eval_size=60", "data.shots=8", "train.max_steps=40",
        "train.lr_scheduler_type=constant", "train.save_steps=1000", "train.seed=0"])
    summary = api.train(recipe, tmp_path / "run", log=lambda *a, **k: None)
    acc = summary["eval"]["accuracy"]
    assert acc["after"] >= acc["before"] + 0.25, acc
    assert summary["family"] == "siglip"
    run_dir = tmp_path / "run"
    assert api.evaluate(recipe, run_dir, log=lambda *_: None)["accuracy"] == acc
    report = export_run(run_dir, out=tmp_path / "out", log=lambda *_: None)
    assert report["passed"], report["checks"]
    assert "get_family('siglip')" in report["loading_snippet"]
    reason = "logit bias" if method["name"] == "coop" else "learns the image side"
    with pytest.raises(ExportError, match=reason):
        export_run(run_dir, merge=True, out=tmp_path / "merged", log=lambda *_: None)
