"""The results viewer in a real browser (headless Chromium driven by Playwright).

Screenshots go to tests/artifacts/. Where Chromium or Playwright is missing these tests are skipped,
unless MASK_IMPACT_REQUIRE_BROWSER=1 (as in CI), where that is an error.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import pytest

from mask_impact.cli import main
from tests.support import ROOT, watched_page

ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
XSS_PROMPT = "<img src=x onerror=alert(1)></script><script>alert(2)</script> & done"


def expect(target):
    """Playwright's auto-waiting assertions (imported late: playwright may be missing, then the tests skip)."""
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(target)


@pytest.fixture(scope="module")
def browser():
    missing = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing = "playwright is not installed"
    if missing is None and not Path(CHROMIUM).exists():
        missing = f"no Chromium at {CHROMIUM}"
    if missing:
        if os.environ.get("MASK_IMPACT_REQUIRE_BROWSER") == "1":
            pytest.fail(missing)
        pytest.skip(missing)
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        yield instance
        instance.close()


@pytest.fixture()
def page(browser):
    with watched_page(browser, 1280, 900) as page:
        yield page


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from mask_impact.demo import demo_model_path

    folder = tmp_path_factory.mktemp("viewer")
    common = ["--output-dir", str(folder), "--no-progress", "--generate-top", "3"]
    assert main(["--demo", "--mask-mode", "both", "--output", "vision", *common], True) == 0
    assert main(["--model", str(demo_model_path(True)), "--prompt", "What's in this image?",
                 "--output", "no_image", *common], True) == 0
    assert main(["--demo", "--output", "text", *common], False) == 0
    assert main(["--demo", "--prompt", XSS_PROMPT, "--output", "xss", *common], False) == 0
    return folder


def _drawn_pixels(page, selector: str) -> int:
    return page.evaluate("""(selector) => {
        const canvas = document.querySelector(selector);
        const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
        let count = 0;
        for (let o = 0; o < data.length; o += 4) {
            const grey = data[o] === data[o + 1] && data[o + 1] === data[o + 2];
            if (data[o + 3] > 0 && !(grey && data[o] >= 235)) count++;
        }
        return count;
    }""", selector)


def test_embedded_run_draws_heatmap_and_overlay(page, results):
    page.goto((results / "vision.html").as_uri())
    page.wait_for_selector("canvas.overlay[data-painted='1']")
    assert _drawn_pixels(page, "#heatmap") > 100
    data = json.loads((results / "vision.json").read_text())
    assert page.locator("#heatmap").evaluate("c => c.height / Number(c.dataset.cellH)") == len(data["windows"])
    assert page.locator("canvas.overlay").count() == len(data["images"]) == 1
    assert _drawn_pixels(page, "canvas.overlay") > 1000
    assert page.locator("#answer").text_content() == data["baseline"]["text"]
    assert page.locator("#top tbody tr").count() == 1 + len(data["generations"])
    assert page.locator("#stage").text_content().startswith("attention knockout in the decoder")
    assert "attention knockout in the decoder" in page.locator("#meta").text_content()
    # images are counted from 1 on the page, as the unit labels and the CSV count them (the JSON's index is 0)
    assert data["images"] and all(tok["image"] == 0 for tok in data["tokens"] if tok["modality"] == "vision")
    assert page.locator(".overlay-box").text_content().startswith("image 1: ")
    assert page.locator("#strip .chip").text_content().startswith("image 1 · ")
    assert page.locator("#thumbs img").get_attribute("alt") == "image 1"
    shown = page.locator("#run").inner_text()
    assert "image 1" in shown and "image 0" not in shown
    page.screenshot(path=str(ARTIFACTS / "viewer_vision.png"), full_page=True)


def test_a_tiny_picture_is_enlarged_to_be_seen_and_hovered(page, tmp_path):
    """A 2×3-pixel picture (the processor upscales it to 64×96 for the model): its overlay is 64×96 canvas pixels
    (its longer side 96, not the 4× of an ordinary picture), each of its own pixels one flat block (not smoothed
    into its neighbours), and hovering its top-left token names that token."""
    from PIL import Image

    picture = Image.new("RGB", (2, 3), (200, 10, 10))
    picture.putpixel((1, 2), (10, 10, 200))
    picture.save(tmp_path / "tiny.png")
    assert main(["--demo", "--image", str(tmp_path / "tiny.png"), "--output-dir", str(tmp_path), "--output", "tiny",
                 "--mask-mode", "vision", "--no-progress"], True) == 0
    page.goto((tmp_path / "tiny.html").as_uri())
    page.wait_for_selector("canvas.overlay[data-painted='1']")
    size, scale = page.evaluate("[[document.querySelector('canvas.overlay').width, "
                                "document.querySelector('canvas.overlay').height], "
                                "document.querySelector('canvas.overlay').scale]")
    assert size == [64, 96] and scale == 32
    page.locator("#opacity").fill("0")  # the picture alone
    page.locator("#opacity").dispatch_event("input")
    pixels = page.evaluate("""() => { const c = document.querySelector('canvas.overlay'), g = c.getContext('2d');
        return [[8, 8], [56, 88], [37, 69], [27, 59]].map(([x, y]) => Array.from(g.getImageData(x, y, 1, 1).data)); }""")
    assert pixels[0][:3] == [200, 10, 10] and pixels[1][:3] == [10, 10, 200]  # the picture's own pixels
    assert pixels[2][:3] == [10, 10, 200] and pixels[3][:3] == [200, 10, 10]  # no blur 5 px from the blocks' edge
    data = json.loads((tmp_path / "tiny.json").read_text())
    first = next(tok for tok in data["tokens"] if tok["modality"] == "vision")
    box = page.locator("canvas.overlay").bounding_box()
    page.mouse.move(box["x"] + 2, box["y"] + 2)
    expect(page.locator("#tooltip")).to_be_visible()
    assert f"(position {first['index']}, id {first['id']})" in page.locator("#tooltip").text_content()


def test_the_maps_figure_enlarges_a_tiny_picture_as_the_page_does(page, tmp_path):
    """The maps side by side, exported: a 2×3-pixel picture is 64×96 as on the page (it was capped at 4×: an 8×12
    speck), and each panel's colour bar keeps a readable width under a picture narrower than it (it was as narrow
    as the picture)."""
    import xml.etree.ElementTree as ET

    from PIL import Image

    Image.new("RGB", (2, 3), (200, 10, 10)).save(tmp_path / "tiny.png")
    common = ["--demo", "--image", str(tmp_path / "tiny.png"), "--output-dir", str(tmp_path), "--no-progress",
              "--no-html", "--generate-top", "0"]
    assert main([*common, "--mask-mode", "vision", "--output", "decoder"], True) == 0
    assert main([*common, "--stage", "pixels", "--unit", "token", "--output", "pixels"], True) == 0
    page.goto((ROOT / "visualize_results.html").as_uri())
    page.set_input_files("#file-input", [str(tmp_path / "decoder.json"), str(tmp_path / "pixels.json")])
    expect(page.locator("#maps canvas.overlay[data-painted='1']")).to_have_count(2)
    assert page.locator("#maps canvas.overlay").evaluate_all("cs => cs.map((c) => [c.width, c.height])") == [[64, 96]] * 2
    page.select_option("#maps-scale", "own")  # a colour bar per panel
    root = ET.parse(_export(page, "maps", "svg", tmp_path)).getroot()
    sizes = [(node.get("width"), node.get("height")) for node in root.iter(f"{SVG}image")]
    assert sizes == [("64", "96"), ("120", "10")] * 2, sizes  # per panel: the picture, its colour bar


def test_hover_shows_the_right_token(page, results):
    data = json.loads((results / "vision.json").read_text())
    page.goto((results / "vision.html").as_uri())
    canvas = page.locator("#heatmap")
    box = canvas.bounding_box()
    cell_w, cell_h = canvas.evaluate("c => [Number(c.dataset.cellW), Number(c.dataset.cellH)]")
    for window, column in ((1, 0), (2, len(data["units"]) - 1), (0, 7)):
        page.mouse.move(box["x"] + (column + 0.5) * cell_w, box["y"] + (window + 0.5) * cell_h)
        tip = page.locator("#tooltip")
        assert tip.is_visible()
        token = data["tokens"][data["units"][column]["keys"][0]]
        text = tip.text_content()
        assert json.dumps(token["text"]) in text and f"position {token['index']}," in text
        first, last = data["windows"][window]
        assert data["window_labels"][window] == (f"layer {first}" if first == last else f"layers {first}–{last}")
        assert text.splitlines()[3] == data["window_labels"][window]  # the window named by the result's own label
        assert f"modality {token['modality']}" in text
    page.screenshot(path=str(ARTIFACTS / "viewer_hover.png"))


def test_text_only_run_has_no_image_overlay(page, results):
    page.goto((results / "text.html").as_uri())
    page.wait_for_selector("#heatmap")
    assert _drawn_pixels(page, "#heatmap") > 50
    assert page.locator("canvas.overlay").count() == 0
    assert not page.locator("#overlay-section").is_visible()
    page.screenshot(path=str(ARTIFACTS / "viewer_text.png"), full_page=True)


def test_compare_view_opens_with_two_files(page, results):
    page.goto((ROOT / "visualize_results.html").as_uri())
    assert not page.locator("#run").is_visible()
    page.set_input_files("#file-input", [str(results / "vision.json"), str(results / "no_image.json")])
    page.wait_for_selector("#compare:not(.hidden)")
    assert int(page.locator("#heatmap-diff").get_attribute("data-pairs")) >= 5  # the shared question tokens
    assert _drawn_pixels(page, "#heatmap-a") > 50 and _drawn_pixels(page, "#heatmap-b") > 50
    assert _drawn_pixels(page, "#heatmap-diff") > 20
    assert "What" in page.locator("#diff-tokens").text_content()
    page.screenshot(path=str(ARTIFACTS / "viewer_compare.png"), full_page=True)


@pytest.mark.parametrize("how", ["embedded", "file"])
def test_hostile_prompt_renders_inertly(page, results, how):
    if how == "embedded":
        page.goto((results / "xss.html").as_uri())
    else:
        page.goto((ROOT / "visualize_results.html").as_uri())
        page.set_input_files("#file-input", [str(results / "xss.json")])
    page.wait_for_selector("#run:not(.hidden)")
    page.wait_for_timeout(300)
    assert page.dialogs == []
    assert page.locator("#prompt").text_content() == XSS_PROMPT
    assert page.locator("img[src='x']").count() == 0
    assert page.locator("script").count() == 2  # the data block and the viewer, nothing injected
    assert XSS_PROMPT in page.locator("#strip").text_content()  # the tokens, shown as the text they are
    page.screenshot(path=str(ARTIFACTS / f"viewer_xss_{how}.png"), full_page=True)


def _synthetic(path: Path, num_positions: int, vision: range) -> Path:
    """A schema-2 result of 36 windows × ``num_positions`` token units with random metrics."""
    rng = random.Random(0)
    windows, positions = [[w, w] for w in range(36)], list(range(num_positions))
    tokens = [{"index": p, "id": p, "text": f"t{p}", "modality": "vision" if p in vision else "text",
               "image": 0 if p in vision else None, "t": 0, "row": None, "col": None, "box": None}
              for p in positions]
    units = [{"index": p, "kind": "token", "label": tok["text"], "keys": [p], "queries": None, "queries_from": None,
              "modality": tok["modality"], "image": tok["image"], "box": tok["box"]} for p, tok in enumerate(tokens)]
    grid = [[rng.gauss(0, 1) for _ in positions] for _ in windows]
    data = {"schema_version": 2, "meta": {"settings": {}}, "prompt": "big", "images": [], "tokens": tokens,
            "baseline": {"text": "x", "token_ids": [1, 2, 3], "tokens": ["a", "b", "c"], "logprobs": [-1, -1, -1],
                         "stopped_at_eos": False},
            "windows": windows, "units": units, "generations": [],
            "metrics": {"logprob_drop": grid, "prob_change_pct": grid, "kl": grid,
                        "top1_changed": [[v > 1 for v in row] for row in grid],
                        "first_divergence": [[0 if v > 1 else None for v in row] for row in grid]}}
    path.write_text(json.dumps(data))
    return path


def test_a_full_size_sweep_renders_completely(page, tmp_path):
    """36 windows × 1,100 positions. The time is written to tests/artifacts (speed is not asserted)."""
    path = _synthetic(tmp_path / "big.json", 1100, range(20, 1044))
    page.goto((ROOT / "visualize_results.html").as_uri())
    started = time.perf_counter()
    page.set_input_files("#file-input", [str(path)])
    expect(page.locator("#heatmap")).to_have_attribute("data-columns", "1100")
    elapsed = time.perf_counter() - started
    width = page.locator("#heatmap").evaluate("c => c.width")
    assert width >= 1100 and _drawn_pixels(page, "#heatmap") > 36 * width * 0.9
    (ARTIFACTS / "viewer_full_size_render_seconds.txt").write_text(f"{elapsed:.3f}\n")
    page.screenshot(path=str(ARTIFACTS / "viewer_full_size.png"))


def test_runs_are_named_and_files_that_cannot_be_shown_are_said(page, results, tmp_path):
    page.goto((results / "vision.html").as_uri())
    page.wait_for_selector("#run:not(.hidden)")
    assert page.title() == "vision — mask_impact viewer"  # before: the same title for every run
    assert "vision" in page.locator("#meta").text_content()
    page.goto((ROOT / "visualize_results.html").as_uri())
    page.set_input_files("#file-input", [str(results / "vision.csv")])
    expect(page.locator("#message")).to_contain_text("is not a JSON file")  # waits: files load async
    message = page.locator("#message").text_content()
    assert "vision.csv is not a JSON file" in message and "Unexpected" not in message  # before: a raw JS error
    files = [str(results / f"{name}.json") for name in ("vision", "no_image", "text")]
    page.set_input_files("#file-input", files)
    expect(page.locator("#message")).to_contain_text("3 runs: vision.json in full, compared with no_image.json")
    assert page.title() == "vision.json — mask_impact viewer"
    for n in range(7):
        (tmp_path / f"copy{n}.json").write_text((results / "vision.json").read_text())
    page.set_input_files("#file-input", [str(tmp_path / f"copy{n}.json") for n in range(7)])
    expect(page.locator("#message")).to_contain_text("7 files were given; the viewer shows up to 6")
    assert "copy5.json" in page.locator("#message").text_content() and "copy6.json" not in page.locator("#message").text_content()


def test_one_sided_metrics_and_an_unchanged_answer_are_labelled_truly(page, results, tmp_path):
    data = json.loads((results / "text.json").read_text())
    data["metrics"]["first_divergence"] = [[None] * len(row) for row in data["metrics"]["first_divergence"]]
    data["metrics"]["top1_changed"] = [[False] * len(row) for row in data["metrics"]["top1_changed"]]
    (tmp_path / "steady.json").write_text(json.dumps(data))
    page.goto((ROOT / "visualize_results.html").as_uri())
    page.set_input_files("#file-input", [str(tmp_path / "steady.json")])
    expect(page).to_have_title("steady.json — mask_impact viewer")
    page.select_option("#metric", "kl")
    labels = page.locator("#colorbar-labels").text_content()
    assert "0 (no change)" in labels and "helps" not in labels  # KL cannot be negative
    page.select_option("#metric", "first_divergence")
    assert page.locator("#colorbar-labels").text_content() == "no knockout changed the greedy answer"


def test_compare_with_nothing_shared_says_so_and_keeps_no_stale_map(page, results, tmp_path):
    data = json.loads((results / "vision.json").read_text())
    data["windows"] = [[a + 100, b + 100] for a, b in data["windows"]]  # no window in common
    (tmp_path / "elsewhere.json").write_text(json.dumps(data))
    page.goto((ROOT / "visualize_results.html").as_uri())
    page.set_input_files("#file-input", [str(results / "vision.json"), str(results / "no_image.json")])
    page.wait_for_selector("#compare:not(.hidden)")
    assert page.locator("#heatmap-diff").is_visible() and "no difference" not in page.locator("#compare-message").text_content()
    page.set_input_files("#file-input", [str(results / "vision.json"), str(tmp_path / "elsewhere.json")])
    expect(page.locator("#compare-message")).to_contain_text("share no layer window")  # waits: files load async
    assert not page.locator("#heatmap-diff").is_visible()  # before: the previous pair's difference stayed


def test_a_long_prompt_fits_the_window_and_tooltips_stay_on_screen(page, tmp_path):
    path = _synthetic(tmp_path / "long.json", 1600, range(0))  # 1,600 text tokens
    page.goto((ROOT / "visualize_results.html").as_uri())
    page.set_input_files("#file-input", [str(path)])
    expect(page.locator("#heatmap")).to_have_attribute("data-columns", "1600")
    assert page.evaluate("document.documentElement.scrollWidth") <= 1280  # before: 16,301 px wide
    assert page.locator("#strip").bounding_box()["width"] <= 1280  # the token strip wraps
    box = page.evaluate("""() => {
        showTooltip({ clientX: window.innerWidth - 3, clientY: window.innerHeight - 3 }, "a\\nlong\\ntooltip text");
        const r = document.querySelector('#tooltip').getBoundingClientRect();
        return [r.left, r.top, r.right, r.bottom, window.innerWidth, window.innerHeight]; }""")
    assert box[0] >= 0 and box[1] >= 0 and box[2] <= box[4] and box[3] <= box[5]  # before: off-screen


def test_token_text_is_readable_and_the_top_table_follows_the_metric(page, results):
    page.goto((results / "vision.html").as_uri())
    page.wait_for_selector("#run:not(.hidden)")
    contrasts = page.evaluate("""() => [...document.querySelectorAll('#strip .tok')].filter((s) => s.style.background)
        .map((s) => {
            const lum = (css) => { const [r, g, b] = css.match(/\\d+/g).slice(0, 3).map((c) => { c /= 255;
                return c <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4; }); return 0.2126 * r + 0.7152 * g + 0.0722 * b; };
            const [a, b] = [lum(getComputedStyle(s).color), lum(getComputedStyle(s).backgroundColor)];
            return (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05); })""")
    assert contrasts and min(contrasts) >= 4.5  # WCAG AA; before: black on full blue
    page.select_option("#metric", "kl")
    cells = page.locator("#top tbody tr").evaluate_all("rows => rows.slice(1).map((r) => r.children[4].textContent)")
    values = [float(v) for v in cells]
    assert values == sorted(values, reverse=True)  # ranked by the chosen metric, not logprob_drop
    assert "vision (image 1, row" in page.locator("#top tbody").text_content()  # images counted from 1


def test_batch_links_work_from_the_batch_folder_and_are_not_dead_elsewhere(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "b.yaml").write_text("defaults:\n  demo: true\n  layers: '0'\n  generate_top: 0\nruns:\n"
                                     "  - name: one\n    prompt: hi\n    figures: png\n")
    assert main(["--config", "b.yaml", "--no-progress"], False) == 0
    folder = tmp_path / "output" / "b"
    page.goto((folder / "index.html").as_uri())
    hrefs = page.locator("#batch-runs a").evaluate_all("links => links.map(a => a.href)")
    assert hrefs == [(folder / name).as_uri() for name in ("one.html", "one.heatmap.png")]  # the run's page, its figure
    assert all((folder / name).exists() for name in ("one.html", "one.heatmap.png"))
    page.goto((ROOT / "visualize_results.html").as_uri())
    page.set_input_files("#file-input", [str(folder / "index.json")])
    expect(page.locator("#message")).to_contain_text("open index.html in the batch folder")
    assert page.locator("#batch-runs a").count() == 0  # before: links resolved next to the viewer, dead
    assert "one.html" in page.locator("#batch-runs").text_content()


