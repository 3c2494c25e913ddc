"""What a stage's sweep needs from its engine module (``plan``): the rows of the result and how to run them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass
class StagePlan:
    """A stage's sweep: what its engine gets for each row of the result (a layer window, or a DeepStack route),
    the rows as windows and as names, how to make its engine, and how to generate under one of its cells."""

    rows: list
    windows: list[tuple[int, int]]
    labels: list[str]
    make_engine: Callable  # (analysis, tf, units) -> engine
    generate: Callable  # (analysis, engine, row index, unit, knockout, num_tokens) -> token ids
    takes_knockouts: bool = False  # the engine takes each unit's Knockout (decoder); the others take the units


def window_labels(windows: list[tuple[int, int]], one: str, several: str) -> list[str]:
    """``layer 3`` / ``layers 2–4`` (or the vision tower's)."""
    return [f"{several} {a}–{b}" if a != b else f"{one} {a}" for a, b in windows]
