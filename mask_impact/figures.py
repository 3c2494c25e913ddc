"""Figures of a result without a browser (``--figures png|svg|pdf``, ``KnockoutResult.plot``).

Drawn from the result JSON alone (DESIGN.md §5), so a saved result can be drawn again later:

- ``heatmap``: window × unit, one cell per knockout, rows named by ``window_labels`` (decoder or ViT layers,
  the occlusion, the DeepStack routes), columns by the units' labels (every one up to ``ALL_LABELS`` columns,
  every k-th up to ``SOME_LABELS``, none beyond), label colour by modality, and a colour bar;
- ``overlay``: each unit's box (original-image pixels) tinted by its value over the picture (the result's
  thumbnail), small multiples: one row per image (per view of it where the model sees it in several: LLaVA-NeXT's
  base grid and tiles), one column per chosen window; parts of a picture the tower never sees (LLaVA-1.5's centre
  crop) greyed, hatched and labelled;
- ``flows``: one curve per flow over the layer windows (runs with ``--flow``; they get no overlay);
- ``estimate`` (runs with ``--estimate K``): the heatmap of the estimated map (``estimated_logprob_drop``).
  On every heatmap of such a run, the cells computed exactly are marked as in the viewer: a top-K cell outlined,
  a random sample's cell dotted; the others were estimated only (grey on the exact metrics' maps).

The colours are the viewer's: red where the knockout hurts the answer, blue where it helps, a robust scale (the
99th percentile of the non-special units' values; values past it are drawn saturated and the bar says so),
one-sided metrics from "no change" up. matplotlib is optional (``pip install "mask-impact[figures]"``) and
imported only here, only when a figure is asked for; figures are drawn on their own Agg canvas, so the caller's
pyplot state (a notebook's inline backend) is left alone.
"""

from __future__ import annotations

import base64
import io
import math
import re
import textwrap
import warnings

import numpy as np

from . import colours
from .errors import FIGURES_INSTALL, MissingDependency
from .options import FIGURE_FORMATS, FIGURE_OPTIONS, figures_available
from .pictures import upright

FORMATS = FIGURE_FORMATS
KINDS = ("heatmap", "overlay", "flows", "estimate", "tokens")  # tokens: on request (kinds=...), not by default
ESTIMATED = "estimated_logprob_drop"  # the estimate's map (``data["estimate"]["logprob_drop"]``), drawn as a metric
ALL_LABELS = 80  # columns up to which every unit is labelled
SOME_LABELS = 600  # columns up to which every k-th unit is labelled (about 60 labels); beyond: unit indices
MAX_PANELS = 6  # windows shown in the overlay unless chosen
DPI = 200
METRICS = {  # title, harm sign (+1: larger hurts), one-sided
    "logprob_drop": ("log-prob drop of the answer (nats)", 1, False),
    "prob_change_pct": ("change of p(first answer token) (%)", -1, False),
    "kl": ("mean KL divergence (nats)", 1, True),
    "top1_changed": ("top-1 token changed", 1, True),
    "first_divergence": ("first diverging answer step", 1, True),
    ESTIMATED: ("estimated log-prob drop (nats)", 1, False),
}
ROW_TITLES = {"decoder": "decoder layers", "vision-encoder": "ViT layers", "pixels": "occlusion",
              "deepstack": "route removed"}
MODALITY_COLOURS = {"text": "black", **{k: v for k, v in colours.MODALITY_COLOURS.items() if k != "text"}}


available = figures_available


def require() -> None:
    """The API's check: ``MissingDependency`` saying how to install matplotlib."""
    if not available():
        raise MissingDependency(f"figures need matplotlib, which is not installed: {FIGURES_INSTALL}")


def kinds_for(data: dict) -> list[str]:
    """The figures a result gets: always the heatmap; the flow curves for flows, else the overlay where a
    unit has a box on an image; the estimated map's heatmap for an ``--estimate`` run."""
    units = data.get("units") or []
    estimate = ["estimate"] if data.get("estimate") else []
    if any(unit["kind"] == "flow" for unit in units):
        return ["heatmap", "flows", *estimate]
    boxed = data.get("images") and any(unit.get("box") and unit.get("image") is not None for unit in units)
    return ["heatmap", "overlay", *estimate] if boxed else ["heatmap", *estimate]


FLOW_METRIC = "prob_change_pct"  # the flow curves' default (the papers plot flows so), as the viewer's flow chart


def default_metric(data: dict, kind: str) -> str:
    """A figure's metric when none is asked for: ``prob_change_pct`` for the flow curves (where the result has it, as
    the viewer's flow chart), ``logprob_drop`` for every other figure."""
    if kind == "flows" and (data.get("metrics") or {}).get(FLOW_METRIC) is not None:
        return FLOW_METRIC
    return "logprob_drop"


def render(data: dict, fmt: str, metric: str | None = None, windows=None, kinds=None,
           **options) -> dict[str, bytes]:
    """Each figure of ``data`` (``kinds``, default ``kinds_for``) as the bytes of a ``fmt`` file; ``metric`` None:
    each figure's own default (``default_metric``)."""
    return {kind: to_bytes(figure, fmt) for kind, figure in draw(data, metric, windows, kinds, **options).items()}


OPTIONS = FIGURE_OPTIONS  # plot()'s and --figure-option's


def check_options(data: dict, options: dict) -> dict:
    """The figure options, checked (``InvalidArgument``/``InvalidType`` in the caller's words): ``units`` (first,
    last) or indices, ``vmax`` > 0, ``title`` text, ``size`` (width, height) in inches, ``font_size`` > 0 (points),
    ``greyscale``."""
    from .errors import InvalidArgument, InvalidType

    for name in options:
        if name not in OPTIONS:
            raise InvalidType(f"{name!r} is not a figure option; the options: {', '.join(OPTIONS)}")
    checked = dict(options)
    if checked.get("units") is not None:
        chosen_units(data, checked["units"])
    for name in ("vmax", "font_size"):
        value = checked.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0
                                  or not math.isfinite(value)):
            raise InvalidArgument(f"{name}={value!r} must be a positive number")
    size = checked.get("size")
    if size is not None and not (isinstance(size, (tuple, list)) and len(size) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 100 for v in size)):
        raise InvalidArgument(f"size={size!r} must be (width, height) in inches, each above 0 and at most 100")
    if checked.get("title") is not None and not isinstance(checked["title"], str):
        raise InvalidType(f"title must be a str, not {type(checked['title']).__name__}")
    return checked


