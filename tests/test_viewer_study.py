"""A study's page (``--dataset``): the batch page of a study shows its header, curves with confidence bands, the
averaged image map and the rows' table (sortable, each row opening its page), read from index.json's study_data.
A batch without study_data shows none of it. Driven in headless Chromium as tests/test_viewer.py is."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from mask_impact.cli import main
from mask_impact.report import viewer_html
from tests.support import watched_page
from tests.test_viewer import ARTIFACTS, SVG, XSS_PROMPT, _export, _png_colours, browser, expect  # noqa: F401

FLOWS = ["image->last", "question->last"]


@pytest.fixture()
def page(browser):  # noqa: F811  (the 1440×900 screen the page is laid out for)
    with watched_page(browser, 1440, 900, accept_downloads=True) as page:
        yield page


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    """Two small demo studies: flows over windows of 3 layers, and image tokens (--mask-mode both) in layers 1, 2."""
    folder = tmp_path_factory.mktemp("studies")
    common = ["--demo", "--dataset", "demo-shapes", "--limit", "4", "--output-dir", str(folder), "--no-progress"]
    assert main([*common, *[x for flow in FLOWS for x in ("--flow", flow)], "--window", "3", "--output", "flows"],
                True) == 0
    assert main([*common, "--mask-mode", "both", "--layers", "1-2", "--output", "grid"], True) == 0
    return folder


def _study(folder: Path) -> dict:
    return json.loads((folder / "index.json").read_text())["study_data"]


def _windows(entries: list[dict]) -> list[str]:
    """The windows' labels in layer order, as the figures and the page sort them."""
    return [label for _, _, label in sorted({(e["layer_start"], e["layer_end"], e["window_label"]) for e in entries})]


def _curves(study: dict, metric: str) -> dict[str, dict]:
    entries = [e for e in study["aggregates"] if e["metric"] == metric]
    named = [e for e in entries if e["kind"] in ("flow", "group", "image")] or [
        e for e in entries if e["kind"] in ("tokens", "words")]
    labels = _windows(named)
    out = {}
    for e in named:
        curve = out.setdefault(e["unit"], {"values": [None] * len(labels), "low": [None] * len(labels),
                                           "high": [None] * len(labels), "n": 0})
        k = labels.index(e["window_label"])
        curve["values"][k], curve["low"][k], curve["high"][k] = e["mean"], e["ci_low"], e["ci_high"]
        curve["n"] = max(curve["n"], e["n"])
    return out


def _shown_curves(page) -> dict[str, dict]:
    return {s["unit"]: s for s in json.loads(page.locator("#study-chart").get_attribute("data-values"))}


def _close(a, b) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and abs(a - b) <= 1e-9 * max(1, abs(b)))


def _same(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) < 1e-6 for x, y in zip(a, b))


def _chart_paths(svg: Path) -> tuple[dict, dict]:
    """The curves figure's lines ({colour: [(x, y), ...]}) and bands ({colour: [(x, y), ...]}) as drawn in its SVG."""
    lines, bands = {}, {}
    for node in ET.parse(svg).getroot().iter(f"{SVG}path"):
        if "translate" not in node.get("transform", "") or "a" in node.get("d"):  # the legend; the points (arcs)
            continue
        points = [tuple(map(float, pair)) for pair in re.findall(r"[ML](-?[\d.e+-]+) (-?[\d.e+-]+)", node.get("d"))]
        if node.get("fill-opacity"):
            bands[node.get("fill")] = points
        elif node.get("stroke") not in (None, "#bbb", "#666", "#e6e8eb"):  # not the axes, zero line, ticks
            lines[node.get("stroke")] = points
    return lines, bands


