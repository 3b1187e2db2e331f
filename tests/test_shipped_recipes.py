"""Every shipped recipe validates, and dry-runs with its model swapped for the matching tiny
model (and Hub data swapped for the offline synthetic task)."""

from __future__ import annotations

import pytest

from peftvlm.cli import shipped_recipes
from peftvlm.families import FAMILIES, tiny_models
from peftvlm.recipe.load import load_recipe

RECIPES = shipped_recipes()


def test_there_are_shipped_recipes():
    assert "quickstart" in RECIPES


@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_validates_and_says_how_to_run_it(name):
    path = RECIPES[name]
    header = path.read_text().splitlines()[0]
    assert header.startswith("#") and len(header) > 10, "recipes open with a header comment"
    assert "peftvlm train" in path.read_text(), "the header says how to run it"
    load_recipe(path)


def offline_overrides(recipe) -> list[str]:
    """Overrides that make a real-model recipe runnable here, keeping its method and targets."""
    out = []
    if recipe.model.id not in tiny_models():
        out.append(f"model.id={FAMILIES[recipe.model.family].tiny_name}")
    # a Hub dataset, or a local data set the user brings (COCO files named in the recipe)
    uses_remote_data = any(s.dataset or (s.path and not (recipe.base_dir() / s.path).exists())
                           for s in (recipe.data.train or []))
    if uses_remote_data:
        # Same template on a local fixture in the same public layout where one exists.
        detector = FAMILIES[recipe.model.family].is_detector if recipe.model.family else False
        fixture = ("coco-instances" if detector
                   else FIXTURE_FOR_TEMPLATE.get(recipe.data.template))
        # preference objectives (dpo) read pairs: the same colour task as preference rows
        plain = "colour-preference" if recipe.train.objective == "dpo" else "colour-vqa"
        out += ["data.train=null", "data.eval=null", "data.synthetic.train_size=16",
                "data.synthetic.eval_size=4", f"data.synthetic.name={fixture or plain}"]
        if fixture is None:
            out += ["data.template=null", "data.template_options={}"]
    return out


FIXTURE_FOR_TEMPLATE = {"vqa": "vqav2", "caption": "coco-captions", "grounding": "refcoco",
                        "detection": "coco-instances"}


@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_dry_runs_on_the_matching_tiny_model(name, tmp_path):
    from peftvlm import api

    recipe = load_recipe(RECIPES[name])
    if recipe.model.id not in tiny_models():
        assert recipe.model.family, "real-model recipes name their family (offline checks need it)"
    recipe = load_recipe(RECIPES[name], offline_overrides(recipe))
    result = api.train(recipe, tmp_path / "run", dry_run=True, log=lambda *_: None)
    assert 0 < result["trainable_params"] < result["total_params"]
    assert not (tmp_path / "run").exists()