def draw(data: dict, metric: str | None = None, windows=None, kinds=None, **options) -> dict:
    """The matplotlib ``Figure`` of each kind; ``metric`` None: each figure's default (``default_metric``: the flow
    curves ``prob_change_pct``, the others ``logprob_drop``); ``options`` (``OPTIONS``): ``units`` and ``windows``
    choose the heatmap's columns and rows (the overlay's panels: ``windows``), ``vmax`` the colour limit (default:
    the result's, colours.py), ``title``, ``size`` (inches), ``font_size``, ``greyscale`` (the overlay's picture in
    grey), ``contours`` (the overlay's effects as contour lines, not a tint)."""
    require()
    options = check_options(data, options)
    style = {k: options.get(k) for k in ("vmax", "title", "size", "font_size")}
    drawers = {"heatmap": lambda d, m, w: heatmap(d, m, w, options.get("units"), **style),
               "overlay": lambda d, m, w: overlay(d, m, w, bool(options.get("greyscale")), **style,
                                                  contours=bool(options.get("contours"))),
               "flows": lambda d, m, w: flow_curves(d, m, w, **style),
               "tokens": lambda d, m, w: token_text(d, m, w, **style),
               "estimate": lambda d, m, w: heatmap(d, ESTIMATED, w, options.get("units"), **style)}
    return {kind: drawers[kind](data, metric or default_metric(data, kind), windows)
            for kind in (kinds or kinds_for(data))}


