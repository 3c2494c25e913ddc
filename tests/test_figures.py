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
from tests.support import cli_error

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
    for u, unit in enumerate(regions.units):  # each block: its value's colour over the picture, 60% at the limit
        x0, _, _, y1 = unit["box"]
        x, y = x0 + 4, y1 - 4  # a corner of the block, away from the shape and the box edges
        alpha = 0.6 * min(1.0, abs(drops[u]) / boxes.norm.vmax)  # transparent where nothing changes
        expected = alpha * 255 * np.array(boxes.cmap(boxes.norm(drops[u]))[:3]) + (1 - alpha) * picture[int(y), int(x)]
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
    changes = result.metric("prob_change_pct")  # a flow figure's default, as the viewer's flow chart
    for u, line in enumerate(axes.get_lines()[:2]):
        assert np.array_equal(line.get_xdata(), [0, 1, 2]) and np.array_equal(line.get_ydata(), changes[:, u])
    drops = result.plot(metric="logprob_drop")["flows"].axes[0].get_lines()
    assert np.array_equal(drops[0].get_ydata(), result.metric("logprob_drop")[:, 0])
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
    (lambda r: r.plot(windows=[]), "windows=\\[\\] chooses no window"),
    (lambda r: r.plot(windows=[99], kinds="heatmap"), "windows=99 is out of range: this result has 3 windows"),
    (lambda r: r.plot(windows=(), kinds="heatmap"), "windows=\\(\\) chooses no window"),
])
def test_bad_plot_arguments(regions, call, message):
    with pytest.raises(InvalidArgument, match=message):
        call(regions)


def test_bad_windows_are_refused_whatever_the_unit_kind(analyzer, tmp_path):
    tokens = analyzer.run(PROMPT, unit="token", layers="0-1", progress=False)  # text only: no overlay is drawn
    for windows, message in (([], r"windows=\[\] chooses no window"), ([99], "windows=99 is out of range")):
        with pytest.raises(InvalidArgument, match=message):
            tokens.plot(windows=windows)
        with pytest.raises(InvalidArgument, match=message):
            tokens.plot(tmp_path / "tok", windows=windows)
    assert not list(tmp_path.iterdir())  # nothing written


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
    assert "--figures 'gif': not one of: png, svg, pdf" in cli_error(capsys, ["--demo", "--figures", "gif", *out])
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
    assert len(plain.patches) == 0 and len(plain.collections) == 0 and "computed exactly" not in plain.get_title(loc="left")
    assert main(["--demo", "--unit", "region:2", "--estimate", "2", "--output", "est", "--figures", "png",
                 "--output-dir", str(tmp_path), "--no-progress"], True) == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".png") == [
        "est.estimate.png", "est.heatmap.png", "est.overlay.png"]
    assert _pixels(tmp_path / "est.estimate.png").std() > 20


@pytest.fixture(scope="module")
def llava_runs(tmp_path_factory):
    from tests.support import tiny_llava_runs

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
    from tests.tiny import build_tiny
    from tests.support import draw_image

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


def test_the_colour_limits_are_stored_with_the_result_and_drawn_by_the_figures(regions):
    """colour_scale: one map and each metric's limit by one rule (colours.py), the figures' norm; a result without
    it (written before) gets the same limits by the same rule; the rule is the viewer's: the sorted sizes' entry at
    ⌊0.99·n⌋ over non-special units."""
    from mask_impact import colours
    from mask_impact.figures import colour_scale, values

    block = regions.data["colour_scale"]
    assert block["colours"] == colours.COLOUR_MAP and block["modality_colours"] == colours.MODALITY_COLOURS
    for metric, stored in block["limits"].items():
        _, norm, _ = colour_scale(regions.data, metric, values(regions.data, metric))
        assert norm.vmax == stored > 0, metric
        older = {k: v for k, v in regions.data.items() if k != "colour_scale"}
        assert colours.limit(older, metric) == stored
    drops = regions.metric("logprob_drop")
    kept = sorted(abs(v) for u, unit in enumerate(regions.units) if unit["modality"] != "special"
                  for v in drops[:, u])
    assert block["limits"]["logprob_drop"] == kept[min(len(kept) - 1, int(0.99 * len(kept)))]