def test_a_study_page_shows_its_header_curves_with_bands_and_a_metric_choice(page, studies, tmp_path):
    folder = studies / "flows"
    study = _study(folder)
    page.goto((folder / "index.html").as_uri())
    expect(page.locator("#study")).to_be_visible()
    assert page.locator("#study-name").text_content() == "flows"
    meta = page.locator("#study-meta").inner_text()
    assert study["model"] in meta and "4 measured / 0 excluded / 0 failed of 4" in meta
    assert "95% · percentile bootstrap over rows (2000 resamples, seed 0)" in meta and "baseline accuracy" in meta
    assert study["primary"] == "prob_change_pct" and page.locator("#study-metric").input_value() == "prob_change_pct"
    assert "prob_change_pct" in meta
    metrics = page.locator("#study-metric option").evaluate_all("options => options.map(o => o.value)")
    assert sorted(metrics) == sorted({e["metric"] for e in study["aggregates"]})
    # the points are the aggregates' means, the bands their intervals, one curve per flow, windows in layer order
    want = _curves(study, "prob_change_pct")
    shown = _shown_curves(page)
    assert set(shown) == set(FLOWS) == set(want)
    assert json.loads(page.locator("#study-chart").get_attribute("data-windows")) == _windows(
        [e for e in study["aggregates"] if e["kind"] == "flow"])
    for unit, curve in want.items():
        for field in ("values", "low", "high"):
            assert all(_close(a, b) for a, b in zip(shown[unit][field], curve[field], strict=True)), (unit, field)
        assert shown[unit]["n"] == curve["n"] == 4
    legend = page.locator("#study-legend").inner_text()
    assert all(f"{unit} (n=4)" in legend for unit in FLOWS)
    # on the canvas: each point drawn at its mean on the chart's axis (a point of its curve's colour, or of a curve
    # whose point lies within a few pixels)
    axis = json.loads(page.locator("#study-chart").get_attribute("data-axis"))
    colours = page.evaluate("SERIES_COLOURS")
    x_of = lambda w: axis["left"] + w / (axis["n"] - 1) * (axis["right"] - axis["left"])  # noqa: E731
    y_of = lambda v: axis["bottom"] - (v - axis["lo"]) / (axis["hi"] - axis["lo"]) * (axis["bottom"] - axis["top"])  # noqa: E731
    order = list(shown)
    for s, unit in enumerate(order):
        for w, v in enumerate(shown[unit]["values"]):
            around = page.evaluate("""([x, y]) => { const d = document.getElementById('study-chart').getContext('2d')
                .getImageData(x - 2, y - 2, 5, 5).data, out = [];
                for (let o = 0; o < d.length; o += 4) out.push('#' + [0, 1, 2].map((c) => d[o + c].toString(16).padStart(2, '0')).join(''));
                return out; }""", [round(x_of(w)), round(y_of(v))])
            assert colours[s] in around, (unit, w)  # the point's own colour (another line may cross its centre)
    # in the SVG figure: every line point and band edge on one affine axis (y = a + b·value), the band from
    # ci_high (its upper edge, left to right) back along ci_low
    svg = _export(page, "study-curves", "svg", tmp_path)
    assert svg.name == "study-flows-study-curves.svg"
    texts = ["".join(node.itertext()) for node in ET.parse(svg).getroot().iter(f"{SVG}text")]
    assert any(text.startswith("study flows") for text in texts) and all(f"{u} (n=4)" in texts for u in FLOWS)
    lines, bands = _chart_paths(svg)
    assert set(lines) == set(bands) == {colours[order.index(u)] for u in FLOWS}
    first = lines[colours[0]]
    values = shown[order[0]]["values"]
    b = (first[1][1] - first[0][1]) / (values[1] - values[0])
    a = first[0][1] - b * values[0]
    for s, unit in enumerate(order):
        line, band = lines[colours[s]], bands[colours[s]]
        assert _same([y for _, y in line], [a + b * v for v in want[unit]["values"]])
        assert _same([y for _, y in band], [a + b * v for v in want[unit]["high"] + want[unit]["low"][::-1]])
        assert [x for x, _ in band] == [x for x, _ in line] + [x for x, _ in line][::-1]
    size, coloured = _png_colours(_export(page, "study-curves", "png", tmp_path))
    assert size[0] >= 1800 and coloured > 500
    # another metric: its means, its name in the header
    page.locator("#study-metric").select_option("logprob_drop")
    expect(page.locator("#study-chart")).to_have_attribute("data-metric", "logprob_drop")
    want = _curves(study, "logprob_drop")
    shown = _shown_curves(page)
    for unit, curve in want.items():
        assert all(_close(x, y) for x, y in zip(shown[unit]["values"], curve["values"], strict=True))
    assert "logprob_drop (nats" in page.locator("#study-meta").inner_text()
    assert page.locator("#study-map-box").is_hidden()  # flows only: no grid units, no map
    page.screenshot(path=str(ARTIFACTS / "viewer_study.png"))


