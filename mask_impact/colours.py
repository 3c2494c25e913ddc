"""One colour map and one rule for the colour limits, for the viewer and the figures alike (DESIGN.md §5).

A result carries them as ``colour_scale`` (``report.result_json`` adds it, the one place): the map's colours, the
rule's percentile and each metric's limit. The figures (figures.py) draw with them; the viewer reads them, and for a
result written before they were stored it computes the same rule itself (``robustEffect`` in the page), so both show
one result with the same colours between the same limits.

- The map: ColorBrewer's RdBu (11 classes, its centre white), a diverging map that readers with the common forms of
  colour blindness tell apart; from "helps the answer" (blue) through "no change" (white) to "hurts it" (red).
  One-sided metrics (``kl``, ``top1_changed``, ``first_divergence``) use its upper half, white to red.
- The limit of a metric: the ``PERCENTILE``-th percentile of |value| over every window and every unit that is not a
  special token (one sink token must not wash out the rest), taken as the viewer takes it — the sorted sizes' entry
  at ⌊p/100 · n⌋; where that is 0, the largest |value| of any unit; where that is 0 too, 1. Values are read as the
  viewer reads them: ``top1_changed`` as 0/1, ``first_divergence`` as answer steps from the end (earlier = larger),
  a missing one left out.
- The modalities' colours (the heatmap's band and labels): none of them red or blue, so they never read as an effect.
"""

from __future__ import annotations

import math

PERCENTILE = 99
COLOUR_MAP = ["#053061", "#2166ac", "#4393c3", "#92c5de", "#d1e5f0", "#ffffff",
              "#fddbc7", "#f4a582", "#d6604d", "#b2182b", "#67001f"]  # helps … no change … hurts
MAP_NAME = "ColorBrewer RdBu (11 classes, centre white), colour-blind safe"
MODALITY_COLOURS = {"text": "#404040", "vision": "#009e73", "special": "#9a9a9a", "mixed": "#cc79a7"}
ESTIMATED = "estimated_logprob_drop"  # the estimate's map (``data["estimate"]["logprob_drop"]``)


def grid_of(data: dict, metric: str) -> list[list]:
    """The (window, unit) values of ``metric`` as the result holds them."""
    return data["estimate"]["logprob_drop"] if metric == ESTIMATED else data["metrics"][metric]


def _size(value, metric: str, answer_steps: int) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool):
        value = 1.0 if value else 0.0
    elif metric == "first_divergence":
        value = answer_steps - value  # the viewer's reading: an earlier divergence is a larger change
    value = abs(float(value))
    return value if math.isfinite(value) else None


def limit(data: dict, metric: str, percentile: float = PERCENTILE) -> float:
    """The colour limit of ``metric`` in ``data`` by the one rule (see the module's text)."""
    units = data.get("units")
    if units is None:  # schema 1: one unit per swept position
        tokens = data["tokens"]
        modalities = [tokens[p]["modality"] for p in data["positions"]]
    else:
        modalities = [unit["modality"] for unit in units]
    steps = len((data.get("target") or data.get("baseline") or {}).get("token_ids") or [])  # the scored answer's
    kept, largest = [], 0.0
    for row in grid_of(data, metric):
        for u, value in enumerate(row):
            size = _size(value, metric, steps)
            if size is None:
                continue
            largest = max(largest, size)
            if u < len(modalities) and modalities[u] != "special":
                kept.append(size)
    robust = 0.0
    if kept:
        kept.sort()
        robust = kept[min(len(kept) - 1, math.floor((percentile / 100) * len(kept)))]
    return robust or largest or 1.0


def scale_block(data: dict) -> dict:
    """The result's ``colour_scale``: the map, the modalities' colours, the rule and each metric's limit."""
    metrics = [name for name, grid in (data.get("metrics") or {}).items() if grid is not None]
    if (data.get("estimate") or {}).get("logprob_drop"):
        metrics.append(ESTIMATED)
    return {"map": MAP_NAME, "colours": COLOUR_MAP, "modality_colours": MODALITY_COLOURS,
            "rule": f"the {PERCENTILE}th percentile of |value| over the units that are not special tokens "
                    "(else the largest |value|, else 1)",
            "percentile": PERCENTILE, "limits": {name: limit(data, name) for name in metrics}}


def limit_of(data: dict, metric: str) -> float:
    """The stored limit where the result has one, else the rule computed now (a result written before results stored it)."""
    stored = (data.get("colour_scale") or {}).get("limits") or {}
    value = stored.get(metric)
    return float(value) if isinstance(value, (int, float)) and value > 0 else limit(data, metric)
