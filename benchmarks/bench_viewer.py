"""Viewer render time for a real-size result, in headless Chromium (needs playwright and /usr/bin/chromium).

    python benchmarks/bench_viewer.py --columns 4156     # 36 windows; 4,096 image tokens + 60 text at 1024×1024

The result is a synthetic schema-2 one with per-step drops (3 answer steps): one token unit per column, the image tokens on a square grid over a
1024×1024 image (as Qwen3-VL's 64×64 merged grid is), so the image overlay is drawn too (--no-image: without).
Prints the time from file selection to a drawn heatmap, of one window-slider step (heatmap, strip, overlay), of a
key press on the focused heatmap (→ a unit, ↓ a window; the median and the slowest of ten, in the page: the handler
and the layout it forces), of a metric change, and of drawing each exported figure (heatmap, overlay, overlay per
window, curves, answer steps, token strip) as PNG or SVG.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import struct
import sys
import tempfile
import time
import zlib
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.test_viewer import CHROMIUM, _synthetic  # noqa: E402

SIDE = 1024  # image pixels


def grey_png(size: int) -> str:
    """A plain grey PNG of ``size``×``size``, as a data URL (the image thumbnail)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    rows = b"".join(b"\x00" + b"\xc8" * size for _ in range(size))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 8, 0, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    return "data:image/png;base64," + base64.b64encode(png).decode()


def with_image(path: Path, vision: range) -> None:
    """Place the vision tokens on a square grid over one SIDE×SIDE image (token and unit boxes, thumbnail)."""
    data = json.loads(path.read_text())
    grid = math.ceil(math.sqrt(len(vision)))
    cell = SIDE / grid
    for k, p in enumerate(vision):
        row, col = divmod(k, grid)
        box = [col * cell, row * cell, (col + 1) * cell, (row + 1) * cell]
        data["tokens"][p].update(row=row, col=col, box=box)
        data["units"][p]["box"] = box
    data["images"] = [{"path": "synthetic.png", "width": SIDE, "height": SIDE, "grid_thw": [1, 2 * grid, 2 * grid],
                       "resized_width": SIDE, "resized_height": SIDE, "thumbnail": grey_png(256), "resize": "kept",
                       "mode": "L", "notes": []}]
    path.write_text(json.dumps(data))


def with_steps(path: Path) -> None:
    """Per-step drops for 3 answer steps, summing to each cell's logprob_drop (as results since 0.3 carry)."""
    data = json.loads(path.read_text())
    data["steps"] = {"logprob_drop": [[[v / 3] * 3 for v in row] for row in data["metrics"]["logprob_drop"]]}
    path.write_text(json.dumps(data))


KEY = """([key, presses]) => {  // each press: the keydown handler and the layout it forces, in ms
    const heat = document.querySelector('#heatmap'), times = [];
    heat.focus();
    for (let n = 0; n < presses; n++) {
        const started = performance.now();
        heat.dispatchEvent(new KeyboardEvent('keydown', { key, bubbles: true, cancelable: true }));
        document.body.getBoundingClientRect();
        times.push(performance.now() - started);
    }
    return times; }"""


def key_times(page, key: str, presses: int = 10) -> str:
    times = sorted(page.evaluate(KEY, [key, presses]))
    return f"median {times[len(times) // 2]:.1f} ms, slowest {times[-1]:.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--columns", type=int, default=4156, help="swept units, one token each (36 windows each)")
    parser.add_argument("--no-image", action="store_true", help="no image: the vision tokens have no boxes, no overlay")
    parser.add_argument("--width", type=int, default=1440, help="window width (px); height 900")
    args = parser.parse_args()
    vision = range(30, args.columns - 30)
    path = _synthetic(Path(tempfile.mkdtemp()) / "big.json", args.columns, vision)
    with_steps(path)
    if not args.no_image:
        with_image(path, vision)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": args.width, "height": 900})
        page.goto((ROOT / "visualize_results.html").as_uri())
        started = time.perf_counter()
        page.set_input_files("#file-input", [str(path)])
        expect(page.locator("#heatmap")).to_have_attribute("data-columns", str(args.columns))
        if not args.no_image:
            page.wait_for_selector("canvas.overlay[data-painted='1']")
        what = "heatmap drawn" if args.no_image else "heatmap and overlay drawn"
        print(f"36 × {args.columns:,} units (schema 2): file selected to {what} {time.perf_counter() - started:.3f} s")
        for window in (17, 30):
            started = time.perf_counter()
            page.locator("#window").fill(str(window))
            print(f"window slider step to {window}: {time.perf_counter() - started:.3f} s")
        print(f"page width {page.evaluate('document.documentElement.scrollWidth')} px (window {args.width})")
        print(f"key → (next unit), 10 presses: {key_times(page, 'ArrowRight')}")
        print(f"key ↓ (next window), 10 presses: {key_times(page, 'ArrowDown')}")
        print(f"key End, Home: End {key_times(page, 'End', 3)}; Home {key_times(page, 'Home', 3)}")
        for metric in ("kl", "prob_change_pct", "logprob_drop"):
            seconds = page.evaluate("""(metric) => { const started = performance.now(), select = document.querySelector('#metric');
                select.value = metric; select.dispatchEvent(new Event('change')); document.body.getBoundingClientRect();
                return (performance.now() - started) / 1000; }""", metric)
            print(f"metric change to {metric}: {seconds:.3f} s")
        for panel, fmt in (("heatmap", "png"), ("heatmap", "svg"), ("overlay", "png"), ("overlay-grid", "png"),
                           ("overlay-grid", "svg"), ("curves", "svg"), ("steps", "png"), ("tokens", "png"),
                           ("tokens", "svg")):
            if args.no_image and panel.startswith("overlay"):
                continue
            seconds = page.evaluate("""([panel, fmt]) => { const started = performance.now();
                const made = figure(panel, fmt); if (fmt === 'png') made.toDataURL('image/png');
                return (performance.now() - started) / 1000; }""", [panel, fmt])
            print(f"figure {panel}.{fmt} drawn and encoded in the page: {seconds:.3f} s")
        browser.close()


if __name__ == "__main__":
    main()