def test_the_study_map_shows_image_1_on_the_grid_per_window_with_each_cells_mean_ci_and_n(page, studies, tmp_path):
    folder = studies / "grid"
    study = _study(folder)
    page.goto((folder / "index.html").as_uri())
    expect(page.locator("#study-map-box")).to_be_visible()
    metric = page.locator("#study-metric").input_value()
    grid = [e for e in study["aggregates"] if e["kind"] == "grid" and e["metric"] == metric]
    labels = _windows(grid)
    assert labels == ["layer 1", "layer 2"] and study["grid"] == 8
    panels = page.locator(".study-grid")
    assert panels.count() == 2
    assert page.locator(".study-map .map-title").all_text_contents() == labels
    # the curves: no flows, groups or images, so the token modalities
    assert set(_shown_curves(page)) == {e["unit"] for e in study["aggregates"] if e["kind"] == "tokens"}
    largest = max(abs(e["mean"]) for e in grid if e["mean"] is not None)
    for k, label in enumerate(labels):
        cells = panels.nth(k).locator("div")
        assert cells.count() == 64
        titles = cells.evaluate_all("cells => cells.map(c => [c.dataset.unit, c.title, c.dataset.mean ?? null, "
                                    "getComputedStyle(c).backgroundColor])")
        assert [unit for unit, *_ in titles] == [f"image1 grid r{r} c{c}" for r in range(8) for c in range(8)]
        mine = {e["unit"]: e for e in grid if e["window_label"] == label}
        assert mine
        for unit, title, mean, background in titles:
            if unit not in mine:
                assert title == f"{unit} · {label}\nno unit's centre lies in this cell"
                assert background == "rgb(235, 235, 235)"
                continue
            e = mine[unit]
            assert title.startswith(f"{unit} · {label}\n{metric}: mean ") and title.endswith(f"\nn = {e['n']} rows")
            assert "[95% CI " in title and float(mean) == e["mean"]
            assert background != "rgb(235, 235, 235)"
            if abs(e["mean"]) == largest:  # the shared symmetric scale: the largest effect saturated
                assert background in ("rgb(5, 48, 97)", "rgb(103, 0, 31)")
    assert f"{metric}, every panel: " in page.locator("#study-map-scale").text_content()
    svg = _export(page, "study-map", "svg", tmp_path)
    texts = ["".join(node.itertext()) for node in ET.parse(svg).getroot().iter(f"{SVG}text")]
    assert labels[0] in texts and labels[1] in texts and any("every panel" in text for text in texts)
    size, coloured = _png_colours(_export(page, "study-map", "png", tmp_path))
    assert coloured > 100
    page.screenshot(path=str(ARTIFACTS / "viewer_study_map.png"), full_page=True)


def test_the_rows_table_has_target_and_correct_sorts_and_opens_each_rows_page(page, studies):
    folder = studies / "flows"
    study, index = _study(folder), json.loads((folder / "index.json").read_text())
    page.goto((folder / "index.html").as_uri())
    assert page.locator("#batch table").count() == 1  # one table: the batch's, with the study's columns
    heads = page.locator("#batch-runs thead th").all_text_contents()
    assert heads[:7] == ["run", "status", "stage · mask mode", "prompt", "answer / error", "target", "correct"]
    rows = page.locator("#batch-runs tbody tr")
    assert rows.count() == len(study["row_table"]) == 4
    for n, row in enumerate(study["row_table"]):
        cells = rows.nth(n).locator("td")
        assert cells.nth(0).text_content() == row["name"] and cells.nth(1).text_content() == row["status"]
        assert cells.nth(4).text_content() == row["answer"] and cells.nth(5).text_content() == row["target"]
        assert cells.nth(6).text_content() == ("yes" if row["correct"] else "no")
    drops = {run["name"]: run["top"]["logprob_drop"] for run in index["runs"]}
    names = lambda: [rows.nth(n).locator("td").first.text_content() for n in range(rows.count())]  # noqa: E731
    page.locator("#batch-runs th", has_text="logprob_drop").click()
    assert names() == sorted(drops, key=drops.get)
    assert page.locator("#batch-runs").get_attribute("data-sort") == "logprob_drop:asc"
    page.locator("#batch-runs th", has_text="logprob_drop").click()
    assert names() == sorted(drops, key=drops.get, reverse=True)
    page.locator("#batch-runs th", has_text="run").first.click()
    assert names() == ["row1", "row2", "row3", "row4"]
    # a row's name opens its page: the run, embedded in rowN.html beside index.html
    link = rows.nth(1).locator("td").first.locator("a")
    assert link.get_attribute("href") == "row2.html"
    link.click()
    expect(page.locator("#run")).to_be_visible()
    assert page.url.split("#")[0] == (folder / "row2.html").as_uri()
    assert page.locator("#answer").text_content().startswith(study["row_table"][1]["answer"])


def test_a_batch_without_study_data_shows_no_study(page, studies, tmp_path):
    index = json.loads((studies / "flows" / "index.json").read_text())
    del index["study_data"]
    (tmp_path / "index.html").write_text(viewer_html(index))
    page.goto((tmp_path / "index.html").as_uri())
    expect(page.locator("#batch")).to_be_visible()
    assert page.locator("#study").is_hidden()
    assert page.locator("#batch-runs thead th").all_text_contents() == [
        "run", "status", "stage · mask mode", "prompt", "answer / error", "top unit", "its peak window", "logprob_drop",
        "result", ""]
    assert page.locator("#batch-runs th.sortable").count() == 0
    assert page.locator("#batch-runs tbody tr").first.locator("td").first.locator("a").count() == 0  # as before
    assert page.locator("#batch-heading").text_content() == "Batch"
    assert page.locator("body.has-study").count() == 0


