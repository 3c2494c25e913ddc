"""DeepStack routes (``--stage deepstack``): which route carries a unit's information into the decoder.

Qwen3-VL adds features from early ViT layers to the decoder's hidden states at the image positions after decoder
layers 0, 1, 2 (``deepstack_visual_indexes``), beside the main visual embedding that enters layer 0. This stage
removes, per unit, the DeepStack feature of one level (or of all levels), or keeps them and replaces the unit's
main embedding by its image's mean embedding (the mean ablation of Neo et al.): the rows of the result say which
route carries the unit's information. ``DeepStackEngine`` recomputes the decoder from the unit's first position
with the altered features; ``NaiveDeepStackEngine`` runs the whole model with the vision tower's output altered by
a forward hook.
"""

from __future__ import annotations

import contextlib

import torch

from ..engine import Analysis, TeacherForced, whole_model_logprobs
from .decoder import FastEngine
from .base import Engine, StagePlan


def deepstack_routes(levels: int, num_layers: int) -> list[tuple[str, int | None]]:
    """The rows of a ``--stage deepstack`` result: each level removed, all of them, then the main embedding."""
    return [("deepstack", level) for level in range(levels)] + [("deepstack", None), ("main", None)]


def route_window(route: tuple[str, int | None], levels: int, num_layers: int) -> tuple[int, int]:
    """The decoder layers a route's removal acts at: after layer ``level``, after layers 0..levels-1, or from the
    first layer on (the main embedding)."""
    kind, level = route
    if kind == "main":
        return (0, num_layers - 1)
    return (level, level) if level is not None else (0, levels - 1)


def route_label(route: tuple[str, int | None]) -> str:
    kind, level = route
    if kind == "main":
        return "main embedding → image mean"
    return f"DeepStack after layer {level}" if level is not None else "all DeepStack levels"


class _Routes(Engine):
    """What both DeepStack engines share: each row's main embeddings and DeepStack features."""

    def __init__(self, analysis: Analysis, tf: TeacherForced):
        self.analysis, self.tf = analysis, tf
        vision = [tok for tok in analysis.prompt.tokens if tok.modality == "vision"]
        self.order = {tok.index: n for n, tok in enumerate(vision)}  # position → row among the visual features
        self.images = torch.tensor([tok.image for tok in vision])  # (n_vis,)

    def first_affected(self, unit) -> int:
        return min(unit.keys)

    def rows(self, unit) -> torch.Tensor:
        return torch.tensor([self.order[p] for p in unit.keys])

    def altered(self, route, unit, embeds: torch.Tensor, deepstack: list[torch.Tensor]):
        """``embeds`` (n_vis, H) and ``deepstack`` (per level (n_vis, H)) as ``route`` leaves them for ``unit``."""
        kind, level = route
        rows = self.rows(unit)
        if kind == "main":  # the unit's main embedding replaced by its image's mean (Neo et al.'s mean ablation)
            embeds = embeds.clone()
            for image in self.images[rows].unique():
                mean = embeds[self.images == image].double().mean(0).to(embeds.dtype)
                embeds[rows[self.images[rows] == image]] = mean
            return embeds, deepstack
        deepstack = [features.clone() if level is None or index == level else features
                     for index, features in enumerate(deepstack)]
        for index, features in enumerate(deepstack):
            if level is None or index == level:
                features[rows] = 0.0
        return embeds, deepstack

    @contextlib.contextmanager
    def hooked(self, route, unit):
        """The model, with its vision tower's output altered as ``route`` says for ``unit`` (a forward hook)."""
        def alter(module, args, output):  # pooler_output: (n_vis, H); deepstack_features: per level (n_vis, H)
            output.pooler_output, output.deepstack_features = self.altered(
                route, unit, output.pooler_output, list(output.deepstack_features))
            return output

        hook = self.analysis.loaded.adapter.vision_tower.register_forward_hook(alter)
        try:
            yield
        finally:
            hook.remove()


class DeepStackEngine(_Routes):
    """The decoder from the unit's first position, with the route's features altered per row."""

    def __init__(self, analysis: Analysis, tf: TeacherForced):
        super().__init__(analysis, tf)
        self.fast = FastEngine(analysis, tf)
        self.base_logprobs = self.fast.base_logprobs

    @torch.no_grad()
    def logprobs(self, route, units: list) -> torch.Tensor:
        altered = [self.altered(route, unit, self.fast.image_embeds, self.fast.deepstack_rows) for unit in units]
        embeds = torch.stack([e for e, _ in altered])  # (B, n_vis, H)
        deepstack = [torch.stack([d[level] for _, d in altered]) for level in range(len(self.fast.deepstack_rows))]
        start = min(self.first_affected(unit) for unit in units)
        return self.fast.visual_logprobs(start, embeds, deepstack)


class NaiveDeepStackEngine(_Routes):
    """The oracle: the whole model per unit, the vision tower's output altered by a forward hook."""

    def __init__(self, analysis: Analysis, tf: TeacherForced):
        super().__init__(analysis, tf)
        self.base_logprobs = self._forward(None, None)[0]

    def _forward(self, route, unit) -> torch.Tensor:
        with self.hooked(route, unit) if route is not None else contextlib.nullcontext():
            return whole_model_logprobs(self.analysis, self.tf)

    def logprobs(self, route, units: list) -> torch.Tensor:
        return torch.cat([self._forward(route, unit) for unit in units], dim=0)


def plan(loaded, config, fast: bool) -> StagePlan:
    """One row per route."""
    levels, num_layers = loaded.adapter.deepstack_levels, loaded.adapter.num_layers
    routes = deepstack_routes(levels, num_layers)

    def generate(analysis, engine, w, unit, knockout, n):
        with engine.hooked(routes[w], unit):
            return analysis.generate(n)[0]

    return StagePlan(routes, [route_window(route, levels, num_layers) for route in routes],
                     [route_label(route) for route in routes],
                     lambda analysis, tf, units: (DeepStackEngine if fast else NaiveDeepStackEngine)(analysis, tf),
                     generate)