def to_bytes(figure, fmt: str) -> bytes:
    """The figure as a file; in SVG and PDF the text stays text (searchable, editable in a drawing program)."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)  # the figure's own canvas: pyplot's backend is not touched
    buffer = io.BytesIO()
    with warnings.catch_warnings(), matplotlib.rc_context({"svg.fonttype": "none", "pdf.fonttype": 42}):
        warnings.filterwarnings("ignore", message=r"Glyph .* missing from")  # drawn as a box, said once here
        figure.savefig(buffer, format=fmt, dpi=DPI, metadata=_metadata(fmt))
    return buffer.getvalue()


def _metadata(fmt: str) -> dict:
    # no creation date: the same result gives the same file
    return {"svg": {"Date": None}, "pdf": {"CreationDate": None}, "png": {}}[fmt]


# ----------------------------------------------------------------------------------------------------- data


def values(data: dict, metric: str) -> np.ndarray:
    """(windows, units) array of ``metric``, NaN where a value is missing."""
    grid = data["estimate"]["logprob_drop"] if metric == ESTIMATED else data["metrics"][metric]
    return np.array([[np.nan if v is None else float(v) for v in row] for row in grid], dtype=float).reshape(
        len(data["windows"]), -1)


def units_of(data: dict) -> list[dict]:
    if "units" in data:
        return data["units"]
    tokens = data["tokens"]  # schema 1: one token unit per swept position
    return [{"kind": "token", "label": tokens[p]["text"], "modality": tokens[p]["modality"],
             "image": tokens[p]["image"], "box": tokens[p]["box"]} for p in data["positions"]]


def window_labels(data: dict) -> list[str]:
    return data.get("window_labels") or [f"layers {a}–{b}" for a, b in data["windows"]]


def colour_map(data: dict, harm: int = 1, one_sided: bool = False):
    """The result's colour map (``colour_scale.colours``, else colours.COLOUR_MAP) as matplotlib's: red where a
    knockout hurts the answer (``harm`` -1: where the value falls); one-sided metrics: its upper half."""
    from matplotlib.colors import LinearSegmentedColormap

    stored = (data.get("colour_scale") or {}).get("colours")
    listed = stored if isinstance(stored, list) and len(stored) >= 3 else colours.COLOUR_MAP
    listed = listed[len(listed) // 2:] if one_sided else listed if harm > 0 else listed[::-1]
    return LinearSegmentedColormap.from_list("mask_impact", listed, N=256)


def colour_scale(data: dict, metric: str, grid: np.ndarray, vmax: float | None = None):
    """(colormap, norm, extend): the viewer's scale (colours.py: the stored limit, else the same rule), red where
    a knockout hurts the answer; ``extend`` says which ends of the colour bar values run past."""
    from matplotlib.colors import Normalize

    _, harm, one_sided = METRICS.get(metric, (metric, 1, False))
    limit = float(vmax) if vmax is not None else colours.limit_of(data, metric)
    cmap = colour_map(data, harm, one_sided)
    norm = Normalize(0.0, limit) if one_sided else Normalize(-limit, limit)
    present = grid[np.isfinite(grid)]
    above = present.size and present.max() > norm.vmax * (1 + 1e-9)
    below = present.size and present.min() < norm.vmin * (1 + 1e-9) and norm.vmin < 0
    extend = {(True, True): "both", (True, False): "max", (False, True): "min"}.get((bool(above), bool(below)),
                                                                                    "neither")
    return cmap.with_extremes(bad="#d9d9d9"), norm, extend


def chosen_windows(data: dict, windows) -> list[int]:
    """Row indices: ``windows`` given as indices or labels, else up to ``MAX_PANELS`` evenly spaced ones."""
    labels = window_labels(data)
    if windows is None:
        count = len(labels)
        return sorted({round(x) for x in np.linspace(0, count - 1, min(count, MAX_PANELS))})
    from .errors import InvalidArgument, InvalidType

    asked = [windows] if isinstance(windows, (int, np.integer, str)) else list(windows)
    if not asked:
        raise InvalidArgument(f"windows={windows!r} chooses no window; give window indices or labels, or leave it "
                              f"out for up to {MAX_PANELS} evenly spaced ones")
    chosen = []
    for window in asked:
        if isinstance(window, str):
            if window not in labels:
                raise InvalidArgument(f"windows={window!r} is not a window of this result; windows: "
                                      f"{', '.join(labels)}")
            chosen.append(labels.index(window))
        elif isinstance(window, (int, np.integer)) and not isinstance(window, bool):
            if not -len(labels) <= window < len(labels):
                raise InvalidArgument(f"windows={window} is out of range: this result has {len(labels)} windows")
            chosen.append(int(window) % len(labels))
        else:
            raise InvalidType(f"windows must hold window indices or labels, not {type(window).__name__}")
    return chosen


def tick_label(text: str, width: int = 18, middle: bool = False) -> str:
    """A unit's label as plain text for matplotlib: whitespace shown, ``$`` not read as maths, cut to ``width`` (at
    its end, or with ``middle`` in its middle, so labels that share a start stay told apart)."""
    shown = text.strip() or repr(text)
    shown = shown.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    shown = re.sub(r"[\x00-\x1f\x7f]", "?", shown)
    if len(shown) > width:
        head = (width - 1 + 1) // 2 if middle else width - 1
        shown = shown[:head] + "…" + (shown[len(shown) - (width - 1 - head):] if middle else "")
    return shown.replace("$", r"\$")


def _title(data: dict, metric: str | None = None) -> str:
    """What a figure shows, for a paper: the stage, the metric and the model (its name, not a local path), then the
    prompt and the answer."""
    stage = {"decoder": "attention knockout in the decoder", "vision-encoder": "attention knockout in the vision encoder",
             "pixels": "occlusion", "deepstack": "DeepStack routes"}.get(data.get("stage", "decoder"), "knockout")
    model = str((data.get("meta") or {}).get("model") or "").rstrip("/\\")
    model = re.split(r"[/\\]", model)[-1] if model else "?"
    first = " · ".join(part for part in (stage, METRICS.get(metric, (metric,))[0] if metric else "", model) if part)
    prompt, answer = " ".join(str(data.get("prompt") or "").split()), data["baseline"]["text"]
    prompt = prompt if len(prompt) <= 70 else prompt[:69] + "…"
    answer = answer if len(answer) <= 40 else answer[:39] + "…"
    return f"{tick_label(first, 120)}\nprompt {tick_label(repr(prompt), 74)}  →  answer {tick_label(repr(answer), 44)}"


MAX_COLUMNS = 1600  # a heatmap with more units pools them (max |value|: no peak lost), as the viewer's "fit" does
MAX_TICKS = 60  # unit labels at most, every k-th, at any width


def chosen_units(data: dict, units) -> list[int]:
    """Column indices: ``units`` as (first, last) inclusive, a range or a list of indices; None: every unit."""
    from .errors import InvalidArgument, InvalidType

    count = len(units_of(data))
    if units is None:
        return list(range(count))
    if isinstance(units, tuple) and len(units) == 2 and all(isinstance(u, (int, np.integer)) for u in units):
        first, last = int(units[0]), int(units[1])
        if not 0 <= first <= last < count:
            raise InvalidArgument(f"units={units!r} is not a range of this result's units 0…{count - 1}")
        return list(range(first, last + 1))
    if not isinstance(units, (list, range, np.ndarray)):
        raise InvalidType(f"units must be (first, last), a range or a list of unit indices, not {type(units).__name__}")
    chosen = [int(u) for u in units]
    if not chosen or any(not 0 <= u < count for u in chosen):
        raise InvalidArgument(f"units={list(units)!r} chooses no unit, or one this result lacks (it has {count})")
    return chosen


def _pooled(grid: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """``grid``'s columns pooled into ``bins`` (the value of largest size in each, its sign kept) and each bin's
    first column."""
    starts = np.floor(np.arange(bins) * grid.shape[1] / bins).astype(int)
    out = np.full((grid.shape[0], bins), np.nan)
    for b, start in enumerate(starts):
        block = grid[:, start: starts[b + 1] if b + 1 < bins else grid.shape[1]]
        sizes = np.where(np.isfinite(block), np.abs(block), -1.0)
        pick = sizes.argmax(axis=1)
        out[:, b] = np.where(sizes.max(axis=1) >= 0, block[np.arange(block.shape[0]), pick], np.nan)
    return out, starts


# ------------------------------------------------------------------------------------------------- figures


def heatmap(data: dict, metric: str, windows=None, units=None, vmax=None, title=None, size=None, font_size=None):
    """Window × unit, labelled (every unit up to ``ALL_LABELS`` columns, else every k-th, at most ``MAX_TICKS``, at
    any count, coloured by modality), a modality band under the cells, and a colour bar. ``windows`` and ``units``
    choose rows and columns; more than ``MAX_COLUMNS`` columns are max-pooled."""
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    everything = values(data, metric)
    all_units = units_of(data)
    rows_shown = list(range(everything.shape[0])) if windows is None else chosen_windows(data, windows)
    columns = chosen_units(data, units)
    grid = everything[np.ix_(rows_shown, columns)]
    shown_units = [all_units[u] for u in columns]
    rows, count = grid.shape
    labels = [window_labels(data)[w] for w in rows_shown]
    cmap, norm, extend = colour_scale(data, metric, everything, vmax)
    starts = np.arange(count)
    if count > MAX_COLUMNS:
        grid, starts = _pooled(grid, MAX_COLUMNS)
    base = font_size or 8.0
    step = 1 if count <= ALL_LABELS else math.ceil(count / MAX_TICKS)
    ticks = list(range(0, count, step))
    longest = max((len(tick_label(shown_units[u]["label"], 24)) for u in ticks), default=4)
    width = min(12.0, max(6.0, 2.8 + 0.17 * min(count, 56)))
    height = min(7.5, max(2.8, 1.5 + 0.16 * rows + 0.065 * longest * base / 8))
    width, height = size if size is not None else (width, height)
    figure = Figure(figsize=(width, height), layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(grid, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest",
                        extent=(-0.5, grid.shape[1] - 0.5, rows - 0.5, -0.5))
    band_h = max(0.35, 0.025 * rows)  # the modality band, as the viewer's: under the cells, a gap between
    codes = {"text": 0, "vision": 1, "special": 2, "mixed": 3}
    band = np.array([[codes.get(all_units[columns[int(start)]]["modality"], 0) for start in starts]], dtype=float)
    palette = ListedColormap([colours.MODALITY_COLOURS[name] for name in codes])
    axes.imshow(band, aspect="auto", cmap=palette, vmin=-0.5, vmax=3.5, interpolation="nearest",
                extent=(-0.5, grid.shape[1] - 0.5, rows - 0.5 + 0.25 + band_h, rows - 0.5 + 0.25))
    axes.set_ylim(rows - 0.5 + 0.25 + band_h, -0.5)
    room = height * 72 * 0.82  # points for the rows (the title, the unit labels and the band take the rest)
    row_step = 1 if rows * base * 1.15 <= room else math.ceil(rows * base * 1.15 / room)
    axes.set_yticks(range(0, rows, row_step), [tick_label(labels[w], 28) for w in range(0, rows, row_step)],
                    fontsize=base)
    scale_x = grid.shape[1] / count  # pooled: a unit's place among the pooled columns
    tick_size = base if count <= 40 else base * 0.85
    axes.set_xticks([u * scale_x + (scale_x - 1) / 2 for u in ticks],
                    [tick_label(shown_units[u]["label"], 24, middle=True) for u in ticks], rotation=90,
                    fontsize=tick_size)
    for tick, u in zip(axes.get_xticklabels(), ticks):
        tick.set_color(MODALITY_COLOURS.get(shown_units[u]["modality"], "black"))
    kinds = sorted({unit["kind"] for unit in shown_units})
    notes = [f"every {step}th of {count:,} labelled" if step > 1 else "",
             f"max-pooled into {grid.shape[1]:,} columns" if grid.shape[1] < count else "",
             f"units {columns[0]}–{columns[-1]}" if units is not None else ""]
    axes.set_xlabel(f"unit ({', '.join(kinds)})" + "".join(f", {note}" for note in notes if note)
                    + "; band: modality (text, vision, special, mixed)" * (count > ALL_LABELS), fontsize=base)
    axes.set_ylabel(ROW_TITLES.get(data.get("stage", "decoder"), "window"), fontsize=base)
    exact = _mark_exact_cells(axes, data, metric) if count <= MAX_COLUMNS and windows is None and units is None else ""
    axes.set_title((title if title is not None else _title(data, metric)) + exact, fontsize=base + 1, loc="left")
    axes.tick_params(length=2)
    bar = figure.colorbar(image, ax=axes, extend=extend, fraction=0.04, pad=0.01)
    bar.set_label(METRICS.get(metric, (metric,))[0], fontsize=base)
    bar.ax.tick_params(labelsize=base * 0.9)
    bar.ax.yaxis.set_major_locator(__import__("matplotlib.ticker", fromlist=["MaxNLocator"]).MaxNLocator(7))
    return figure


def _mark_exact_cells(axes, data: dict, metric: str) -> str:
    """An ``--estimate`` run: its exact cells marked on the heatmap (top-K outlined, the random sample dotted, as
    in the viewer); returns the title's line that says so ("" for other runs)."""
    block = data.get("estimate")
    if not block:
        return ""
    from matplotlib.patches import Rectangle

    cells = block.get("exact_cells") or {}
    top, sample = cells.get("top") or [], cells.get("sample") or []
    for w, u in top:
        axes.add_patch(Rectangle((u - 0.5, w - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=1.2))
    if sample:
        axes.scatter([u for _, u in sample], [w for w, _ in sample], s=12, c="black", marker="o", edgecolors="white",
                     linewidths=0.6)  # seen on dark cells too
    rest = "the others estimated only" + (" (first order)" if metric == ESTIMATED else " (grey)")
    line = (f"--estimate {block.get('requested_top_k') or block.get('top_k')}: computed exactly: the top {len(top)} "
            f"by |estimate| (outlined) and a random sample of {len(sample)} (dot); {rest}")
    return "\n" + textwrap.fill(line, int(axes.figure.get_figwidth() * 12))


FIGURE_SIDE = 2048  # the longest side of a picture read from its file for a figure (more adds no detail at 200 dpi)


def picture(info: dict) -> np.ndarray | None:
    """The picture at the best resolution there is: its file where readable (downscaled to ``FIGURE_SIDE``), else the
    result's embedded ``picture`` (up to 1024 px), else its 256-px ``thumbnail`` (the fallback); None if none reads."""
    from PIL import Image

    try:
        with Image.open(info["path"]) as image:
            image = upright(image).convert("RGB")  # the frame the boxes are in
            image.thumbnail((FIGURE_SIDE, FIGURE_SIDE))
            if image.size == (info["width"], info["height"]) or max(image.size) == FIGURE_SIDE:
                return np.asarray(image)  # the file still holds the picture measured (not another of that name)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    for key in ("picture", "thumbnail"):
        url = str(info.get(key) or "")
        if url.startswith("data:image/") and ";base64," in url:
            try:
                raw = base64.b64decode(url.split(",", 1)[1])
                return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
            except (OSError, ValueError):
                continue
    return None


ROW_ASPECT = (0.45, 3.0)  # the overlay's row height over the panel's width: at least (two lines of label), at most


def overlay(data: dict, metric: str, windows=None, greyscale: bool = False, vmax=None, title=None, size=None,
            font_size=None, contours: bool = False):
    """Each unit's box tinted by its value over its image (the picture at its best resolution, in grey with
    ``greyscale``): as the viewer tints it, the more the larger the effect (60% at the colour limit, transparent where
    there is none, so the picture's own colours never read as an effect); with ``contours``, no tint: contour lines
    where the effect crosses 25%, 50% and 75% of the colour limit (the viewer's "effects as contours"), the picture
    left as it is between them; one row per image (per view of it), one column per chosen window."""
    from matplotlib.collections import PatchCollection
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    grid = values(data, metric)
    units = units_of(data)
    cmap, norm, extend = colour_scale(data, metric, grid, vmax)
    columns = chosen_windows(data, windows)
    base = font_size or 8.0
    labels = window_labels(data)
    images = sorted({unit["image"] for unit in units if unit.get("box") and unit.get("image") is not None})
    rows = [(i, view) for i in images for view in image_views(data, i)]
    # each row as tall as its picture at the panel's width, within bounds: a strip of a picture (1000×30, 30×1000,
    # common among several images in one prompt) neither squeezes its row below its label nor stretches the figure
    # to metres (the picture keeps its aspect inside the panel)
    ratios = [min(max(data["images"][i]["height"] / data["images"][i]["width"], ROW_ASPECT[0]), ROW_ASPECT[1])
              for i, _ in rows]
    panel = 2.4
    figure_width = max(4.2, 0.9 + panel * len(columns))  # one column still leaves room for labels and the bar
    height = max(3.0, 0.7 + panel * sum(ratios))  # the colour bar's label fits beside a wide picture
    figure_width, height = size if size is not None else (figure_width, height)
    figure = Figure(figsize=(figure_width, height), layout="constrained")
    axes = np.atleast_2d(figure.subplots(len(rows), len(columns), squeeze=False,
                                         gridspec_kw={"height_ratios": ratios}))
    for r, (i, view) in enumerate(rows):
        info = data["images"][i]
        width, height = info["width"], info["height"]
        mine = [u for u, unit in enumerate(units) if unit.get("image") == i and unit.get("box")
                and (view is None or unit_view(data, unit, i) in (view, None))]
        mine.sort(key=lambda u: -_area(units[u]["box"]))  # large boxes first, so smaller ones stay visible
        pixels = picture(info)
        if pixels is not None and greyscale:
            pixels = np.repeat((pixels @ np.array([0.299, 0.587, 0.114]))[..., None], 3, axis=2).astype(np.uint8)
        for c, w in enumerate(columns):
            ax = axes[r, c]
            if pixels is not None:
                ax.imshow(pixels, extent=(0, width, height, 0), interpolation="antialiased")
            if contours:
                _contour_lines(ax, [units[u]["box"] for u in mine], grid[w, mine], width, height, cmap, norm)
            else:
                boxes = [Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1]) for b in (units[u]["box"] for u in mine)]
                shaded = PatchCollection(boxes, cmap=cmap, norm=norm, edgecolor=(1, 1, 1, 0.25), linewidth=0.3)
                shaded.set_array(np.ma.masked_invalid(grid[w, mine]))
                shaded.set_alpha(tint_alpha(grid[w, mine], norm))
                ax.add_collection(shaded)
            for x0, y0, x1, y1 in crop_strips(info):  # no token sees them: greyed, hatched, said
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, facecolor=(0.27, 0.27, 0.27, 0.62),
                                       edgecolor=(1, 1, 1, 0.45), hatch="//", linewidth=0, label="cropped"))
                ax.text((x0 + x1) / 2, (y0 + y1) / 2, "cropped: no tokens", color="white", fontsize=6, ha="center",
                        va="center", rotation=0 if x1 - x0 >= y1 - y0 else 90, clip_on=True)
            ax.set_xlim(0, width)
            ax.set_ylim(height, 0)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(tick_label(labels[w], 28), fontsize=base + 1)
            if c == 0:
                ax.set_ylabel(f"image {i + 1}{f' {view}' if view else ''}\n({width}×{height} px)", fontsize=base)
    figure.suptitle(title if title is not None else _title(data, metric), fontsize=base + 1, x=0.01, ha="left")
    from matplotlib.cm import ScalarMappable

    # panchor=False: the colour bar leaves the panels' anchor at the centre (its default moves them to the right
    # edge of their cells, where a narrow picture's panel then sits)
    bar = figure.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axes, extend=extend,
                          fraction=0.05, pad=0.02, shrink=0.9, panchor=False)
    bar.set_label(METRICS.get(metric, (metric,))[0], fontsize=base)
    bar.ax.tick_params(labelsize=base * 0.9)
    return figure