def test_the_slider_and_a_click_show_their_window_and_the_heatmap_marks_it(page, results):
    labels = json.loads((results / "vision.json").read_text())["window_labels"]
    dark = """() => { const c = document.querySelector('#heatmap');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0;
        for (let o = 0; o < d.length; o += 4) if (d[o] === 17 && d[o + 1] === 17 && d[o + 2] === 17) n++;
        return n; }"""
    page.goto((results / "vision.html").as_uri())
    page.wait_for_selector("#run:not(.hidden)")
    assert page.locator("#aggregate").input_value() == "max" and page.evaluate(dark) == 0
    strip_before = page.locator("#strip").inner_html()
    page.locator("#window").fill("2")  # before: in "max over windows" the slider changed nothing visible
    assert page.locator("#aggregate").input_value() == "window"
    assert page.locator("#strip").inner_html() != strip_before and page.evaluate(dark) > 0
    canvas = page.locator("#heatmap")
    canvas.scroll_into_view_if_needed()  # the slider lies below the answer steps: the page scrolled to it
    box = canvas.bounding_box()
    cell_w, cell_h = canvas.evaluate("c => [Number(c.dataset.cellW), Number(c.dataset.cellH)]")
    page.mouse.click(box["x"] + 3.5 * cell_w, box["y"] + 1.5 * cell_h)
    assert page.locator("#window").input_value() == "1" and page.locator("#window-label").text_content() == labels[1] == "layer 1"
    assert page.locator("#strip .tok.selected").count() == 1


def test_heatmap_has_height_axis_titles_and_token_labels(page, results):
    data = json.loads((results / "vision.json").read_text())
    page.goto((results / "vision.html").as_uri())
    page.wait_for_selector("#run:not(.hidden)")
    assert page.locator("#heatmap").bounding_box()["height"] >= 100  # 3 windows: before 48 px
    assert int(page.locator("#column-labels").get_attribute("data-labels")) == len(data["units"])
    assert _drawn_pixels(page, "#column-labels") > 200  # the token texts are drawn
    assert "y: layer windows" in page.text_content("body") and "x: swept units" in page.text_content("body")
    page.screenshot(path=str(ARTIFACTS / "viewer_labels.png"), full_page=True)


def test_impact_curves_have_axes_a_legend_and_only_the_lines_drawn(page, results):
    page.goto((results / "text.html").as_uri())
    page.wait_for_selector("#run:not(.hidden)")
    assert page.locator("#curves").get_attribute("data-series") == "1"  # a text-only run has no vision line
    page.locator("#strip .tok").nth(3).click()
    assert page.locator("#curves").get_attribute("data-series") == "2"
    assert "click a token" in page.text_content("body")
    page.screenshot(path=str(ARTIFACTS / "viewer_curves.png"), full_page=True)


def test_one_sink_token_does_not_wash_out_the_colour_scale(page, tmp_path):
    path = _synthetic(tmp_path / "sink.json", 200, range(50, 150))
    data = json.loads(path.read_text())
    data["tokens"][0]["modality"] = data["units"][0]["modality"] = "special"  # a sink token with a huge effect
    for row in data["metrics"]["logprob_drop"]:
        row[0] = 500.0
    path.write_text(json.dumps(data))
    page.goto((ROOT / "visualize_results.html").as_uri())
    page.set_input_files("#file-input", [str(path)])
    expect(page.locator("#colorbar-labels")).to_contain_text("≥ ")
    robust = float(page.locator("#colorbar-labels").text_content().split("≥ ")[1].split(" ")[0])
    assert 1 < robust < 5  # the 99th percentile of the other tokens; before: 500, everything else near white
    page.select_option("#scale", "full")
    assert "500" in page.locator("#colorbar-labels").text_content()


def test_the_overlay_repaints_in_place_with_an_opacity_control(page, results):
    page.goto((results / "vision.html").as_uri())
    page.wait_for_selector("canvas.overlay[data-painted='1']")
    painted = page.evaluate("""() => {
        const canvas = document.querySelector('canvas.overlay');
        canvas.mark = 'kept';
        const slider = document.querySelector('#window');
        slider.value = '2'; slider.dispatchEvent(new Event('input'));  // repaint, then read at once
        const now = document.querySelector('canvas.overlay');
        const d = now.getContext('2d').getImageData(0, 0, now.width, now.height).data;
        let red = 0; for (let o = 0; o < d.length; o += 4) if (d[o] > d[o + 1] + 60 && d[o] > d[o + 2] + 30) red++;
        return [now.mark, red]; }""")
    assert painted[0] == "kept" and painted[1] > 100  # before: a fresh blank canvas, painted later
    def tinted(opacity):  # pixels the impact colour has pushed away from grey
        page.locator("#opacity").fill(str(opacity))
        return page.evaluate("""() => { const c = document.querySelector('canvas.overlay');
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0;
            for (let o = 0; o < d.length; o += 4) if (Math.max(d[o], d[o + 1], d[o + 2]) - Math.min(d[o], d[o + 1], d[o + 2]) > 40) n++;
            return n; }""")
    assert tinted(0) < tinted(100)


def test_top_rows_open_their_knockout_and_compare_shares_one_scale(page, results):
    page.goto((results / "vision.html").as_uri())
    page.wait_for_selector("#run:not(.hidden)")
    row = page.locator("#top tbody tr").nth(1)
    layers, unit = row.locator("td").nth(0).text_content(), int(row.locator("td").nth(1).text_content())
    row.click()
    assert page.locator("#window-label").text_content() == layers  # the window's label, in the table and the readout
    assert page.evaluate("state.selected") == unit  # before: the rows could not be clicked
    page.goto((ROOT / "visualize_results.html").as_uri())
    page.set_input_files("#file-input", [str(results / "vision.json"), str(results / "no_image.json")])
    page.wait_for_selector("#compare:not(.hidden)")
    assert page.locator("#heatmap-a").get_attribute("data-scale") == page.locator("#heatmap-b").get_attribute("data-scale")


def _panel_bar_pixels(page, selector: str) -> int:
    """Clearly red or blue pixels in a heatmap panel's colour bar (36 px above its cells, 10 px tall, 160 px wide;
    its ticks below it)."""
    return page.evaluate("""(selector) => {
        const c = document.querySelector(selector), { x, y } = c.layout;
        const d = c.getContext('2d').getImageData(x, y - 36, 160, 10).data; let n = 0;
        for (let o = 0; o < d.length; o += 4) if (Math.max(d[o], d[o + 2]) - Math.min(d[o], d[o + 2]) > 60) n++;
        return n; }""", selector)


def test_compare_has_a_colour_bar_labels_and_hover_on_each_panel(page, results):
    page.goto((ROOT / "visualize_results.html").as_uri())
    page.set_input_files("#file-input", [str(results / "vision.json"), str(results / "no_image.json")])
    page.wait_for_selector("#compare:not(.hidden)")
    assert "A and B on one scale" in page.locator("#compare-scale").text_content()
    for selector in ("#heatmap-a", "#heatmap-b", "#heatmap-diff"):  # before: no colour bar on any, no labels
        assert _panel_bar_pixels(page, selector) > 100
        labels = page.evaluate("""(s) => { const c = document.querySelector(s), l = c.layout;
            const dark = (x, y, w, h) => { const d = c.getContext('2d').getImageData(x, y, w, h).data; let n = 0;
                for (let o = 0; o < d.length; o += 4) if (d[o] < 120 && d[o + 1] < 120 && d[o + 2] < 120) n++; return n; };
            return [dark(0, l.y, l.x - 4, l.labelsY - 8 - l.y), dark(l.x, l.labelsY, c.width - l.x, c.height - l.labelsY)]; }""",
                               selector)
        assert labels[0] > 30 and labels[1] > 100  # window labels left of the cells, unit labels and x title below
    for name in ("a", "b"):
        canvas = page.locator(f"#heatmap-{name}")
        canvas.scroll_into_view_if_needed()
        box = canvas.bounding_box()
        x, y, cell_w, cell_h = canvas.evaluate("c => [c.layout.x, c.layout.y, c.layout.cellW, c.layout.cellH]")
        page.mouse.move(box["x"] + x + cell_w / 2, box["y"] + y + cell_h / 2)
        assert page.locator("#tooltip").is_visible()
        assert page.locator("#tooltip").text_content().startswith(name.upper() + ": token")
    diff = page.locator("#heatmap-diff")
    diff.scroll_into_view_if_needed()
    box = diff.bounding_box()
    x, y, cell_w, cell_h = diff.evaluate("c => [c.layout.x, c.layout.y, c.layout.cellW, c.layout.cellH]")
    page.mouse.move(box["x"] + x + cell_w / 2, box["y"] + y + cell_h / 2)
    assert "A − B " in page.locator("#tooltip").text_content()


def _schema_1(data: dict) -> dict:
    """A schema-2 token-unit result written as schema 1 wrote it: swept positions, generations by position."""
    old = {key: value for key, value in data.items() if key not in ("units", "stage", "window_labels")}  # added later
    old["schema_version"] = 1
    old["positions"] = [unit["keys"][0] for unit in data["units"]]
    old["generations"] = [{"window": g["window"], "position": data["units"][g["unit"]]["keys"][0], "text": g["text"],
                           "token_ids": g["token_ids"]} for g in data["generations"]]
    return old


def test_a_schema_1_result_still_renders_and_a_newer_schema_is_refused(page, results, tmp_path):
    data = json.loads((results / "vision.json").read_text())
    keep = [i for i, unit in enumerate(data["units"]) if unit["modality"] != "vision"]  # as --mask-mode text sweeps
    data["units"] = [data["units"][i] for i in keep]
    data["metrics"] = {m: [[row[i] for i in keep] for row in grid] for m, grid in data["metrics"].items()}
    data["generations"] = [dict(g, unit=keep.index(g["unit"])) for g in data["generations"] if g["unit"] in keep]
    old = _schema_1(data)
    assert old["positions"] != list(range(len(old["positions"]))) and old["generations"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    page.goto((ROOT / "visualize_results.html").as_uri())
    page.set_input_files("#file-input", [str(tmp_path / "old.json")])
    expect(page).to_have_title("old.json — mask_impact viewer")  # waits: files load async
    cell_w = page.evaluate("Number(document.querySelector('#heatmap').dataset.cellW)")
    assert page.locator("#heatmap").evaluate("c => c.width") == len(old["positions"]) * cell_w  # a column per position
    assert _drawn_pixels(page, "#heatmap") > 50
    assert f"× {len(old['positions'])} token units" in page.locator("#meta").text_content()
    canvas = page.locator("#heatmap")
    box = canvas.bounding_box()
    cell_w, cell_h = canvas.evaluate("c => [Number(c.dataset.cellW), Number(c.dataset.cellH)]")
    column = len(old["positions"]) - 2
    page.mouse.move(box["x"] + (column + 0.5) * cell_w, box["y"] + 0.5 * cell_h)
    token = old["tokens"][old["positions"][column]]
    tip = page.locator("#tooltip").text_content()
    assert tip.startswith(f"token {json.dumps(token['text'])}  (position {token['index']},")
    first, last = old["windows"][0]
    assert f"\nlayers {first}–{last}\n" in tip  # no window_labels: the window named by its layers, as before
    assert page.locator("#row-labels div").first.text_content() == (f"{first}" if first == last else f"{first}–{last}")
    assert page.locator("#stage").text_content().startswith("attention knockout in the decoder")  # no stage: decoder
    rows = page.locator("#top tbody tr")
    assert rows.count() == 1 + len(old["generations"])
    texts = rows.evaluate_all("rows => rows.slice(1).map((r) => r.children[5].textContent)")
    assert sorted(texts) == sorted(g["text"] for g in old["generations"])  # generations found their units
    assert page.locator("#strip .tok[style*='background']").count() == len(old["positions"])  # swept tokens coloured
    assert page.locator("#strip .chip[style*='background']").count() == 0  # the image was not swept
    page.screenshot(path=str(ARTIFACTS / "viewer_schema_1.png"), full_page=True)

    newer = dict(data, schema_version=3)
    (tmp_path / "newer.json").write_text(json.dumps(newer))
    page.set_input_files("#file-input", [str(tmp_path / "newer.json")])
    expect(page.locator("#message")).to_contain_text("newer.json is a schema 3 result")
    assert "reads schemas 1 and 2" in page.locator("#message").text_content()


WORD_PROMPT = "What colour is the shapeless thingamajig?"


@pytest.fixture(scope="module")
def unit_results(tmp_path_factory):
    """Schema-2 results over each kind of unit: image regions, flows, groups, words."""
    folder = tmp_path_factory.mktemp("units")
    common = ["--demo", "--output-dir", str(folder), "--no-progress", "--generate-top", "3"]
    assert main([*common, "--unit", "region:2", "--output", "region"], True) == 0
    assert main([*common, "--flow", "image->last", "--flow", "question->last", "--flow", "image->question",
                 "--output", "flow"], True) == 0
    assert main([*common, "--unit", "groups", "--group", "shape=32,32,64,64", "--group", "q=text:color is",
                 "--group", "p=pos:0-3", "--output", "groups"], True) == 0
    assert main([*common, "--unit", "word", "--mask-mode", "both", "--prompt", WORD_PROMPT, "--output", "word"], True) == 0
    return folder


def _hover_column(page, column: int, window: int = 0) -> str:
    canvas = page.locator("#heatmap")
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    cell_w, cell_h = canvas.evaluate("c => [Number(c.dataset.cellW), Number(c.dataset.cellH)]")
    page.mouse.move(box["x"] + (column + 0.5) * cell_w, box["y"] + (window + 0.5) * cell_h)
    return page.locator("#tooltip").text_content()


def _strip_token(page, data: dict, position: int):
    """The token strip's span for a prompt position (an image's tokens are one chip, not spans)."""
    assert data["tokens"][position]["modality"] != "vision"
    return page.locator("#strip .tok").nth(sum(t["modality"] != "vision" for t in data["tokens"][:position]))


def _ranges(positions: list[int]) -> str:
    parts: list[list[int]] = []
    for p in sorted(positions):
        if parts and parts[-1][1] == p - 1:
            parts[-1][1] = p
        else:
            parts.append([p, p])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in parts)


def test_flows_show_a_chart_with_one_curve_per_flow_and_a_legend(page, unit_results):
    data = json.loads((unit_results / "flow.json").read_text())
    labels = [unit["label"] for unit in data["units"]]
    assert labels == ["image->last", "question->last", "image->question"]
    page.goto((unit_results / "flow.html").as_uri())
    page.wait_for_selector("#flow-section:not(.hidden)")
    assert page.locator("#flow-metric").input_value() == "prob_change_pct"
    assert page.locator("#flow-legend .flow-key").all_text_contents() == labels
    chart = page.locator("#flow-chart")
    assert chart.get_attribute("data-series") == "3"
    colours = page.evaluate("SERIES_COLOURS.slice(0, 3)")
    counts = chart.evaluate("""(c, colours) => {
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        return colours.map((hex) => { const [r, g, b] = [1, 3, 5].map((k) => parseInt(hex.slice(k, k + 2), 16)); let n = 0;
            for (let o = 0; o < d.length; o += 4) if (Math.abs(d[o] - r) + Math.abs(d[o + 1] - g) + Math.abs(d[o + 2] - b) < 30) n++;
            return n; }); }""", colours)
    assert all(n > 40 for n in counts), counts  # every curve is drawn
    # the lowest point of the chart is a point of a flow whose value there is the lowest
    values = data["metrics"]["prob_change_pct"]
    lowest = min(v for row in values for v in row if v is not None)
    w = next(w for w, row in enumerate(values) if lowest in row)
    at = chart.evaluate("""(c, [w, n]) => { const left = 84, right = c.width - 24, bottom = c.height - 40;
        const x = Math.round(left + w / (n - 1) * (right - left));
        return Array.from(c.getContext('2d').getImageData(x, bottom, 1, 1).data.slice(0, 3)); }""", [w, len(data["windows"])])
    expected = [colours[i] for i, v in enumerate(values[w]) if v == lowest]
    assert any(sum(abs(a - int(hex_[k:k + 2], 16)) for a, k in zip(at, (1, 3, 5))) < 30 for hex_ in expected), (at, expected)
    box = chart.bounding_box()
    page.mouse.move(box["x"] + 84 + 2, box["y"] + 100)  # over the first window
    tip = page.locator("#tooltip").text_content()
    assert tip.startswith(f"{data['window_labels'][0]}  (prob_change_pct)") and all(label in tip for label in labels)
    assert _drawn_pixels(page, "#heatmap") > 100  # the heatmap still shows
    assert not page.locator("#curves-section").is_visible()  # its text/vision means say nothing about flows
    tip = _hover_column(page, 1)
    assert tip.startswith('flow "question->last"  (unit 1)')
    unit = data["units"][1]
    assert f"keys {_ranges(unit['keys'])}" in tip and f"queries {_ranges(unit['queries'])}" in tip
    page.locator("#flow-legend .flow-key").nth(2).click()
    assert page.evaluate("state.selected") == 2
    page.screenshot(path=str(ARTIFACTS / "viewer_flows.png"), full_page=True)


def _near(rgb, want, tolerance: int) -> bool:
    return max(abs(a - b) for a, b in zip(rgb, want)) <= tolerance


def _overlay_pixels(page, box: list[float]) -> list[tuple[int, int, int]]:
    """The overlay's pixels inside ``box`` (original-image pixels), 3 px in from its edges, as (r, g, b)."""
    data = page.evaluate("""(box) => {
        const c = document.querySelector('canvas.overlay'), s = c.scale;
        const [x0, y0, x1, y1] = box.map((v) => Math.round(v * s));
        return Array.from(c.getContext('2d').getImageData(x0 + 3, y0 + 3, x1 - x0 - 6, y1 - y0 - 6).data); }""", box)
    return [tuple(data[o:o + 3]) for o in range(0, len(data), 4)]


def test_region_units_are_boxes_on_the_image_overlay(page, unit_results):
    data = json.loads((unit_results / "region.json").read_text())
    units = data["units"]
    assert [unit["kind"] for unit in units] == ["region"] * 4
    # colour by "max over windows" (the default): the region with the largest drop is the most red
    peak = [max(row[i] for row in data["metrics"]["logprob_drop"]) for i in range(len(units))]
    top, low = peak.index(max(peak)), peak.index(min(peak))
    assert peak[top] > 1 and abs(peak[low]) < 0.01 * peak[top]
    page.goto((unit_results / "region.html").as_uri())
    page.wait_for_selector("canvas.overlay[data-painted='1']")
    assert page.locator("#column-labels").get_attribute("data-labels") == "4"
    assert page.locator("#column-labels").get_attribute("data-across") == "1"  # wide columns: labels written across
    page.locator("#opacity").fill("100")
    pixels = _overlay_pixels(page, units[top]["box"])
    hurts = page.evaluate("colourAt(1)")  # the colour map's "hurts" end
    red, inside = sum(_near(pixel, hurts, 12) for pixel in pixels), len(pixels)
    assert red > 0.85 * inside  # the top region's box is filled
    changed = page.evaluate("""() => { const c = document.querySelector('canvas.overlay');
        return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data); }""")
    page.locator("#opacity").fill("0")
    plain = page.evaluate("""() => { const c = document.querySelector('canvas.overlay');
        return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data); }""")
    width, scale = page.evaluate("[document.querySelector('canvas.overlay').width, document.querySelector('canvas.overlay').scale]")
    def differing(box):
        x0, y0, x1, y1 = (round(v * scale) for v in box)
        return sum(changed[4 * (y * width + x)] != plain[4 * (y * width + x)] for y in range(y0 + 3, y1 - 3) for x in range(x0 + 3, x1 - 3))
    assert differing(units[top]["box"]) > 0.5 * inside and differing(units[low]["box"]) < 0.02 * inside  # only impact tints
    page.locator("#opacity").fill("60")
    canvas = page.locator("canvas.overlay")
    canvas.scroll_into_view_if_needed()
    at = canvas.bounding_box()
    x0, y0, x1, y1 = units[top]["box"]
    page.mouse.move(at["x"] + (x0 + x1) / 2 * scale, at["y"] + (y0 + y1) / 2 * scale)
    tip = page.locator("#tooltip").text_content()
    assert tip.startswith(f'region {json.dumps(units[top]["label"])}  (unit {top})')
    assert f"keys {_ranges(units[top]['keys'])}  (4 tokens)" in tip and "queries every query" in tip
    assert f"box {','.join(str(round(v)) for v in units[top]['box'])} px" in tip
    page.mouse.click(at["x"] + (x0 + x1) / 2 * scale, at["y"] + (y0 + y1) / 2 * scale)
    assert page.evaluate("state.selected") == top
    outline = _overlay_pixels(page, [x0 - 4 / scale, y0 - 4 / scale, x1 + 4 / scale, y1 + 4 / scale])
    blue = sum(pixel == (42, 98, 201) for pixel in outline)
    assert blue > 100  # the selected region is outlined
    assert units[top]["label"] in page.locator("#top tbody").text_content()
    page.screenshot(path=str(ARTIFACTS / "viewer_regions.png"), full_page=True)


