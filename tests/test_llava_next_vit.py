"""The ViT knockout (``--stage vision-encoder``) for LLaVA-NeXT (``llava_next``): one CLIP sequence per view.

Each view of a picture (the base view, then the tiles row-major over the canvas) is its own sequence of the tower,
CLS first, then the view's patches row by row; the prompt's views are one batch, image after image. A unit is the
set of patches occlusion names (a token's patch, a region's, an image's over all its views); its knockout blocks, in
each view's sequence, every other position, CLS included, from the unit's patches of that view, at the blocks of
the window (the tiny tower: 3 CLIP blocks, features of layer −2, so blocks 0 and 1 are the rows). The tests: no
knockout is the model as loaded, bit for bit, and a window leaves the blocks below it bit-identical; a knockout at
every block == the model's forward with its tower's attention written out in the test, view by view
(``tests.support.tower_by_hand``, the tower's batch element b being view b of the prompt); fast == naive over
pictures of 3 and 5 views (``pixel_values`` padded to 5) for every unit kind; bad input is one line.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from mask_impact.cli import main
from mask_impact.engine import Analysis
from mask_impact.engines.vit import NaiveVisionEncoderEngine, VisionEncoderEngine, VisionPlan
from mask_impact.inputs import build_prompt
from mask_impact.units import build_units
from tests.support import TINY_PROMPT, cli_error, tiny_argv, tower_by_hand, tower_pass

PROMPT = TINY_PROMPT  # the prompt tiny_argv gives
PER_VIEW = 16  # a 64-px view of 16-px patches: 4×4


@pytest.fixture(scope="module")
def two(next_model, next_pictures):
    """The 3-view and the 5-view picture in one prompt: 8 sequences of 17 (CLS + 4×4) in the tower's batch."""
    prompt = build_prompt(next_model, "What is in the picture?", next_pictures[:2])
    analysis = Analysis(next_model, prompt)
    _, tf = analysis.baseline(2)
    assert [image.grid_thw for image in prompt.images] == [[3, 4, 4], [5, 4, 4]]
    return prompt, analysis, tf


def _units(next_model, prompt, analysis, unit: str) -> list:
    config = SimpleNamespace(unit=unit, groups=[], flows=[], mask_mode="vision", stage="vision-encoder")
    return build_units(prompt, next_model.tokenizer, config, analysis.answer_start)