TINT = 0.6  # the overlay's opacity at the colour limit (the viewer's default)
CONTOUR_LEVELS = (0.25, 0.5, 0.75)  # the overlay's contours: these fractions of the colour limit, either side of 0
CONTOUR_SIDE = 384  # the longest side of the grid the boxes' values are laid on for the contours


def effect_grid(boxes: list, values: np.ndarray, width: float, height: float, side: int = CONTOUR_SIDE) -> np.ndarray:
    """The boxes' values on a grid over the picture (``side`` cells along its longer side; the boxes in the order
    given, later ones over earlier ones), 0 where no box lies or a value is missing."""
    scale = side / max(width, height)
    rows, cols = max(2, round(height * scale)), max(2, round(width * scale))
    out = np.zeros((rows, cols))
    for box, value in zip(boxes, values):
        if not np.isfinite(value):
            continue
        x0, y0 = int(round(box[0] * scale)), int(round(box[1] * scale))
        x1, y1 = max(x0 + 1, int(round(box[2] * scale))), max(y0 + 1, int(round(box[3] * scale)))
        out[max(0, y0):min(rows, y1), max(0, x0):min(cols, x1)] = value
    return out


def _contour_lines(ax, boxes: list, values: np.ndarray, width: float, height: float, cmap, norm) -> None:
    """Contour lines of the boxes' values at ``CONTOUR_LEVELS`` of the colour limit (hurts and helps), each in its
    level's colour, deeper for a stronger level — the viewer's "effects as contours"."""
    grid = effect_grid(boxes, values, width, height)
    limit = max(abs(norm.vmin), abs(norm.vmax))
    levels = sorted({sign * f * limit for f in CONTOUR_LEVELS for sign in ((1,) if norm.vmin == 0 else (-1, 1))})
    present = [level for level in levels if grid.min() < level < grid.max()]
    if not present:
        return
    rows, cols = grid.shape
    xs, ys = (np.arange(cols) + 0.5) * width / cols, (np.arange(rows) + 0.5) * height / rows

    def deeper(level):  # the line's colour: its side of the map, past its level (a pale line would not read on grey)
        position = float(norm(level))
        centre = 0.0 if norm.vmin == 0 else 0.5
        return cmap(centre + (position - centre) * 1.25 + np.sign(position - centre) * 0.1)

    ax.contour(xs, ys, grid, levels=present, colors=[deeper(level) for level in present],
               linewidths=[0.9 + 0.5 * CONTOUR_LEVELS.index(min(CONTOUR_LEVELS, key=lambda f: abs(abs(level) / limit - f)))
                           for level in present])


