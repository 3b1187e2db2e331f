"""`peftvlm demo` in a real headless browser (Debian's Chromium driven by Playwright), on the
session's trained quickstart; and the CLIP-family page's class probabilities."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from serve_helpers import free_socket, held_out_by_colour, quickstart_predictor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from demo_screenshot import CHROMIUM, answer_in_browser  # noqa: E402

needs_browser = pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason="needs Debian's chromium (scripts/setup.sh installs it)")


@pytest.fixture(scope="module")
def demo_url():
    from peftvlm.serving.demo import build_demo, example_folders

    predictor = quickstart_predictor()
    with free_socket() as sock:
        port = sock.getsockname()[1]
    demo = build_demo(predictor, compare_base=True)
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True,
                ssr_mode=False, quiet=True, allowed_paths=example_folders(predictor))
    yield f"http://127.0.0.1:{port}"
    demo.close()


@pytest.mark.slow
@needs_browser
def test_demo_page_answers_an_uploaded_held_out_image_with_its_colour(demo_url, tmp_path):
    colour, image = next((c, p) for c, p in held_out_by_colour().items() if c == "yellow")
    shot = tmp_path / "demo.png"
    answers = answer_in_browser(demo_url, image=image, screenshot=shot)
    assert answers["tuned"] == colour
    assert answers["base"] and answers["base"] != colour  # the random base, beside it
    summary = quickstart_predictor().files.summary["eval"]["exact_match"]
    assert f"{summary['after']:.3f}" in answers["metrics"]
    assert shot.stat().st_size > 10_000


@pytest.mark.slow
@needs_browser
def test_demo_held_out_example_is_one_click_away(demo_url):
    predictor = quickstart_predictor()
    from peftvlm.data.batch.collate import last_answer

    expected = last_answer(predictor.examples[1]["messages"])
    assert answer_in_browser(demo_url, example=1)["tuned"] == expected