def test_groups_are_labelled_columns(page, unit_results):
    data = json.loads((unit_results / "groups.json").read_text())
    assert [unit["label"] for unit in data["units"]] == ["shape", "q", "p"]
    page.goto((unit_results / "groups.html").as_uri())
    page.wait_for_selector("#run:not(.hidden)")
    labels = page.locator("#column-labels")
    assert labels.get_attribute("data-labels") == "3" and labels.get_attribute("data-across") == "1"
    ink = labels.evaluate("""(c) => { const w = Number(document.querySelector('#heatmap').dataset.cellW);
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data, ink = [0, 0, 0];
        for (let o = 0; o < d.length; o += 4) if (d[o + 3] > 100) ink[Math.floor((o / 4 % c.width) / w)]++;
        return ink; }""")
    assert all(n > 15 for n in ink), ink  # a label drawn in each column
    assert ink[0] > ink[2] * 2  # "shape" is longer than "p"
    for column, unit in enumerate(data["units"]):
        tip = _hover_column(page, column)
        assert tip.startswith(f'group {json.dumps(unit["label"])}  (unit {column})')
        assert f"modality {unit['modality']}" in tip and f"keys {_ranges(unit['keys'])}" in tip
    assert "box 32,32,64,64 px" in _hover_column(page, 0)
    assert page.locator("#overlay-section").is_visible()  # the box group is on the image
    q = data["units"][1]
    _strip_token(page, data, q["keys"][0]).click()  # a token of group q selects q
    assert page.evaluate("state.selected") == 1
    assert page.locator("#strip .tok.selected").count() == len(q["keys"])
    page.screenshot(path=str(ARTIFACTS / "viewer_groups.png"), full_page=True)


def test_words_are_labelled_and_select_all_their_tokens(page, unit_results):
    data = json.loads((unit_results / "word.json").read_text())
    words = [i for i, unit in enumerate(data["units"]) if unit["kind"] == "word" and len(unit["keys"]) > 1]
    assert words  # the demo tokenizer splits some of these words
    i = max(words, key=lambda k: len(data["units"][k]["keys"]))
    unit = data["units"][i]
    assert unit["label"] == "thingamajig"
    page.goto((unit_results / "word.html").as_uri())
    page.wait_for_selector("#run:not(.hidden)")
    assert int(page.locator("#column-labels").get_attribute("data-labels")) == len(data["units"])
    assert "word units" in page.locator("#meta").text_content()  # swept: "N token, M word units"
    tip = _hover_column(page, i)
    keys = unit["keys"]
    assert tip.startswith('word "thingamajig"') and f"keys {_ranges(keys)}  ({len(keys)} tokens)" in tip
    assert _ranges(keys) == f"{keys[0]}-{keys[-1]}"
    _strip_token(page, data, keys[1]).click()  # a subword token selects its word
    assert page.evaluate("state.selected") == i
    assert page.locator("#strip .tok.selected").all_text_contents() == [data["tokens"][p]["text"] for p in keys]
    page.screenshot(path=str(ARTIFACTS / "viewer_words.png"), full_page=True)


def test_compare_needs_the_same_units_and_says_when_they_differ(page, unit_results, tmp_path):
    data = json.loads((unit_results / "region.json").read_text())
    data["metrics"] = {m: [[v * 2 if isinstance(v, float) else v for v in row] for row in grid] for m, grid in data["metrics"].items()}
    (tmp_path / "region_b.json").write_text(json.dumps(data))
    page.goto((ROOT / "visualize_results.html").as_uri())
    page.set_input_files("#file-input", [str(unit_results / "region.json"), str(tmp_path / "region_b.json")])
    page.wait_for_selector("#compare:not(.hidden)")
    assert page.locator("#heatmap-diff").get_attribute("data-pairs") == "4"
    assert _drawn_pixels(page, "#heatmap-diff") > 20
    assert "every unit" in page.locator("#compare-caption").text_content()
    assert page.locator("#diff-tokens .tok").all_text_contents() == [unit["label"] for unit in data["units"]]
    page.set_input_files("#file-input", [str(unit_results / "region.json"), str(unit_results / "flow.json")])
    expect(page.locator("#compare-message")).to_contain_text("cannot be compared")
    message = page.locator("#compare-message").text_content()
    assert "4 region units" in message and "3 flow units" in message
    assert not page.locator("#heatmap-diff").is_visible() and page.locator("#diff-tokens .tok").count() == 0
    assert _drawn_pixels(page, "#heatmap-a") > 20 and _drawn_pixels(page, "#heatmap-b") > 20  # each run still shows


@pytest.fixture(scope="module")
def pixel_results(tmp_path_factory):
    """Occlusion (--stage pixels) results: one unit per 16-px patch (fill mean), one per image token (fill blur)."""
    folder = tmp_path_factory.mktemp("pixels")
    common = ["--demo", "--stage", "pixels", "--output-dir", str(folder), "--no-progress", "--generate-top", "3"]
    assert main([*common, "--output", "patch"], True) == 0
    assert main([*common, "--unit", "token", "--fill", "blur", "--output", "token"], True) == 0
    return folder


def _overlay_rgb(page) -> tuple[int, list[int]]:
    """The first overlay canvas: its width and its pixels (r, g, b, a flat)."""
    return page.evaluate("""() => { const c = document.querySelector('canvas.overlay');
        return [c.width, Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)]; }""")


def test_an_occlusion_run_shows_its_stage_one_labelled_row_and_no_layer_controls(page, pixel_results):
    data = json.loads((pixel_results / "patch.json").read_text())
    assert data["stage"] == "pixels" and data["meta"]["settings"]["fill"] == "mean"
    assert data["windows"] == [[0, data["windows"][0][1]]] and data["window_labels"] == ["occluded (mean)"]
    page.goto((pixel_results / "patch.html").as_uri())
    page.wait_for_selector("canvas.overlay[data-painted='1']")
    assert page.locator("#stage").text_content().startswith("occlusion (fill: mean): ")  # what was measured
    assert "occlusion (fill: mean)" in page.locator("#meta").text_content()
    assert page.locator("#heat-title").text_content() == "Occlusion × unit heatmap"
    assert page.locator("#heatmap").evaluate("c => c.height / Number(c.dataset.cellH)") == 1  # one row
    assert page.locator("#row-labels").inner_text() == "occluded (mean)"
    assert _drawn_pixels(page, "#heatmap") > 100
    # one window: no slider, play button or impact-by-layer curves, a note instead
    assert not page.locator("#window").is_visible() and not page.locator("#play").is_visible()
    assert not page.locator("#curves-section").is_visible()
    assert page.locator("#window-note").is_visible()
    assert page.locator("#window-note").text_content() == "one window: occluded (mean)"
    drops = data["metrics"]["logprob_drop"][0]
    top = drops.index(max(drops))
    unit = data["units"][top]
    tip = _hover_column(page, top).splitlines()
    assert tip[0] == f'patch {json.dumps(unit["label"])}  (unit {top})'
    assert tip[1] == f"occludes 1 patch of image 1  box {','.join(str(round(v)) for v in unit['box'])} px"
    assert "occluded (mean)" in tip and not any(line.startswith("queries") for line in tip)  # nothing is blocked
    cells = page.locator("#top tbody tr").nth(1).locator("td").all_text_contents()
    assert cells[:3] == ["occluded (mean)", str(top), unit["label"]] and "occludes 1 patch of image 1" in cells[3]
    assert page.locator("#top-window").text_content() == "occlusion"
    page.screenshot(path=str(ARTIFACTS / "viewer_pixels_patch.png"), full_page=True)


def test_each_patch_paints_its_own_16_pixel_box_on_a_patch_grid(page, pixel_results):
    data = json.loads((pixel_results / "patch.json").read_text())
    units, drops = data["units"], data["metrics"]["logprob_drop"][0]
    image = data["images"][0]
    assert image["resize"] == "kept" and image["grid_thw"] == [1, 8, 8] and len(units) == 64
    assert sorted(tuple(u["box"]) for u in units) == sorted(
        (16.0 * c, 16.0 * r, 16.0 * (c + 1), 16.0 * (r + 1)) for r in range(8) for c in range(8))  # a box per patch
    top = drops.index(max(drops))
    page.goto((pixel_results / "patch.html").as_uri())
    page.wait_for_selector("canvas.overlay[data-painted='1']")
    scale = page.evaluate("document.querySelector('canvas.overlay').scale")
    page.locator("#opacity").fill("100")
    width, tinted = _overlay_rgb(page)
    page.locator("#opacity").fill("0")
    _, plain = _overlay_rgb(page)

    def inside(box):  # the canvas pixel offsets inside a box, 3 px in from its edges (clear of the grid lines)
        x0, y0, x1, y1 = (round(v * scale) for v in box)
        return [4 * (y * width + x) for y in range(y0 + 3, y1 - 3) for x in range(x0 + 3, x1 - 3)]

    hurts = page.evaluate("colourAt(1)")  # the colour map's end: "hurts", saturated
    red = [tinted[o:o + 3] == hurts for o in inside(units[top]["box"])]
    assert sum(red) > 0.95 * len(red)  # the top patch: its own box, in full red at full opacity
    far = max(range(len(units)), key=lambda i: sum((a - b) ** 2 for a, b in zip(units[i]["box"], units[top]["box"])))
    assert abs(drops[far]) < 1e-3 * drops[top]
    for i, unit in enumerate(units):  # every patch tints only its own box, as much as its value says
        offsets = inside(unit["box"])
        changed = sum(tinted[o:o + 3] != plain[o:o + 3] for o in offsets)
        strength = abs(drops[i]) / drops[top]
        if strength > 0.05:
            assert changed > 0.9 * len(offsets), (unit["label"], strength, changed)
        elif strength < 1e-3:
            assert changed == 0, (unit["label"], strength, changed)  # the far patch among them
    # the patch grid: a dotted line between two patches inside one decoder token (a token is 2×2 patches here)
    grey = lambda o: sum(plain[o:o + 3]) / 3  # noqa: E731
    x_line = round(image["width"] / 8 * scale)  # between patch columns 0 and 1
    darker = sum(grey(4 * (y * width + x_line)) < grey(4 * (y * width + x_line + 4)) - 10 for y in range(4, 36))
    assert darker >= 8, darker
    legend = page.locator("#overlay-legend").text_content()
    assert "16×16-pixel patches" in legend and "fill: mean" in legend
    page.locator("#opacity").fill("100")  # the screenshot shows the tint
    page.screenshot(path=str(ARTIFACTS / "viewer_pixels_overlay.png"), full_page=True)


def test_an_occlusion_run_by_token_names_its_fill_and_its_units(page, pixel_results):
    data = json.loads((pixel_results / "token.json").read_text())
    assert data["window_labels"] == ["occluded (blur)"] and all(u["kind"] == "token" for u in data["units"])
    drops = data["metrics"]["logprob_drop"][0]
    top = drops.index(max(drops))
    unit = data["units"][top]
    page.goto((ROOT / "visualize_results.html").as_uri())
    page.set_input_files("#file-input", [str(pixel_results / "token.json")])
    expect(page.locator("#stage")).to_contain_text("occlusion (fill: blur)")  # waits: files load async
    tip = _hover_column(page, top).splitlines()
    assert tip[0] == f'token {json.dumps(unit["label"])}  (unit {top})' and unit["label"].startswith("image1 r")
    assert tip[1].startswith(f"occludes {len(unit['patches'])} patches of image 1") and len(unit["patches"]) == 4
    assert tip[3] == "occluded (blur)"
    page.wait_for_selector("canvas.overlay[data-painted='1']")
    page.locator("#opacity").fill("100")
    hurts = page.evaluate("colourAt(1)")
    red = [_near(pixel, hurts, 40) for pixel in _overlay_pixels(page, unit["box"])]
    assert sum(red) > 0.9 * len(red)  # the top token's 32-px box
    assert "image 0" not in page.locator("#run").inner_text()
    page.screenshot(path=str(ARTIFACTS / "viewer_pixels_token.png"), full_page=True)


def test_compare_takes_two_occlusions_but_not_an_occlusion_and_a_decoder_knockout(page, pixel_results, tmp_path):
    data = json.loads((pixel_results / "patch.json").read_text())
    black = dict(data, window_labels=["occluded (black)"], meta=dict(data["meta"], settings=dict(data["meta"]["settings"], fill="black")))
    black["metrics"] = {m: [[v / 2 if isinstance(v, float) else v for v in row] for row in grid] for m, grid in data["metrics"].items()}
    (tmp_path / "black.json").write_text(json.dumps(black))
    decoder = {key: value for key, value in data.items() if key not in ("stage", "window_labels")}  # same units and layers
    (tmp_path / "decoder.json").write_text(json.dumps(decoder))
    page.goto((ROOT / "visualize_results.html").as_uri())
    page.set_input_files("#file-input", [str(pixel_results / "patch.json"), str(tmp_path / "black.json")])
    page.wait_for_selector("#compare:not(.hidden)")
    assert "(occlusion (fill: mean))" in page.locator("#compare-a").text_content()
    assert "(occlusion (fill: black))" in page.locator("#compare-b").text_content()
    assert page.locator("#heatmap-diff").get_attribute("data-pairs") == "64" and _drawn_pixels(page, "#heatmap-diff") > 20
    page.set_input_files("#file-input", [str(pixel_results / "patch.json"), str(tmp_path / "decoder.json")])
    expect(page.locator("#compare-message")).to_contain_text("A is an occlusion (fill: mean), B an attention knockout")
    assert not page.locator("#heatmap-diff").is_visible() and page.locator("#diff-tokens .tok").count() == 0


@pytest.fixture(scope="module")
def stage_results(tmp_path_factory):
    """One image, one answer, every stage: the demo's decoder (image tokens swept), vision encoder (its ViT attention
    output is zero), occlusion and DeepStack runs (by token and by image), and the ViT demo's vision-encoder runs."""
    folder = tmp_path_factory.mktemp("stages")
    common = ["--output-dir", str(folder), "--no-progress", "--generate-top", "2"]
    demo = ["--demo", *common]
    assert main([*demo, "--mask-mode", "vision", "--output", "decoder"], True) == 0
    assert main([*demo, "--stage", "vision-encoder", "--output", "vit"], True) == 0
    assert main([*demo, "--stage", "pixels", "--unit", "token", "--output", "pixels"], True) == 0
    assert main([*demo, "--stage", "deepstack", "--output", "deepstack"], True) == 0
    assert main([*demo, "--stage", "deepstack", "--unit", "image", "--output", "deepstack_image"], True) == 0
    live = ["--model", str(ROOT / "models" / "demo-vl-vit"), "--image", str(ROOT / "testimg.png"), "--prompt",
            "What color is the shape?", "--stage", "vision-encoder", *common]
    assert main([*live, "--output", "vit_live"], True) == 0
    assert main([*live, "--unit", "token", "--output", "vit_live_token"], True) == 0
    return folder


def _peak(data: dict, metric: str = "logprob_drop") -> list[float]:
    """Each unit's largest value over the rows (what the overlay shows by default, "max over windows")."""
    return [max(row[i] for row in data["metrics"][metric]) for i in range(len(data["units"]))]


def test_a_vit_run_shows_a_vit_layer_by_patch_heatmap_and_each_patch_on_its_16_pixel_box(page, stage_results):
    data = json.loads((stage_results / "vit_live.json").read_text())
    assert data["stage"] == "vision-encoder" and data["window_labels"] == ["ViT layer 0", "ViT layer 1"]
    units, peak = data["units"], _peak(data)
    top = peak.index(max(peak))
    assert len(units) == 64 and peak[top] > 1 and sum(v == 0.0 for v in peak) > 30
    page.goto((stage_results / "vit_live.html").as_uri())
    page.wait_for_selector("canvas.overlay[data-painted='1']")
    assert page.locator("#stage").text_content().startswith("attention knockout in the vision encoder: ")
    assert page.locator("#heat-title").text_content() == "ViT layer × patch heatmap"
    assert page.locator("#heatmap").evaluate("c => c.height / Number(c.dataset.cellH)") == 2
    assert page.locator("#row-labels").inner_text().split("\n") == ["ViT layer 0", "ViT layer 1"]
    assert "y: ViT layer windows" in page.locator("#heat-y").text_content()
    assert page.locator("#top-window").text_content() == "ViT layers"
    tip = _hover_column(page, top).splitlines()
    assert tip[0] == f'patch {json.dumps(units[top]["label"])}  (unit {top})'
    assert tip[1] == ("knocks out 1 patch of image 1 (the image's other patches cannot attend to them)  box "
                      + ",".join(str(round(v)) for v in units[top]["box"]) + " px")
    assert "ViT layer 0" in tip and not any(line.startswith("queries") for line in tip)  # no decoder attention
    scale = page.evaluate("document.querySelector('canvas.overlay').scale")
    page.locator("#opacity").fill("100")
    width, tinted = _overlay_rgb(page)
    page.locator("#opacity").fill("0")
    _, plain = _overlay_rgb(page)

    def inside(box):  # canvas offsets 3 px in from a box's edges
        x0, y0, x1, y1 = (round(v * scale) for v in box)
        return [4 * (y * width + x) for y in range(y0 + 3, y1 - 3) for x in range(x0 + 3, x1 - 3)]

    assert units[top]["box"][2] - units[top]["box"][0] == 16  # one 16-px patch, not its 32-px token
    hurts = page.evaluate("colourAt(1)")
    red = [tinted[o:o + 3] == hurts for o in inside(units[top]["box"])]
    assert sum(red) > 0.95 * len(red)
    for i, unit in enumerate(units):  # a patch whose knockout changes nothing leaves its box untouched
        if peak[i] == 0.0:
            assert all(tinted[o:o + 3] == plain[o:o + 3] for o in inside(unit["box"])), unit["label"]
    grey = lambda o: sum(plain[o:o + 3]) / 3  # noqa: E731
    x_line = round(data["images"][0]["width"] / 8 * scale)  # the patch grid: between patch columns 0 and 1
    assert sum(grey(4 * (y * width + x_line)) < grey(4 * (y * width + x_line + 4)) - 10 for y in range(4, 36)) >= 8
    assert "16×16-pixel patches" in page.locator("#overlay-legend").text_content()
    page.locator("#opacity").fill("100")
    page.screenshot(path=str(ARTIFACTS / "viewer_vit_patch.png"), full_page=True)


def test_a_vit_run_by_token_tints_the_32_pixel_token(page, stage_results):
    data = json.loads((stage_results / "vit_live_token.json").read_text())
    units, peak = data["units"], _peak(data)
    top = peak.index(max(peak))
    assert units[top]["kind"] == "token" and len(units[top]["patches"]) == 4 and peak[top] > 1
    x0, y0, x1, y1 = units[top]["box"]
    assert (x1 - x0, y1 - y0) == (32, 32)
    page.goto((stage_results / "vit_live_token.html").as_uri())
    page.wait_for_selector("canvas.overlay[data-painted='1']")
    assert page.locator("#heat-title").text_content() == "ViT layer × unit heatmap"
    assert _hover_column(page, top).splitlines()[1].startswith("knocks out 4 patches of image 1")
    page.locator("#opacity").fill("100")
    hurts = page.evaluate("colourAt(1)")
    red = [_near(pixel, hurts, 40) for pixel in _overlay_pixels(page, units[top]["box"])]
    assert sum(red) > 0.9 * len(red)
    page.screenshot(path=str(ARTIFACTS / "viewer_vit_token.png"), full_page=True)


def _chart_colour_pixels(page, selector: str, colours: list[str]) -> list[int]:
    return page.locator(selector).evaluate("""(c, colours) => {
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        return colours.map((hex) => { const [r, g, b] = [1, 3, 5].map((k) => parseInt(hex.slice(k, k + 2), 16)); let n = 0;
            for (let o = 0; o < d.length; o += 4) if (d[o] === r && d[o + 1] === g && d[o + 2] === b) n++;
            return n; }); }""", colours)


