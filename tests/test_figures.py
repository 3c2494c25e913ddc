"""Figures without a browser (figures.py): what is drawn is the result's numbers, where its boxes say; files are
written beside the results by --figures, YAML batches and KnockoutResult.plot; without matplotlib, one clear line."""

from __future__ import annotations

import io

import json
import sys

import numpy as np
import pytest
from PIL import Image

from mask_impact import Analyzer, InvalidArgument, KnockoutResult, MissingDependency
from mask_impact.cli import main
from mask_impact.config import DEMO_IMAGE
from tests.conftest import cli_error

PROMPT = "What color is the shape?"


@pytest.fixture(scope="module")
def analyzer():
    return Analyzer.demo(vision=True)


@pytest.fixture(scope="module")
def regions(analyzer):
    return analyzer.run(PROMPT, images=[str(DEMO_IMAGE)], unit="region:2", progress=False)


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=float)


def _canvas(figure) -> np.ndarray:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].astype(float)


def test_heatmap_draws_the_results_numbers_with_its_labels(regions):
    figure = regions.plot(kinds="heatmap")["heatmap"]
    axes = figure.axes[0]
    drawn = axes.images[0].get_array()
    assert np.array_equal(np.asarray(drawn), regions.metric("logprob_drop"))
    assert [t.get_text() for t in axes.get_xticklabels()] == [u["label"] for u in regions.units]
    assert [t.get_text() for t in axes.get_yticklabels()] == regions.window_labels
    assert axes.get_ylabel() == "decoder layers" and axes.get_xlabel() == "unit (region)"
    bar = figure.axes[1]
    assert bar.get_ylabel() == "log-prob drop of the answer (nats)"
    other = regions.plot(kinds="heatmap", metric="kl")["heatmap"].axes[0].images[0]
    assert np.array_equal(np.asarray(other.get_array()), regions.metric("kl"))


