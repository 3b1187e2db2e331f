"""Screenshot `peftvlm demo RUN` in headless Chromium after answering one image.

    python scripts/demo_screenshot.py runs/quickstart --image IMG.png --out docs/demo.png

Starts the demo on a free 127.0.0.1 port, opens it in Debian's Chromium through Playwright
(`/usr/bin/chromium`: Playwright's own browser download needs the network), uploads the image,
presses Answer, waits for both answers, prints them and saves a full-page screenshot. The
README's docs/demo.png is made with it; tests/test_demo.py drives the page the same way.
"""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def answer_in_browser(url: str, image: Path | None = None, example: int | None = None,
                      screenshot: Path | None = None, timeout_ms: int = 60_000) -> dict[str, str]:
    """Upload `image` (or click held-out example number `example`) on the demo page at `url`,
    press Answer; return the answers' text and the metrics table's text (`metrics`)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(timeout_ms)
            page.goto(url)
            if image is not None:
                page.locator("#input-image input[type=file]").set_input_files(str(image))
            else:
                page.locator("#examples tbody tr").nth(example).click()
            page.locator("#input-image img").first.wait_for()  # the image is shown
            page.locator("#answer-button").click()
            answers = {"metrics": page.locator("#eval-metrics").inner_text()}
            for which in ("tuned", "base"):
                box = page.locator(f"#{which}-answer textarea")
                page.wait_for_function("el => el.value.length > 0", arg=box.element_handle())
                answers[which] = box.input_value()
            if screenshot is not None:
                page.screenshot(path=str(screenshot), full_page=True)
            return answers
        finally:
            browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="run folder, e.g. runs/quickstart")
    parser.add_argument("--image", required=True, type=Path, help="image to upload")
    parser.add_argument("--out", type=Path, default=Path("docs/demo.png"), help="screenshot PNG")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from peftvlm.serving.demo import launch

    port = free_port()
    demo = launch(args.run, port=port, block=False)
    try:
        print(answer_in_browser(f"http://127.0.0.1:{port}", args.image, screenshot=args.out))
    finally:
        demo.close()
    print(f"screenshot -> {args.out}")


if __name__ == "__main__":
    main()