def tint_alpha(values: np.ndarray, norm) -> np.ndarray:
    """Each box's opacity: ``TINT`` times the size of its place on the scale (0 at no change, 1 at the limit), as
    the viewer's overlay draws it; a missing value: none."""
    position = np.clip(np.asarray(norm(np.ma.masked_invalid(values)).filled(np.nan), dtype=float), 0, 1)
    size = position if norm.vmin == 0 else np.abs(2 * position - 1)
    return np.nan_to_num(TINT * size, nan=0.0)


def crop_strips(info: dict) -> list[tuple[float, float, float, float]]:
    """The parts of the picture the vision tower never sees (``crop``: LLaVA-1.5's centre crop), as boxes in
    original-image pixels — the viewer's ``cropStrips``."""
    crop, width, height = info.get("crop"), info["width"], info["height"]
    if not crop or len(crop) != 4 or not info.get("resized_width") or not info.get("resized_height"):
        return []
    sx, sy = width / info["resized_width"], height / info["resized_height"]
    left, top, w, h = crop
    x0, y0 = max(0.0, left * sx), max(0.0, top * sy)
    x1, y1 = min(width, (left + w) * sx), min(height, (top + h) * sy)
    strips = [(0, 0, x0, height), (x1, 0, width, height), (x0, 0, x1, y0), (x0, y1, x1, height)]
    return [strip for strip in strips if strip[2] - strip[0] > 1e-9 and strip[3] - strip[1] > 1e-9]


