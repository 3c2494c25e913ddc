"""The decoder stage (``--stage decoder``, the default): attention knockouts over windows of decoder layers. Its
engines are ``engine.FastEngine`` and ``engine.NaiveEngine`` (docs/DESIGN.md §4)."""

from __future__ import annotations

from ..config import parse_layers, windows_for
from ..engine import FastEngine, NaiveEngine
from .base import StagePlan, window_labels


def plan(loaded, config, fast: bool) -> StagePlan:
    num_layers = loaded.adapter.num_layers
    windows = windows_for(parse_layers(config.layers, num_layers), config.window, num_layers)
    return StagePlan(windows, windows, window_labels(windows, "layer", "layers"),
                     lambda analysis, tf, units: (FastEngine if fast else NaiveEngine)(analysis, tf),
                     lambda analysis, engine, w, unit, knockout, n: analysis.generate(
                         n, analysis.plan(windows[w], [knockout]))[0], takes_knockouts=True)
