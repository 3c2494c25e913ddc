"""A study's aggregates: each unit's metrics averaged over the rows, with a bootstrap confidence interval.

Units are matched across rows by name: flows (``image->last``), named groups, whole images (``image1``) as they
are; tokens and words by modality (``tokens:text`` is a row's mean over its text tokens); image tokens, regions
and patches also on a ``grid`` × ``grid`` lattice of each picture's normalised coordinates (``image1 grid r2 c5``:
a row's mean over the units whose box centre falls in that cell), so that a map averages over pictures of any
size. Windows are matched by their layers.

The interval is a percentile bootstrap over rows: ``resamples`` draws of the rows with replacement, one draw
shared by every (unit, window, metric) cell, from numpy's PCG64 seeded with ``seed`` (the same study gives the
same interval bit for bit); a cell's statistic on a draw is the mean over the drawn rows that have a value for it.
Booleans (``top1_changed``) count as 0/1: their mean is the fraction of rows whose answer the knockout flips.
"""

from __future__ import annotations

import csv
import io
import math

import numpy as np

COLUMNS = ["unit", "kind", "window_label", "layer_start", "layer_end", "metric", "n", "mean", "ci_low", "ci_high"]
AS_THEY_ARE = ("flow", "group", "image")  # unit kinds matched across rows by their label
GRID_KINDS = ("token", "region", "patch")  # units with a box in a picture: also on the grid
SKIPPED = ("first_divergence",)  # a step number, not an amount: not averaged


def row_units(data: dict, grid: int) -> dict[tuple[str, str], list[int]]:
    """(name, kind) of each aggregate unit of one result → the indices of its units in that result."""
    out: dict[tuple[str, str], list[int]] = {}
    images = data.get("images") or []
    for i, unit in enumerate(data["units"]):
        kind = unit["kind"]
        if kind in AS_THEY_ARE:
            out.setdefault((unit["label"], kind), []).append(i)
            continue
        if kind in ("token", "word"):
            out.setdefault((f"{kind}s:{unit['modality']}", f"{kind}s"), []).append(i)
        if kind in GRID_KINDS and unit.get("box") and unit.get("image") is not None and unit["image"] < len(images):
            image = images[unit["image"]]
            x0, y0, x1, y1 = unit["box"]
            column = min(grid - 1, max(0, int((x0 + x1) / 2 / image["width"] * grid)))
            row = min(grid - 1, max(0, int((y0 + y1) / 2 / image["height"] * grid)))
            out.setdefault((f"image{unit['image'] + 1} grid r{row} c{column}", "grid"), []).append(i)
    return out


def _number(value) -> float:
    if value is None:
        return math.nan
    return float(value)


def cell_values(results: list[dict], grid: int) -> tuple[dict, list[tuple[int, int, str]]]:
    """{(name, kind, window key, metric): (rows,) float array, NaN where a row has no value} and the windows
    (layer_start, layer_end, label), in the order first met."""
    windows: dict[tuple[int, int], str] = {}
    values: dict[tuple, np.ndarray] = {}
    count = len(results)
    for r, data in enumerate(results):
        labels = data.get("window_labels") or [f"layers {a}–{b}" for a, b in data["windows"]]
        units = row_units(data, grid)
        for w, (start, end) in enumerate(data["windows"]):
            windows.setdefault((start, end), labels[w])
            for metric, rows in data["metrics"].items():
                if metric in SKIPPED:
                    continue
                for (name, kind), indices in units.items():
                    cells = [_number(rows[w][i]) for i in indices]
                    cells = [v for v in cells if not math.isnan(v)]
                    key = (name, kind, (start, end), metric)
                    if key not in values:
                        values[key] = np.full(count, np.nan)
                    values[key][r] = sum(cells) / len(cells) if cells else np.nan
    return values, [(a, b, label) for (a, b), label in windows.items()]


def bootstrap_draws(rows: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, rows) row indices drawn with replacement, from PCG64 seeded with ``seed``."""
    return np.random.Generator(np.random.PCG64(seed)).integers(0, rows, size=(resamples, rows))


def interval(values: np.ndarray, draws: np.ndarray, level: float) -> tuple[int, float, float, float]:
    """n, mean and the percentile bootstrap interval of the mean of ``values`` (NaN: no value in that row)."""
    have = ~np.isnan(values)
    n = int(have.sum())
    if n == 0:
        return 0, math.nan, math.nan, math.nan
    mean = float(values[have].mean())
    filled = np.where(have, values, 0.0)
    counts = have[draws].sum(axis=1)  # (resamples,) drawn rows with a value
    sums = filled[draws].sum(axis=1)
    means = sums[counts > 0] / counts[counts > 0]
    low, high = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
    return n, mean, float(low), float(high)


def aggregate(results: list[dict], grid: int = 8, level: float = 0.95, resamples: int = 2000,
              seed: int = 0) -> list[dict]:
    """One entry per (unit, window, metric): ``COLUMNS``' values, over the rows of ``results``."""
    if not results:
        return []
    values, windows = cell_values(results, grid)
    draws = bootstrap_draws(len(results), resamples, seed)
    order = {(a, b): k for k, (a, b, _) in enumerate(windows)}
    labels = {(a, b): label for a, b, label in windows}
    kinds = {kind: k for k, kind in enumerate(("flow", "group", "image", "tokens", "words", "grid"))}
    out = []
    for (name, kind, window, metric), column in sorted(
            values.items(), key=lambda item: (kinds[item[0][1]], item[0][0] if item[0][1] != "grid" else
                                              _grid_key(item[0][0]), order[item[0][2]])):
        n, mean, low, high = interval(column, draws, level)
        out.append({"unit": name, "kind": kind, "window_label": labels[window], "layer_start": window[0],
                    "layer_end": window[1], "metric": metric, "n": n, "mean": mean, "ci_low": low, "ci_high": high})
    return out


def _grid_key(name: str) -> tuple:
    image, _, rest = name.partition(" grid ")
    row, column = rest.split()
    return image, int(row[1:]), int(column[1:])


def csv_text(entries: list[dict]) -> str:
    """``study.csv``: long format, one line per (unit, window, metric), ``COLUMNS`` (empty where n is 0)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(COLUMNS)
    for entry in entries:
        writer.writerow(["" if isinstance(entry[c], float) and math.isnan(entry[c]) else entry[c] for c in COLUMNS])
    return buffer.getvalue()
