"""Occlusion (``--stage pixels``) for LLaVA-OneVision (``llava_onevision``): LLaVA-NeXT's views, a pooled tile map,
and one padded square per image when a prompt has several.

A token's pixels are the patches it is made of: a base token's patch, an unpooled tile token's cell, a pooled tile
token's the cells its bilinear sample reads with a weight above zero (``bilinear_taps``), a padded square's token its
patch; a newline has none. The tests: the taps are exactly the cells the model's own ``pack_image_features`` makes a
pooled token from (by autograd, independently of the code); occluding a pooled token is the model's forward on the
processor's ``pixel_values`` with those cells filled by hand; fast == naive for every fill on a pooled picture, an
unpooled one and a prompt of several pictures; the mean of a padded square is its patches that show the picture; the
command line.
"""

from __future__ import annotations

import json

import pytest
import torch

from mask_impact.cli import main
from mask_impact.engine import Analysis
from mask_impact.engines.pixels import FILLS, NaivePixelEngine, PixelEngine
from mask_impact.families.llava_next import layout_patches
from mask_impact.inputs import build_prompt
from mask_impact.models import load_model
from tests.support import TINY_PROMPT, draw_image, model_logprobs, pixel_stage_units, tiny_argv
from tests.tiny import build_tiny

PROMPT = TINY_PROMPT


@pytest.fixture(scope="module")
def ov_folder(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("ov_pixels"), "llava_onevision")


