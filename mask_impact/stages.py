"""Each stage's plan for a loaded model: its rows, engines and generation (the stages themselves: options.py).

    decoder          attention knockouts in the decoder, over windows of its layers (engines/decoder.py)
    vision-encoder   attention knockouts between an image's patches in the ViT, over windows of its layers
                     (engines/vit.py)
    pixels           occlusion of the image the model sees: one row, the whole model (engines/pixels.py)
    deepstack        DeepStack features or the main embedding removed: one row per route (engines/deepstack.py)

``options.STAGES`` says what each stage removes and which options apply to it (checked before the model loads);
each engine module's ``plan`` gives, for a loaded model and a run's settings, the rows of the result (layer
windows, or routes), their names, how to make its fast or naive engine and how to generate under one of its cells
(``engines.base.StagePlan``). ``sweep.run``, the configuration's checks and the benchmarks all go through these;
nothing else tests a stage's name.

Adding a stage is one engine module under ``engines/`` with its ``plan``, its row in ``options.STAGES`` and in
``PLANS`` here, the family adapters that support it listing it in their ``stages``, and its tests
(docs/DESIGN.md §7).
"""

from __future__ import annotations

from .engines import decoder, deepstack, pixels, vit
from .engines.base import StagePlan
from .errors import UsageError, mention
from .options import STAGES

PLANS = {"decoder": decoder.plan, "vision-encoder": vit.plan, "pixels": pixels.plan, "deepstack": deepstack.plan}


def check_available(loaded, config) -> None:
    """The model's family supports ``config.stage`` (checked as soon as the model is loaded, before the prompt)."""
    if config.stage not in loaded.adapter.stages:
        why = {"deepstack": "it has no DeepStack", "vision-encoder": "its ViT knockout is not defined for it"}
        why = loaded.adapter.stage_notes.get(config.stage, why.get(config.stage))
        raise UsageError(f"{mention('stage', config.stage)} is not available for {loaded.adapter.name} models"
                         f"{f' ({why})' if why else ''}; it supports {mention('stage')} "
                         f"{', '.join(loaded.adapter.stages)}")


def stage_plan(loaded, config) -> StagePlan:
    """The plan of ``config.stage`` for this model; the stage's availability and the layer options are checked
    here, before any work."""
    check_available(loaded, config)
    return PLANS[STAGES[config.stage].name](loaded, config, config.engine == "fast")
