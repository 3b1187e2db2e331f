"""Screenshot `peftvlm demo RUN` in headless Chromium after answering one image.

    python scripts/demo_screenshot.py runs/quickstart --image IMG.png --out docs/demo.png

Starts the demo on a free 127.0.0.1 port, opens it in Debian's Chromium through Playwright
(`/usr/bin/chromium`: Playwright's own browser download needs the network), uploads the image,
presses Answer, waits for both answers, prints them and saves a full-page screenshot.
On a detection run, `--text "cat . dog ."` names the classes and `--threshold` the score. The
README's docs/demo.png is made with it; tests/test_demo.py drives the page the same way.
"""

from __future__ import annotations

import argparse
import socket
import sys
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urljoin

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def chromium():
    """Debian's Chromium, headless, driven by Playwright; closed on exit."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def answer_in_browser(url: str, image: Path | None = None, example: int | None = None,
                      screenshot: Path | None = None, timeout_ms: int = 60_000,
                      text: str | None = None, threshold: float | None = None,
                      browser=None) -> dict:
    """Upload `image` (or click held-out example number `example`) on the demo page at `url`,
    fill the text box with `text` and the score threshold with `threshold` when given, press
    Answer; return the answers' text, the metrics table's text (`metrics`) and, on pages that
    draw boxes, the fine-tuned column's drawn picture as PNG bytes (`tuned_picture`).
    `browser`: an open Chromium (`chromium()`) to reuse; else one is started for this call."""
    if browser is None:
        with chromium() as own:
            return answer_in_browser(url, image, example, screenshot, timeout_ms, text,
                                     threshold, own)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    try:
        page.set_default_timeout(timeout_ms)
        page.goto(url)
        if image is not None:
            page.locator("#input-image input[type=file]").set_input_files(str(image))
        else:
            page.locator("#examples tbody tr").nth(example).click()
        page.locator("#input-image img").first.wait_for()  # the image is shown
        if text is not None:
            page.locator("#question textarea").fill(text)
        if threshold is not None:
            number = page.locator("#threshold input[type=number]")
            number.fill(str(threshold))
            number.press("Enter")
        page.locator("#answer-button").click()
        answers = {"metrics": page.locator("#eval-metrics").inner_text()}
        for which in ("tuned", "base"):
            box = page.locator(f"#{which}-answer textarea")
            page.wait_for_function("el => el.value.length > 0", arg=box.element_handle())
            answers[which] = box.input_value()
        if page.locator("#tuned-boxes").count():
            drawn = page.locator("#tuned-boxes img").first
            drawn.wait_for()
            answers["tuned_picture"] = page.request.get(
                urljoin(page.url, drawn.get_attribute("src"))).body()
        if screenshot is not None:
            page.screenshot(path=str(screenshot), full_page=True)
        return answers
    finally:
        page.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="run folder, e.g. runs/quickstart")
    parser.add_argument("--image", required=True, type=Path, help="image to upload")
    parser.add_argument("--out", type=Path, default=Path("docs/demo.png"), help="screenshot PNG")
    parser.add_argument("--text", help="the text box: a question, captions, or class names")
    parser.add_argument("--threshold", type=float, help="detection runs: the score threshold")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from peftvlm.serving.demo import launch

    port = free_port()
    demo = launch(args.run, port=port, block=False)
    try:
        answers = answer_in_browser(f"http://127.0.0.1:{port}", args.image, screenshot=args.out,
                                    text=args.text, threshold=args.threshold)
        answers.pop("tuned_picture", None)  # bytes: in the screenshot
        print(answers)
    finally:
        demo.close()
    print(f"screenshot -> {args.out}")


if __name__ == "__main__":
    main()
