"""Make docs/viewer.png: the page from `telepresence demo` (the real pipeline, the sample clip) in
headless Chromium after a drag to yaw +16, pitch +3, with the stats badge collapsed.

    python docs/make_viewer_figure.py [--min-fps 10] [--out docs/viewer.png] [demo options, e.g. --device cuda]

Run it on a quiet machine: the badge shows what the sender achieves there (received fps,
glass to glass, refiner on/off), and the shot waits until it receives at least --min-fps.
Needs Chromium (/usr/bin/chromium or $CHROMIUM) and the playwright package, as tests/web does.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--autoplay-policy=no-user-gesture-required"]
YAW_DEG, PITCH_DEG = 16, 3
LIMIT_YAW_DEG = 40  # the sender's default orbit limit: a drag across the tile's width spans +-40 degrees


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "viewer.png")
    parser.add_argument("--min-fps", type=float, default=10.0, help="wait until the badge shows this many fps")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for that")
    args, demo_args = parser.parse_known_args()
    from playwright.sync_api import sync_playwright

    demo = subprocess.Popen([sys.executable, "-c", "import sys; from telepresence.cli import main; sys.exit(main())",
                             "demo", "--port", "0", *demo_args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        url = None
        for line in demo.stdout:
            if match := re.search(r"Open (http://\S+)", line):
                url = match.group(1)
                break
        if url is None:
            raise SystemExit("the demo printed no URL")
        threading.Thread(target=lambda: [None for _ in demo.stdout], daemon=True).start()  # keep its pipe drained
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=os.environ.get("CHROMIUM", "/usr/bin/chromium"),
                                                 args=CHROMIUM_FLAGS, headless=True)
            page = browser.new_page(viewport={"width": 1000, "height": 700})
            page.goto(url)
            page.wait_for_function("() => document.querySelector('.tile')?.dataset.state === 'live'", timeout=240_000)
            box = page.locator(".tile").bounding_box()
            x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
            px_per_deg = box["width"] / (2 * LIMIT_YAW_DEG)
            page.mouse.move(x, y)
            page.mouse.down()
            for step in range(1, 21):  # dragging left turns the camera to +yaw, down to +pitch
                page.mouse.move(x - YAW_DEG * px_per_deg * step / 20, y + PITCH_DEG * px_per_deg * step / 20)
                time.sleep(0.03)
            page.mouse.up()
            page.mouse.move(box["x"] + box["width"] + 60, y)  # the pointer off the tile
            page.wait_for_function(
                "(minFps) => { const fps = document.querySelector('[data-badge=\"fps\"]').textContent;"
                " const ms = document.querySelector('[data-badge=\"latency\"]').textContent;"
                " return +fps >= minFps && /\\d/.test(ms); }",
                arg=args.min_fps, timeout=args.timeout * 1000,
            )
            time.sleep(2.0)
            page.screenshot(path=str(args.out))
            print(f"wrote {args.out}: {' '.join(page.text_content('.badge').split())}, "
                  f"{' '.join(page.text_content('.pose-text').split())}")
            browser.close()
    finally:
        demo.send_signal(signal.SIGTERM)
        demo.wait(timeout=20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