def test_overlay_tints_each_box_where_it_lies(regions):
    figure = regions.plot(kinds="overlay")["overlay"]
    panels = [ax for ax in figure.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == regions.window_labels  # three windows: every one shown
    pixels = _canvas(figure)
    height = pixels.shape[0]
    layer2 = panels[2]

    def colour(x: float, y: float) -> np.ndarray:  # image pixels → canvas pixels (the canvas' rows run down)
        cx, cy = layer2.transData.transform((x, y))
        return pixels[int(round(height - cy)), int(round(cx))]

    top = regions.top(1)[0]
    assert top["label"] == "image1 r0-1 c2-3" and top["window_label"] == "layer 2"
    boxes = layer2.collections[0]
    picture = np.asarray(Image.open(DEMO_IMAGE).convert("RGB"), dtype=float)
    drops = regions.metric()[2]
    for u, unit in enumerate(regions.units):  # each block: its value's colour at 60% over the picture
        x0, _, _, y1 = unit["box"]
        x, y = x0 + 4, y1 - 4  # a corner of the block, away from the shape and the box edges
        expected = 0.6 * 255 * np.array(boxes.cmap(boxes.norm(drops[u]))[:3]) + 0.4 * picture[int(y), int(x)]
        assert np.abs(colour(x, y) - expected).max() <= 3, unit["label"]
    shape_block, empty_block = colour(124, 60), colour(4, 124)
    assert shape_block[0] - shape_block[2] > 30 and abs(empty_block[0] - empty_block[2]) < 10  # red; grey


def test_plot_writes_nonblank_png_svg_and_pdf(regions, tmp_path):
    written = regions.plot(tmp_path / "cat.json")
    assert sorted(written) == ["heatmap", "overlay"]
    assert written["heatmap"] == tmp_path / "cat.heatmap.png"
    for path in written.values():
        assert _pixels(path).std() > 20  # drawn, not blank
    svg = regions.plot(tmp_path / "cat", format="svg", kinds=["heatmap"])["heatmap"].read_text()
    for text in ("decoder layers", "unit (region)", "image1 r0-1 c2-3", "layer 2", "log-prob drop of the answer"):
        assert f">{text}" in svg or text in svg
    pdf = regions.plot(tmp_path / "cat", format="pdf", windows=["layer 1", 2], kinds="overlay")["overlay"]
    assert pdf.read_bytes().startswith(b"%PDF")
    with pytest.raises(InvalidArgument, match="already exists; pass overwrite=True"):
        regions.plot(tmp_path / "cat")
    assert regions.plot(tmp_path / "cat", overwrite=True)["heatmap"].exists()


def test_save_with_figures_writes_one_set(regions, tmp_path):
    paths = regions.save(tmp_path / "run", figures="svg")
    assert sorted(p.name for p in paths.values()) == ["run.csv", "run.heatmap.svg", "run.html", "run.json",
                                                       "run.overlay.svg"]
    loaded = KnockoutResult.load(paths["json"])
    again = loaded.plot(kinds="heatmap")["heatmap"].axes[0].images[0].get_array()
    assert np.array_equal(np.asarray(again), regions.metric())  # a saved result draws the same numbers


def test_flow_curves_one_line_per_flow(analyzer, tmp_path):
    result = analyzer.run(PROMPT, images=[str(DEMO_IMAGE)], flows=["image->last", "question->last"], progress=False)
    figures = result.plot()
    assert sorted(figures) == ["flows", "heatmap"]  # a flow's box is the whole image: no overlay
    axes = figures["flows"].axes[0]
    drops = result.metric("logprob_drop")
    for u, line in enumerate(axes.get_lines()[:2]):
        assert np.array_equal(line.get_xdata(), [0, 1, 2]) and np.array_equal(line.get_ydata(), drops[:, u])
    assert [t.get_text() for t in axes.get_legend().get_texts()] == ["image->last", "question->last"]
    assert axes.get_xlabel() == "decoder layer"
    with pytest.raises(InvalidArgument, match="kinds='overlay' is not a figure of this result; its figures: "
                                              "heatmap, flows"):
        result.plot(kinds="overlay")


@pytest.mark.parametrize("call,message", [
    (lambda r: r.plot(format="gif"), "format='gif' is not one of: png, svg, pdf"),
    (lambda r: r.plot(metric="loss"), "metric='loss' is not a metric"),
    (lambda r: r.plot(windows=["layer 9"]), "windows='layer 9' is not a window of this result"),
    (lambda r: r.plot(windows=[3]), "windows=3 is out of range: this result has 3 windows"),
])
def test_bad_plot_arguments(regions, call, message):
    with pytest.raises(InvalidArgument, match=message):
        call(regions)


@pytest.mark.slow
def test_command_line_figures_for_each_stage(tmp_path):
    out = ["--output-dir", str(tmp_path), "--no-progress"]
    assert main(["--demo", "--stage", "pixels", "--output", "pix", "--figures", "png", *out], True) == 0
    assert main(["--demo", "--stage", "deepstack", "--output", "ds", "--figures", "svg", *out], True) == 0
    assert main(["--demo", "--output", "text", "--figures", "pdf", *out], False) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["pix.json", "pix.csv", "pix.html", "pix.heatmap.png", "pix.overlay.png",
                            "ds.json", "ds.csv", "ds.html", "ds.heatmap.svg", "ds.overlay.svg",
                            "text.json", "text.csv", "text.html", "text.heatmap.pdf"])
    assert _pixels(tmp_path / "pix.heatmap.png").std() > 20 and _pixels(tmp_path / "pix.overlay.png").std() > 20
    svg = (tmp_path / "ds.heatmap.svg").read_text()
    labels = json.loads((tmp_path / "ds.json").read_text())["window_labels"]
    assert "route removed" in svg and all(label in svg for label in labels)  # rows: the DeepStack routes
    overlay = (tmp_path / "ds.overlay.svg").read_text()
    assert all(label in overlay for label in labels)  # a panel per route
    assert (tmp_path / "text.heatmap.pdf").read_bytes().startswith(b"%PDF")
    pixels = KnockoutResult.load(tmp_path / "pix.json").plot(kinds="heatmap")["heatmap"].axes[0]
    assert pixels.get_ylabel() == "occlusion" and [t.get_text() for t in pixels.get_yticklabels()] == \
        ["occluded (mean)"]