def test_missing_means_excluded_rows_and_hostile_text_on_a_study_page(page, studies, tmp_path):
    """A cell with no value (null mean and interval) leaves a gap in its curve and a grey map cell; excluded and
    failed rows are listed; names sort as numbers (row10 after row9); every string stays text."""
    index = json.loads((studies / "flows" / "index.json").read_text())
    study = index["study_data"]
    study["name"] = study["model"] = XSS_PROMPT
    study["rows"].update(total=12, excluded=1, failed=1)
    study["accuracy"] = {"rows": 11, "correct": 10, "value": 10 / 11}
    entry = next(e for e in study["aggregates"] if e["unit"] == "image->last" and e["metric"] == "prob_change_pct")
    entry.update(mean=None, ci_low=None, ci_high=None, n=0)
    for e in [e for e in study["aggregates"] if e["unit"] == "question->last"]:
        e["unit"] = XSS_PROMPT
    study["aggregates"].append({"unit": "image1 grid r0 c0", "kind": "grid", "window_label": XSS_PROMPT,
                                "layer_start": 0, "layer_end": 1, "metric": "prob_change_pct", "n": 3, "mean": None,
                                "ci_low": None, "ci_high": None})
    study["aggregates"].append({"unit": "image1 grid r2 c5", "kind": "grid", "window_label": XSS_PROMPT,
                                "layer_start": 0, "layer_end": 1, "metric": "prob_change_pct", "n": 3, "mean": -2.0,
                                "ci_low": -3.0, "ci_high": -1.0})
    index["runs"].append({"name": "row10", "status": "excluded", "prompt": XSS_PROMPT, "answer": XSS_PROMPT,
                          "target": XSS_PROMPT, "correct": False, "json": None, "html": None})
    study["row_table"].append({"name": "row10", "status": "excluded", "json": None, "error": None, "answer": XSS_PROMPT,
                               "correct": False})
    study["row_table"].append({"name": "row9", "status": "error", "json": None, "error": XSS_PROMPT, "answer": None,
                               "correct": None})
    (tmp_path / "index.html").write_text(viewer_html(index))
    page.goto((tmp_path / "index.html").as_uri())
    expect(page.locator("#study")).to_be_visible()
    assert page.locator("#study-name").text_content() == XSS_PROMPT
    meta = page.locator("#study-meta").inner_text()
    assert "4 measured / 1 excluded / 1 failed of 12" in meta and "90.9% (10 of 11 rows" in meta
    shown = _shown_curves(page)
    assert set(shown) == {"image->last", XSS_PROMPT} and shown["image->last"]["values"][0] is None
    assert shown["image->last"]["low"][0] is None and shown["image->last"]["values"][1] is not None
    assert XSS_PROMPT in page.locator("#study-legend").text_content()
    cells = page.locator(".study-grid div")
    assert cells.count() == 64
    assert cells.nth(0).get_attribute("title") == f"image1 grid r0 c0 · {XSS_PROMPT}\nprob_change_pct: mean –  [95% CI – … –]\nn = 3 rows"
    assert cells.nth(0).evaluate("c => getComputedStyle(c).backgroundColor") == "rgb(235, 235, 235)"
    assert cells.nth(2 * 8 + 5).evaluate("c => getComputedStyle(c).backgroundColor") == "rgb(103, 0, 31)"  # hurts
    rows = page.locator("#batch-runs tbody tr")
    assert rows.count() == 6
    assert rows.nth(4).locator("td").nth(3).text_content() == XSS_PROMPT  # the excluded row's prompt, from runs
    assert rows.nth(4).locator("td").nth(4).text_content() == XSS_PROMPT  # its answer
    assert rows.nth(5).locator("td").nth(4).text_content() == XSS_PROMPT  # the failed row's error
    page.locator("#batch-runs th", has_text="run").first.click()
    page.locator("#batch-runs th", has_text="run").first.click()
    assert [rows.nth(n).locator("td").first.text_content() for n in range(6)] == [
        "row10", "row9", "row4", "row3", "row2", "row1"]
    page.locator("#batch-runs th", has_text="correct").click()
    assert [rows.nth(n).locator("td").nth(6).text_content() for n in range(6)] == ["no", "yes", "yes", "yes", "yes", ""]
    for panel in ("study-curves", "study-map"):
        _export(page, panel, "svg", tmp_path)  # well-formed: the hostile names escaped
        ET.parse(next(tmp_path.glob(f"*-{panel}.svg")))
    page.wait_for_timeout(200)
    assert page.dialogs == [] and page.locator("img[src='x']").count() == 0 and page.locator("script").count() == 2