def image_views(data: dict, image: int) -> list[str | None]:
    """The views the model sees image ``image`` in — the parts of its vision tokens that have boxes, in order
    (LLaVA-NeXT: base, tiles) — or [None] for one view: each gets its own row of the overlay, as the viewer's view
    choice shows them, so the base grid's boxes are not drawn over the tiles'."""
    views = []
    for token in data.get("tokens") or []:
        if token.get("image") == image and token.get("box") and token.get("part") and token["part"] not in views:
            views.append(token["part"])
    return views if len(views) > 1 else [None]


def unit_view(data: dict, unit: dict, image: int) -> str | None:
    """The one view of all the unit's boxed vision keys on ``image``; None where it spans views (a whole image)."""
    tokens = data.get("tokens") or []
    parts = {tokens[p].get("part") for p in unit.get("keys") or [] if p < len(tokens)
             and tokens[p].get("image") == image and tokens[p].get("box")}
    return parts.pop() if len(parts) == 1 else None


def _area(box: list[float]) -> float:
    return (box[2] - box[0]) * (box[3] - box[1])


def flow_curves(data: dict, metric: str, windows=None, vmax=None, title=None, size=None, font_size=None):
    """One curve per flow over the layer windows (x: the window's centre layer), with a legend."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    grid = values(data, metric)
    units = units_of(data)
    centres = [(a + b) / 2 for a, b in data["windows"]]
    figure = Figure(figsize=size or (6.4, 3.8), layout="constrained")
    axes = figure.add_subplot()
    base = font_size or 8.0
    for u, unit in enumerate(units):
        axes.plot(centres, grid[:, u], marker="o", markersize=3, linewidth=1.4, label=tick_label(unit["label"], 32))
    axes.axhline(0, color="#999999", linewidth=0.8, zorder=0)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    spans = {b - a + 1 for a, b in data["windows"]}
    axes.set_xlabel("decoder layer" if spans == {1} else f"decoder layer (centre of a {max(spans)}-layer window)")
    axes.set_ylabel(METRICS.get(metric, (metric,))[0])
    axes.yaxis.set_major_locator(MaxNLocator(6))  # enough ticks to read a value off (it had two)
    if vmax is not None:
        axes.set_ylim(-vmax, vmax)
    axes.set_title(title if title is not None else _title(data, metric), fontsize=base + 1, loc="left")
    axes.legend(title="flow", fontsize=base, title_fontsize=base, frameon=False, loc="best")
    axes.grid(alpha=0.3, linewidth=0.5)
    return figure


def _readable(rgb) -> str:
    """Black or white text, whichever reads on ``rgb`` (relative luminance, WCAG), as the viewer chooses."""
    lum = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb[:3]]
    return "black" if 0.2126 * lum[0] + 0.7152 * lum[1] + 0.0722 * lum[2] > 0.179 else "white"


WORD_START = re.compile(r"^[\s\u2581\u0120]")  # a token that starts a word (a space, SentencePiece's ▁, GPT-2's Ġ)


def _words(chips: list[tuple]) -> list[list[tuple[str, tuple | None]]]:
    """Chips (text, colour[, starts]) grouped into words as the viewer's strip groups them: a chip starts a word
    where ``starts`` says so (else where its text starts with a space, ▁ or Ġ), or after 12 chips or 40 characters."""
    words, length = [], 0
    for chip in chips:
        text, colour = chip[0], chip[1]
        starts = chip[2] if len(chip) > 2 else bool(WORD_START.match(text))
        if not words or starts or length >= 40 or len(words[-1]) >= 12:
            words.append([])
            length = 0
        words[-1].append((text, colour))
        length += len(text)
    return words


def _token_rows(chips: list[tuple], room: float, char_w: float, gap: float) -> list[list[tuple[str, tuple | None]]]:
    """Chips (text, colour[, starts]) laid out in lines ``room`` inches wide (a chip: its characters and ``gap``),
    never breaking a chip, and a line breaking between words, not inside one (``_words``), as the viewer's strip."""
    lines, line, used = [], [], 0.0
    for word in _words(chips):
        width = sum(len(text.replace(r"\$", "$")) * char_w + gap for text, _ in word)
        if line and used + width > room:
            lines.append(line)
            line, used = [], 0.0
        line.extend(word)
        used += width
    return lines + ([line] if line else [])