@pytest.fixture(scope="module")
def ov(ov_folder):
    return load_model(str(ov_folder), True, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """300×70 (a 4×20 kept map pooled to 3×17), 128×64 (a 4×8 map, not pooled), 50×150 (a tall one)."""
    folder = tmp_path_factory.mktemp("ov_pictures")
    return [str(draw_image(folder / f"{n}.png", w, h, seed=n)) for n, (w, h) in enumerate([(300, 70), (128, 64),
                                                                                            (50, 150)])]


def test_a_pooled_tile_token_is_made_of_the_cells_the_model_pools_it_from(ov, pictures):
    """For every tile token of the 300×70 picture (pooled 4×20 → 3×17), the cells of the views whose features its
    packed feature depends on (the gradient of the model's own ``pack_image_features`` through random features) are
    exactly ``layout_patches``' cells; a pooled token reads 1 to 4 cells and together they read every kept cell."""
    prompt = build_prompt(ov, PROMPT, [pictures[0]])
    layout = prompt.images[0].layout
    assert layout["pooled"] and layout["out"] == [3, 17] and (len(layout["rows"]), len(layout["cols"])) == (4, 20)
    grid, views = layout["base_grid"], prompt.images[0].grid_thw[0]
    features = torch.randn(views, grid * grid, 8, requires_grad=True)
    inner = ov.model.model
    packed, _ = inner.pack_image_features([features], torch.tensor([[70, 300]]), image_newline=torch.zeros(8),
                                          vision_aspect_ratio=ov.model.config.vision_aspect_ratio)
    packed = packed[0]
    tokens = [t for t in prompt.tokens if t.modality == "vision" and t.image == 0]
    assert packed.shape[0] == len(tokens)
    read = set()
    for n, tok in enumerate(tokens):
        (gradient,) = torch.autograd.grad(packed[n].sum(), features, retain_graph=True)
        cells = {(v, *divmod(k, grid)) for v, k in torch.nonzero(gradient.abs().sum(-1)).tolist()}
        assert cells == set(layout_patches(layout, n)), (n, tok.part)
        if tok.part == "tiles":
            assert 1 <= len(cells) <= 4
            read |= cells
    kept = {(1 + (r // grid) * layout["tiles"][0] + c // grid, r % grid, c % grid) for r in layout["rows"]
            for c in layout["cols"]}
    assert read == kept


def test_occluding_a_pooled_token_is_the_model_on_its_cells_filled_by_hand(ov, pictures):
    """Black over a pooled tile token's cells (found here from the model's map: the kept rows and columns each
    sample reads), set by hand in the processor's ``pixel_values``: the model's own forward == naive == fast; a
    region of pooled tokens holds each shared cell once."""
    prompt = build_prompt(ov, PROMPT, [pictures[0]])
    analysis = Analysis(ov, prompt)
    _, tf = analysis.baseline(2)
    pixels, p = tf.model_kwargs["pixel_values"], ov.adapter.patch_size  # (1, views, C, 64, 64)
    layout, grid = prompt.images[0].layout, ov.adapter.tile // p
    tokens = pixel_stage_units(ov, prompt, analysis, "token")
    cells = [t for t in prompt.tokens if t.modality == "vision" and t.part != "newline"]
    assert [u.keys for u in tokens] == [[t.index] for t in cells]
    picked = [n for n, t in enumerate(cells) if t.part == "tiles" and (t.row, t.col) in ((0, 0), (1, 7), (2, 16))]
    black = (0.0 - torch.tensor(ov.processor.image_processor.image_mean)) / torch.tensor(
        ov.processor.image_processor.image_std)
    expected = []
    for n in picked:
        tok = cells[n]
        # sample i of a bilinear resize from `size` to `out` reads floor(s) and floor(s) + 1 around
        # s = (i + 0.5) · size / out − 0.5 (clamped at 0), the second only where it has a weight
        def taps(i, size, out):
            s = max((i + 0.5) * size / out - 0.5, 0.0)
            low = int(s)
            return [low] + ([low + 1] if low + 1 < size and s > low else [])
        by_hand = pixels.clone()
        for r in taps(tok.row, len(layout["rows"]), layout["out"][0]):
            for c in taps(tok.col, len(layout["cols"]), layout["out"][1]):
                row, col = layout["rows"][r], layout["cols"][c]
                view = 1 + (row // grid) * layout["tiles"][0] + col // grid
                by_hand[0, view, :, (row % grid) * p:(row % grid + 1) * p, (col % grid) * p:(col % grid + 1) * p] = \
                    black[:, None, None]
        expected.append(model_logprobs(ov, tf, by_hand))
        assert len(tokens[n].patches) == int((by_hand != pixels).any(dim=2).sum()) // (p * p)
    expected = torch.stack(expected)
    units = [tokens[n] for n in picked]
    fast, naive = PixelEngine(analysis, tf, "black", tokens), NaivePixelEngine(analysis, tf, "black", tokens)
    assert (naive.base_logprobs - model_logprobs(ov, tf, pixels)).abs().max() <= 1e-5
    assert (naive.logprobs(None, units) - expected).abs().max() <= 2e-5
    assert (fast.logprobs(None, units) - expected).abs().max() <= 2e-5
    assert ((expected - naive.base_logprobs).abs().amax(dim=(1, 2)) > 1e-5).all()
    regions = [u for u in pixel_stage_units(ov, prompt, analysis, "region:2") if prompt.tokens[u.keys[0]].part == "tiles"]
    assert all(len(set(u.patches)) == len(u.patches) for u in regions)
    assert any(len(u.patches) < 4 * len(u.keys) for u in regions)  # neighbours share cells


@pytest.mark.parametrize("which", ["pooled", "unpooled", "several"])
def test_occlusion_fast_equals_naive_for_every_fill(ov, pictures, which):
    """The tower on a batch of occluded copies and the decoder from the image's first position == one whole-model
    forward per unit, for every fill and unit kind: a pooled picture, an unpooled one, and two pictures in one prompt
    (one padded square each: a lone occluded copy runs beside a copy of itself)."""
    images = {"pooled": [pictures[0]], "unpooled": [pictures[1]], "several": pictures[1:]}[which]
    prompt = build_prompt(ov, PROMPT, images)
    assert bool(prompt.images[0].layout.get("pooled")) == (which == "pooled")
    assert ("square" in prompt.images[0].layout) == (which == "several")
    analysis = Analysis(ov, prompt)
    _, tf = analysis.baseline(2)
    units = [u for kind, step in (("token", 11), ("region:2", 5), ("patch", 23), ("image", 1))
             for u in pixel_stage_units(ov, prompt, analysis, kind)[::step]]
    assert {u.image for u in units} == set(range(len(images)))
    for fill in FILLS:
        fast, naive = PixelEngine(analysis, tf, fill, units), NaivePixelEngine(analysis, tf, fill, units)
        expected = naive.logprobs(None, units)
        assert (fast.logprobs(None, units) - expected).abs().max() <= 2e-5, fill
        assert ((expected - naive.base_logprobs).abs().amax(dim=(1, 2)) > 1e-5).all(), fill
    lone = units[:1]  # one acting copy of one image of the pair
    fast, naive = PixelEngine(analysis, tf, "black", lone), NaivePixelEngine(analysis, tf, "black", lone)
    assert (fast.logprobs(None, lone) - naive.logprobs(None, lone)).abs().max() <= 2e-5


def test_the_mean_of_a_padded_square_is_its_patches_that_show_the_picture(ov, pictures):
    """50×150 beside 128×64: the tall picture padded to a 150-px square, 50 px each side; in its 4×4 view the first
    and last columns of patches are wholly padding (0 to 37.5 px and 112.5 to 150 px of the square) and are left out
    of the mean colour, the middle two columns make it."""
    prompt = build_prompt(ov, PROMPT, pictures[1:])
    analysis = Analysis(ov, prompt)
    _, tf = analysis.baseline(1)
    assert prompt.images[1].layout["offset"] == [50, 0]
    units = pixel_stage_units(ov, prompt, analysis, "image")
    engine = PixelEngine(analysis, tf, "mean", units)
    view, p = tf.model_kwargs["pixel_values"][1, 0], ov.adapter.patch_size  # (C, 64, 64)
    colour = view[:, :, p:3 * p].double().mean(dim=(1, 2)).float()
    got = engine.filler.values(units[1].patches, 0)
    assert torch.equal(got, colour[None, :, None].expand(len(units[1].patches), -1, p * p).reshape(got.shape))
    assert (colour - view.double().mean(dim=(1, 2)).float()).abs().max() > 1e-3  # the padding would move it


def test_occlusion_from_the_command_line(ov_folder, pictures, in_tmp, capsys):
    assert main(tiny_argv(ov_folder, "--image", pictures[0], "--stage", "pixels", "--unit", "patch", "--fill", "blur",
                          "--output", "o", generate_top=1), True) == 0, capsys.readouterr().err
    data = json.loads((in_tmp / "output" / "o.json").read_text())
    assert data["stage"] == "pixels" and data["window_labels"] == ["occluded (blur)"]
    layout = data["images"][0]["layout"]
    units = data["units"]
    # every patch once: the 4×4 base view and the 4×20 kept cells the 3×17 pooled tokens read
    assert len(units) == 16 + len(layout["rows"]) * len(layout["cols"]) == 96
    assert len({tuple(u["patches"]) for u in units}) == len(units)
    shared = [u for u in units if len(u["keys"]) > 1]  # a cell read by neighbouring pooled tokens
    assert shared and all(len(u["keys"]) <= 4 for u in units)
    kl = [value for row in data["metrics"]["kl"] for value in row]
    assert min(kl) >= -1e-6 and max(kl) > 0


def test_occlusion_of_two_pictures_from_the_command_line_generates_under_the_fill(ov_folder, ov, pictures, in_tmp,
                                                                                 capsys):
    """Two pictures in one prompt, a unit per image: the top unit's generation is the model's own greedy decoding on
    its occluded ``pixel_values`` (one padded square per image)."""
    assert main(tiny_argv(ov_folder, "--image", pictures[1], "--image", pictures[2], "--stage", "pixels", "--unit",
                          "image", "--fill", "black", "--output", "two", generate_top=2), True) == 0, \
        capsys.readouterr().err
    data = json.loads((in_tmp / "output" / "two.json").read_text())
    assert [u["label"] for u in data["units"]] == ["image1", "image2"]
    assert [u["image"] for u in data["units"]] == [0, 1]
    prompt = build_prompt(ov, PROMPT, pictures[1:])
    analysis = Analysis(ov, prompt)
    _, tf = analysis.baseline(2)
    units = pixel_stage_units(ov, prompt, analysis, "image")
    engine = NaivePixelEngine(analysis, tf, "black", units)
    generations = {g["unit"]: g for g in data["generations"]}
    assert sorted(generations) == [0, 1]
    for unit in units:
        kwargs = dict(prompt.model_kwargs, pixel_values=engine.occluded(unit))
        with torch.no_grad():
            native = ov.model.generate(input_ids=prompt.input_ids, attention_mask=torch.ones_like(prompt.input_ids),
                                       **kwargs, max_new_tokens=2, do_sample=False,
                                       suppress_tokens=analysis.placeholder_ids() or None)[0, prompt.length:]
        assert generations[unit.index]["token_ids"] == native.tolist()


def test_a_group_of_newlines_alone_is_one_line(ov_folder, ov, pictures, in_tmp, capsys):
    """A group of image newlines holds no pixels: one line, exit 2, nothing written."""
    from tests.support import cli_error

    prompt = build_prompt(ov, PROMPT, [pictures[0]])
    newline = next(t.index for t in prompt.tokens if t.part == "newline")
    err = cli_error(capsys, tiny_argv(ov_folder, "--image", pictures[0], "--stage", "pixels", "--unit", "groups",
                                      "--group", f"nl=pos:{newline}", "--output", "g"))
    assert "--group nl holds no image patch (an image newline token has no pixels)" in err
    assert not (in_tmp / "output").exists() or not any((in_tmp / "output").iterdir())
