"""The method inside the vision encoder: on the trained ViT demo (models/demo-vl-vit), ViT knockouts find the route
planted there.

Its decoder was trained to read only the top-left image token, and the shape is never in that cell, so the colour
can reach the answer only through the vision tower's attention, from the shape's patches to the top-left token's
(tools/train_demo_models.py, ``--only vl-vit``). On fresh pictures (seed 4242; training drew from 1234, its
held-out checks from 1235 and 1236, its card from 777), knocking out the 2×2 patches of the shape's token at every
ViT layer costs the colour most, and a ViT knockout of a patch far from the shape changes next to nothing.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from mask_impact.demo_tasks import QUESTIONS, draw_shape, draw_shape_example_off
from mask_impact.engine import Analysis
from mask_impact.inputs import build_prompt
from mask_impact.metrics import logprob_drop
from mask_impact.models import load_model
from mask_impact.engines.vit import NaiveVisionEncoderEngine, VisionEncoderEngine
from mask_impact.units import build_units
from tests.support import ROOT

pytestmark = pytest.mark.slow

SEED = 4242


@pytest.fixture(scope="module")
def trained():
    return load_model(str(ROOT / "models" / "demo-vl-vit"), True, device="cpu", dtype="float32")


def _units(loaded, prompt, unit: str):
    config = SimpleNamespace(unit=unit, groups=[], flows=[], mask_mode="vision", stage="vision-encoder")
    return build_units(prompt, loaded.tokenizer, config, prompt.length - 1)


def _setup(loaded, example, folder, unit: str):
    path = folder / "picture.png"
    example.image.save(path)
    prompt = build_prompt(loaded, QUESTIONS["colour"], [str(path)])
    analysis = Analysis(loaded, prompt)
    baseline, tf = analysis.baseline(3)
    units = _units(loaded, prompt, unit)
    return prompt, analysis, baseline, tf, units


def _shape_token(prompt, units, example) -> int:
    return next(i for i, unit in enumerate(units)
                if (prompt.tokens[unit.keys[0]].row, prompt.tokens[unit.keys[0]].col) == (example.row, example.col))


def test_the_shapes_token_costs_the_colour_most_among_vit_token_knockouts(trained, tmp_path):
    depth = len(trained.model.model.visual.blocks)
    assert depth >= 2 and trained.model.model.visual.blocks[0].attn.proj.weight.abs().sum() > 0  # live attention
    rng, count, correct, first, margins = random.Random(SEED), 20, 0, 0, []
    for _ in range(count):
        example = draw_shape_example_off(rng)
        prompt, analysis, baseline, tf, units = _setup(trained, example, tmp_path, "token")
        correct += baseline.text.strip() == example.colour
        engine = VisionEncoderEngine(analysis, tf, units)
        drops = logprob_drop(engine.base_logprobs, engine.logprobs((0, depth - 1), units), tf.answer_ids)
        shape = _shape_token(prompt, units, example)
        others = torch.cat([drops[:shape], drops[shape + 1:]])
        first += bool(drops[shape] > others.max())
        margins.append(round((drops[shape] - others.max()).item(), 2))
    assert correct >= 19, correct  # the model does answer these pictures natively
    assert first >= 0.9 * count, (first, margins)


def test_a_vit_knockout_of_a_far_patch_barely_changes_the_answer_and_one_of_the_shapes_token_destroys_it(
        trained, tmp_path):
    example = draw_shape("red", "circle", 3, 3)  # the bottom-right cell: patches 6..7 × 6..7
    prompt, analysis, baseline, tf, patches = _setup(trained, example, tmp_path, "patch")
    assert baseline.text.strip() == "red"
    depth = len(trained.model.model.visual.blocks)
    window = (0, depth - 1)
    far = [next(unit for unit in patches if unit.label == "image1 p7,0")]  # the bottom-left corner
    tokens = _units(trained, prompt, "token")
    shape = [tokens[_shape_token(prompt, tokens, example)]]
    rows = {}
    for name, units in (("far", far), ("shape", shape)):
        engine = VisionEncoderEngine(analysis, tf, units)
        base, rows[name] = engine.base_logprobs, engine.logprobs(window, units)
        naive = NaiveVisionEncoderEngine(analysis, tf, units)  # the fast engine agrees with the oracle here too
        assert (naive.logprobs(window, units) - rows[name]).abs().max() <= 2e-5, name
    drop = {name: logprob_drop(base, row, tf.answer_ids).item() for name, row in rows.items()}
    assert abs(drop["far"]) < 0.05, drop
    assert drop["shape"] > 2.0, drop
    none = trained.tokenizer.encode("none")[0]
    assert rows["shape"][0, 0].argmax().item() == none  # with its patches cut off, the picture reads as empty
