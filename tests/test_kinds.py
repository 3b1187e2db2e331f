"""Run kinds as objects (`peftvlm.kinds`): every registered kind implements every verb, and each
kind's verbs work on its tiny model (dry run, train, eval, export, predict, serve), derived from the
KINDS registry so a new kind is tested by adding its shipped tiny recipe below."""

from __future__ import annotations

import json

import pytest

from conftest import REPO
from peftvlm import api
from peftvlm.errors import RecipeError
from peftvlm.kinds import KINDS, Kind, VERBS, get_kind, kind_for
from peftvlm.recipe.load import load_recipe, validate_recipe_dict
from peftvlm.serving.predictor import open_predictor

QUIET = {"log": lambda *_: None}
# a shipped tiny recipe per kind, shortened (the registry test below fails on a kind without one)
TINY = {
    "generative": ("quickstart.yaml", ["train.max_steps=2", "data.synthetic.train_size=8",
                                       "data.synthetic.eval_size=4", "eval.max_new_tokens=2"]),
    "classification": ("clip-coop.yaml", ["train.max_steps=2", "data.synthetic.eval_size=8"]),
    "retrieval": ("clip-retrieval-tiny.yaml", ["train.max_steps=2",
                                               "data.synthetic.train_size=16",
                                               "data.synthetic.eval_size=8"]),
    "detection": ("grounding-dino-tiny.yaml", ["train.max_steps=2",
                                               "train.per_device_train_batch_size=4",
                                               "data.synthetic.train_size=8",
                                               "data.synthetic.eval_size=4"]),
}
ABSTRACT = [v for v in VERBS if v != "check"]  # `check` may keep the base's no-op


def tiny_recipe(kind: str):
    name, overrides = TINY[kind]
    return load_recipe(REPO / "recipes" / name, overrides)


@pytest.mark.parametrize("name", list(KINDS))
def test_every_kind_implements_every_verb(name):
    kind = get_kind(name)
    assert isinstance(kind, Kind) and kind.name == name
    missing = [v for v in ABSTRACT if getattr(type(kind), v) is getattr(Kind, v)]
    assert not missing, f"kind {name} does not implement {missing}"
    assert name in TINY, f"add a tiny recipe for kind {name} to TINY"


def test_the_base_kind_refuses_unimplemented_verbs():
    with pytest.raises(NotImplementedError):
        Kind().fit(None, None, resume=False, overwrite=False)


def test_kind_for_is_decided_by_method_and_family(tiny_llava_path):
    def kind(model, method):
        return kind_for(validate_recipe_dict({"model": {"id": model}, "method": {"name": method},
                                              "data": {"synthetic": {"name": "colour-vqa"}}}))

    assert kind("tiny-clip", "coop") is get_kind("classification")
    assert kind("tiny-siglip", "dora") is get_kind("retrieval")
    assert kind(str(tiny_llava_path), "vera") is get_kind("generative")
    assert get_kind("generative").generates and not get_kind("retrieval").generates
    with pytest.raises(RecipeError, match="'qlora' does not train dual encoders"):
        kind("tiny-clip", "qlora")
    with pytest.raises(RecipeError, match="unknown run kind 'segmentation'"):
        get_kind("segmentation")


@pytest.mark.parametrize("name", list(KINDS))
def test_each_kind_trains_evaluates_exports_and_predicts_on_its_tiny_model(name, tmp_path):
    recipe = tiny_recipe(name)
    assert kind_for(recipe).name == name
    shown = api.train(recipe, tmp_path / "dry", dry_run=True, **QUIET)
    assert shown["trainable_params"] > 0 and not (tmp_path / "dry").exists()

    run = tmp_path / "run"
    summary = api.train(recipe, run, **QUIET)
    written = json.loads((run / "summary.json").read_text())
    assert written["kind"] == name and written["global_step"] == 2
    assert 0 < written["trainable_params"] < written["total_params"]
    assert summary["name"] == written["name"] and written["hardware"]

    result = api.evaluate(recipe, run, with_base=False, **QUIET)
    assert result["metrics"] and (run / "eval" / "metrics.json").is_file()

    report = api.export(run, out=tmp_path / "export", **QUIET)
    assert report["passed"] and (tmp_path / "export" / "export_report.json").is_file()

    predictor = open_predictor(run, **QUIET)
    assert predictor.generates == get_kind(name).generates
    assert_served(predictor)


def assert_served(predictor):
    """`peftvlm serve`'s app on the run: it lists the run, and chat completions answer exactly
    when the kind generates text (the others refuse with a 400 that says why)."""
    import httpx

    from peftvlm.serving.openai_api import build_app
    from serve_helpers import served

    with served(build_app(predictor)) as url:
        listed = httpx.get(f"{url}/v1/models", timeout=60).json()
        assert predictor.name in [m["id"] for m in listed["data"]]
        chat = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
            "model": predictor.name, "max_tokens": 2,
            "messages": [{"role": "user", "content": "What colour is it?"}]})
    if predictor.generates:
        assert chat.status_code == 200, chat.text
        assert chat.json()["choices"][0]["message"]["role"] == "assistant"
    else:
        assert chat.status_code == 400 and chat.json()["error"]["message"], chat.text
