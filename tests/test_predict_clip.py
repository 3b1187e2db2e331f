"""`peftvlm predict` and the demo's answer function on a CLIP-family run: top-k classes with
probabilities, trained and zero-shot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def coop_run(tmp_path_factory):
    from peftvlm import api
    from peftvlm.recipe import load_recipe

    recipe = load_recipe(REPO / "recipes" / "clip-coop.yaml",
                         ["train.max_steps=5", "data.synthetic.eval_size=20"])
    run_dir = tmp_path_factory.mktemp("coop") / "run"
    api.train(recipe, run_dir, log=lambda *_: None)
    return run_dir


def test_predict_ranks_the_runs_classes_with_probabilities(coop_run, tmp_path):
    from PIL import Image

    from peftvlm.serving.demo import build_demo, example_folders, responder
    from peftvlm.serving.predict import predict
    from peftvlm.serving.predictor import open_predictor

    predictor = open_predictor(coop_run, log=lambda *_: None)
    image = predictor.examples[0]["images"][0]
    out = tmp_path / "p.jsonl"
    rows = predict(coop_run, [image], top_k=3, base=True, out=out, log=lambda *_: None)
    assert json.loads(out.read_text().splitlines()[0]) == rows[0]
    top = rows[0]["top_k"]
    assert len(top) == 3 and {t["label"] for t in top} <= {"red", "green", "blue", "yellow"}
    assert [t["probability"] for t in top] == sorted((t["probability"] for t in top),
                                                     reverse=True)
    full = predictor.classify([Image.open(image)], top_k=10)[0]
    assert len(full) == 4 and abs(sum(p for _, p in full) - 1) < 1e-3  # softmax over 4 classes
    assert rows[0]["prediction"] == top[0]["label"] and "base_top_k" in rows[0]
    tuned, tuned_probs, base, base_probs = responder(predictor, True)(Image.open(image), "")
    assert tuned == rows[0]["prediction"] and set(tuned_probs) == set(dict(full))
    assert base == rows[0]["base_prediction"] and len(base_probs) == 4
    assert build_demo(predictor) is not None  # its held-out examples are images, no messages
    assert example_folders(predictor) == [str(Path(image).parent)]
