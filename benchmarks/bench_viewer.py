"""Viewer render time for a real-size result, in headless Chromium (needs playwright and /usr/bin/chromium).

    python benchmarks/bench_viewer.py --columns 4156     # 36 windows; 4,096 image tokens + 60 text at 1024×1024

Prints the time from file selection to a drawn heatmap, and of one window-slider step (heatmap, strip, overlay).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.test_viewer import CHROMIUM, _synthetic  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--columns", type=int, default=4156, help="swept positions (36 windows each)")
    args = parser.parse_args()
    path = _synthetic(Path(tempfile.mkdtemp()) / "big.json", args.columns, range(30, args.columns - 30))
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto((ROOT / "visualize_results.html").as_uri())
        started = time.perf_counter()
        page.set_input_files("#file-input", [str(path)])
        expect(page.locator("#heatmap")).to_have_js_property("width", args.columns)
        print(f"36 × {args.columns:,} columns: file selected to heatmap drawn {time.perf_counter() - started:.3f} s")
        for window in (17, 30):
            started = time.perf_counter()
            page.locator("#window").fill(str(window))
            print(f"window slider step to {window}: {time.perf_counter() - started:.3f} s")
        print(f"page width {page.evaluate('document.documentElement.scrollWidth')} px (window 1280)")
        browser.close()


if __name__ == "__main__":
    main()