def test_a_deepstack_run_draws_each_route_per_unit_with_a_legend_and_says_which_route_carries_it(page, stage_results):
    data = json.loads((stage_results / "deepstack.json").read_text())
    labels = data["window_labels"]
    assert labels == ["DeepStack after layer 0", "all DeepStack levels", "main embedding → image mean"]
    drops = data["metrics"]["logprob_drop"]
    peak = _peak(data)
    shape = peak.index(max(peak))
    assert data["units"][shape]["label"] == "image1 r1 c2" and drops[1][shape] > 10 * drops[2][shape] > 0
    page.goto((stage_results / "deepstack.html").as_uri())
    page.wait_for_selector("#deepstack-section:not(.hidden)")
    assert page.locator("#stage").text_content().startswith("DeepStack routes: ")
    assert page.locator("#heat-title").text_content() == "Route × unit heatmap"
    assert page.locator("#top-window").text_content() == "route"
    assert not page.locator("#curves-section").is_visible()  # routes are not layers
    assert page.locator("#deepstack-legend .flow-key").all_text_contents() == labels
    chart = page.locator("#deepstack-chart")
    shown = int(chart.get_attribute("data-units"))
    assert shown == 12 and int(chart.get_attribute("data-bars")) == shown * len(labels)  # 12 of 16 units, every route
    colours = page.evaluate("routeColours(state.runs[0])")
    assert len(set(colours)) == 3
    counts = _chart_colour_pixels(page, "#deepstack-chart", colours)
    assert all(n > 20 for n in counts), counts  # a bar of every route is drawn
    assert counts[1] > 5 * counts[2]  # the shape's DeepStack bars are taller than its main-embedding bar
    rows = page.locator("#deepstack-table tbody tr")
    assert rows.count() == shown
    first = rows.first.locator("td").all_text_contents()
    assert first[:2] == ["image1 r1 c2", "1 image token of image 1"] and first[4] == "DeepStack"
    assert float(first[2]) == pytest.approx(drops[1][shape], rel=1e-3) and float(first[3]) == pytest.approx(drops[2][shape], rel=1e-2)
    assert "all DeepStack levels (logprob_drop)" == page.locator("#deepstack-all").text_content()
    assert "--unit image" in page.locator("#deepstack-note").text_content()
    box = chart.bounding_box()
    group = (box["width"] - 84 - 16) / shown
    page.mouse.move(box["x"] + 84 + 0.5 * group, box["y"] + 100)  # the first group: the shape's token
    tip = page.locator("#tooltip").text_content()
    assert tip.startswith('token "image1 r1 c2"') and all(label in tip for label in labels)
    page.mouse.click(box["x"] + 84 + 1.5 * group, box["y"] + 100)
    assert page.evaluate("state.selected") == page.evaluate("chartUnits(state.runs[0], 'logprob_drop')[1]")
    page.screenshot(path=str(ARTIFACTS / "viewer_deepstack.png"), full_page=True)


def test_a_deepstack_run_by_image_shows_all_vision_tokens_at_once(page, stage_results):
    data = json.loads((stage_results / "deepstack_image.json").read_text())
    (drop_all, ), (drop_main, ) = data["metrics"]["logprob_drop"][1], data["metrics"]["logprob_drop"][2]
    assert [u["kind"] for u in data["units"]] == ["image"] and drop_all > drop_main > 0
    page.goto((stage_results / "deepstack_image.html").as_uri())
    page.wait_for_selector("#deepstack-section:not(.hidden)")
    assert page.locator("#deepstack-chart").get_attribute("data-bars") == "3"
    cells = page.locator("#deepstack-table tbody tr").first.locator("td").all_text_contents()
    assert cells[1] == "all 16 vision tokens of image 1" and cells[4] == "DeepStack"
    assert "all of its image's vision tokens" in page.locator("#deepstack-note").text_content()


def _panel_rgb(page, n: int) -> tuple[int, list[int]]:
    return page.evaluate("""(n) => { const c = document.querySelectorAll('#maps canvas.overlay')[n];
        return [c.width, Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)]; }""", n)


def test_decoder_vit_and_occlusion_maps_of_one_image_side_by_side(page, stage_results):
    names = ("decoder", "vit", "pixels")
    data = {name: json.loads((stage_results / f"{name}.json").read_text()) for name in names}
    assert {d["baseline"]["text"] for d in data.values()} == {"red"}
    page.goto((ROOT / "visualize_results.html").as_uri())
    page.set_input_files("#file-input", [str(stage_results / f"{name}.json") for name in names])
    page.wait_for_selector("#maps-section:not(.hidden)")
    expect(page.locator("#maps canvas.overlay[data-painted='1']")).to_have_count(3)
    assert page.locator("#maps").get_attribute("data-panels") == "3" and page.locator("#maps-message").text_content() == ""
    assert "3 runs" in page.locator("#message").text_content()
    titles = page.locator("#maps .map-title").all_text_contents()
    assert titles == ["attention knockout in the decoder · max over layer 0 … layer 2",
                      "attention knockout in the vision encoder · ViT layer 0", "occlusion (fill: mean) · occluded (mean)"]
    panels = page.locator("#maps .map-panel")
    maxima = page.locator("#maps canvas.overlay").evaluate_all("cs => cs.map((c) => Number(c.dataset.max))")
    assert len(set(maxima)) == 1 and "(one scale for every panel)" in panels.nth(0).text_content()  # the default
    tops = page.locator("#maps canvas.overlay").evaluate_all("cs => cs.map((c) => c.getBoundingClientRect().top)")
    assert max(tops) - min(tops) < 1, tops  # the pictures level (before: the third higher)
    for n, name in enumerate(names):
        text = panels.nth(n).text_content()
        assert f"{name}.json · image 1" in text and "logprob_drop: " in text  # its run, and its labelled scale
    # each panel paints its own run: the decoder's and the occlusion's shape token red, the ViT's nothing at all
    decoder_top, pixels_top = (max(range(len(d["units"])), key=lambda i: _peak(d)[i]) for d in (data["decoder"], data["pixels"]))
    assert data["decoder"]["units"][decoder_top]["box"] == data["pixels"]["units"][pixels_top]["box"]
    scale = page.evaluate("document.querySelector('#maps canvas.overlay').scale")
    x0, y0, x1, y1 = (round(v * scale) for v in data["decoder"]["units"][decoder_top]["box"])
    page.select_option("#maps-scale", "own")  # each at its own scale: each run's own top saturated
    page.locator("#opacity").fill("0")
    plain = [_panel_rgb(page, n)[1] for n in range(3)]
    page.locator("#opacity").fill("100")
    reds, hurts = [], page.evaluate("colourAt(1)")
    for n in range(3):
        width, pixels = _panel_rgb(page, n)
        offsets = [4 * (y * width + x) for y in range(y0 + 3, y1 - 3) for x in range(x0 + 3, x1 - 3)]
        reds.append(sum(_near(pixels[o:o + 3], hurts, 40) for o in offsets) / len(offsets))
        assert (pixels == plain[n]) == (n == 1), n  # the ViT knockouts change exactly nothing: no tint anywhere
    assert reds[0] > 0.9 and reds[2] > 0.9, reds
    maxima = page.locator("#maps canvas.overlay").evaluate_all("cs => cs.map((c) => Number(c.dataset.max))")
    assert len(set(maxima)) == 3  # each panel its own scale, on request, and the caption says so
    assert "this panel's own scale: colours do not compare across panels" in panels.nth(0).text_content()
    page.select_option("#maps-scale", "shared")
    page.locator("#maps .map-panel select").first.select_option(label="layer 1")
    assert page.locator("#maps .map-title").first.text_content() == "attention knockout in the decoder · layer 1"
    page.screenshot(path=str(ARTIFACTS / "viewer_maps.png"), full_page=True)


def test_maps_of_another_image_or_answer_are_left_out_with_a_reason_and_no_stale_map(page, stage_results, tmp_path):
    data = json.loads((stage_results / "pixels.json").read_text())
    other_answer = dict(data, baseline=dict(data["baseline"], text="green", token_ids=[7, 2]))
    (tmp_path / "green.json").write_text(json.dumps(other_answer))
    fingerprint = dict(data["meta"]["fingerprint"], **{"inputs.pixel_values": "0" * 64})
    (tmp_path / "other_image.json").write_text(json.dumps(dict(data, meta=dict(data["meta"], fingerprint=fingerprint))))
    page.goto((ROOT / "visualize_results.html").as_uri())
    page.set_input_files("#file-input", [str(stage_results / "decoder.json"), str(stage_results / "vit.json"),
                                         str(tmp_path / "green.json")])
    expect(page.locator("#maps canvas.overlay")).to_have_count(2)
    message = page.locator("#maps-message").text_content()
    assert 'green.json: a different answer ("green", not "red")' in message and "left out" in message
    page.set_input_files("#file-input", [str(stage_results / "decoder.json"), str(tmp_path / "other_image.json")])
    expect(page.locator("#maps-message")).to_contain_text("other_image.json: a different image")
    assert page.locator("#maps canvas").count() == 0  # before: nothing to say, and no stale panels
    assert page.locator("#maps-message").text_content().startswith("no maps side by side")
    page.set_input_files("#file-input", [str(stage_results / "decoder.json")])
    expect(page.locator("#maps-section")).to_be_hidden()


def test_hostile_labels_in_the_deepstack_chart_and_the_maps_render_inertly(page, stage_results, tmp_path):
    data = json.loads((stage_results / "deepstack.json").read_text())
    data["window_labels"][0] = XSS_PROMPT
    for i, unit in enumerate(data["units"]):
        unit["label"] = f"{XSS_PROMPT} {i}"
    hostile = tmp_path / "<img src=x onerror=alert(3)>.json"
    hostile.write_text(json.dumps(data))
    page.goto((ROOT / "visualize_results.html").as_uri())
    page.set_input_files("#file-input", [str(hostile), str(stage_results / "pixels.json")])
    expect(page.locator("#maps canvas.overlay")).to_have_count(2)
    page.wait_for_timeout(300)
    assert page.dialogs == [] and page.locator("img[src='x']").count() == 0
    assert page.locator("script").count() == 2
    assert XSS_PROMPT in page.locator("#deepstack-legend").text_content()
    assert f"{XSS_PROMPT} " in page.locator("#deepstack-table").text_content()
    assert XSS_PROMPT in page.locator("#maps .map-title").first.text_content()
    assert hostile.name in page.locator("#maps .map-panel").first.text_content()
    legend = _svg_texts(_export(page, "deepstack", "svg", tmp_path))  # the figures keep them as text
    assert XSS_PROMPT in legend and any(text.startswith(hostile.name) for text in legend)
    maps = _svg_texts(_export(page, "maps", "svg", tmp_path))
    assert f"{hostile.name} · image 1" in maps and f"max over {XSS_PROMPT[:24]}" in " ".join(maps)  # the window label, cut to fit
    assert page.dialogs == [] and page.locator("img[src='x']").count() == 0


# ---------- figure export ----------

SVG = "{http://www.w3.org/2000/svg}"


def _export(page, panel: str, fmt: str, folder: Path) -> Path:
    """Clicks a panel's export button and keeps the download."""
    with page.expect_download() as download:
        page.locator(f"button[data-export='{panel}'][data-format='{fmt}']").click()
    path = folder / download.value.suggested_filename
    download.value.save_as(path)
    return path


def _svg_texts(path: Path) -> list[str]:
    import xml.etree.ElementTree as ET

    root = ET.parse(path).getroot()  # well-formed XML: every text from the result escaped
    assert root.tag == f"{SVG}svg"
    assert not [node for node in root.iter() if node.tag.split("}")[-1] in ("script", "foreignObject", "img")]
    return ["".join(node.itertext()) for node in root.iter(f"{SVG}text")] + [root.find(f"{SVG}title").text]


def _png_colours(path: Path) -> tuple[tuple[int, int], int]:
    """A PNG's size and how many of its pixels are neither white nor grey (the painted cells, the colour bar)."""
    from PIL import Image

    image = Image.open(path).convert("RGB")
    coloured = sum(1 for r, g, b in image.get_flattened_data() if max(r, g, b) - min(r, g, b) > 60)
    return image.size, coloured


def test_each_panel_exports_png_and_svg_with_title_labels_and_colour_bar(page, results, tmp_path):
    data = json.loads((results / "vision.json").read_text())
    page.goto((results / "vision.html").as_uri())
    page.wait_for_selector("canvas.overlay[data-painted='1']")
    peak = data["generations"][0]["label"]  # the unit of the largest knockout
    for panel, words in [("heatmap", [peak, *data["window_labels"], "layer window", "(hurts)", "vision — attention knockout"]),
                         ("overlay", ["image 1", "max over windows", "(hurts)"]),
                         ("overlay-grid", ["image 1", *data["window_labels"], "(hurts)"]),
                         ("curves", ["vision units (mean)", "text units (mean)", "layer window", data["window_labels"][-1]])]:
        svg = _export(page, panel, "svg", tmp_path)
        assert svg.name == f"vision-{panel}.svg"
        texts = _svg_texts(svg)
        for word in words:
            assert any(word in text for text in texts), (panel, word)
        if panel != "curves":
            assert '<image ' in svg.read_text()  # the cells or the tinted picture, as a raster
        png = _export(page, panel, "png", tmp_path)
        size, coloured = _png_colours(png)
        assert size[0] >= 400 and coloured > 500, (panel, size, coloured)
    assert texts and any("layer window" in text for text in texts)


def test_compare_and_flows_export_and_hostile_labels_stay_text_in_svg(page, results, unit_results, tmp_path):
    data = json.loads((results / "text.json").read_text())
    data["window_labels"][0] = XSS_PROMPT
    for i, unit in enumerate(data["units"]):
        unit["label"] = f"{XSS_PROMPT} {i}"
    (tmp_path / "hostile.json").write_text(json.dumps(data))
    page.goto((ROOT / "visualize_results.html").as_uri())
    page.set_input_files("#file-input", [str(tmp_path / "hostile.json"), str(results / "text.json")])
    page.wait_for_selector("#compare:not(.hidden)")
    texts = _svg_texts(_export(page, "compare", "svg", tmp_path))
    assert any(text.startswith("A: hostile.json") for text in texts) and any(text.startswith("B: text.json") for text in texts)
    assert any(text.startswith("A − B") for text in texts)
    assert XSS_PROMPT in texts  # the hostile window label, written as text (A's rows and A − B's)
    assert sum(text.startswith("<img src=x") for text in texts) >= len(data["units"])  # the unit labels
    size, coloured = _png_colours(_export(page, "compare", "png", tmp_path))
    assert coloured > 300
    heatmap = _svg_texts(_export(page, "heatmap", "svg", tmp_path))
    assert XSS_PROMPT in heatmap and any(text.startswith("<img src=x") for text in heatmap)
    assert page.dialogs == [] and page.locator("img[src='x']").count() == 0
    flows = json.loads((unit_results / "flow.json").read_text())
    page.set_input_files("#file-input", [str(unit_results / "flow.json")])
    page.wait_for_selector("#flow-section:not(.hidden)")
    texts = _svg_texts(_export(page, "flows", "svg", tmp_path))
    for unit in flows["units"]:
        assert unit["label"] in texts  # the legend: one entry per flow


def test_answer_steps_deepstack_and_maps_export_png_and_svg_with_title_labels_and_colour_bar(page, results, stage_results, tmp_path):
    data = json.loads((results / "vision.json").read_text())
    page.goto((results / "vision.html").as_uri())
    page.wait_for_selector("#run:not(.hidden)")
    page.evaluate("state.window = 1; state.selected = 20; showWindow()")
    drops = data["steps"]["logprob_drop"][1][20]
    svg = _export(page, "steps", "svg", tmp_path)
    assert svg.name == "vision-steps.svg"
    texts = _svg_texts(svg)
    label = page.evaluate("unitName(state.runs[0], 20)")
    assert any(text.startswith("vision — answer steps · ") and label in text and data["window_labels"][1] in text for text in texts)
    for token, value in zip(data["baseline"]["tokens"], drops):
        assert token.replace("\n", "⏎") in texts and f"drop {page.evaluate('(v) => signed(v)', value)}" in texts
    assert any(text.startswith("drop log p(y_t) − log p_KO(y_t): ") and "(hurts)" in text for text in texts)  # its colour bar
    size, coloured = _png_colours(_export(page, "steps", "png", tmp_path))
    assert size[0] >= 400 and coloured > 500, (size, coloured)

    routes = json.loads((stage_results / "deepstack.json").read_text())
    page.goto((ROOT / "visualize_results.html").as_uri())
    page.set_input_files("#file-input", [str(stage_results / f"{name}.json") for name in ("deepstack", "decoder", "pixels")])
    expect(page.locator("#maps canvas.overlay[data-painted='1']")).to_have_count(3)
    texts = _svg_texts(_export(page, "deepstack", "svg", tmp_path))
    assert "deepstack.json — DeepStack routes · logprob_drop" in texts
    for label in routes["window_labels"]:
        assert label in texts  # the legend: one entry per route
    assert "logprob drop (nats)" in texts and any(text.startswith("unit (") for text in texts)
    size, coloured = _png_colours(_export(page, "deepstack", "png", tmp_path))
    assert size[0] >= 900 and coloured > 500, (size, coloured)

    page.select_option("#maps-scale", "own")
    svg = _export(page, "maps", "svg", tmp_path)
    texts = _svg_texts(svg)
    assert svg.name == "deepstack-maps.svg" and "deepstack.json — maps side by side · logprob_drop" in texts
    for name, stage in (("deepstack", "DeepStack routes"), ("decoder", "attention knockout in the decoder"), ("pixels", "occlusion (fill: mean)")):
        assert stage in texts and f"{name}.json · image 1" in texts
    assert sum(text.startswith("logprob_drop: ") and "(hurts)" in text for text in texts) == 3  # each panel its colour bar
    assert svg.read_text().count("<image ") >= 3 + 3  # three tinted pictures, three colour bars
    page.select_option("#maps-scale", "shared")
    texts = _svg_texts(_export(page, "maps", "svg", tmp_path))
    assert sum(text.startswith("logprob_drop, every panel: ") for text in texts) == 1
    size, coloured = _png_colours(_export(page, "maps", "png", tmp_path))
    assert size[0] >= 900 and coloured > 1000, (size, coloured)


# ---------- colour scale ----------

def _cell_rgb(page, window: int, column: int, selector: str = "#heatmap") -> list[int]:
    return page.evaluate("""([s, w, i]) => { const c = document.querySelector(s);
        const x = Math.floor((i + 0.5) * Number(c.dataset.cellW)), y = Math.floor((w + 0.5) * Number(c.dataset.cellH));
        return [...c.getContext('2d').getImageData(x, y, 1, 1).data.slice(0, 3)]; }""", [selector, window, column])


def _graded(tmp_path: Path) -> tuple[Path, list[float]]:
    """36 windows × 200 token units; unit 0 a special sink at 500, unit i (1..199) at i/100 nats in every window."""
    path = _synthetic(tmp_path / "graded.json", 200, range(0))
    data = json.loads(path.read_text())
    data["tokens"][0]["modality"] = data["units"][0]["modality"] = "special"
    values = [500.0] + [i / 100 for i in range(1, 200)]
    data["metrics"]["logprob_drop"] = [list(values) for _ in data["windows"]]
    path.write_text(json.dumps(data))
    return path, values


