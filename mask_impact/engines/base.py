"""What a stage's sweep needs from its engine module: the plan (``StagePlan``: the rows of the result and how to
make its engines) and the engines' one interface (``Engine``), which sweep.score_knockouts drives."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch

    from ..engine import TeacherForced


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


class Engine:
    """A stage's engine (fast or naive), as the sweep drives it; every stage's engines subclass this.

    ``tf``: the teacher-forced answer; ``base_logprobs``: its (T, V) log-probs with nothing removed;
    ``first_affected(unit)``: the first position the unit's removal can change (None: none), by which the sweep
    forms batches that recompute little (sweep.next_batch); ``logprobs(row, units)``: (B, T, V), one removal per
    unit, at one row of the result (a layer window, or a DeepStack route); ``logprobs_batches(row, batches)``:
    several batches, one (B, T, V) each. ``shares_head``: the batches of one call share one call of the LM head
    (the decoder's fast engine), so the sweep hands it groups of batches (sweep.next_group); the others get one
    batch per call."""

    tf: TeacherForced
    base_logprobs: torch.Tensor
    shares_head: bool = False

    def first_affected(self, unit) -> int | None:
        raise NotImplementedError

    def logprobs(self, row, units: list) -> torch.Tensor:
        raise NotImplementedError

    def logprobs_batches(self, row, batches: list[list]) -> list[torch.Tensor]:
        return [self.logprobs(row, batch) for batch in batches]