def token_text(data: dict, metric: str, windows=None, vmax=None, title=None, size=None, font_size=None):
    """The prompt's tokens coloured by their unit's impact (its largest over the chosen windows; an image's vision
    tokens one chip) and, below, the answer's tokens coloured by each step's drop under the run's largest knockout
    (``steps.logprob_drop``), as Inseq shows them; the colour bars of both scales."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.figure import Figure

    grid = values(data, metric)
    units = units_of(data)
    rows = list(range(grid.shape[0])) if windows is None else chosen_windows(data, windows)
    _, harm, _ = METRICS.get(metric, (metric, 1, False))
    cmap, norm, _ = colour_scale(data, metric, grid, vmax)
    unit_of = {}
    for u, unit in enumerate(units):
        for p in unit.get("keys") or []:
            unit_of.setdefault(p, u)

    def impact(u):
        column = grid[rows, u] * harm
        column = column[np.isfinite(column)]
        return None if column.size == 0 else float(column.max()) * harm

    def chip_colour(v):
        return None if v is None else cmap(norm(v))

    chips, seen = [], set()
    for token in data.get("tokens") or []:
        if token.get("modality") == "vision":
            if token.get("image") in seen:
                continue
            seen.add(token.get("image"))
            keys = [t["index"] for t in data["tokens"] if t.get("modality") == "vision" and t.get("image") == token["image"]]
            whole = {unit_of.get(p) for p in keys}
            u = whole.pop() if len(whole) == 1 else None
            chips.append((f" image {token['image'] + 1} · {len(keys)} tokens ", chip_colour(impact(u)) if u is not None else None,
                          True))
            continue
        u = unit_of.get(token["index"])
        text = tick_label(token["text"], 40) if token["text"].strip() else token["text"].replace("\n", "⏎") or "∅"
        chips.append((text.replace("\\$", "$").replace("$", r"\$"), chip_colour(impact(u)) if u is not None else None,
                      bool(WORD_START.match(token["text"])) or token.get("modality") == "special"))
    # the answer: each step's drop under the run's largest knockout by logprob_drop (special tokens left out)
    drops = values(data, "logprob_drop") if "logprob_drop" in data.get("metrics", {}) else None
    answer, knockout = [], ""
    steps = ((data.get("steps") or {}).get("logprob_drop")) if drops is not None else None
    if steps:
        plain = [u for u, unit in enumerate(units) if unit["modality"] != "special"] or list(range(len(units)))
        masked = np.full(drops.shape, -np.inf)
        masked[:, plain] = np.where(np.isfinite(drops[:, plain]), drops[:, plain], -np.inf)
        w, u = np.unravel_index(int(np.argmax(masked)), masked.shape)
        step_cmap, step_norm, _ = colour_scale(data, "logprob_drop", drops)
        for t, text in enumerate((data.get("target") or data["baseline"]).get("tokens") or []):
            value = steps[w][u][t] if t < len(steps[w][u]) else None
            answer.append((tick_label(text, 40) if text.strip() else text or "∅",
                           None if value is None else step_cmap(step_norm(value)), bool(WORD_START.match(text))))
        knockout = f"answer steps under the largest knockout: {tick_label(units[u]['label'], 40)}, {window_labels(data)[w]}"
    base = font_size or 9.0
    width = size[0] if size is not None else 10.0
    char_w = 0.602 * base / 72  # inches a monospace character takes (DejaVu Sans Mono)
    gap = 0.26 * base / 72 + 0.03  # a chip's padding and the space after it
    lines = _token_rows(chips, width - 0.7, char_w, gap)
    answer_lines = _token_rows(answer, width - 0.7, char_w, gap) if answer else []
    line_h = 1.9 * base / 72
    height = size[1] if size is not None else (1.25 + line_h * (len(lines) + len(answer_lines) + (2 if answer else 0)) + 0.45)
    figure = Figure(figsize=(width, height))
    y = height - 0.95

    def put(line_chips, y):
        x = 0.3
        for text, colour in line_chips:
            face = colour if colour is not None else (1, 1, 1, 1)
            figure.text(x / width, y / height, text, fontsize=base, family="monospace", va="baseline", ha="left",
                        color=_readable(face) if colour is not None else "#555555",
                        bbox={"boxstyle": "square,pad=0.12", "facecolor": face, "edgecolor": "none" if colour is not None else "#bbbbbb",
                              "linewidth": 0.4})
            x += len(text.replace(r"\$", "$")) * char_w + gap

    figure.text(0.3 / width, (height - 0.3) / height, title if title is not None else _title(data, metric),
                fontsize=base, va="top", ha="left")
    figure.text(0.3 / width, (y + line_h * 0.9) / height, f"prompt tokens: {METRICS.get(metric, (metric,))[0]}, "
                f"their unit's largest over {'every window' if windows is None else f'{len(rows)} window(s)'}",
                fontsize=base * 0.85, color="#555555", va="baseline")
    for line in lines:
        y -= line_h
        put(line, y)
    if answer_lines:
        y -= line_h * 1.4
        figure.text(0.3 / width, y / height, knockout + " (the step's logprob drop)", fontsize=base * 0.85,
                    color="#555555", va="baseline")
        for line in answer_lines:
            y -= line_h
            put(line, y)
    bar_axes = figure.add_axes((0.3 / width, 0.25 / height, min(0.35, 3 / width), 0.12 / height))
    bar = figure.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=bar_axes, orientation="horizontal")
    bar.ax.tick_params(labelsize=base * 0.8)
    bar.set_label(METRICS.get(metric, (metric,))[0], fontsize=base * 0.85)
    return figure


# ---------------------------------------------------------------------------------------------------- studies


def render_study(study: dict, fmt: str, metric: str | None = None) -> dict[str, bytes]:
    """A study's figures (study.py) as the bytes of ``fmt`` files: ``curves`` (always) and ``map`` (where its
    units have grid cells)."""
    require()
    metric = metric or study["primary"]
    figures = {"curves": study_curves(study, metric)}
    if any(entry["kind"] == "grid" for entry in study["aggregates"]):
        figures["map"] = study_map(study, metric)
    return {kind: to_bytes(figure, fmt) for kind, figure in figures.items()}


def _study_caption(study: dict, metric: str) -> str:
    """What a study figure shows, for a paper: the metric, the rows it averages, the interval, the model."""
    rows, ci = study["rows"], study["ci"]
    model = re.split(r"[/\\]", str(study.get("model") or "?").rstrip("/\\"))[-1]
    kept = f", {rows['excluded']} excluded as answered wrongly" if rows["excluded"] else ""
    accuracy = study["accuracy"]["value"]
    accuracy = f"; baseline accuracy {accuracy:.0%}" if accuracy is not None else ""
    settings = study.get("row_settings") or {}
    what = [settings.get("stage", "decoder")]
    what += [f"flows {', '.join(settings['flows'])}"] if settings.get("flows") else [
        f"unit {settings.get('unit', 'token')}, mask mode {settings.get('mask_mode', 'text')}"]
    what += [f"layers {settings.get('layers', 'all')}, window {settings.get('window', 1)}"]
    what += [f"block from {settings['block_from']}"] if settings.get("block_from", "all") != "all" else []
    return (f"{METRICS.get(metric, (metric,))[0]} · mean over {rows['measured']} rows{kept} · "
            f"{ci['level']:.0%} CI ({ci['method']}, {ci['resamples']} resamples, seed {ci['seed']}){accuracy} · "
            f"{model} · {'; '.join(what)}")


def study_curves(study: dict, metric: str, size=None, font_size=None):
    """One curve per unit (flows, groups, images; else the token and word modalities) over the layer windows: the
    mean over rows with its confidence band, as the papers draw attention-knockout curves."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    entries = [e for e in study["aggregates"] if e["metric"] == metric]
    named = [e for e in entries if e["kind"] in ("flow", "group", "image")] or [
        e for e in entries if e["kind"] in ("tokens", "words")]
    units = list(dict.fromkeys(e["unit"] for e in named))
    figure = Figure(figsize=size or (6.4, 4.0), layout="constrained")
    axes = figure.add_subplot()
    base = font_size or 8.0
    windows = sorted({(e["layer_start"], e["layer_end"], e["window_label"]) for e in named})
    position = {window[:2]: k for k, window in enumerate(windows)}
    for unit in units:
        rows = sorted((e for e in named if e["unit"] == unit), key=lambda e: position[e["layer_start"], e["layer_end"]])
        xs = [position[e["layer_start"], e["layer_end"]] for e in rows]
        mean = [np.nan if e["mean"] is None else e["mean"] for e in rows]
        low = [np.nan if e["ci_low"] is None else e["ci_low"] for e in rows]
        high = [np.nan if e["ci_high"] is None else e["ci_high"] for e in rows]
        n = max((e["n"] for e in rows), default=0)
        line, = axes.plot(xs, mean, marker="o", markersize=3, linewidth=1.4, label=f"{tick_label(unit, 32)} (n={n})")
        axes.fill_between(xs, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    axes.axhline(0, color="#999999", linewidth=0.8, zorder=0)
    step = max(1, math.ceil(len(windows) / 12))  # at most about 12 window labels
    axes.set_xticks(range(0, len(windows), step), [windows[k][2] for k in range(0, len(windows), step)],
                    fontsize=base, rotation=30 if len(windows) > 6 else 0, ha="right" if len(windows) > 6 else "center")
    axes.set_xlabel("knocked-out layers (window)")
    axes.set_ylabel(METRICS.get(metric, (metric,))[0])
    axes.yaxis.set_major_locator(MaxNLocator(6))
    axes.set_title(f"study {study['name']}\n" + textwrap.fill(_study_caption(study, metric), 90),
                   fontsize=base, loc="left")
    if units:
        axes.legend(fontsize=base, frameon=False, loc="best")
    axes.grid(alpha=0.3, linewidth=0.5)
    return figure


def study_map(study: dict, metric: str, size=None, font_size=None):
    """The image tokens' mean effect on the study's grid of each picture's normalised coordinates, one panel per
    window (up to ``MAX_PANELS``), one colour scale for all (symmetric about no change)."""
    from matplotlib.colors import LinearSegmentedColormap, Normalize
    from matplotlib.figure import Figure

    entries = [e for e in study["aggregates"] if e["metric"] == metric and e["kind"] == "grid"
               and e["unit"].startswith("image1 ")]
    windows = list(dict.fromkeys((e["layer_start"], e["layer_end"], e["window_label"]) for e in entries))
    if len(windows) > MAX_PANELS:
        windows = [windows[round(k * (len(windows) - 1) / (MAX_PANELS - 1))] for k in range(MAX_PANELS)]
    cells = study["grid"]
    grids = []
    for start, end, _ in windows:
        grid = np.full((cells, cells), np.nan)
        for e in entries:
            if (e["layer_start"], e["layer_end"]) == (start, end) and e["mean"] is not None:
                r, c = _grid_cell(e["unit"])
                grid[r, c] = e["mean"]
        grids.append(grid)
    present = np.concatenate([g[np.isfinite(g)] for g in grids]) if grids else np.array([])
    limit = float(np.abs(present).max()) if present.size and np.abs(present).max() > 0 else 1.0
    _, harm, one_sided = METRICS.get(metric, (metric, 1, False))
    listed = colours.COLOUR_MAP[len(colours.COLOUR_MAP) // 2:] if one_sided else (
        colours.COLOUR_MAP if harm > 0 else colours.COLOUR_MAP[::-1])
    cmap = LinearSegmentedColormap.from_list("mask_impact", listed, N=256).with_extremes(bad="#d9d9d9")
    norm = Normalize(0.0, limit) if one_sided else Normalize(-limit, limit)
    count = max(1, len(grids))
    width = size[0] if size else max(5.0, 2.2 * count + 1.2)
    figure = Figure(figsize=size or (width, 3.6), layout="constrained")
    axes_list = figure.subplots(1, count, squeeze=False)[0]
    base = font_size or 8.0
    image = None
    for axes, grid, (_, _, label) in zip(axes_list, grids, windows):
        image = axes.imshow(grid, cmap=cmap, norm=norm, extent=(0, 1, 1, 0))
        axes.set_title(label, fontsize=base)
        axes.set_xticks([0, 0.5, 1])
        axes.set_yticks([0, 0.5, 1])
        axes.tick_params(labelsize=base - 1)
    if image is not None:
        bar = figure.colorbar(image, ax=list(axes_list), shrink=0.8)
        bar.set_label(METRICS.get(metric, (metric,))[0], fontsize=base)
    heading = (f"study {study['name']}: image tokens on a {cells}×{cells} grid of each picture (x, y: its width and "
               f"height)")
    figure.suptitle("\n".join(textwrap.wrap(heading, int(width * 13)) + textwrap.wrap(_study_caption(study, metric),
                                                                                      int(width * 13))),
                    fontsize=base, x=0.01, ha="left")
    return figure


def _grid_cell(name: str) -> tuple[int, int]:
    row, column = name.rpartition(" grid ")[2].split()
    return int(row[1:]), int(column[1:])