def test_scale_controls_percentile_fixed_log_noise_floor_and_hidden_special_tokens(page, tmp_path):
    path, values = _graded(tmp_path)
    page.goto((ROOT / "visualize_results.html").as_uri())
    page.set_input_files("#file-input", [str(path)])
    expect(page.locator("#colorbar-labels")).to_contain_text("≥ 1.980")  # the 99th percentile of units 1..199 over all windows
    def at(column, t):  # the cell is drawn at t (-1 … 1) on the colour map
        rgb, want = _cell_rgb(page, 5, column), page.evaluate("(t) => colourAt(t)", t)
        return max(abs(a - b) for a, b in zip(rgb, want)) <= 1
    def green(column):  # the green channel of a cell, red side: 255 (white) … (saturated)
        return _cell_rgb(page, 5, column)[1]
    assert at(198, 1) and at(99, 0.99 / 1.98)
    page.fill("#percentile", "50")
    page.dispatch_event("#percentile", "change")
    others = sorted(values[1:])
    assert page.locator("#colorbar-labels").text_content().startswith(f"≤ -{others[len(others) // 2]:.3f}")
    page.select_option("#scale", "fixed")
    page.fill("#fixed", "4")
    page.dispatch_event("#fixed", "change")
    assert "-4.000 (helps)" in page.locator("#colorbar-labels").text_content()
    assert at(100, 1 / 4)  # 1 nat on ±4: a quarter of the way
    linear = green(4)
    page.check("#log")
    assert "log scale" in page.locator("#colorbar-labels").text_content()
    t = math.log1p(0.04 / 0.004) / math.log1p(4 / 0.004)  # e = max/1000
    assert at(4, t) and green(4) < linear - 60  # small effects become visible
    page.uncheck("#log")
    page.fill("#floor", "0.5")
    page.dispatch_event("#floor", "change")
    assert _cell_rgb(page, 5, 49) == [255, 255, 255] and green(50) < 255  # under the floor: white
    assert "noise floor" in page.locator("#colorbar-labels").text_content()
    bar = page.evaluate("""() => { const c = document.querySelector('#colorbar');
        return [...c.getContext('2d').getImageData(c.width / 2 + 5, 5, 1, 1).data.slice(0, 3)]; }""")
    assert bar == [255, 255, 255]  # the floor's band on the colour bar
    page.select_option("#scale", "full")
    assert "500.0 (hurts)" in page.locator("#colorbar-labels").text_content()
    page.check("#hide-special")
    assert "500.0" not in page.locator("#colorbar-labels").text_content()  # the sink left out of the scale
    assert _cell_rgb(page, 5, 0) == [235, 235, 235]  # and drawn grey
    assert " 1.990 (hurts)" in page.locator("#colorbar-labels").text_content()


# ---------- heatmap navigation ----------

def test_column_groups_zoom_and_pan_for_a_long_prompt(page, results, tmp_path):
    page.goto((results / "vision.html").as_uri())
    page.wait_for_selector("#run:not(.hidden)")
    assert json.loads(page.locator("#column-groups").get_attribute("data-groups")) == ["text", "image 1", "text"]
    assert _drawn_pixels(page, "#column-groups") > 50
    path = _synthetic(tmp_path / "long.json", 1600, range(400, 800))  # 1,600 units: one pixel per column to fit
    page.goto((ROOT / "visualize_results.html").as_uri())
    page.set_input_files("#file-input", [str(path)])
    expect(page.locator("#heatmap")).to_have_attribute("data-columns", "1600")
    assert page.locator("#heatmap").evaluate("c => c.width") < 1280  # fit: every column inside the box, pooled
    assert page.locator("#column-labels").get_attribute("data-labels") == "0"  # no room for labels
    page.select_option("#zoom", "12")
    assert page.locator("#heatmap").evaluate("c => c.width") == 1600 * 12
    assert page.locator("#column-labels").get_attribute("data-labels") == "1600"  # labels, turned, once zoomed in
    assert page.locator("#column-labels").get_attribute("data-across") == "0"
    assert page.evaluate("document.documentElement.scrollWidth") <= 1280  # the heatmap pans inside its box
    scroller = page.locator("#heat-scroll")
    assert scroller.evaluate("s => s.scrollWidth > s.clientWidth")
    page.locator("#heatmap").click(position={"x": 5, "y": 5})
    page.keyboard.press("End")  # the last unit, scrolled into view
    assert page.evaluate("state.selected") == 1599 and scroller.evaluate("s => s.scrollLeft") > 1600 * 12 - 2 * 1280
    page.keyboard.press("-")
    assert page.locator("#zoom").input_value() == "8" and page.locator("#heatmap").evaluate("c => c.width") == 1600 * 8
    assert json.loads(page.locator("#column-groups").get_attribute("data-groups")) == ["text", "image 1", "text"]


def test_keyboard_moves_the_selected_cell_and_says_what_it_is(page, results):
    data = json.loads((results / "vision.json").read_text())
    page.goto((results / "vision.html").as_uri())
    page.wait_for_selector("#run:not(.hidden)")
    page.locator("#heatmap").focus()
    for _ in range(3):
        page.keyboard.press("ArrowRight")
    assert page.evaluate("state.selected") == 2
    token = data["tokens"][data["units"][2]["keys"][0]]
    assert json.dumps(token["text"]) in page.locator("#heat-readout").text_content()
    page.keyboard.press("Shift+ArrowRight")
    assert page.evaluate("state.selected") == 12
    page.keyboard.press("ArrowDown")
    assert page.locator("#window").input_value() == "1" and page.locator("#aggregate").input_value() == "window"
    assert data["window_labels"][1] in page.locator("#heat-readout").text_content()
    page.keyboard.press("Escape")
    assert page.evaluate("state.selected") is None and page.locator("#heat-readout").text_content() == ""


def test_hovering_a_vision_column_outlines_its_patch_and_hovering_the_image_its_column(page, results):
    data = json.loads((results / "vision.json").read_text())
    page.goto((results / "vision.html").as_uri())
    page.wait_for_selector("canvas.overlay[data-painted='1']")
    column = next(i for i, unit in enumerate(data["units"]) if unit["modality"] == "vision" and unit["box"][0] > 0)
    box = data["units"][column]["box"]
    _hover_column(page, column)
    brush = page.locator("#overlays .brush")
    assert brush.is_visible()
    scale = page.evaluate("document.querySelector('canvas.overlay').scale")
    left, top, width = brush.evaluate("b => [b.offsetLeft, b.offsetTop, b.offsetWidth]")
    assert abs(left - (box[0] * scale - 1)) <= 1 and abs(top - (box[1] * scale - 1)) <= 1
    assert abs(width - ((box[2] - box[0]) * scale + 4)) <= 1
    page.mouse.move(0, 0)
    assert not brush.is_visible() and not page.locator("#heat-cursor").is_visible()
    other = next(i for i, unit in enumerate(data["units"]) if unit["modality"] == "vision" and i != column)
    x0, y0, x1, y1 = data["units"][other]["box"]
    canvas = page.locator("canvas.overlay")
    canvas.scroll_into_view_if_needed()
    at = canvas.bounding_box()
    page.mouse.move(at["x"] + (x0 + x1) / 2 * scale, at["y"] + (y0 + y1) / 2 * scale)
    cursor = page.locator("#heat-cursor")
    assert cursor.is_visible()
    left = cursor.evaluate("c => c.offsetLeft")
    heat_left, cell_w = page.locator("#heatmap").evaluate("c => [c.offsetLeft, Number(c.dataset.cellW)]")
    assert left == heat_left + math.floor(other * cell_w) - 1


def _brush_box(page, selector: str) -> list[int] | None:
    """A brush outline's [left, top, width] (None when hidden)."""
    return page.locator(selector).evaluate("b => b.style.display === 'block' ? [b.offsetLeft, b.offsetTop, b.offsetWidth] : null")


def test_hovering_a_map_side_by_side_brushes_the_heatmap_overlay_and_every_map_and_back(page, stage_results):
    data = json.loads((stage_results / "decoder.json").read_text())
    page.goto((ROOT / "visualize_results.html").as_uri())
    page.set_input_files("#file-input", [str(stage_results / f"{name}.json") for name in ("decoder", "vit", "pixels")])
    expect(page.locator("#maps canvas.overlay[data-painted='1']")).to_have_count(3)
    vision = [i for i, unit in enumerate(data["units"]) if unit["modality"] == "vision"]
    unit, other = vision[5], vision[10]
    x0, y0, x1, y1 = data["units"][unit]["box"]
    panel = page.locator("#maps canvas.overlay").nth(2)  # the occlusion's map: its patches lie on the decoder's tokens
    panel.scroll_into_view_if_needed()
    scale, at = panel.evaluate("c => c.scale"), panel.bounding_box()
    page.mouse.move(at["x"] + (x0 + x1) / 2 * scale, at["y"] + (y0 + y1) / 2 * scale)
    heat_left, cell_w = page.locator("#heatmap").evaluate("c => [c.offsetLeft, Number(c.dataset.cellW)]")
    assert _brush_box(page, "#heat-cursor")[0] == heat_left + unit * cell_w - 1  # the decoder's column for those pixels
    assert page.locator("#tooltip").text_content().startswith("pixels.json: occlusion")
    overlay_scale = page.evaluate("document.querySelector('#overlays canvas.overlay').scale")
    left, top, _ = _brush_box(page, "#overlays .brush")
    assert abs(left - (x0 * overlay_scale - 1)) <= 1 and abs(top - (y0 * overlay_scale - 1)) <= 1
    for n in range(3):  # the same area outlined on every map
        left, top, width = _brush_box(page, f"#maps .map-panel >> nth={n} >> .brush")
        assert abs(left - (x0 * scale - 1)) <= 1 and abs(top - (y0 * scale - 1)) <= 1 and abs(width - ((x1 - x0) * scale + 4)) <= 1
    _hover_column(page, other)  # and back: a heatmap column outlines its area on every map
    ox0, oy0 = data["units"][other]["box"][:2]
    for n in range(3):
        left, top, _ = _brush_box(page, f"#maps .map-panel >> nth={n} >> .brush")
        assert abs(left - (ox0 * scale - 1)) <= 1 and abs(top - (oy0 * scale - 1)) <= 1
    page.mouse.move(0, 0)
    assert [_brush_box(page, f"#maps .map-panel >> nth={n} >> .brush") for n in range(3)] == [None] * 3
    assert _brush_box(page, "#heat-cursor") is None


def test_hovering_compare_brushes_the_matching_unit_in_every_panel_and_back(page, results):
    page.goto((ROOT / "visualize_results.html").as_uri())
    page.set_input_files("#file-input", [str(results / "vision.json"), str(results / "no_image.json")])
    page.wait_for_selector("#compare:not(.hidden)")
    pairs = page.evaluate("state.comparePairs")
    k = next(k for k, (i, j) in enumerate(pairs) if i != j)  # a shared text token at different positions in A and B
    i, j = pairs[k]

    def column(selector):
        left = _brush_box(page, f"{selector} + .panel-cursor")
        return None if left is None else page.locator(selector).evaluate(
            "(c, left) => Math.round((left + 2 - c.offsetLeft - c.layout.x) / c.layout.cellW)", left[0])

    canvas = page.locator("#heatmap-b")
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    x, y, cell_w, cell_h = canvas.evaluate("c => [c.layout.x, c.layout.y, c.layout.cellW, c.layout.cellH]")
    page.mouse.move(box["x"] + x + (j + 0.5) * cell_w, box["y"] + y + cell_h / 2)
    heat_left, heat_w = page.locator("#heatmap").evaluate("c => [c.offsetLeft, Number(c.dataset.cellW)]")
    assert _brush_box(page, "#heat-cursor")[0] == heat_left + i * heat_w - 1  # B's token is A's unit i
    assert (column("#heatmap-a"), column("#heatmap-b"), column("#heatmap-diff")) == (i, j, k)
    diff = page.locator("#heatmap-diff")
    diff.scroll_into_view_if_needed()
    box = diff.bounding_box()
    x, y, cell_w, cell_h = diff.evaluate("c => [c.layout.x, c.layout.y, c.layout.cellW, c.layout.cellH]")
    page.mouse.move(box["x"] + x + (k + 0.5) * cell_w, box["y"] + y + cell_h / 2)
    assert (column("#heatmap-a"), column("#heatmap-b"), column("#heatmap-diff")) == (i, j, k)
    _hover_column(page, i)  # and back: the main heatmap's column brushes compare
    assert (column("#heatmap-a"), column("#heatmap-b"), column("#heatmap-diff")) == (i, j, k)
    vision = page.evaluate("state.runs[0].units.findIndex((u) => u.modality === 'vision')")
    _hover_column(page, vision)  # a unit B does not have: only A's column
    assert (column("#heatmap-a"), column("#heatmap-b"), column("#heatmap-diff")) == (vision, None, None)
    page.mouse.move(0, 0)
    assert column("#heatmap-a") is None


def test_dragging_the_zoomed_heatmap_pans_it_and_does_not_select(page, tmp_path):
    path = _synthetic(tmp_path / "long.json", 1600, range(400, 800))
    page.goto((ROOT / "visualize_results.html").as_uri())
    page.set_input_files("#file-input", [str(path)])
    page.select_option("#zoom", "12")
    scroller, canvas = page.locator("#heat-scroll"), page.locator("#heatmap")
    scroller.evaluate("s => { s.scrollLeft = 3000; }")
    box = scroller.bounding_box()
    y = canvas.bounding_box()["y"] + 5
    page.mouse.move(box["x"] + 700, y)
    page.mouse.down()
    page.mouse.move(box["x"] + 500, y, steps=5)
    page.mouse.move(box["x"] + 300, y, steps=5)
    page.mouse.up()
    assert scroller.evaluate("s => s.scrollLeft") == 3400  # dragged 400 px to the left: 400 px further right
    assert page.evaluate("state.selected") is None  # a drag is not a click
    page.mouse.move(box["x"] + 700, y, steps=5)
    page.mouse.down()
    page.mouse.move(box["x"] + 1000, y, steps=5)
    page.mouse.up()
    assert scroller.evaluate("s => s.scrollLeft") == 3100 and page.evaluate("state.selected") is None
    page.mouse.click(box["x"] + 700, y)  # a click that does not move still selects
    assert page.evaluate("state.selected") == (3100 + 700) // 12


def test_the_url_fragment_restores_metric_window_unit_and_scale(page, results):
    page.goto((results / "vision.html").as_uri())
    page.wait_for_selector("#run:not(.hidden)")
    page.select_option("#metric", "kl")
    page.locator("#window").fill("2")
    page.locator("#strip .tok").nth(4).click()
    page.select_option("#scale", "fixed")
    page.fill("#fixed", "0.5")
    page.dispatch_event("#fixed", "change")
    page.check("#log")
    page.select_option("#zoom", "24")
    view = page.evaluate("[state.metric, state.window, state.aggregate, state.selected]")
    labels, readout = page.locator("#colorbar-labels").text_content(), page.locator("#heat-readout").text_content()
    url = page.url
    assert "metric=kl" in url and "window=2" in url and "scale=fixed" in url and "log=1" in url
    fresh = page.context.new_page()
    fresh.goto(url)
    fresh.wait_for_selector("#run:not(.hidden)")
    assert fresh.evaluate("[state.metric, state.window, state.aggregate, state.selected]") == view
    assert fresh.locator("#metric").input_value() == "kl" and fresh.locator("#window").input_value() == "2"
    assert fresh.locator("#scale").input_value() == "fixed" and fresh.locator("#log").is_checked()
    assert fresh.locator("#colorbar-labels").text_content() == labels and fresh.locator("#heat-readout").text_content() == readout
    assert fresh.locator("#heatmap").evaluate("c => Number(c.dataset.cellW)") == 24
    fresh.goto("about:blank")
    fresh.goto((results / "vision.html").as_uri() + "#metric=nope&window=99&unit=-1&scale=%3Cb%3E&zoom=7")
    fresh.wait_for_selector("#run:not(.hidden)")  # nonsense is ignored, never shown
    assert fresh.evaluate("[state.metric, state.window, state.selected, state.scale, state.zoom]") == ["logprob_drop", 0, None, "robust", 0]
    fresh.close()


def _steps_shown(page) -> list[dict]:
    """What the answer-steps view shows per step: its values (data-*) and its text."""
    return page.locator("#steps .step[data-step]").evaluate_all("""cs => cs.map((c) => ({
        p: c.dataset.p, drop: c.dataset.drop, pko: c.dataset.pko, token: c.querySelector('.step-token').textContent,
        text: c.querySelector('.step-drop').textContent, bar: getComputedStyle(c.querySelector('.step-bar span')).backgroundColor,
        diverges: c.classList.contains('diverges')}))""")


def test_answer_steps_show_each_steps_drop_for_the_selected_knockout(page, results):
    data = json.loads((results / "vision.json").read_text())
    tokens, logprobs = data["baseline"]["tokens"], data["baseline"]["logprobs"]
    assert len(tokens) >= 2
    page.goto((results / "vision.html").as_uri())
    page.wait_for_selector("#run:not(.hidden)")
    g = next(g for g in data["generations"] if data["metrics"]["first_divergence"][data["windows"].index(g["window"])][g["unit"]] is not None)
    w, i = data["windows"].index(g["window"]), g["unit"]
    page.evaluate("([w, i]) => { state.window = w; state.selected = i; showWindow(); }", [w, i])
    drops = data["steps"]["logprob_drop"][w][i]
    shown = _steps_shown(page)
    assert [s["token"] for s in shown] == [t.replace("\n", "⏎") for t in tokens]
    for t, step in enumerate(shown):
        assert float(step["drop"]) == drops[t]  # the JSON's value, exactly
        assert math.isclose(float(step["p"]), math.exp(logprobs[t]), rel_tol=1e-12)
        assert math.isclose(float(step["pko"]), math.exp(logprobs[t] - drops[t]), rel_tol=1e-12)
        assert math.isclose(float(step["text"].split()[-1]), drops[t], rel_tol=5e-3, abs_tol=1e-9)  # drop +8.622
        red, green, blue = (int(v) for v in step["bar"][4:-1].split(",")[:3])
        if drops[t] > 0.05 * abs(max(drops, key=abs)):
            assert red > blue and green < 255  # red: this step's token got less likely
    assert [s["diverges"] for s in shown] == [t == data["metrics"]["first_divergence"][w][i] for t in range(len(tokens))]
    total = data["metrics"]["logprob_drop"][w][i]
    assert math.isclose(sum(drops), total, rel_tol=1e-5, abs_tol=1e-6)  # the steps sum to the knockout's logprob_drop
    summed = page.locator("#steps .step-sum").text_content()
    assert f"logprob_drop +{page.evaluate('(v) => fmt(v)', total)}" in summed
    assert page.locator("#steps-title").text_content().endswith(f"knocked out in {data['window_labels'][w]}")
    assert f'answer generated under it: {json.dumps(g["text"])}' in page.locator("#steps-note").text_content()
    # another cell, clicked in the heatmap: the view follows it
    other = next(j for j in range(len(data["units"])) if j != i and data["steps"]["logprob_drop"][0][j] != drops)
    canvas = page.locator("#heatmap")
    box = canvas.bounding_box()
    cell_w, cell_h = canvas.evaluate("c => [Number(c.dataset.cellW), Number(c.dataset.cellH)]")
    page.mouse.click(box["x"] + (other + 0.5) * cell_w, box["y"] + 0.5 * cell_h)
    assert [float(s["drop"]) for s in _steps_shown(page)] == data["steps"]["logprob_drop"][0][other]
    page.locator("#steps").scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "viewer_steps.png"))


def test_answer_steps_of_a_result_without_per_step_data_say_so(page, results, tmp_path):
    data = json.loads((results / "vision.json").read_text())
    del data["steps"]  # a result written before per-step data
    (tmp_path / "old.json").write_text(json.dumps(data))
    page.goto((ROOT / "visualize_results.html").as_uri())
    page.set_input_files("#file-input", [str(tmp_path / "old.json")])
    page.wait_for_selector("#run:not(.hidden)")
    page.evaluate("state.selected = 3; showWindow()")
    shown = _steps_shown(page)
    assert len(shown) == len(data["baseline"]["tokens"]) and all(s["drop"] == "" and s["pko"] == "" for s in shown)
    for step, logprob in zip(shown, data["baseline"]["logprobs"]):
        assert math.isclose(float(step["p"]), math.exp(logprob), rel_tol=1e-12)  # the baseline's probabilities stay
    assert page.locator("#steps .step-sum").count() == 0
    assert "this result has no per-step data" in page.locator("#steps-note").text_content()
    svg = _svg_texts(_export(page, "steps", "svg", tmp_path))
    assert any("no per-step data" in text for text in svg)


# ---------- batch overview ----------

def _top(data: dict) -> tuple[int, int]:
    """The (window, unit) of a result's largest logprob_drop, special tokens left out, as the overview finds it."""
    best = None
    for w, row in enumerate(data["metrics"]["logprob_drop"]):
        for i, v in enumerate(row):
            if data["units"][i]["modality"] != "special" and v is not None and (best is None or v > best[0]):
                best = (v, w, i)
    return best[1], best[2]