def _removed(unit, views: int = 8) -> list[set[int]]:
    """Per view of the tower's batch, the positions (after CLS) of the unit's patches: found from the patch rows
    (16 a view, view after view, image after image), independently of the code's sequences."""
    removed = [set() for _ in range(views)]
    for row in unit.patches:
        removed[row // PER_VIEW].add(1 + row % PER_VIEW)
    return removed


def test_no_knockout_is_native_and_a_window_leaves_the_blocks_below_it_bit_identical(next_model, two):
    """The model's forward through the registered ViT attention with no plan, or a plan that blocks nothing in any
    of the 8 views, is the model as loaded, bit for bit (every block's input over every view, the logits); the
    naive engine's baseline is the model's own (≤ 1e-5: its decoder's attention is written out). A knockout at ViT
    layer 1 leaves the inputs of blocks 0 and 1 bit-identical and changes block 2's; one at block 2 (after the
    feature layer, −2) changes nothing."""
    prompt, analysis, tf = two
    adapter = next_model.adapter
    feature_layer = next_model.model.config.vision_feature_layer
    assert (len(adapter.vision_layers), adapter.vision_depth, feature_layer) == (3, 2, -2)
    native = tower_pass(next_model, tf, registered=False)
    assert native[0][0].shape[:2] == (8, 17)  # 3 + 5 views, CLS + 16 patches each
    for plan in (None, VisionPlan(range(3), [None] * 8)):
        blocks, logits = tower_pass(next_model, tf, plan)
        assert all(torch.equal(a, b) for a, b in zip(native[0], blocks)) and torch.equal(native[1], logits)
    unit = _units(next_model, prompt, analysis, "token")[20]  # image 0's first tiles
    engine = NaiveVisionEncoderEngine(analysis, tf, [unit])
    expected = torch.log_softmax(native[1][0, tf.answer_positions].float(), dim=-1)
    assert (engine.base_logprobs - expected).abs().max() <= 1e-5  # its decoder's attention written out
    blocks, logits = tower_pass(next_model, tf, engine.plan_for((1, 1), unit))
    assert torch.equal(blocks[0], native[0][0]) and torch.equal(blocks[1], native[0][1])
    assert not torch.equal(blocks[2], native[0][2]) and not torch.equal(logits, native[1])
    changed = [view for view in range(8) if not torch.equal(blocks[2][view], native[0][2][view])]
    assert changed == [row // PER_VIEW for row in unit.patches]  # only the view holding the patch
    _, logits = tower_pass(next_model, tf, engine.plan_for((2, 2), unit))
    assert torch.equal(logits, native[1])


def test_a_knockout_at_every_block_equals_attention_written_out_view_by_view(next_model, two):
    """A base token, a tile token of the 5-view picture's last tile, a 3×3 region of the tile map that spans two
    tiles and the whole first image (all three views) knocked out at blocks 0 and 1 == the model's forward with its
    tower's attention written out in the test at every block: in each view, every position (CLS included) loses
    that view's share of the unit's patches but a patch itself, CLS never removed. Exempting CLS's query gives
    another answer. Fast == naive == that; both images' units in one batch: fast == naive."""
    prompt, analysis, tf = two
    tokens, regions = _units(next_model, prompt, analysis, "token"), _units(next_model, prompt, analysis, "region:3")
    image = _units(next_model, prompt, analysis, "image")[0]
    spanning = next(u for u in regions if u.image == 0 and len({row // PER_VIEW for row in u.patches}) == 2)
    last = max(n for n, u in enumerate(tokens) if u.image == 1)
    picked = [tokens[5], tokens[last], spanning, image]
    assert [sorted({row // PER_VIEW for row in u.patches}) for u in picked] == [[0], [7], [1, 2], [0, 1, 2]]
    naive, fast = NaiveVisionEncoderEngine(analysis, tf, picked), VisionEncoderEngine(analysis, tf, picked)
    for n, unit in enumerate(picked):
        reference = tower_by_hand(next_model, tf, _removed(unit))
        assert (naive.logprobs((0, 1), [unit])[0] - reference).abs().max() <= 1e-5, n
        assert (fast.logprobs((0, 1), [unit])[0] - reference).abs().max() <= 2e-5, n
        assert (reference - naive.base_logprobs).abs().max() > 1e-4, n
        if n == 0:
            assert (tower_by_hand(next_model, tf, _removed(unit), exempt=frozenset({0})) - reference).abs().max() > 1e-6
    assert (fast.logprobs((1, 1), picked) - naive.logprobs((1, 1), picked)).abs().max() <= 2e-5  # one batch


def test_fast_equals_naive_for_every_unit_kind(next_model, next_pictures):
    """The unpadded 40×128 picture beside the 3-view one: the tower re-run from the window's first block on a batch
    of copies of one image's views, packed, then the decoder from the image's first position == one whole-model
    forward per unit, for a spread of patches, tokens, regions and both images, at every window of one block and
    over both blocks; every unit acts."""
    prompt = build_prompt(next_model, "What is in the picture?", [next_pictures[0], next_pictures[2]])
    assert prompt.images[1].layout["cols"] == [1, 2]
    analysis = Analysis(next_model, prompt)
    _, tf = analysis.baseline(2)
    units = [u for kind, step in (("patch", 23), ("token", 17), ("region:2", 7), ("image", 1))
             for u in _units(next_model, prompt, analysis, kind)[::step]]
    assert {u.image for u in units} == {0, 1} and {u.kind for u in units} == {"patch", "token", "region", "image"}
    fast, naive = VisionEncoderEngine(analysis, tf, units), NaiveVisionEncoderEngine(analysis, tf, units)
    for window in ((0, 0), (1, 1), (0, 1)):
        expected = naive.logprobs(window, units)
        assert (fast.logprobs(window, units) - expected).abs().max() <= 2e-5, window
        assert ((expected - naive.base_logprobs).abs().amax(dim=(1, 2)) > 1e-6).all(), window


def test_vit_from_the_command_line(next_folder, next_pictures, in_tmp, capsys):
    assert main(tiny_argv(next_folder, "--image", next_pictures[0], "--stage", "vision-encoder", "--unit", "region:2",
                          "--output", "v", generate_top=1), True) == 0, capsys.readouterr().err
    data = json.loads((in_tmp / "output" / "v.json").read_text())
    assert data["stage"] == "vision-encoder" and data["window_labels"] == ["ViT layer 0", "ViT layer 1"]
    newlines = {t["index"] for t in data["tokens"] if t.get("part") == "newline"}
    assert len(newlines) == 4 and not any(set(u["keys"]) & newlines for u in data["units"])
    assert [u["label"].split(" ")[1] for u in data["units"]] == ["base"] * 4 + ["tiles"] * 8
    kl = [value for row in data["metrics"]["kl"] for value in row]
    assert min(kl) >= -1e-6 and max(kl) > 0
    assert len(data["generations"]) == 1  # generated under the knockout


def test_bad_input_is_one_line(next_folder, next_model, next_pictures, in_tmp, capsys):
    err = cli_error(capsys, tiny_argv(next_folder, "--image", next_pictures[0], "--stage", "vision-encoder",
                                      "--layers", "2", "--output", "w", generate_top=1))
    assert ("layers are the vision tower's 2 below its feature layer (vision_feature_layer -2; the blocks after it "
            "change nothing)") in err
    prompt = build_prompt(next_model, PROMPT, [next_pictures[0]])
    newline = next(t.index for t in prompt.tokens if t.part == "newline")
    err = cli_error(capsys, tiny_argv(next_folder, "--image", next_pictures[0], "--stage", "vision-encoder",
                                      "--unit", "groups", "--group", f"nl=pos:{newline}", "--output", "g",
                                      generate_top=1))
    assert "--group nl holds no image patch (an image newline token has no pixels)" in err
    assert not (in_tmp / "output").exists() or not any((in_tmp / "output").iterdir())
