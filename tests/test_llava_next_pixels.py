"""Occlusion (``--stage pixels``) for LLaVA-NeXT (``llava_next``): a base view and tiles per picture.

A token's pixels are its patch: a base token's of the base view, a tile token's the cell of the canvas it was cut
from (its tile, row-major over the canvas, then the cell inside it); a newline token has none and is no unit. The
tests: occluding a token is the model's own forward on the processor's ``pixel_values`` with that patch filled by
hand (the view and cell found here from the layout, independently of the code); two pictures of different tile
counts (``pixel_values`` padded to the most views) round-trip; fast == naive for every fill and unit kind; the mean
colour is the base view's and the blur runs over the base view and over the tiles' whole canvas; a fill equal to the
pixels is the baseline bit for bit; bad input is one line.
"""

from __future__ import annotations

import json

import torch

from mask_impact.cli import main
from mask_impact.engine import Analysis
from mask_impact.engines.pixels import FILLS, NaivePixelEngine, PixelEngine
from mask_impact.inputs import build_prompt
from tests.support import TINY_PROMPT, cli_error, model_logprobs, pixel_stage_units, tiny_argv

PROMPT = TINY_PROMPT  # the prompt tiny_argv gives


def _view_cell(prompt, tok, grid: int) -> tuple[int, int, int]:
    """(view, row, column) of the patch of a vision token in the processor's ``pixel_values[image]``."""
    if tok.t == 0:
        return 0, tok.row, tok.col
    layout = prompt.images[tok.image].layout
    r, c = layout["rows"][tok.row], layout["cols"][tok.col]  # the kept map's cell on the canvas
    return 1 + (r // grid) * layout["tiles"][0] + c // grid, r % grid, c % grid


def test_occlusion_is_the_model_on_the_views_with_the_patch_filled_by_hand(next_model, next_pictures):
    """Two pictures of 3 and 5 views: ``pixel_values`` is padded to 5 views for both; the patch rows are each
    image's own views, and their inverse gives the model the same answer. Occluding a base token, a tile token and
    a tile token of the second picture's last tile (black) is the model's forward with that patch set to black by
    hand; a patch unit (mean) is the same with the base view's mean colour; fast == naive == that."""
    prompt = build_prompt(next_model, "What is in the picture?", next_pictures[:2])
    analysis = Analysis(next_model, prompt)
    _, tf = analysis.baseline(2)
    pixels, p = tf.model_kwargs["pixel_values"], next_model.adapter.patch_size  # (2, 5, C, 64, 64)
    grid = next_model.adapter.tile // p
    assert [image.grid_thw[0] for image in prompt.images] == [3, 5] and pixels.shape[:2] == (2, 5)
    rows = next_model.adapter.patch_rows(pixels, next_model.adapter.grid_of(prompt))
    assert rows.shape[0] == (3 + 5) * grid * grid
    assert torch.equal(next_model.adapter.pixel_values_of(rows), torch.cat([pixels[0, :3], pixels[1]]))
    assert torch.equal(rows[(3 + 2) * grid * grid + grid + 3], pixels[1, 2, :, p:2 * p, 3 * p:4 * p].reshape(-1))

    tokens = pixel_stage_units(next_model, prompt, analysis, "token")
    vision = [t for t in prompt.tokens if t.modality == "vision"]
    cells = [t for t in vision if t.part != "newline"]
    assert [u.keys for u in tokens] == [[t.index] for t in cells]  # every token with pixels, no newline
    assert [u.box for u in tokens] == [t.box for t in cells] and all(len(u.patches) == 1 for u in tokens)
    processor = next_model.processor.image_processor
    black = (0.0 - torch.tensor(processor.image_mean)) / torch.tensor(processor.image_std)  # (C,)
    chosen = [5, next(n for n, t in enumerate(cells) if t.image == 0 and t.part == "tiles" and t.col == 5),
              max(n for n, t in enumerate(cells) if t.image == 1)]
    expected = []
    for n in chosen:
        view, r, c = _view_cell(prompt, cells[n], grid)
        by_hand = pixels.clone()
        by_hand[cells[n].image, view, :, r * p:(r + 1) * p, c * p:(c + 1) * p] = black[:, None, None]
        expected.append(model_logprobs(next_model, tf, by_hand))
    assert {_view_cell(prompt, cells[n], grid)[0] for n in chosen} == {0, 2, 4}
    expected = torch.stack(expected)
    picked = [tokens[n] for n in chosen]
    fast, naive = PixelEngine(analysis, tf, "black", tokens), NaivePixelEngine(analysis, tf, "black", tokens)
    assert (naive.base_logprobs - model_logprobs(next_model, tf, pixels)).abs().max() <= 1e-5  # the round trip
    assert (naive.logprobs(None, picked) - expected).abs().max() <= 2e-5
    assert (fast.logprobs(None, picked) - expected).abs().max() <= 2e-5
    assert ((expected - naive.base_logprobs).abs().amax(dim=(1, 2)) > 1e-5).all()  # each fill changes the answer

    patches = pixel_stage_units(next_model, prompt, analysis, "patch")
    unit = next(u for u in patches if u.label == "image2 t3 p1,2")  # tile 2 (bottom left) of the 90×90 picture
    by_hand = pixels.clone()
    by_hand[1, 3, :, p:2 * p, 2 * p:3 * p] = pixels[1, 0].double().mean(dim=(1, 2)).float()[:, None, None]
    expected = model_logprobs(next_model, tf, by_hand)[None]
    fast, naive = PixelEngine(analysis, tf, "mean", patches), NaivePixelEngine(analysis, tf, "mean", patches)
    assert (naive.logprobs(None, [unit]) - expected).abs().max() <= 2e-5
    assert (fast.logprobs(None, [unit]) - expected).abs().max() <= 2e-5
    layout = prompt.images[1].layout  # canvas 128×128, the picture resized to 128×128: no padding
    assert (layout["canvas"], layout["offset"]) == ([128, 128], [0, 0])
    assert unit.box == [round(v * 90 / 128, 2) for v in (2 * p, 64 + p, 3 * p, 64 + 2 * p)]


def test_occlusion_fast_equals_naive_for_every_fill(next_model, next_pictures):
    """The unpadded 40×128 picture beside the 3-view one: the tower on a batch of occluded copies and the decoder
    from the image's first position == one whole-model forward per unit, for every fill and unit kind (a spread of
    the tokens and regions of both pictures, both whole images)."""
    prompt = build_prompt(next_model, "What is in the picture?", [next_pictures[0], next_pictures[2]])
    assert prompt.images[1].layout["cols"] == [1, 2]
    analysis = Analysis(next_model, prompt)
    _, tf = analysis.baseline(2)
    units = [u for kind, step in (("token", 17), ("region:2", 7), ("image", 1))
             for u in pixel_stage_units(next_model, prompt, analysis, kind)[::step]]
    assert {u.image for u in units} == {0, 1} and {u.kind for u in units} == {"token", "region", "image"}
    for fill in FILLS:
        fast, naive = PixelEngine(analysis, tf, fill, units), NaivePixelEngine(analysis, tf, fill, units)
        expected = naive.logprobs(None, units)
        assert (fast.logprobs(None, units) - expected).abs().max() <= 2e-5, fill
        assert ((expected - naive.base_logprobs).abs().amax(dim=(1, 2)) > 1e-5).all(), fill  # every unit acts


def test_the_mean_is_the_base_views_and_the_blur_runs_over_the_tiles_canvas(next_model, next_pictures):
    """The mean fill is the base view's mean colour (the tiles' canvas carries padding); the blur fill is the base
    view blurred as one picture and the tiles blurred as the one canvas they were cut from (σ = one patch side),
    computed here with torchvision from the processor's ``pixel_values``."""
    from torchvision.transforms.functional import gaussian_blur

    prompt = build_prompt(next_model, "What is in the picture?", [next_pictures[2]])
    analysis = Analysis(next_model, prompt)
    _, tf = analysis.baseline(1)
    pixels, p = tf.model_kwargs["pixel_values"][0], next_model.adapter.patch_size  # (3, C, 64, 64)
    grid = next_model.adapter.tile // p
    units = pixel_stage_units(next_model, prompt, analysis, "image")
    mean = PixelEngine(analysis, tf, "mean", units).filler.values(units[0].patches, 0)
    colour = pixels[0].double().mean(dim=(1, 2)).float()
    assert torch.equal(mean, colour[None, :, None].expand(len(units[0].patches), -1, p * p).reshape(mean.shape))
    blurred = PixelEngine(analysis, tf, "blur", units).filler._blur(0)  # (3 · g², C·P·P)
    kernel, sigma = [63, 63], [float(p)] * 2  # 4·16 + 1 px, cut to odd and shorter than a 64-px side
    across, down = prompt.images[0].layout["tiles"]
    assert (across, down) == (1, 2)  # the 40×128 picture: two tiles, one above the other
    base = gaussian_blur(pixels[:1], kernel, sigma)[0]
    canvas = torch.cat([torch.cat(list(pixels[1 + i * across: 1 + (i + 1) * across]), dim=-1) for i in range(down)],
                       dim=-2)
    canvas = gaussian_blur(canvas[None], kernel, sigma)[0]  # (C, 128, 64)
    side = next_model.adapter.tile
    views = [base] + [canvas[:, i * side:(i + 1) * side, j * side:(j + 1) * side] for i in range(down)
                      for j in range(across)]
    for view, picture in enumerate(views):
        for r in range(grid):
            for c in range(grid):
                row = blurred[view * grid * grid + r * grid + c]
                assert (row - picture[:, r * p:(r + 1) * p, c * p:(c + 1) * p].reshape(-1)).abs().max() <= 1e-6
    alone = gaussian_blur(pixels[1:2], kernel, sigma)[0, :, -p:, :p].reshape(-1)  # the first tile blurred alone
    assert (blurred[grid * grid + (grid - 1) * grid] - alone).abs().max() > 1e-3  # its bottom sees the next tile


def test_an_occlusion_whose_fill_equals_the_pixels_changes_nothing(next_model, tmp_path):
    """A picture black on its left half: a black fill of a token whose patch is all black (in the base view and in
    the tiles) is the baseline itself, in both engines, bit for bit; the other tokens change the answer."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (128, 64), (0, 0, 0))
    ImageDraw.Draw(image).rectangle([64, 0, 127, 63], fill=(200, 120, 30))
    image.save(tmp_path / "black.png")
    prompt = build_prompt(next_model, "What is in the picture?", [str(tmp_path / "black.png")])
    analysis = Analysis(next_model, prompt)
    _, tf = analysis.baseline(2)
    every = pixel_stage_units(next_model, prompt, analysis, "token")
    fast, naive = PixelEngine(analysis, tf, "black", every), NaivePixelEngine(analysis, tf, "black", every)
    black = fast.filler.values(every[0].patches, 0)[0]
    still = [u for u in every if torch.equal(fast.pixel_values[u.patches[0]], black)]
    units = still[::2] + [u for u in every if u not in still][::6]  # a spread of both kinds
    still = [n for n, u in enumerate(units) if u in still]
    parts = {prompt.tokens[units[n].keys[0]].part for n in still}
    assert len(still) >= 4 and parts == {"base", "tiles"}
    got, expected = fast.logprobs(None, units), naive.logprobs(None, units)
    for n in range(len(units)):
        if n in still:
            assert torch.equal(got[n], fast.base_logprobs) and torch.equal(expected[n], naive.base_logprobs)
        else:
            assert (expected[n] - naive.base_logprobs).abs().max() > 1e-6
    assert (got - expected).abs().max() <= 2e-5


def test_occlusion_from_the_command_line(next_folder, next_pictures, in_tmp, capsys):
    assert main(tiny_argv(next_folder, "--image", next_pictures[0], "--stage", "pixels", "--unit", "region:2",
                          "--fill", "blur", "--output", "o", generate_top=1), True) == 0, capsys.readouterr().err
    data = json.loads((in_tmp / "output" / "o.json").read_text())
    assert data["stage"] == "pixels" and data["window_labels"] == ["occluded (blur)"]
    newlines = {t["index"] for t in data["tokens"] if t.get("part") == "newline"}
    assert len(newlines) == 4 and not any(set(u["keys"]) & newlines for u in data["units"])
    # the 4×4 base view in 2×2 blocks, then the 4×8 tile map in 2×2 blocks: 4 + 8 regions of 4 patches each
    assert [u["label"].split(" ")[1] for u in data["units"]] == ["base"] * 4 + ["tiles"] * 8
    assert all(len(u["patches"]) == 4 for u in data["units"])
    assert data["units"][4]["box"] == [0.0, 0.0, 32.0, 32.0]  # the tiles' first 2×2 cells of 16 px: no resize
    kl = [value for row in data["metrics"]["kl"] for value in row]
    assert min(kl) >= -1e-6 and max(kl) > 0


def test_a_group_of_newlines_alone_is_one_line(next_folder, next_model, next_pictures, in_tmp, capsys):
    prompt = build_prompt(next_model, PROMPT, [next_pictures[0]])
    newline = next(t.index for t in prompt.tokens if t.part == "newline")
    err = cli_error(capsys, tiny_argv(next_folder, "--image", next_pictures[0], "--stage", "pixels", "--unit", "groups",
                                      "--group", f"nl=pos:{newline}", "--output", "g", generate_top=1))
    assert "--group nl holds no image patch (an image newline token has no pixels)" in err