def test_overlays_draw_the_picture_at_full_resolution_the_thumbnail_only_as_a_fallback(analyzer, tmp_path):
    """A 1024×768 picture with fine text-like stripes: the result embeds it at 1024 px (``picture``) beside the 256-px
    thumbnail; the figure draws the file itself while it is readable, the embedded picture when it is gone, and
    the thumbnail only where neither is there; ``greyscale`` draws the picture grey."""
    from PIL import ImageDraw

    from mask_impact.figures import picture

    image = Image.new("RGB", (1024, 768), (250, 250, 250))
    draw = ImageDraw.Draw(image)
    for x in range(0, 1024, 4):  # 2-px stripes: lost in a 256-px thumbnail
        draw.rectangle([x, 0, x + 1, 767], fill=(20, 20, 20))
    path = tmp_path / "stripes.png"
    image.save(path)
    result = analyzer.run(PROMPT, images=[str(path)], unit="region:2", layers="0", progress=False)
    info = result.data["images"][0]
    embedded = Image.open(io.BytesIO(__import__("base64").b64decode(info["picture"].split(",", 1)[1])))
    assert embedded.size == (1024, 768) and info["thumbnail"].startswith("data:image/png")
    assert picture(info).shape == (768, 1024, 3)
    moved = dict(info, path=str(tmp_path / "gone.png"))
    assert picture(moved).shape == (768, 1024, 3)  # the embedded picture, not the thumbnail
    assert picture({k: v for k, v in moved.items() if k != "picture"}).shape == (192, 256, 3)
    figure = result.plot(kinds="overlay")["overlay"]
    drawn = figure.axes[0].images[0].get_array()
    assert drawn.shape[:2] == (768, 1024)
    grey = result.plot(kinds="overlay", greyscale=True)["overlay"].axes[0].images[0].get_array()
    assert np.all(grey[..., 0] == grey[..., 1])


def _big(tmp_path, columns: int):
    """benchmarks/bench_viewer.py's synthetic result: 36 windows × ``columns`` token units, most on a 1024-px image."""
    from benchmarks.bench_viewer import with_image, with_steps
    from tests.test_viewer import _synthetic

    vision = range(30, columns - 30)
    path = _synthetic(tmp_path / f"big{columns}.json", columns, vision)
    with_steps(path)
    with_image(path, vision)
    data = json.loads(path.read_text())
    data["meta"]["model"] = "/home/someone/models/Qwen3-VL-2B-Instruct"
    data["prompt"] = "What is written on the sign?"
    path.write_text(json.dumps(data))
    return KnockoutResult.load(path)


