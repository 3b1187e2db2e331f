"""`peftvlm demo` in a real headless browser (Debian's Chromium driven by Playwright): the
question page on the session's trained quickstart (an uploaded image), the detection page on a
one-step Grounding DINO run (a held-out example clicked; boxes drawn where the predictor puts
them), and the grounding page's drawing of a generative answer's boxes. One Chromium serves every test of the file; the quickstart run is
the session's (trained once for the quickstart, serve and demo tests: see serve_helpers)."""

from __future__ import annotations

import io
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import REPO
from serve_helpers import free_socket, held_out_by_colour, quickstart_predictor

sys.path.insert(0, str(REPO / "scripts"))
from demo_screenshot import CHROMIUM, answer_in_browser, chromium  # noqa: E402

needs_browser = pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason="needs Debian's chromium (scripts/setup.sh installs it)")
QUIET = {"log": lambda *_: None}


@contextmanager
def demo_of(predictor):
    """The demo page of `predictor` on a free 127.0.0.1 port, closed afterwards."""
    from peftvlm.serving.demo import build_demo, example_folders

    with free_socket() as sock:
        port = sock.getsockname()[1]
    demo = build_demo(predictor, compare_base=True)
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True,
                ssr_mode=False, quiet=True, allowed_paths=example_folders(predictor))
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        demo.close()


@pytest.fixture(scope="module")
def browser():
    with chromium() as open_browser:
        yield open_browser


@pytest.fixture(scope="module")
def demo_url():
    with demo_of(quickstart_predictor()) as url:
        yield url


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    """The predictor of a one-step run of the shipped tiny Grounding DINO recipe (it does not
    learn in a CPU test's steps; the page must draw whatever it finds)."""
    from peftvlm import api
    from peftvlm.recipe import load_recipe
    from peftvlm.serving.predictor import open_predictor

    recipe = load_recipe(REPO / "recipes" / "grounding-dino-tiny.yaml", [
        "train.max_steps=1", "train.per_device_train_batch_size=2",
        "data.synthetic.train_size=2", "data.synthetic.eval_size=2",
        "eval.before_training=false"])
    run = tmp_path_factory.mktemp("gdino-demo") / "run"
    api.train(recipe, run, **QUIET)
    return open_predictor(run, **QUIET)


@pytest.mark.slow
@needs_browser
def test_demo_page_answers_an_uploaded_held_out_image_with_its_colour(demo_url, browser,
                                                                      tmp_path):
    colour, image = next((c, p) for c, p in held_out_by_colour().items() if c == "yellow")
    shot = tmp_path / "demo.png"
    answers = answer_in_browser(demo_url, image=image, screenshot=shot, browser=browser)
    assert answers["tuned"] == colour
    assert answers["base"] and answers["base"] != colour  # the random base, beside it
    summary = quickstart_predictor().files.summary["eval"]["exact_match"]
    assert f"{summary['after']:.3f}" in answers["metrics"]
    assert shot.stat().st_size > 10_000


@needs_browser
def test_detection_page_draws_the_boxes_of_a_held_out_example(detector, browser):
    """One click on a held-out example (its image and the run's classes), threshold 0, Answer:
    the boxes listed and drawn are the predictor's, at their pixels."""
    import numpy as np
    from PIL import Image

    from peftvlm.data.images import load_rgb
    from peftvlm.data.preview import draw_detections

    with demo_of(detector) as url:
        answers = answer_in_browser(url, example=1, threshold=0.0, browser=browser)
    image = detector.examples[1]["images"][0]
    expected = detector.detect([image], ["red", "green", "blue", "yellow"], threshold=0.0)[0]
    listed = answers["tuned"].splitlines()
    assert len(listed) == len(expected) > 0
    top = expected[0]
    assert listed[0] == f"{top['label']} {top['score']:.2f} at [" + ", ".join(
        f"{v:g}" for v in top["box"]) + "]"
    assert answers["base"]  # the base detector's boxes, beside them
    drawn = np.asarray(Image.open(io.BytesIO(answers["tuned_picture"])).convert("RGB"))
    plain = load_rgb(image)
    assert drawn.shape == (plain.height, plain.width, 3)
    assert np.array_equal(drawn, np.asarray(draw_detections(plain, expected)))
    assert not np.array_equal(drawn, np.asarray(plain))  # boxes, not the bare image


def test_every_task_has_a_page_and_grounding_answers_are_drawn(monkeypatch):
    """A generative run trained on a grounding template gets the grounding page, which draws
    its answer's boxes (read with the family's convention) on the uploaded image."""
    from PIL import Image

    from peftvlm.data.preview import PREDICTION_COLOUR
    from peftvlm.errors import RunError
    from peftvlm.recipe import load_recipe
    from peftvlm.serving.demo import PAGES, build_demo, page_for, responder
    from peftvlm.serving.predictor import TASKS, task_of

    assert set(TASKS) | {"retrieve", "detect"} <= set(PAGES)
    grounding = load_recipe(REPO / "recipes" / "refcoco-grounding-tiny.yaml", [])
    assert task_of(grounding) == "grounding"
    predictor = quickstart_predictor()  # tiny LLaVA: boxes as "label: [x1, y1, x2, y2]" in 0-1
    monkeypatch.setattr(predictor, "task", "grounding")
    asked = []
    monkeypatch.setattr(predictor, "answer", lambda rows, base=False: asked.extend(rows) or [
        "the cat: [0.10, 0.20, 0.50, 0.60]" if not base else "no idea"])
    tuned, picture, base, base_picture = responder(predictor, True)(
        Image.new("RGB", (200, 100), (255, 255, 255)), "where is the cat?")
    assert tuned.startswith("the cat") and base == "no idea"
    assert asked[0]["messages"][0]["content"][-1]["text"] == "where is the cat?"
    assert picture.getpixel((20, 40)) == PREDICTION_COLOUR  # left edge of (20, 20)-(100, 60)
    assert picture.getpixel((60, 40)) == (255, 255, 255)  # inside: the image itself
    assert base_picture.getpixel((20, 40)) == (255, 255, 255)  # no box in the base answer
    assert build_demo(predictor) is not None
    monkeypatch.setattr(predictor, "task", "segment")
    with pytest.raises(RunError, match="no page for 'segment'"):
        page_for(predictor)
