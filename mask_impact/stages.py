"""Where a unit is removed: the registry of stages (``--stage``), each one object with one interface.

    decoder          attention knockouts in the decoder, over windows of its layers (engine.py)
    vision-encoder   attention knockouts between an image's patches in the ViT, over windows of its layers
                     (engines/vit.py)
    pixels           occlusion of the image the model sees: one row, the whole model (engines/pixels.py)
    deepstack        DeepStack features or the main embedding removed: one row per route (engines/deepstack.py)

A ``Stage`` says what it removes (for refusals), which options do not apply to it (``check``, before the model
loads), which units it takes, and, for a loaded model and a run's settings, its ``StagePlan``: the rows of the
result (layer windows, or routes), their names, how to make its fast or naive engine, and how to generate under
one of its cells. ``sweep.run``, the configuration's checks and the benchmarks all go through ``STAGES``; nothing
else tests a stage's name. This module imports no engine until a plan is made, so the command line can check its
options without torch.

Adding a stage is one engine module under ``engines/``, one ``Stage`` subclass here with its row in ``STAGES``,
the family adapters that support it listing it in their ``stages``, and its tests (docs/DESIGN.md §2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .errors import UsageError


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


@dataclass(frozen=True)
class Stage:
    """One stage. Subclasses say what differs: ``check`` and ``plan``."""

    name: str
    removes: str = ""  # what it removes, in refusals: "--stage pixels occludes image patches"
    on_patches: bool = False  # its units are the patches of ``pixel_values`` (their default: ``patch``)
    unit_kinds: str = "token, word, region:N, image or groups"  # what ``--unit`` may be, said when one is refused
    has_layers: bool = True  # --layers, --window and --block-from apply
    estimable: bool = False  # --estimate has a first-order estimate of it
    images_only: bool = True  # it removes image tokens only: a run needs an image, its units are vision units

    @property
    def default_unit(self) -> str:
        return "patch" if self.on_patches else "token"

    def check(self, config) -> None:
        """The settings that do not apply to this stage, refused before the model loads."""
        if config.fill != "mean" and self.name != "pixels":
            raise UsageError(f"--fill {config.fill} says what replaces occluded pixels, and only --stage pixels "
                             f"occludes them (this run is --stage {self.name}, where nothing is filled); drop --fill, "
                             "or use --stage pixels")

    def plan(self, loaded, config, fast: bool) -> StagePlan:
        raise NotImplementedError


def _window_labels(windows: list[tuple[int, int]], prefix: str, plural: str) -> list[str]:
    return [f"{plural} {a}–{b}" if a != b else f"{prefix} {a}" for a, b in windows]


class DecoderStage(Stage):
    def plan(self, loaded, config, fast: bool) -> StagePlan:
        from .config import parse_layers, windows_for
        from .engine import FastEngine, NaiveEngine

        num_layers = loaded.adapter.num_layers
        windows = windows_for(parse_layers(config.layers, num_layers), config.window, num_layers)
        return StagePlan(windows, windows, _window_labels(windows, "layer", "layers"),
                         lambda analysis, tf, units: (FastEngine if fast else NaiveEngine)(analysis, tf),
                         lambda analysis, engine, w, unit, knockout, n: analysis.generate(
                             n, analysis.plan(windows[w], [knockout]))[0], takes_knockouts=True)


class VisionEncoderStage(Stage):
    def check(self, config) -> None:
        super().check(config)
        if config.block_from != "all":
            raise UsageError("--block-from answer restricts decoder queries; in the vision encoder every other patch "
                             "of the image is blocked from the unit; drop it")

    def plan(self, loaded, config, fast: bool) -> StagePlan:  # --layers and --window count the vision tower's layers
        from .config import parse_layers, windows_for
        from .engines.vit import NaiveVisionEncoderEngine, VisionEncoderEngine

        depth = loaded.adapter.vision_depth
        try:
            windows = windows_for(parse_layers(config.layers, depth), config.window, depth)
        except UsageError as error:
            raise UsageError(f"{error} (with --stage vision-encoder, layers are the vision tower's {depth})") from None

        def generate(analysis, engine, w, unit, knockout, n):
            with engine.knocked_out(windows[w], unit):
                return analysis.generate(n)[0]

        return StagePlan(windows, windows, _window_labels(windows, "ViT layer", "ViT layers"),
                         lambda analysis, tf, units: (VisionEncoderEngine if fast else NaiveVisionEncoderEngine)(
                             analysis, tf, units), generate)


class PixelStage(Stage):
    def check(self, config) -> None:
        super().check(config)
        if config.layers != "all" or config.window != 1 or config.block_from != "all":
            raise UsageError("--stage pixels occludes the image before the model: it has no layers, so --layers, "
                             "--window and --block-from do not apply; drop them")

    def plan(self, loaded, config, fast: bool) -> StagePlan:  # occlusion has no layers: one row, the whole model
        from .engines.pixels import NaivePixelEngine, PixelEngine

        windows = [(0, loaded.adapter.num_layers - 1)]
        return StagePlan(windows, windows, [f"occluded ({config.fill})"],
                         lambda analysis, tf, units: (PixelEngine if fast else NaivePixelEngine)(
                             analysis, tf, config.fill, units),
                         lambda analysis, engine, w, unit, knockout, n: analysis.generate(
                             n, pixel_values=engine.occluded(unit))[0])


class DeepStackStage(Stage):
    def check(self, config) -> None:
        super().check(config)
        if config.layers != "all" or config.window != 1 or config.block_from != "all":
            raise UsageError("--stage deepstack removes features where the model adds them (its rows are the "
                             "DeepStack levels and the main embedding), so --layers, --window and --block-from do "
                             "not apply; drop them")

    def plan(self, loaded, config, fast: bool) -> StagePlan:
        from .engines.deepstack import (DeepStackEngine, NaiveDeepStackEngine, deepstack_routes, route_label,
                                        route_window)

        levels, num_layers = loaded.adapter.deepstack_levels, loaded.adapter.num_layers
        routes = deepstack_routes(levels, num_layers)

        def generate(analysis, engine, w, unit, knockout, n):
            with engine.hooked(routes[w], unit):
                return analysis.generate(n)[0]

        return StagePlan(routes, [route_window(route, levels, num_layers) for route in routes],
                         [route_label(route) for route in routes],
                         lambda analysis, tf, units: (DeepStackEngine if fast else NaiveDeepStackEngine)(analysis, tf),
                         generate)


PATCH_UNITS = "patch, token, region:N, image or groups"
STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    DecoderStage("decoder", estimable=True, images_only=False),
    VisionEncoderStage("vision-encoder", "knocks out image patches in the vision encoder", on_patches=True,
                       unit_kinds=PATCH_UNITS),
    PixelStage("pixels", "occludes image patches", on_patches=True, unit_kinds=PATCH_UNITS, has_layers=False),
    DeepStackStage("deepstack", "removes image features", unit_kinds="token, region:N, image or groups",
                   has_layers=False),
)}


def stage_plan(loaded, config) -> StagePlan:
    """The plan of ``config.stage`` for this model; the stage's availability and the layer options are checked
    here, before any work."""
    if config.stage not in loaded.adapter.stages:
        why = {"deepstack": " (it has no DeepStack)", "vision-encoder": " (its ViT knockout is not defined for it)"}
        raise UsageError(f"--stage {config.stage} is not available for {loaded.adapter.name} models"
                         f"{why.get(config.stage, '')}; it supports --stage {', '.join(loaded.adapter.stages)}")
    return STAGES[config.stage].plan(loaded, config, config.engine == "fast")