def test_figures_are_paper_ready_at_real_size(tmp_path):
    """36 × 784 units: the title names the stage, metric, model (not its local path), prompt and answer; the heatmap
    is at most 3:1 and a few inches, its x axis has at most 60 labels and a modality band in the viewer's colours;
    4,156 units are max-pooled (a one-cell peak kept); both figures draw and encode in a few seconds."""
    import time

    from mask_impact import colours

    result = _big(tmp_path, 784)
    started = time.perf_counter()
    written = result.plot(tmp_path / "big", kinds=["heatmap", "overlay"])
    seconds = time.perf_counter() - started
    (tmp_path / "seconds.txt").write_text(f"{seconds:.2f}\n")
    assert seconds < 20, seconds  # was 24 s; a few seconds on an idle machine
    size = Image.open(written["heatmap"]).size
    assert size[0] / size[1] <= 3 and size[0] <= 2600, size
    figure = result.plot(kinds="heatmap")["heatmap"]
    axes = figure.axes[0]
    title = axes.get_title(loc="left")
    assert "/home/someone" not in title and "Qwen3-VL-2B-Instruct" in title
    assert "attention knockout in the decoder" in title and "log-prob drop" in title and "What is written" in title
    ticks = axes.get_xticklabels()
    assert 10 <= len(ticks) <= 60 and all(t.get_text() for t in ticks)
    band = axes.images[1]
    codes = np.asarray(band.get_array())[0]
    vision = [u for u, unit in enumerate(result.units) if unit["modality"] == "vision"]
    assert codes[vision[0]] == 1 and codes[0] == 0
    assert matplotlib_hex(band.cmap(band.norm(1))) == colours.MODALITY_COLOURS["vision"]
    big = _big(tmp_path, 4156)
    data = big.data
    data["metrics"]["logprob_drop"][7][3001] = 50.0  # one decisive cell among many per column
    pooled = big.plot(kinds="heatmap")["heatmap"].axes[0]
    drawn = np.asarray(pooled.images[0].get_array())
    assert drawn.shape == (36, 1600) and np.nanmax(drawn[7]) == 50.0
    assert len(pooled.get_xticklabels()) <= 60 and "max-pooled into 1,600 columns" in pooled.get_xlabel()


def matplotlib_hex(rgba) -> str:
    from matplotlib.colors import to_hex

    return to_hex(rgba)


def test_plot_options_for_a_paper_and_the_token_text_figure(regions):
    figure = regions.plot(kinds="heatmap", units=(1, 2), windows=[0, 2], vmax=0.5, title="Figure 3", size=(5, 3),
                          font_size=11)["heatmap"]
    axes = figure.axes[0]
    assert np.array_equal(np.asarray(axes.images[0].get_array()), regions.metric()[[0, 2]][:, 1:3])
    assert axes.images[0].norm.vmax == 0.5 and axes.get_title(loc="left") == "Figure 3"
    assert tuple(figure.get_size_inches()) == (5, 3) and axes.get_yticklabels()[0].get_fontsize() == 11
    for bad, message in (({"vmax": -1}, "vmax=-1 must be a positive number"),
                         ({"units": (3, 99)}, r"units=\(3, 99\) is not a range"),
                         ({"size": (0, 3)}, "size=")):
        with pytest.raises(InvalidArgument, match=message):
            regions.plot(kinds="heatmap", **bad)
    tokens = regions.plot(kinds="tokens")["tokens"]
    texts = {t.get_text(): t for t in tokens.texts}
    assert " image 1 · 4 tokens " not in texts  # region units: no one unit holds all of the image's tokens
    prompt_words = [t["text"] for t in regions.data["tokens"] if t["modality"] == "text" and t["text"].strip()]
    assert any(word.strip() in texts or word in texts for word in prompt_words)
    assert any(text.startswith("answer steps under the largest knockout") for text in texts)
    answer = regions.data["baseline"]["tokens"]
    assert all(token in texts for token in answer if token.strip())


def test_command_line_figure_options(tmp_path, capsys):
    out = ["--output-dir", str(tmp_path), "--no-progress", "--layers", "0-1"]
    assert main(["--demo", "--output", "opt", "--figures", "svg", "--figure-option", "vmax=0.25",
                 "--figure-option", "title=Figure 2", "--figure-option", "size=5x3", "--figure-option", "units=0-3",
                 *out], True) == 0
    svg = (tmp_path / "opt.heatmap.svg").read_text()
    assert "Figure 2" in svg and 'width="360pt"' in svg and "0.2" in svg  # 5 in wide, the bar to ±0.25
    assert "--figure-option 'loud=1' is not KEY=VALUE" in cli_error(
        capsys, ["--demo", "--figures", "png", "--figure-option", "loud=1", *out])
    assert "vmax takes a positive number" in cli_error(
        capsys, ["--demo", "--figures", "png", "--figure-option", "vmax=-2", *out])