def test_a_batch_overview_shows_each_runs_answer_and_top_unit_and_opens_runs_in_place(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "b.yaml").write_text("defaults:\n  demo: true\n  layers: '0-1'\n  generate_top: 0\nruns:\n"
                                     "  - name: one\n    prompt: 'A=3, B=7. What is B?'\n"
                                     "  - name: two\n    prompt: 'The capital of France is'\n"
                                     "  - name: bad\n    prompt: hi\n    layers: '0-99'\n")
    main(["--config", "b.yaml", "--no-progress"], False)
    folder = tmp_path / "output" / "b"
    index = json.loads((folder / "index.json").read_text())
    assert [entry["status"] for entry in index["runs"]][:2] == ["done", "done"] and index["runs"][2]["status"] != "done"
    page.goto((ROOT / "visualize_results.html").as_uri())
    page.set_input_files("#file-input", [str(folder / name) for name in ("index.json", "one.json", "two.json")])
    expect(page.locator("#batch-runs")).to_have_attribute("data-results", "2")
    rows = page.locator("#batch-runs tbody tr")
    assert rows.count() == 3
    for n, name in enumerate(("one", "two")):
        data = json.loads((folder / f"{name}.json").read_text())
        w, i = _top(data)
        cells = rows.nth(n).locator("td")
        assert cells.nth(4).text_content() == data["baseline"]["text"]
        assert cells.nth(5).text_content() == data["units"][i]["label"].replace("\n", "⏎")
        assert cells.nth(6).text_content() == data["window_labels"][w]
    assert index["runs"][2]["error"] and index["runs"][2]["error"] in rows.nth(2).text_content()  # the failed run says why
    rows.nth(1).get_by_role("button", name="open here").click()  # in place: no link to follow
    expect(page.locator("#run")).to_be_visible()
    assert page.title() == "two.json — mask_impact viewer" and page.url.startswith((ROOT / "visualize_results.html").as_uri())
    page.locator("#batch-back").click()
    expect(page.locator("#batch")).to_be_visible()
    assert rows.count() == 3
    page.goto((folder / "index.html").as_uri())  # the batch's own page: its links, and results dropped onto it
    assert page.locator("#batch-runs a").count() == 2
    for n, name in enumerate(("one", "two")):  # before any drop: the largest knockout the batch wrote in index.json
        data = json.loads((folder / f"{name}.json").read_text())
        w, i = _top(data)
        assert index["runs"][n]["top"] == {"unit": i, "label": data["units"][i]["label"], "window": w,
                                           "window_label": data["window_labels"][w],
                                           "logprob_drop": data["metrics"]["logprob_drop"][w][i]}
        cells = rows.nth(n).locator("td")
        assert cells.nth(5).text_content() == data["units"][i]["label"].replace("\n", "⏎")
        assert cells.nth(6).text_content() == data["window_labels"][w] and cells.nth(7).text_content() != ""
    page.set_input_files("#file-input", [str(folder / "one.json")])
    expect(page.locator("#batch-runs")).to_have_attribute("data-results", "1")
    rows.nth(0).get_by_role("button", name="open here").click()
    expect(page).to_have_title("one.json — mask_impact viewer")
    page.goto((folder / "index.html").as_uri())  # the README's way: index.json with the runs, onto index.html
    page.set_input_files("#file-input", [str(folder / name) for name in ("index.json", "one.json", "two.json")])
    expect(page.locator("#batch-runs")).to_have_attribute("data-results", "2")
    hrefs = page.locator("#batch-runs a").evaluate_all("links => links.map(a => a.href)")
    assert hrefs == [(folder / name).as_uri() for name in ("one.html", "two.html")]  # before: plain text, dead
    assert "cannot reach the batch's files" not in page.locator("#message").text_content()


def test_hostile_text_in_the_new_views_renders_inertly(page, results, tmp_path):
    data = json.loads((results / "text.json").read_text())
    data["baseline"]["tokens"] = [XSS_PROMPT, *data["baseline"]["tokens"][1:]]
    for i, unit in enumerate(data["units"]):
        unit["label"] = data["tokens"][unit["keys"][0]]["text"] = f"{XSS_PROMPT} {i}"
    data["generations"] = [dict(g, text=XSS_PROMPT) for g in data["generations"]]
    (tmp_path / "hostile.json").write_text(json.dumps(data))
    index = {"schema_version": 1, "kind": "batch", "batch": XSS_PROMPT, "runs": [
        {"name": XSS_PROMPT, "status": "done", "prompt": XSS_PROMPT, "stage": XSS_PROMPT, "mask_mode": "text",
         "json": "hostile.json", "html": "hostile.html", "answer": XSS_PROMPT},
        {"name": "x", "status": "failed", "error": XSS_PROMPT, "json": "<img src=x>.json"}]}
    (tmp_path / "index.json").write_text(json.dumps(index))
    page.goto((ROOT / "visualize_results.html").as_uri())
    page.set_input_files("#file-input", [str(tmp_path / "index.json"), str(tmp_path / "hostile.json")])
    expect(page.locator("#batch-runs")).to_have_attribute("data-results", "1")
    row = page.locator("#batch-runs tbody tr").first
    assert row.locator("td").nth(0).text_content() == XSS_PROMPT
    assert row.locator("td").nth(5).text_content().startswith(XSS_PROMPT)  # the top unit's label
    assert XSS_PROMPT in page.locator("#batch-runs tbody tr").nth(1).text_content()
    row.get_by_role("button", name="open here").click()
    g = data["generations"][0]
    page.evaluate("([w, i]) => { state.window = w; state.selected = i; showWindow(); }", [data["windows"].index(g["window"]), g["unit"]])
    assert page.locator("#steps .step").first.text_content().startswith(XSS_PROMPT)
    assert json.dumps(XSS_PROMPT) in page.locator("#steps-note").text_content()
    assert XSS_PROMPT in page.locator("#heat-readout").text_content()
    assert XSS_PROMPT in page.locator("#steps-title").text_content()
    steps = _svg_texts(_export(page, "steps", "svg", tmp_path))
    assert any(text.startswith("hostile.json — answer steps · ") and XSS_PROMPT in text for text in steps)  # the unit label
    assert f"{XSS_PROMPT[:15]}…" in steps  # the first answer token, cut to its cell
    page.wait_for_timeout(300)
    assert page.dialogs == [] and page.locator("img[src='x']").count() == 0 and page.locator("script").count() == 2


# ---------- --estimate K ----------

@pytest.fixture(scope="module")
def estimate_results(tmp_path_factory):
    """A text and a VL demo run triaged by gradient: the estimated map, exact cells (top K and a random sample)."""
    folder = tmp_path_factory.mktemp("estimate")
    common = ["--demo", "--output-dir", str(folder), "--no-progress"]
    assert main([*common, "--estimate", "5", "--num-tokens", "2", "--output", "est"], False) == 0
    assert main([*common, "--mask-mode", "both", "--estimate", "8", "--output", "estvl"], True) == 0
    return folder


def _pixel(page, x: float, y: float) -> list[int]:
    return page.evaluate("""([x, y]) => [...document.querySelector('#heatmap').getContext('2d')
        .getImageData(Math.floor(x), Math.floor(y), 1, 1).data.slice(0, 3)]""", [x, y])


@pytest.mark.parametrize("name", ["est", "estvl"])
def test_an_estimate_run_shows_the_estimated_map_marks_the_exact_cells_and_its_quality(page, estimate_results, name):
    data = json.loads((estimate_results / f"{name}.json").read_text())
    est, exact = data["estimate"], data["metrics"]["logprob_drop"]
    top = {tuple(c) for c in est["exact_cells"]["top"]}
    sample = {tuple(c) for c in est["exact_cells"]["sample"]}
    W, U = len(data["windows"]), len(data["units"])
    computed = {(w, i) for w in range(W) for i in range(U) if exact[w][i] is not None}
    assert top and sample and computed == top | sample and len(computed) < W * U  # the rest was only estimated
    page.goto((estimate_results / f"{name}.html").as_uri())
    page.wait_for_selector("#run:not(.hidden)")
    assert page.locator("#estimate").is_visible()
    options = page.locator("#metric option").evaluate_all("os => os.map((o) => o.value)")
    assert "estimated_logprob_drop" in options
    cw, ch = page.locator("#heatmap").evaluate("c => [Number(c.dataset.cellW), Number(c.dataset.cellH)]")
    assert cw >= 8 and ch >= 8

    # the exact map: computed cells coloured, every other cell grey; top-K cells outlined, sample cells dotted
    black = lambda rgb: max(rgb) < 40  # noqa: E731
    for w in range(W):
        for i in range(U):
            x0, y0 = i * cw, w * ch
            edge, centre, inner = _pixel(page, x0 + 0.5, y0 + ch / 2), _pixel(page, x0 + cw / 2, y0 + ch / 2), _pixel(page, x0 + cw / 4, y0 + ch / 4)
            assert black(edge) == ((w, i) in top), (w, i, edge)
            assert black(centre) == ((w, i) in sample), (w, i, centre)
            if (w, i) not in computed:
                assert inner == [235, 235, 235], (w, i, inner)
    text = page.locator("#estimate-cells").text_content()
    assert f"{len(computed)} of {W * U} cells were computed exactly" in text and "estimated, not computed" in text
    assert "every grey cell was estimated, not computed" in text

    # the quality line: the JSON's figures
    import re
    quality = page.locator("#estimate-quality").text_content()
    found = re.search(r"Spearman ρ (\S+) over all (\d+) exact cells, (\S+) over the random sample alone \((\d+) cells\); "
                      r"top-K recall among the computed cells (\S+) \(an upper bound: cells not computed are not "
                      r"ranked\); K = (\d+), sample = (\d+), seed (\d+)", quality)
    assert found, quality
    rho, n, rho_sample, n_sample, recall, k, r, seed = found.groups()
    assert float(rho) == pytest.approx(est["spearman"], abs=5e-4) and int(n) == len(computed)
    assert float(rho_sample) == pytest.approx(est["spearman_sample"], abs=5e-4) and int(n_sample) == len(sample - top)
    assert float(recall) == pytest.approx(est["computed_top_k_recall"], abs=5e-4)
    assert (int(k), int(r), int(seed)) == (est["top_k"], est["sample"], est["seed"])
    missed = est["missed_above_top_k"]
    assert (f"Not computed, with a drop above the top {est['top_k']}'s smallest ({missed['threshold']:.3f}): about "
            f"{missed['estimate']:.1f} of {missed['not_computed']} cells (95% CI {missed['ci'][0]}–{missed['ci'][1]}; "
            f"{missed['sample_above']} of the {missed['sample']} random cells were)") in quality
    assert page.locator("#estimate-method").text_content() == f"method: {est['method']}"

    # the estimated map: every cell painted from estimate.logprob_drop (full range: ±the largest |estimate|)
    page.select_option("#scale", "full")
    page.select_option("#metric", "estimated_logprob_drop")
    grid = est["logprob_drop"]
    top_value = max(abs(v) for row in grid for v in row)
    for w in range(W):
        for i in range(U):
            t = max(-1.0, min(1.0, grid[w][i] / top_value))
            want = page.evaluate("(t) => colourAt(t)", t)
            got = _pixel(page, i * cw + cw / 4, w * ch + ch / 4)
            assert all(abs(a - b) <= 1 for a, b in zip(got, want)), (w, i, got, want)
    assert "This map shows the estimate of every cell" in page.locator("#estimate-cells").text_content()
    assert page.evaluate("fragment => location.hash.includes('metric=estimated_logprob_drop')", None)
    tip = _hover_column(page, 0, 0)
    assert f"estimated_logprob_drop {page.evaluate('(v) => fmt(v)', grid[0][0])}" in " ".join(tip.split())


def test_the_estimated_map_tints_the_overlay_and_unestimated_units_stay_untinted_on_the_exact_map(page, estimate_results):
    data = json.loads((estimate_results / "estvl.json").read_text())
    grid, exact = data["estimate"]["logprob_drop"], data["metrics"]["logprob_drop"]
    units = data["units"]
    vision = [i for i, u in enumerate(units) if u["modality"] == "vision"]
    peak = max(vision, key=lambda i: max(row[i] for row in grid))
    unseen = next(i for i in vision if all(row[i] is None for row in exact) and max(abs(row[i]) for row in grid) > 0)
    page.goto((estimate_results / "estvl.html").as_uri())
    page.wait_for_selector("canvas.overlay[data-painted='1']")
    page.locator("#opacity").fill("0")
    plain_unseen = _overlay_pixels(page, units[unseen]["box"])
    page.locator("#opacity").fill("100")
    assert _overlay_pixels(page, units[unseen]["box"]) == plain_unseen  # no exact value: the picture shows through
    assert "estimated, not computed" in page.locator("#overlay-legend").text_content()
    page.select_option("#metric", "estimated_logprob_drop")
    hurts = page.evaluate("colourAt(1)")
    red = [_near(pixel, hurts, 40) for pixel in _overlay_pixels(page, units[peak]["box"])]
    assert sum(red) > 0.9 * len(red)
    page.locator("#log").check()  # its estimate is small beside the peak's: the signed log shows it
    assert _overlay_pixels(page, units[unseen]["box"]) != plain_unseen  # the estimate tints it
    assert page.locator("#overlay-scale").text_content().startswith("estimated_logprob_drop (max over windows)")
    page.screenshot(path=str(ARTIFACTS / "viewer_estimate.png"), full_page=True)


def test_a_result_without_an_estimate_is_unchanged_and_compare_with_one_works(page, results, estimate_results):
    page.goto((results / "vision.html").as_uri())
    page.wait_for_selector("#run:not(.hidden)")
    assert not page.locator("#estimate").is_visible()
    assert "estimated_logprob_drop" not in page.locator("#metric").inner_text()
    assert "estimated" not in page.locator("#overlay-legend").text_content()
    page.goto((ROOT / "visualize_results.html").as_uri())
    page.set_input_files("#file-input", [str(estimate_results / "estvl.json"), str(results / "vision.json")])
    expect(page.locator("#compare")).to_be_visible()
    page.select_option("#metric", "estimated_logprob_drop")  # B has no estimate: its cells are grey, nothing breaks
    assert page.locator("#compare-scale").text_content().startswith("A and B on one scale, estimated_logprob_drop")


def test_hostile_estimate_notes_and_method_render_inertly(page, estimate_results, tmp_path):
    data = json.loads((estimate_results / "est.json").read_text())
    data["estimate"]["notes"] = [XSS_PROMPT, "second"]
    data["estimate"]["method"] = XSS_PROMPT
    (tmp_path / "hostile.json").write_text(json.dumps(data))
    page.goto((ROOT / "visualize_results.html").as_uri())
    page.set_input_files("#file-input", [str(tmp_path / "hostile.json")])
    expect(page.locator("#estimate")).to_be_visible()
    assert page.locator("#estimate-notes li").all_text_contents() == [XSS_PROMPT, "second"]
    assert page.locator("#estimate-method").text_content() == f"method: {XSS_PROMPT}"
    page.wait_for_timeout(300)
    assert page.dialogs == [] and page.locator("img[src='x']").count() == 0 and page.locator("script").count() == 2


# ---------- DeepStack chart labels ----------

def _corners(box: dict) -> list[tuple[float, float]]:
    """A label's outline on the canvas: its measured width, ascent and descent, turned by its angle about its anchor."""
    x0 = -box["width"] if box["align"] == "right" else -box["width"] / 2
    x1 = x0 + box["width"]
    y0, y1 = box.get("dy", 0) - box["ascent"], box.get("dy", 0) + box["descent"]
    a = math.radians(box["angle"])
    return [(box["x"] + x * math.cos(a) - y * math.sin(a), box["y"] + x * math.sin(a) + y * math.cos(a))
            for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1))]


def _overlap(p: list, q: list) -> bool:
    """Two convex outlines overlap unless an edge's normal separates them (separating axis theorem)."""
    for poly in (p, q):
        for k in range(len(poly)):
            (ax, ay), (bx, by) = poly[k], poly[(k + 1) % len(poly)]
            nx, ny = ay - by, bx - ax
            sp, sq = [nx * x + ny * y for x, y in p], [nx * x + ny * y for x, y in q]
            if max(sp) <= min(sq) or max(sq) <= min(sp):
                return False
    return True


@pytest.mark.parametrize("width", [1280, 800])
def test_the_deepstack_chart_labels_do_not_overlap_on_the_page_or_in_its_figure(page, stage_results, tmp_path, width):
    data = json.loads((stage_results / "deepstack.json").read_text())
    assert len(data["units"]) >= 12
    page.set_viewport_size({"width": width, "height": 900})
    page.goto((stage_results / "deepstack.html").as_uri())
    page.wait_for_selector("#deepstack-section:not(.hidden)")
    chart = page.locator("#deepstack-chart")
    assert chart.get_attribute("data-units") == "12"
    boxes = chart.evaluate("c => c.labelBoxes")
    shown = page.evaluate("chartUnits(state.runs[0], 'logprob_drop')")
    assert [b["text"] for b in boxes] == [data["units"][i]["label"] for i in shown]  # every label whole, none cut
    outlines = [_corners(b) for b in boxes]
    height = chart.evaluate("c => c.height")
    for k, outline in enumerate(outlines):
        assert all(0 <= y <= height for _, y in outline), boxes[k]  # inside the canvas
        for other in outlines[k + 1:]:
            assert not _overlap(outline, other), boxes[k]
    # the figure: its SVG opened in the browser, each label's rendered box (getBBox, turned by its transform)
    svg = _export(page, "deepstack", "svg", tmp_path)
    viewer = page.context.new_page()
    viewer.goto(svg.as_uri())
    rendered = viewer.evaluate("""() => [...document.querySelectorAll('text')].filter((t) => t.getAttribute('style').includes('monospace'))
        .map((t) => { const b = t.getBBox(), m = t.getCTM();
            return [t.textContent, [[b.x, b.y], [b.x + b.width, b.y], [b.x + b.width, b.y + b.height], [b.x, b.y + b.height]]
                .map(([x, y]) => [m.a * x + m.c * y + m.e, m.b * x + m.d * y + m.f])]; })""")
    viewer.close()
    assert [text for text, _ in rendered] == [data["units"][i]["label"] for i in shown]
    for k, (text, outline) in enumerate(rendered):
        for other_text, other in rendered[k + 1:]:
            assert not _overlap(outline, other), (text, other_text)


def test_tiled_views_and_newline_tokens_are_named_not_shown_as_null(page, results, tmp_path):
    """LLaVA-NeXT tokens carry ``part`` (base, tiles, newline, padding); a newline token has no column."""
    data = json.loads((results / "vision.json").read_text())
    columns = [i for i, unit in enumerate(data["units"]) if unit["modality"] == "vision"][:2]
    newline, tile = (data["tokens"][data["units"][i]["keys"][0]] for i in columns)
    newline.update(part="newline", col=None, box=None)
    tile.update(part="tiles")
    (tmp_path / "tiled.json").write_text(json.dumps(data))
    page.goto((ROOT / "visualize_results.html").as_uri())
    page.set_input_files("#file-input", [str(tmp_path / "tiled.json")])
    expect(page).to_have_title("tiled.json — mask_impact viewer")
    first = _hover_column(page, columns[0])
    assert f"newline after row {newline['row']}" in first and "null" not in first
    second = _hover_column(page, columns[1])
    assert f"tiles row {tile['row']}, col {tile['col']}" in second


# --- LLaVA geometry on the overlay: the centre crop's strips, the views of a tiled picture ------------------------

@pytest.fixture(scope="module")
def llava_results(tmp_path_factory):
    from tests.support import tiny_llava_runs

    return tiny_llava_runs(tmp_path_factory.mktemp("llava_viewer"), "0,1")