@pytest.mark.slow
def test_yaml_batch_figures(tmp_path):
    config = tmp_path / "b.yaml"
    config.write_text(f"defaults:\n  demo: true\n  output_dir: {tmp_path / 'out'}\n  figures: png\nruns:\n"
                      "  - name: regions\n    unit: region:2\n  - name: flows\n    flow: image->last\n"
                      "    figures: svg\n", encoding="utf-8")
    assert main(["--config", str(config), "--no-progress"], True) == 0
    folder = tmp_path / "out" / "b"
    index = json.loads((folder / "index.json").read_text())
    assert [run["figures"] for run in index["runs"]] == [["regions.heatmap.png", "regions.overlay.png"],
                                                          ["flows.heatmap.svg", "flows.flows.svg"]]
    assert all((folder / name).stat().st_size > 1000 for run in index["runs"] for name in run["figures"])


def test_bad_figures_option_is_one_line_before_the_model_loads(capsys, tmp_path, monkeypatch):
    from mask_impact import cli

    monkeypatch.setattr(cli, "load", lambda *a: pytest.fail("the model must not load"))
    out = ["--output-dir", str(tmp_path)]
    assert "--figures 'gif' is not one of: png, svg, pdf" in cli_error(capsys, ["--demo", "--figures", "gif", *out])
    (tmp_path / "x.overlay.png").write_bytes(b"")
    assert "x.overlay.png already exists" in cli_error(capsys, ["--demo", "--figures", "png", "--output", "x", *out])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    error = cli_error(capsys, ["--demo", "--figures", "png", "--output", "y", *out])
    assert 'needs matplotlib, which is not installed: pip install "mask-impact[figures]"' in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.overlay.png"]


def test_plot_without_matplotlib_raises_the_librarys_error(regions, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingDependency, match=r'pip install "mask-impact\[figures\]"') as caught:
        regions.plot(tmp_path / "cat")
    assert isinstance(caught.value, ImportError) and not list(tmp_path.iterdir())
    regions.save(tmp_path / "plain")  # the rest needs no matplotlib
    assert len(list(tmp_path.iterdir())) == 3


@pytest.mark.slow
def test_an_estimate_runs_figures_mark_the_exact_cells(analyzer, regions, tmp_path):
    """--estimate K: every heatmap outlines the top-K cells and dots the random sample (the exact cells), and the
    estimated map gets its own heatmap; the command line writes it beside the others."""
    from matplotlib.patches import Rectangle

    result = analyzer.run(PROMPT, images=[str(DEMO_IMAGE)], unit="region:2", estimate=3, estimate_sample=2,
                          progress=False)
    cells = result.data["estimate"]["exact_cells"]
    figures = result.plot(kinds=["heatmap", "estimate"])
    for kind, grid in (("heatmap", result.metric("logprob_drop")), ("estimate", result.estimate)):
        axes = figures[kind].axes[0]
        assert np.array_equal(np.asarray(axes.images[0].get_array()), grid, equal_nan=True)
        outlined = sorted([round(p.get_y() + 0.5), round(p.get_x() + 0.5)] for p in axes.patches
                          if isinstance(p, Rectangle))
        assert outlined == sorted(cells["top"]) and len(outlined) == 3
        dotted = sorted([round(y), round(x)] for x, y in axes.collections[0].get_offsets())
        assert dotted == sorted(cells["sample"]) and len(dotted) == 2
        title = " ".join(axes.get_title(loc="left").split())
        assert "computed exactly: the top 3 by |estimate| (outlined) and a random sample of 2 (dot)" in title
    assert figures["estimate"].axes[1].get_ylabel() == "estimated log-prob drop (nats)"
    plain = regions.plot(kinds="heatmap")["heatmap"].axes[0]  # no estimate: no marks
    assert len(plain.patches) == 0 and len(plain.collections) == 0 and "\n" not in plain.get_title(loc="left")
    assert main(["--demo", "--unit", "region:2", "--estimate", "2", "--output", "est", "--figures", "png",
                 "--output-dir", str(tmp_path), "--no-progress"], True) == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".png") == [
        "est.estimate.png", "est.heatmap.png", "est.overlay.png"]
    assert _pixels(tmp_path / "est.estimate.png").std() > 20


@pytest.fixture(scope="module")
def llava_runs(tmp_path_factory):
    from tests.conftest import tiny_llava_runs

    folder = tiny_llava_runs(tmp_path_factory.mktemp("llava_figures"), "0")
    return {name: KnockoutResult.load(folder / f"{name}.json") for name in ("llava", "llava_next")}