def test_flow_curves_default_to_prob_change_pct_as_the_viewers_flow_chart(analyzer):
    """One default for flows, the viewer's and the papers': the change in the answer's probability (before: the
    figures drew logprob_drop, the viewer prob_change_pct); a metric asked for is still drawn."""
    from mask_impact import figures

    result = analyzer.run(PROMPT, images=[str(DEMO_IMAGE)], flows=["image->last", "question->last"], progress=False)
    drawn = figures.draw(result.data)  # as --figures draws them: no metric given
    axes = drawn["flows"].axes[0]
    assert axes.get_ylabel() == "change of p(first answer token) (%)"
    for u, line in enumerate(axes.get_lines()[:2]):
        assert np.array_equal(line.get_ydata(), result.metric("prob_change_pct")[:, u])
    assert drawn["heatmap"].axes[1].get_ylabel() == "log-prob drop of the answer (nats)"  # the heatmap keeps its own
    assert figures.draw(result.data, "logprob_drop", kinds=["flows"])["flows"].axes[0].get_ylabel().startswith("log-prob")


def test_36_windows_label_every_row_and_the_colour_bar_has_intermediate_ticks(regions):
    data = json.loads(json.dumps(regions.data))
    grid = data["metrics"]["logprob_drop"]
    data["windows"] = [[w, w] for w in range(36)]
    data["window_labels"] = [f"layer {w}" for w in range(36)]
    for name in data["metrics"]:
        data["metrics"][name] = [data["metrics"][name][w % len(grid)] for w in range(36)]
    data.pop("steps", None)
    data.pop("colour_scale", None)
    from mask_impact import figures

    figure = figures.draw(data, kinds=["heatmap"], font_size=10)["heatmap"]
    axes, bar = figure.axes[0], figure.axes[1]
    assert [t.get_text() for t in axes.get_yticklabels()] == data["window_labels"]  # before: every other row
    assert len([t for t in bar.get_yticks() if bar.get_ylim()[0] <= t <= bar.get_ylim()[1]]) >= 5


def test_overlay_contours_over_a_grey_picture(regions):
    """figures.overlay(contours=True): no tint, contour lines where the effect crosses 25/50/75% of the limit; the
    picture in grey elsewhere (the viewer's "effects as contours")."""
    from matplotlib.collections import PatchCollection

    from mask_impact import figures

    figure = figures.draw(regions.data, kinds=["overlay"], greyscale=True, contours=True)["overlay"]
    panels = [ax for ax in figure.axes if ax.get_title()]
    assert not any(isinstance(c, PatchCollection) for ax in panels for c in ax.collections)  # no tint
    layer2 = panels[2]
    lines = [c for c in layer2.collections if hasattr(c, "levels")]
    assert lines and len(lines[0].levels) >= 1
    limit = figures.colours.limit_of(regions.data, "logprob_drop")
    assert all(abs(abs(level) / limit - f) < 1e-9 for level, f in zip(lines[0].levels, (0.25, 0.5, 0.75)))
    pixels = _canvas(figure)
    height = pixels.shape[0]
    cx, cy = layer2.transData.transform((110, 20))  # inside the top block, away from its edges: grey
    r, g, b = pixels[int(round(height - cy)), int(round(cx))]
    assert abs(r - g) <= 2 and abs(g - b) <= 2
    tinted = figures.draw(regions.data, kinds=["overlay"], greyscale=True)["overlay"]
    r, g, b = _canvas(tinted)[int(round(height - cy)), int(round(cx))]
    assert r - b > 30  # the tint (the default) colours it


def test_token_text_breaks_lines_between_words_never_inside_one():
    from mask_impact.figures import _token_rows

    chips = [(text, None, text.startswith(" ")) for text in ["Un", "believ", "ably", " long", " sentence"] * 12]
    lines = _token_rows(chips, 3.0, 0.1, 0.05)
    assert len(lines) > 3
    for line in lines:  # before: a line could begin with "believ" or "ably"
        assert line[0][0] in ("Un", " long", " sentence"), line