def _saturation(page, box: list[float], strips: bool) -> float:
    """Mean max − min channel of the overlay's pixels in ``box`` (canvas pixels), or of the bare thumbnail there."""
    return page.evaluate("""([box, strips]) => {
        const c = document.querySelector('canvas.overlay'), [x0, y0, x1, y1] = box.map(Math.round);
        let ctx = c.getContext('2d');
        if (!strips) {
            const bare = document.createElement('canvas'); bare.width = c.width; bare.height = c.height;
            ctx = bare.getContext('2d'); ctx.drawImage(pictures.get(state.runs[0].images[0].thumbnail), 0, 0, c.width, c.height);
        }
        const d = ctx.getImageData(x0 + 2, y0 + 2, x1 - x0 - 4, y1 - y0 - 4).data;
        let sum = 0;
        for (let o = 0; o < d.length; o += 4) sum += Math.max(d[o], d[o + 1], d[o + 2]) - Math.min(d[o], d[o + 1], d[o + 2]);
        return sum / (d.length / 4); }""", [box, strips])


def test_llava_cropped_off_strips_are_hatched_and_labelled(page, llava_results):
    data = json.loads((llava_results / "llava.json").read_text())
    image = data["images"][0]
    assert (image["width"], image["height"], image["resized_width"], image["resized_height"], image["crop"]) == \
        (128, 64, 128, 64, [32, 0, 64, 64])
    boxes = [t["box"] for t in data["tokens"] if t["modality"] == "vision"]
    assert min(b[0] for b in boxes) == 32 and max(b[2] for b in boxes) == 96  # no token in either strip
    page.goto((llava_results / "llava.html").as_uri())
    page.wait_for_selector("canvas.overlay[data-painted='1']")
    scale = page.evaluate("document.querySelector('canvas.overlay').scale")
    strips = page.evaluate("document.querySelector('canvas.overlay').cropStrips")
    assert scale == 420 / 128  # exact in binary: the strips' canvas pixels are exact too
    assert strips == [[0, 0, 105, 210], [315, 0, 420, 210]]  # 32 px of 128 each side, on a 420-px canvas
    for strip in strips:  # greyed: far less colour than the picture has there
        assert _saturation(page, strip, True) < 0.5 * _saturation(page, strip, False)
    seen = [32 * scale, 0, 96 * scale, 64 * scale]  # the crop itself is not greyed (opacity 0: the picture alone)
    page.locator("#opacity").fill("0")
    assert _saturation(page, seen, True) > 0.9 * _saturation(page, seen, False)
    assert "cropped off by the processor, no token sees them" in page.locator("#overlay-legend").text_content()
    assert page.locator("#overlay-views").is_hidden()  # one view: no view choice
    page.locator("#overlay-section").screenshot(path=str(ARTIFACTS / "viewer_llava_crop.png"))


def test_llava_next_views_are_chosen_not_drawn_over_each_other(page, llava_results):
    data = json.loads((llava_results / "llava_next.json").read_text())
    parts = [t["part"] for t in data["tokens"] if t["modality"] == "vision"]
    assert parts.count("base") == 16 and parts.count("tiles") == 48 and parts.count("newline") == 8
    page.goto((llava_results / "llava_next.html").as_uri())
    page.wait_for_selector("canvas.overlay[data-painted='1']")
    assert page.locator("#overlay-views").is_visible()
    assert page.locator("#overlay-view option").evaluate_all("(os) => os.map((o) => o.value)") == ["base", "tiles", "all"]
    drawn = lambda: page.evaluate("visibleAreas(state.runs[0], 0).map((a) => a.view)")  # noqa: E731
    pixels = lambda: page.evaluate("""() => { const c = document.querySelector('canvas.overlay');
        return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data); }""")  # noqa: E731
    assert page.locator("#overlay-view").input_value() == "base" and drawn() == ["base"] * 16
    assert "base view" in page.locator("#overlay-view-note").text_content()
    base = pixels()
    page.locator("#overlay-view").select_option("tiles")
    assert drawn() == ["tiles"] * 48 and page.evaluate("state.view") == "tiles"
    assert pixels() != base  # the tile grid, not the base grid
    # the pointer finds a tile token there, and its place names the view
    canvas = page.locator("canvas.overlay")
    canvas.scroll_into_view_if_needed()
    at, scale = canvas.bounding_box(), page.evaluate("document.querySelector('canvas.overlay').scale")
    tile = next(t for t in data["tokens"] if t.get("part") == "tiles")
    x0, y0, x1, y1 = tile["box"]
    page.mouse.move(at["x"] + (x0 + x1) / 2 * scale, at["y"] + (y0 + y1) / 2 * scale)
    assert f"tiles row {tile['row']}, col {tile['col']}" in page.locator("#tooltip").text_content()
    page.locator("#overlay-view").select_option("all")
    assert sorted(drawn()) == ["base"] * 16 + ["tiles"] * 48
    assert "tile grid dashed" in page.locator("#overlay-view-note").text_content()
    page.locator("#overlay-section").screenshot(path=str(ARTIFACTS / "viewer_llava_next_views.png"))


@pytest.fixture(scope="module")
def onevision_images(tmp_path_factory):
    """The tiny LLaVA-OneVision with a 150×40 and a 40×150 picture in one prompt (each padded to a square: whole rows
    or columns of padding patches, no box), region units, vision tokens over layers 0 and 1."""
    from tests.tiny import build_tiny
    from tests.support import draw_image

    folder = tmp_path_factory.mktemp("onevision_viewer")
    checkpoint = build_tiny(folder / "model", "llava_onevision")
    pictures = [str(draw_image(folder / f"{n}.png", w, h, seed=n)) for n, (w, h) in enumerate(((150, 40), (40, 150)))]
    assert main(["--model", str(checkpoint), *[a for p in pictures for a in ("--image", p)], "--prompt", "Which?",
                 "--device", "cpu", "--dtype", "float32", "--num-tokens", "1", "--layers", "0,1", "--mask-mode",
                 "vision", "--unit", "token", "--no-progress", "--generate-top", "0", "--output-dir", str(folder),
                 "--output", "ov"], True) == 0
    return folder


def test_onevision_several_images_each_drawn_hovered_and_exported(page, onevision_images, tmp_path):
    """Each picture of a multi-image prompt has its overlay; hovering a padding patch or a newline in the heatmap
    names it without a box; the overlay figures (PNG and SVG) hold every picture, each labelled, not the first only."""
    data = json.loads((onevision_images / "ov.json").read_text())
    page.goto((onevision_images / "ov.html").as_uri())
    page.wait_for_selector("canvas.overlay[data-painted='1']")
    assert page.locator("canvas.overlay").count() == 2
    assert page.locator("#overlay-views").is_hidden()  # one view per picture: no view choice
    units = {u["keys"][0]: u["index"] for u in data["units"] if len(u["keys"]) == 1}
    for part in ("padding", "newline"):
        token = next(t for t in data["tokens"] if t.get("part") == part)
        text = _hover_column(page, units[token["index"]])
        assert f"{part} " in text and "image 1" in text, text
    for panel in ("overlay", "overlay-grid"):
        svg = _export(page, panel, "svg", tmp_path)
        texts = _svg_texts(svg)
        assert "image 1 (150×40)" in texts and "image 2 (40×150)" in texts, texts
        pictures = 2 * (1 if panel == "overlay" else len(data["windows"]))
        assert svg.read_text().count("<image ") == 1 + pictures  # the colour bar, then each picture per panel
        size, coloured = _png_colours(_export(page, panel, "png", tmp_path))
        assert size[0] >= 400 and coloured > 500
    page.locator("#overlay-section").screenshot(path=str(ARTIFACTS / "viewer_onevision_images.png"))


def test_a_sliver_token_first_does_not_hide_the_token_grid(page, tmp_path):
    """A 52×100 picture beside another in one LLaVA-OneVision prompt: padded to a 100-px square (24 px left), so its
    first column of tokens covers 1 px of the picture. That sliver is too thin to outline, but the grid of the other
    tokens is still drawn (it was not drawn at all: the first thin token stopped the outlining)."""
    from tests.tiny import build_tiny
    from tests.support import draw_image

    checkpoint = build_tiny(tmp_path / "model", "llava_onevision")
    sizes = ((52, 100), (64, 64))
    pictures = [str(draw_image(tmp_path / f"{n}.png", w, h, seed=n)) for n, (w, h) in enumerate(sizes)]
    assert main(["--model", str(checkpoint), *[a for p in pictures for a in ("--image", p)], "--prompt", "Which?",
                 "--device", "cpu", "--dtype", "float32", "--num-tokens", "1", "--layers", "0", "--mask-mode", "vision",
                 "--no-progress", "--generate-top", "0", "--output-dir", str(tmp_path), "--output", "sliver"],
                True) == 0
    data = json.loads((tmp_path / "sliver.json").read_text())
    boxes = [t["box"] for t in data["tokens"] if t.get("image") == 0 and t.get("box")]
    assert boxes[0] == [0.0, 0.0, 1.0, 25.0]  # the sliver comes first
    page.goto((tmp_path / "sliver.html").as_uri())
    page.wait_for_selector("canvas.overlay[data-painted='1']")
    outlined = page.evaluate("""() => { const n = [0, 0], rect = CanvasRenderingContext2D.prototype.rect;
        CanvasRenderingContext2D.prototype.rect = function (...a) {  // the token grid: one path of rectangles
            n[Number(this.canvas.dataset.image)]++; return rect.apply(this, a); };
        for (const c of document.querySelectorAll('canvas.overlay')) { c.base = null; paintOverlay(state.runs[0], c); }
        CanvasRenderingContext2D.prototype.rect = rect;
        return [n, document.querySelector('canvas.overlay').scale]; }""")
    (first, second), scale = outlined
    assert first == sum((b[2] - b[0]) * scale >= 5 for b in boxes) == 8  # the two middle columns: 25 px wide each
    assert second == 16


def test_maps_of_a_narrow_picture_keep_the_window_choice_above_and_the_colour_bar_below(page, onevision_images,
                                                                                        tmp_path):
    """Side-by-side maps of a prompt with a 40×150 picture: its map is narrow, yet the window choice stays above it
    and the colour bar below it (they sat beside the picture, on its baseline)."""
    shutil.copy(onevision_images / "ov.json", tmp_path / "again.json")
    page.goto((onevision_images / "ov.html").as_uri())
    page.wait_for_selector("canvas.overlay[data-painted='1']")
    page.set_input_files("input[type=file]", [str(onevision_images / "ov.json"), str(tmp_path / "again.json")])
    page.wait_for_selector("#maps-section .map-panel canvas.overlay")
    panels = page.locator("#maps-section .map-panel")
    narrow = [n for n in range(panels.count()) if panels.nth(n).locator(".map-head > div").nth(1).text_content().endswith("image 2")]
    assert narrow
    for n in narrow:
        panel = panels.nth(n)
        select, picture = panel.locator("select").bounding_box(), panel.locator("canvas.overlay").bounding_box()
        bar = panel.locator(":scope > canvas").bounding_box()
        assert picture["width"] < select["width"]  # narrow indeed
        assert select["y"] + select["height"] <= picture["y"] + 1 and picture["y"] + picture["height"] <= bar["y"] + 1
    page.locator("#maps-section").screenshot(path=str(ARTIFACTS / "viewer_onevision_maps.png"))


@pytest.mark.parametrize("thumbnail", ["data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAAB",  # cut short
                                       "data:image/svg+xml,<svg", "data:image/png;base64,%%%not base64"])
def test_a_picture_that_cannot_be_drawn_is_skipped_with_a_note_and_the_rest_drawn(page, onevision_images, tmp_path,
                                                                                 thumbnail):
    """A result whose first picture's thumbnail is a broken (or refused) data URL: no uncaught error, a visible note
    names the picture (its units' areas drawn on grey), the other picture is drawn, and the overlay figures export."""
    data = json.loads((onevision_images / "ov.json").read_text())
    data["images"][0]["thumbnail"] = thumbnail
    (tmp_path / "broken.json").write_text(json.dumps(data))
    page.goto((ROOT / "visualize_results.html").as_uri())
    page.set_input_files("#file-input", [str(tmp_path / "broken.json")])
    page.wait_for_selector("canvas.overlay[data-painted='1']")
    expect(page.locator("#overlay-section")).to_contain_text("image 1: its picture cannot be drawn")
    assert page.locator(".picture-missing").first.is_visible()
    assert _drawn_pixels(page, "#heatmap") > 100
    expect(page.locator("canvas.overlay[data-painted='1']")).to_have_count(2)
    assert page.locator("#overlay-1 .picture-missing").is_hidden()
    picture = json.loads((onevision_images / "ov.json").read_text())["images"][1]
    page.locator("#opacity").fill("0")  # the second picture alone: its own pixels, not grey
    page.locator("#opacity").dispatch_event("input")
    colours = page.evaluate("""() => { const c = document.querySelector('#overlay-1 canvas'), d = c.getContext('2d')
        .getImageData(0, 0, c.width, c.height).data; const seen = new Set();
        for (let o = 0; o < d.length; o += 4) seen.add(d[o] + ',' + d[o + 1] + ',' + d[o + 2]); return seen.size; }""")
    assert picture["thumbnail"].startswith("data:image/png") and colours > 20
    for panel in ("overlay", "overlay-grid"):
        size, coloured = _png_colours(_export(page, panel, "png", tmp_path))
        assert coloured > 100
    page.select_option("#metric", "kl")  # a redraw repaints without the broken picture again
    assert page.errors == []