def test_overlay_gives_each_view_its_row_and_greys_the_cropped_strips(llava_runs):
    from matplotlib.patches import Rectangle

    nexts = llava_runs["llava_next"]
    figure = nexts.plot(kinds="overlay")["overlay"]
    panels = [ax for ax in figure.axes[:-1] if ax.get_ylabel()]  # the last: the colour bar
    assert [ax.get_ylabel() for ax in panels] == ["image 1 base\n(100×150 px)", "image 1 tiles\n(100×150 px)"]
    tokens = nexts.data["tokens"]
    for ax, view in zip(panels, ("base", "tiles")):  # each row: its view's boxes only, every one of them
        drawn = sorted(tuple(path.vertices[0]) for path in ax.collections[0].get_paths())
        expected = sorted((b[0], b[1]) for b in (u["box"] for u in nexts.units if u["box"]
                                                  and tokens[u["keys"][0]]["part"] == view))
        assert len(drawn) == len(expected) > 0 and np.allclose(drawn, expected)
    llava = llava_runs["llava"]
    info = llava.data["images"][0]
    assert info["crop"] is not None
    ax = llava.plot(kinds="overlay")["overlay"].axes[0]
    strips = sorted((p.get_x(), p.get_y(), p.get_x() + p.get_width(), p.get_y() + p.get_height())
                    for p in ax.patches if isinstance(p, Rectangle) and p.get_label() == "cropped")
    assert strips == [(0, 0, 32, 64), (96, 0, 128, 64)]  # the 32-px strips each side of the centre 64×64
    assert [t.get_text() for t in ax.texts] == ["cropped: no tokens"] * 2
    assert all(32 <= u["box"][0] and u["box"][2] <= 96 for u in llava.units if u["box"])  # tokens: the centre


def test_overlay_of_strip_pictures_in_one_prompt_stays_a_readable_size(tmp_path):
    """LLaVA-OneVision with a 1000×30 and a 30×1000 picture in one prompt: each row is as tall as its picture at the
    panel's width only within bounds, so the figure is not metres tall (it was 2100×64140 pixels for four such
    pictures) and a strip's row still holds its two-line label; every picture is drawn whole, at its aspect."""
    from mask_impact.figures import DPI
    from mask_impact.tiny import build_tiny
    from tests.conftest import draw_image

    checkpoint = build_tiny(tmp_path / "model", "llava_onevision")
    sizes = ((1000, 30), (30, 1000))
    pictures = [str(draw_image(tmp_path / f"{n}.png", w, h, seed=n)) for n, (w, h) in enumerate(sizes)]
    assert main(["--model", str(checkpoint), *[a for p in pictures for a in ("--image", p)], "--prompt", "Which?",
                 "--device", "cpu", "--dtype", "float32", "--num-tokens", "1", "--layers", "0", "--unit", "image",
                 "--mask-mode", "vision", "--no-progress", "--generate-top", "0", "--output-dir", str(tmp_path),
                 "--output", "strips", "--figures", "png"], True) == 0
    width, height = Image.open(tmp_path / "strips.overlay.png").size
    assert height <= (0.7 + 2.4 * (0.45 + 3.0)) * DPI + 1 and width < 2000
    figure = KnockoutResult.load(tmp_path / "strips.json").plot(kinds="overlay")["overlay"]
    panels = [ax for ax in figure.axes[:-1] if ax.get_ylabel()]
    assert [ax.get_ylabel() for ax in panels] == ["image 1\n(1000×30 px)", "image 2\n(30×1000 px)"]
    for ax, (w, h) in zip(panels, sizes):
        assert ax.get_xlim() == (0, w) and ax.get_ylim() == (h, 0)
        assert ax.get_aspect() == 1.0  # imshow keeps the picture's aspect
    # each panel sits in the middle of its cell (the colour bar used to anchor them at the cells' right edges)
    figure.savefig(io.BytesIO(), format="png")
    for ax in panels:
        cell, drawn = ax.get_position(original=True), ax.get_position()
        assert abs((drawn.x0 + drawn.x1) / 2 - (cell.x0 + cell.x1) / 2) < 1e-6
        assert abs((drawn.y0 + drawn.y1) / 2 - (cell.y0 + cell.y1) / 2) < 1e-6
    assert panels[1].get_position().width < 0.5 * panels[1].get_position(original=True).width  # the tall one: narrower