def _peaks(path: Path, peaks: dict[tuple[int, int], float]) -> Path:
    data = json.loads(path.read_text())
    for (w, i), v in peaks.items():
        data["metrics"]["logprob_drop"][w][i] = v
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("width", [1440, 1920])
def test_fit_shows_every_column_max_pooled_with_an_overview_to_brush_a_zoom(browser, tmp_path, width):
    """A 1,508-token prompt at 1440×900 and 1920×1080: "fit" draws every unit inside the visible box (no sideways
    scroll, the box's width used), a one-column peak anywhere (the last token too) keeps its full colour where many
    units share a pixel, hovering it names it; the overview shows every unit, and a drag across it zooms the heatmap
    to those units."""
    context = browser.new_context(viewport={"width": width, "height": 900 if width == 1440 else 1080})
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    path = _peaks(_synthetic(tmp_path / "long.json", 1508, range(100, 884)), {(5, 1507): 40.0, (9, 777): 40.0})
    page.goto((ROOT / "visualize_results.html").as_uri())
    page.set_input_files("#file-input", [str(path)])
    expect(page.locator("#heatmap")).to_have_attribute("data-columns", "1508")
    heat, scroller = page.locator("#heatmap"), page.locator("#heat-scroll")
    assert scroller.evaluate("s => s.scrollWidth <= s.clientWidth")  # nothing hidden to the right
    box = heat.bounding_box()
    assert box["x"] >= 0 and box["x"] + box["width"] <= width  # on screen
    assert box["width"] >= scroller.evaluate("s => s.clientWidth") - 8  # the box's width is used (before: ≤ 1,100)
    assert int(heat.get_attribute("data-pooled")) >= 2 if box["width"] < 1508 else True
    red = page.evaluate("colourAt(1)")
    cell_h = int(heat.get_attribute("data-cell-h"))
    for w, i in ((5, 1507), (9, 777)):
        x = heat.evaluate(f"c => Math.floor({i} * Number(c.dataset.cellW))")
        assert _cell_pixel(page, x, w * cell_h + cell_h // 2) == red, (w, i)
        heat.hover(position={"x": x + 1.5, "y": w * cell_h + cell_h / 2 + 1})  # 1 px border
        assert "(position %d" % i in page.locator("#tooltip").text_content()
    overview = page.locator("#heat-overview")
    assert page.locator("#overview-box").is_visible() and overview.get_attribute("data-columns") == "1508"
    assert overview.bounding_box()["x"] + overview.bounding_box()["width"] <= width
    ob = overview.bounding_box()
    page.mouse.move(ob["x"] + ob["width"] * 0.5, ob["y"] + 5)  # units 754 …
    page.mouse.down()
    page.mouse.move(ob["x"] + ob["width"] * 0.55, ob["y"] + 5, steps=4)
    page.mouse.up()  # … about 829: zoomed so those ~75 units fill the box
    assert page.evaluate("state.zoom") >= 9 and scroller.evaluate("s => s.scrollWidth > s.clientWidth")
    first, last = map(int, overview.get_attribute("data-shown").split("-"))
    assert abs(first - 754) <= 2 and last >= 820, (first, last)
    assert page.locator("#column-labels").get_attribute("data-labels") == "1508"
    assert page.locator("#overview-frame").is_visible()
    page.screenshot(path=str(ARTIFACTS / f"viewer_fit_{width}.png"))
    context.close()
    assert errors == []


def _cell_pixel(page, x: int, y: int, selector: str = "#heatmap") -> list[int]:
    return page.evaluate("""([s, x, y]) => Array.from(document.querySelector(s).getContext('2d')
        .getImageData(x, y, 1, 1).data.slice(0, 3))""", [selector, x, y])


def test_labels_cut_keep_their_ends_so_region_labels_stay_distinct(page):
    page.goto((ROOT / "visualize_results.html").as_uri())
    cut = page.evaluate("""() => { const ctx = document.createElement('canvas').getContext('2d');
        ctx.font = '12px ui-monospace, monospace';
        return ['image1 r12-15 c100-103 wide', 'image1 r12-15 c104-107 wide'].map((t) => fitMiddle(ctx, t, 90)); }""")
    assert cut[0] != cut[1] and all("…" in c for c in cut), cut


def test_the_viewer_and_the_figures_use_one_colour_map_and_the_stored_limits(page, results, tmp_path):
    """The same result: the viewer's colour limit of every metric is the one stored with it (colour_scale), which is
    the figures' limit; their colour maps agree at every point; a result written before colour_scale was stored gets
    the same limits from the viewer's own computation of the rule; the modality band uses the stored colours."""
    from matplotlib.colors import to_hex

    from mask_impact import colours, figures

    data = json.loads((results / "vision.json").read_text())
    block = data["colour_scale"]
    assert block["colours"] == colours.COLOUR_MAP and block["percentile"] == 99
    metrics = [m for m in figures.METRICS if m in data["metrics"]]
    assert set(block["limits"]) == set(metrics)
    page.goto((results / "vision.html").as_uri())
    page.wait_for_selector("#run:not(.hidden)")
    viewer = page.evaluate("(ms) => ms.map((m) => scaleOf(state.runs[0], m))", metrics)
    figure_limits = []
    for metric in metrics:
        grid = figures.values(data, metric)
        _, norm, _ = figures.colour_scale(data, metric, grid)
        figure_limits.append(norm.vmax)
    assert viewer == [block["limits"][m] for m in metrics] == figure_limits
    cmap = figures.colour_map(data)
    points = [-1, -0.73, -0.5, -0.2, 0, 0.1, 0.5, 0.9, 1]
    shown = page.evaluate("(ts) => ts.map((t) => colourAt(t))", points)
    for t, rgb in zip(points, shown):
        expected = [round(255 * c) for c in cmap((t + 1) / 2)[:3]]
        assert max(abs(a - b) for a, b in zip(rgb, expected)) <= 4, (t, rgb, expected)  # matplotlib: 256 steps
    assert to_hex(cmap(1.0)) == colours.COLOUR_MAP[-1] and to_hex(cmap(0.0)) == colours.COLOUR_MAP[0]
    band = page.evaluate("""() => { const c = document.querySelector('#modality-band'), d = c.getContext('2d')
        .getImageData(0, 2, c.width, 1).data, seen = new Set();
        for (let o = 0; o < d.length; o += 4) seen.add('#' + [0, 1, 2].map((k) => d[o + k].toString(16).padStart(2, '0')).join(''));
        return [...seen]; }""")
    assert colours.MODALITY_COLOURS["vision"] in band and colours.MODALITY_COLOURS["text"] in band
    del data["colour_scale"]  # an older result
    (tmp_path / "old.json").write_text(json.dumps(data))
    page.goto((ROOT / "visualize_results.html").as_uri())
    page.set_input_files("#file-input", [str(tmp_path / "old.json")])
    expect(page.locator("#heatmap")).to_have_attribute("data-columns", str(len(data["units"])))
    assert page.evaluate("(ms) => ms.map((m) => scaleOf(state.runs[0], m))", metrics) == viewer
    assert [colours.limit(data, m) for m in metrics] == viewer


def test_overlays_and_their_exports_draw_the_full_resolution_picture(page, tmp_path):
    """A 1024×768 picture of 2-px stripes (a thumbnail blurs them to grey): the overlay draws the embedded 1024-px
    picture, so its export shows the stripes (dark and light pixels both, not a grey wash); a result without it
    (written before) falls back to the thumbnail; "picture in grey" drops the picture's own colours."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (1024, 768), (250, 250, 250))
    draw = ImageDraw.Draw(image)
    for x in range(0, 1024, 6):
        draw.rectangle([x, 0, x + 2, 767], fill=(200, 20, 20))  # red stripes: the picture's own red
    image.save(tmp_path / "stripes.png")
    assert main(["--demo", "--image", str(tmp_path / "stripes.png"), "--output-dir", str(tmp_path), "--output", "big",
                 "--mask-mode", "vision", "--unit", "region:2", "--layers", "0", "--no-progress"], True) == 0
    page.goto((tmp_path / "big.html").as_uri())
    page.wait_for_selector("canvas.overlay[data-painted='1']")
    assert page.evaluate("pictureOf(state.runs[0].images[0]).naturalWidth") == 1024
    page.locator("#opacity").fill("0")

    def stripes(path):
        pixels = Image.open(path).convert("RGB")
        w, h = pixels.size
        row = [pixels.getpixel((x, h // 2)) for x in range(w // 4, 3 * w // 4)]
        return sum(r > 150 and g < 90 for r, g, b in row) / len(row), sum(min(r, g, b) > 220 for r, g, b in row) / len(row)

    red, light = stripes(_export(page, "overlay", "png", tmp_path))
    assert red > 0.15 and light > 0.15, (red, light)  # stripes drawn, not blurred to pink
    page.locator("#grey-picture").check()
    red, _ = stripes(_export(page, "overlay", "png", tmp_path))
    assert red == 0
    data = json.loads((tmp_path / "big.json").read_text())
    del data["images"][0]["picture"]  # written before: the thumbnail only
    (tmp_path / "old.json").write_text(json.dumps(data))
    page.goto((ROOT / "visualize_results.html").as_uri())
    page.set_input_files("#file-input", [str(tmp_path / "old.json")])
    page.wait_for_selector("canvas.overlay[data-painted='1']")
    assert page.evaluate("pictureOf(state.runs[0].images[0]).naturalWidth") == 256


def test_compare_refuses_a_difference_of_other_pictures_or_answers_and_keeps_titles_whole(page, results, tmp_path):
    """A − B of two runs of different pictures is refused with the reason (as the maps side by side refuse them), not
    drawn; of different answers it is drawn with a note saying so; the panels' titles and colour-bar captions are not
    cut by their canvas."""
    data = json.loads((results / "vision.json").read_text())
    other = json.loads(json.dumps(data))
    other["meta"]["fingerprint"] = dict(other["meta"].get("fingerprint") or {}, **{"inputs.pixel_values": "another"})
    data["meta"]["fingerprint"] = dict(data["meta"].get("fingerprint") or {}, **{"inputs.pixel_values": "this"})
    (tmp_path / "a.json").write_text(json.dumps(data))
    (tmp_path / "picture.json").write_text(json.dumps(other))
    answer = json.loads(json.dumps(data))
    answer["baseline"] = dict(answer["baseline"], text="green", token_ids=[7, 2])
    (tmp_path / "answer.json").write_text(json.dumps(answer))
    page.goto((ROOT / "visualize_results.html").as_uri())
    page.set_input_files("#file-input", [str(tmp_path / "a.json"), str(tmp_path / "picture.json")])
    expect(page.locator("#compare-message")).to_contain_text("no difference to show: A and B saw different images")
    assert not page.locator("#heatmap-diff").is_visible()
    page.set_input_files("#file-input", [str(tmp_path / "a.json"), str(tmp_path / "answer.json")])
    expect(page.locator("#compare-message")).to_contain_text('note: the answers differ (A "')  # drawn, with a word
    assert "A − B is a difference of two quantities" in page.locator("#compare-message").text_content()
    page.set_input_files("#file-input", [str(tmp_path / "a.json"), str(tmp_path / "a.json")])
    expect(page.locator("#heatmap-diff")).to_be_visible()
    for selector in ("#heatmap-a", "#heatmap-b", "#heatmap-diff"):  # every title and caption inside its canvas
        widths = page.locator(selector).evaluate("""(c) => { const l = c.layout, ctx = c.getContext('2d');
            ctx.font = '600 13px system-ui, sans-serif'; const title = ctx.measureText(c.dataset.title).width + 14;
            ctx.font = '11px system-ui, sans-serif'; const caption = ctx.measureText(c.dataset.caption).width;
            return [title, caption + l.x + 160 + 8, c.width]; }""")
        assert widths[0] <= widths[2] and widths[1] <= widths[2] + 1, (selector, widths)


def _svg_overflow(page, path: Path) -> list[str]:
    """The texts of an exported SVG that run past its right edge or end cut with "…" (measured in the page, in the
    font the SVG gives them; turned texts left out)."""
    import xml.etree.ElementTree as ET

    root = ET.parse(path).getroot()
    width = float(root.get("width") or root.get("viewBox").split()[2])
    items = []
    for node in root.iter(f"{SVG}text"):
        if node.get("transform") or "rotate" in (node.get("style") or ""):
            continue
        font = (node.get("style") or "").removeprefix("font: ")
        items.append([float(node.get("x")), node.get("text-anchor"), font, "".join(node.itertext())])
    measured = page.evaluate("""(items) => { const ctx = document.createElement('canvas').getContext('2d');
        return items.map(([x, anchor, font, text]) => { ctx.font = font; const w = ctx.measureText(text).width;
            return anchor === 'middle' ? x + w / 2 : anchor === 'end' ? x : x + w; }); }""", items)
    return [text for (_, _, _, text), right in zip(items, measured) if right > width + 1 or text.endswith("…")]


def test_exported_figures_hold_their_captions_whole(page, stage_results, tmp_path):
    """The overlay (one window and every window), the answer steps and the maps side by side (each panel's own scale,
    and one shared scale) as SVG: no caption cut with "…" or past the figure's edge, a noise floor's note included."""
    page.goto((ROOT / "visualize_results.html").as_uri())
    page.set_input_files("#file-input", [str(stage_results / f"{name}.json") for name in ("decoder", "vit", "pixels")])
    expect(page.locator("#maps canvas.overlay[data-painted='1']")).to_have_count(3)
    page.fill("#floor", "0.001")
    page.dispatch_event("#floor", "change")
    for scale in ("own", "shared"):
        page.select_option("#maps-scale", scale)
        for panel in ("overlay", "overlay-grid", "steps", "maps"):
            path = _export(page, panel, "svg", tmp_path)
            assert _svg_overflow(page, path) == [], (panel, scale, _svg_overflow(page, path))


def test_a_link_to_a_unit_scrolls_its_column_into_view(browser, tmp_path):
    """#unit=1400&zoom=12 on a 1,508-unit result at 1440×900: the selected column is inside the heatmap's visible box
    (sideways) and the heatmap on screen (before: selected, but off-screen)."""
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    page = context.new_page()
    path = _synthetic(tmp_path / "long.json", 1508, range(100, 884))
    page.goto((ROOT / "visualize_results.html").as_uri() + "#unit=1400&zoom=12")
    page.set_input_files("#file-input", [str(path)])
    expect(page.locator("#heatmap")).to_have_attribute("data-columns", "1508")
    assert page.evaluate("[state.selected, state.zoom]") == [1400, 12]
    left, visible = page.locator("#heat-scroll").evaluate("s => [s.scrollLeft, s.clientWidth]")
    assert left <= 1400 * 12 and 1401 * 12 <= left + visible, (left, visible)
    box = page.locator("#heatmap").bounding_box()
    assert 0 <= box["y"] and box["y"] + box["height"] <= 900
    context.close()


def test_key_presses_on_a_36_by_4156_result_redraw_only_what_changed(browser, tmp_path):
    """36 windows × 4,156 units with an image (benchmarks/bench_viewer.py's result) at 1440×900: a key press that moves
    the selected unit (→) or the window (↓) takes a few tens of ms in the page (it took 0.4–0.6 s: every view was
    drawn again); the medians go to tests/artifacts. The bound asserted is loose (a loaded machine), the target 50 ms."""
    from benchmarks.bench_viewer import KEY, with_image, with_steps

    context = browser.new_context(viewport={"width": 1440, "height": 900})
    page = context.new_page()
    vision = range(30, 4156 - 30)
    path = _synthetic(tmp_path / "big.json", 4156, vision)
    with_steps(path)
    with_image(path, vision)
    page.goto((ROOT / "visualize_results.html").as_uri())
    page.set_input_files("#file-input", [str(path)])
    expect(page.locator("#heatmap")).to_have_attribute("data-columns", "4156")
    page.wait_for_selector("canvas.overlay[data-painted='1']")
    page.evaluate(KEY, ["ArrowDown", 1])  # colour by the window shown: the first press redraws every view once
    medians = {}
    for key in ("ArrowRight", "ArrowDown"):
        times = sorted(page.evaluate(KEY, [key, 10]))
        medians[key] = times[len(times) // 2]
    (ARTIFACTS / "viewer_key_press_ms.txt").write_text(json.dumps(medians) + "\n")
    assert page.evaluate("state.selected") == 9 and page.evaluate("state.window") == 11
    assert medians["ArrowRight"] < 120 and medians["ArrowDown"] < 120, medians
    context.close()


def test_the_heatmap_and_the_image_overlay_are_seen_together_at_1440_by_900(browser, results):
    """Linked brushing can be seen: at 1440×900 the heatmap starts on the first screen, and with the heatmap in view
    the image overlay is on screen beside it (it stays there as the page scrolls), so hovering a vision column shows
    its outline on the picture at once."""
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    page = context.new_page()
    data = json.loads((results / "vision.json").read_text())
    page.goto((results / "vision.html").as_uri())
    page.wait_for_selector("canvas.overlay[data-painted='1']")
    assert page.locator("#heatmap").bounding_box()["y"] < 900  # before: at y ≈ 740 below the fold's worth of header
    page.evaluate("document.querySelector('#heat-title').scrollIntoView()")  # the heatmap's section at the top
    page.wait_for_timeout(100)
    heat, picture = page.locator("#heatmap").bounding_box(), page.locator("canvas.overlay").bounding_box()
    for box in (heat, picture):
        assert 0 <= box["y"] and box["y"] + box["height"] <= 900 and box["x"] + box["width"] <= 1440, (heat, picture)
    assert picture["x"] >= heat["x"] + heat["width"] - 1  # beside the map, not under it
    column = next(i for i, unit in enumerate(data["units"]) if unit["modality"] == "vision")
    _hover_column(page, column)
    brush = page.locator("#overlays .brush").bounding_box()
    assert brush and 0 <= brush["y"] <= 900
    page.screenshot(path=str(ARTIFACTS / "viewer_1440x900.png"))
    page.mouse.wheel(0, 250)  # further down (answer steps, tokens): the overlay stays in view beside them
    page.wait_for_timeout(200)
    box = page.locator("canvas.overlay").bounding_box()
    assert 0 <= box["y"] and box["y"] + box["height"] <= 900, box
    context.close()


def test_an_occlusions_answer_steps_name_the_unit_and_maps_export_is_off_without_maps(page, stage_results):
    data = json.loads((stage_results / "pixels.json").read_text())
    page.goto((ROOT / "visualize_results.html").as_uri())
    page.set_input_files("#file-input", [str(stage_results / "pixels.json"), str(stage_results / "decoder.json")])
    expect(page.locator("#maps canvas.overlay[data-painted='1']")).to_have_count(2)
    title = page.locator("#steps-title").text_content()
    assert "image_pad" not in title and any(f'"{u["label"]}"' in title for u in data["units"]), title
    assert not page.locator('button[data-export="maps"]').first.is_disabled()
    page.set_input_files("#file-input", [str(stage_results / "pixels.json")])
    expect(page.locator('button[data-export="maps"]').first).to_be_disabled()


def test_the_token_strip_breaks_between_words_not_inside_one(page, results, tmp_path):
    data = json.loads((results / "text.json").read_text())
    words = ["Un", "believ", "ably", " long", " sentence"] * 40
    data["tokens"] = [dict(data["tokens"][0], index=p, text=text, modality="text") for p, text in enumerate(words)]
    data["units"] = [dict(data["units"][0], index=p, keys=[p], label=text) for p, text in enumerate(words)]
    for name in data["metrics"]:
        data["metrics"][name] = [[row[0]] * len(words) for row in data["metrics"][name]]
    data.pop("steps", None)
    (tmp_path / "words.json").write_text(json.dumps(data))
    page.goto((ROOT / "visualize_results.html").as_uri())
    page.set_input_files("#file-input", [str(tmp_path / "words.json")])
    expect(page.locator("#strip .tok")).to_have_count(len(words))
    tops = page.locator("#strip .tok").evaluate_all("ts => ts.map((t) => Math.round(t.getBoundingClientRect().top))")
    assert len(set(tops)) > 1  # the strip wraps
    for k in range(0, len(words), 5):  # "Un" "believ" "ably": one word, one line
        assert tops[k] == tops[k + 1] == tops[k + 2], k


def test_the_top_tables_first_row_is_the_runs_largest_knockout_by_the_same_rule(page, results, tmp_path):
    """The top-knockouts table ranks as "the run's largest knockout" is found (answer steps, batch overview,
    report.largest_knockout): by the metric, special tokens left out where other units were swept (they come last,
    said so); under logprob_drop its row 1 is that knockout, even where the run generated no answer under it."""
    from mask_impact.report import largest_knockout

    data = json.loads((results / "text.json").read_text())
    special = next(i for i, unit in enumerate(data["units"]) if unit["modality"] == "special")
    plain = [i for i, unit in enumerate(data["units"]) if unit["modality"] != "special"]
    drops = data["metrics"]["logprob_drop"]
    drops[0][special] = 50.0  # a sink token: the largest value of all, generated under
    drops[1][plain[-1]] = 20.0  # the largest of the other units: not generated under
    window = lambda w: list(data["windows"][w])  # noqa: E731
    data["generations"] = [{"window": window(0), "unit": special, "label": data["units"][special]["label"],
                            "text": "sink", "token_ids": [1]},
                           {"window": window(0), "unit": plain[0], "label": data["units"][plain[0]]["label"],
                            "text": "other", "token_ids": [1]}]
    data.pop("colour_scale", None)
    (tmp_path / "sink.json").write_text(json.dumps(data))
    top = largest_knockout(data)
    assert (top["window"], top["unit"]) == (1, plain[-1])
    page.goto((ROOT / "visualize_results.html").as_uri())
    page.set_input_files("#file-input", [str(tmp_path / "sink.json")])
    page.wait_for_selector("#run:not(.hidden)")
    rows = page.locator("#top tbody tr")
    first = rows.nth(1).locator("td")
    assert int(first.nth(1).text_content()) == top["unit"]  # before: the sink token, ranked by its raw value
    assert first.nth(5).text_content() == "(not generated)" and rows.nth(1).get_attribute("data-largest") == "1"
    last = rows.nth(rows.count() - 1).locator("td")
    assert int(last.nth(1).text_content()) == special and "special token (ranked last)" in last.nth(3).text_content()
    assert "row 1 (bold) is the run's largest knockout by logprob_drop" in page.locator("#top-note").text_content()
    label = data["units"][top["unit"]]["label"]
    assert json.dumps(label) in page.locator("#steps-title").text_content() or label in page.locator("#steps-title").text_content()
    assert page.evaluate("(() => { const t = topKnockout(state.runs[0]); return [t.w, t.i]; })()") == [1, top["unit"]]
    page.select_option("#metric", "kl")  # another metric: ranked by it, the largest knockout still marked where shown
    assert page.locator("#top-note").text_content().startswith("ranked by kl")


def test_flow_and_impact_curves_have_round_ticks_on_the_page_and_in_their_figures(page, unit_results, tmp_path):
    page.goto((unit_results / "flow.html").as_uri())
    page.wait_for_selector("#flow-section:not(.hidden)")
    ticks = json.loads(page.locator("#flow-chart").get_attribute("data-ticks"))  # before: no ticks, the two ends only
    assert len(ticks) >= 4 and 0 in ticks, ticks
    steps = {round(b - a, 9) for a, b in zip(ticks, ticks[1:])}
    assert len(steps) == 1 and f"{steps.pop():g}"[0] in "125", ticks  # evenly spaced round values
    texts = _svg_texts(_export(page, "flows", "svg", tmp_path))
    assert sum(text.lstrip("-").replace(".", "").isdigit() for text in texts) >= 4 + 3  # y ticks and x layers


def test_colour_bars_have_intermediate_ticks_and_36_windows_each_a_label_in_the_figure(page, tmp_path):
    path = _synthetic(tmp_path / "w36.json", 40, range(0))
    page.goto((ROOT / "visualize_results.html").as_uri())
    page.set_input_files("#file-input", [str(path)])
    expect(page.locator("#heatmap")).to_have_attribute("data-columns", "40")
    bar = json.loads(page.locator("#colorbar").get_attribute("data-ticks"))
    assert len(bar) >= 3 and "0" in bar, bar  # before: only the ends, in words beside the bar
    rows = page.locator("#row-labels div").all_text_contents()
    assert all(rows) and len(rows) == 36
    texts = _svg_texts(_export(page, "heatmap", "svg", tmp_path))
    assert all(str(w) in texts for w in range(36)), texts  # before: every other window ("0", "2", …)
    assert sum(text in bar for text in texts) >= 3  # the figure's colour bar has the same ticks
    page.screenshot(path=str(ARTIFACTS / "viewer_36_windows.png"))


def test_the_token_strip_exports_png_and_svg_with_words_whole(page, results, tmp_path):
    data = json.loads((results / "xss.json").read_text())
    page.goto((results / "xss.html").as_uri())
    page.wait_for_selector("#run:not(.hidden)")
    svg = _export(page, "tokens", "svg", tmp_path)
    assert svg.name.endswith("-tokens.svg"), svg.name
    texts = _svg_texts(svg)
    shown = [tok["text"].replace("\n", "⏎") for tok in data["tokens"] if tok["modality"] != "vision"]
    start = texts.index(shown[0])
    assert texts[start:start + len(shown)] == shown  # every token, whole, in order, as text
    assert any(" — prompt tokens · " in text for text in texts) and any("(hurts)" in text for text in texts), texts[:3]
    assert page.dialogs == []
    png = _export(page, "tokens", "png", tmp_path)
    size, coloured = _png_colours(png)
    assert size[0] >= 1900 and coloured > 100  # drawn at twice the size, tokens and the bar coloured


def test_the_overlay_draws_effects_as_contours_over_a_grey_picture(page, unit_results):
    data = json.loads((unit_results / "region.json").read_text())
    page.goto((unit_results / "region.html").as_uri())
    page.wait_for_selector("canvas.overlay[data-painted='1']")
    page.locator("#grey-picture").check()
    page.select_option("#overlay-style", "contours")
    expect(page.locator("canvas.overlay")).to_have_attribute("data-painted", "1")
    canvas = page.locator("canvas.overlay")
    assert int(canvas.get_attribute("data-contours") or 0) > 50  # before: no such option
    top = max(range(len(data["units"])), key=lambda i: max(row[i] for row in data["metrics"]["logprob_drop"]))
    x0, y0, x1, y1 = data["units"][top]["box"]
    scale = canvas.evaluate("c => c.scale")
    centre = page.evaluate("""([x, y]) => Array.from(document.querySelector('canvas.overlay').getContext('2d')
        .getImageData(x, y, 1, 1).data.slice(0, 3))""", [round((x0 + x1) / 2 * scale) - 3, round((y0 + y1) / 2 * scale) - 3])
    assert max(centre) - min(centre) <= 2, centre  # inside the area: the grey picture, no tint
    coloured = page.evaluate("""() => { const c = document.querySelector('canvas.overlay'), d = c.getContext('2d')
        .getImageData(0, 0, c.width, c.height).data; let n = 0;
        for (let o = 0; o < d.length; o += 4) if (d[o] - d[o + 2] > 50 && d[o] > d[o + 1]) n++; return n; }""")
    assert coloured > 20  # red lines where the effect crosses its levels
    page.screenshot(path=str(ARTIFACTS / "viewer_contours.png"))
