"""Occlusion (``--stage pixels``): the patch layout against pictures whose patches are told apart by colour,
the fills, fast == naive for every fill and unit kind, a fill that replaces nothing is the baseline itself,
the planted shape, and bad input."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from mask_impact.cli import main
from mask_impact.engine import Analysis
from mask_impact.inputs import build_prompt
from mask_impact.engines.pixels import FILLS, Filler, NaivePixelEngine, PixelEngine
from mask_impact.patches import PatchLayout, merge_size
from mask_impact.units import build_units
from tests.support import cli_error, shape_pictures

PROMPT = "What's in this image?"


def _units(loaded, prompt, unit="patch", groups=()):
    config = SimpleNamespace(unit=unit, groups=list(groups), flows=[], mask_mode="vision", stage="pixels")
    return build_units(prompt, loaded.tokenizer, config, prompt.length - 1)


def _patchwork(path: Path, width: int, height: int, side: int = 16) -> Path:
    """Every 16×16 patch a solid colour of its own: (patch row, patch column, 99)."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    for row in range(height // side):
        for col in range(width // side):
            pixels[row * side:(row + 1) * side, col * side:(col + 1) * side] = (row * 9, col * 9, 99)
    Image.fromarray(pixels).save(path)
    return path


def _colour(filler: Filler, rows: torch.Tensor) -> torch.Tensor:
    """Mean 0-255 colour of each row (undoing the processor's normalisation)."""
    shaped = rows.float().reshape(rows.shape[0], filler.channels, -1).mean(-1)  # (n, C)
    return (shaped * filler.std + filler.mean) / filler.scale


def test_the_patch_layout_finds_every_patch_where_the_picture_has_it(vl_model, tmp_path):
    paths = [_patchwork(tmp_path / "a.png", 128, 96), _patchwork(tmp_path / "b.png", 64, 160)]
    prompt = build_prompt(vl_model, PROMPT, [str(p) for p in paths])
    assert [(i.resized_width, i.resized_height) for i in prompt.images] == [(128, 96), (64, 160)]  # not resized
    layout = PatchLayout.of(prompt, merge_size(prompt))
    pixel_values = prompt.model_kwargs["pixel_values"]
    filler = Filler(vl_model, pixel_values, layout, "mean")
    colours = _colour(filler, pixel_values)
    seen = set()
    for row in range(pixel_values.shape[0]):
        image, t, patch_row, patch_col = layout.cell(row)
        assert colours[row].tolist() == pytest.approx([patch_row * 9, patch_col * 9, 99], abs=0.01)
        seen.add((image, patch_row, patch_col))
    assert len(seen) == pixel_values.shape[0] == 6 * 8 + 10 * 4
    units = _units(vl_model, prompt, "token")
    for unit in units:  # a decoder token's patches are the 2×2 under its box
        token = prompt.tokens[unit.keys[0]]
        cells = {layout.cell(row)[2:] for row in unit.patches}
        assert cells == {(2 * token.row + dy, 2 * token.col + dx) for dy in (0, 1) for dx in (0, 1)}


def test_fills(vl_model, images):
    prompt = build_prompt(vl_model, PROMPT, [images["odd"], images["square"]])
    layout = PatchLayout.of(prompt, merge_size(prompt))
    pixel_values = prompt.model_kwargs["pixel_values"]
    rows = list(layout.rows(1))[:6]
    mean = Filler(vl_model, pixel_values, layout, "mean")
    image_colour = _colour(mean, pixel_values[list(layout.rows(1))]).mean(0)
    assert torch.allclose(_colour(mean, mean.values(rows, 0)), image_colour.expand(6, -1), atol=1e-3)
    black = Filler(vl_model, pixel_values, layout, "black")
    assert torch.allclose(_colour(black, black.values(rows, 0)), torch.zeros(6, 3), atol=1e-4)
    noise = Filler(vl_model, pixel_values, layout, "noise")
    assert torch.equal(noise.values(rows, 5), noise.values(rows, 5))  # seeded
    assert not torch.equal(noise.values(rows, 5), noise.values(rows, 6))
    values = noise.values(rows, 5).reshape(6, 3, 2, -1)
    assert torch.equal(values[:, :, 0], values[:, :, 1])  # the same noise in both temporal copies
    blur = Filler(vl_model, pixel_values, layout, "blur")
    blurred = _colour(blur, blur.values(list(layout.rows(1)), 0))
    original = _colour(blur, pixel_values[list(layout.rows(1))])
    assert blurred.std(0).sum() < original.std(0).sum()  # smoother
    assert torch.allclose(blurred.mean(0), original.mean(0), atol=3.0)  # about the same colour overall


def test_a_fill_that_replaces_nothing_is_the_baseline_itself(vl_model, images, tmp_path, monkeypatch):
    path = tmp_path / "grey.png"
    Image.new("RGB", (64, 64), (120, 130, 140)).save(path)
    prompt = build_prompt(vl_model, PROMPT, [str(path)])
    analysis = Analysis(vl_model, prompt)
    _, tf = analysis.baseline(2)
    units = _units(vl_model, prompt, "token")
    engine = PixelEngine(analysis, tf, "mean", units)  # the mean of a uniform picture is its colour
    assert all(torch.equal(row, engine.base_logprobs) for row in engine.logprobs(None, units))
    prompt = build_prompt(vl_model, PROMPT, [images["wide"]])
    analysis = Analysis(vl_model, prompt)
    _, tf = analysis.baseline(2)
    units = _units(vl_model, prompt, "token")
    engine = PixelEngine(analysis, tf, "noise", units)
    monkeypatch.setattr(Filler, "values", lambda self, rows, seed: self.pixel_values[rows])  # the original pixels
    assert all(torch.equal(row, engine.base_logprobs) for row in engine.logprobs(None, units))


@pytest.mark.parametrize("fill", FILLS)
def test_fast_equals_naive_for_every_fill_and_unit_kind(fill, vl_model, images):
    prompt = build_prompt(vl_model, PROMPT, [images["wide"], images["square"]])
    analysis = Analysis(vl_model, prompt)
    _, tf = analysis.baseline(2)
    kinds = {"patch": [], "token": [], "region:2": [], "image": [], "groups": ["box=20,10,70,50@2", "two=pos:9-10"]}
    if fill != "mean":  # the fill decides only the values: one kind of unit is enough for the others
        kinds = {"region:2": []}
    for unit, groups in kinds.items():
        units = _units(vl_model, prompt, unit, groups)
        if unit == "patch":
            units = units[::7]  # a spread of patches over both images
        fast, naive = PixelEngine(analysis, tf, fill, units), NaivePixelEngine(analysis, tf, fill, units)
        expected = naive.logprobs(None, units)
        assert (fast.logprobs(None, units) - expected).abs().max() <= 2e-5, unit
        assert (expected - naive.base_logprobs).abs().amax(dim=(1, 2)).max() > 1e-4, unit  # they occlude something


def test_a_box_group_occludes_its_own_patches_not_whole_tokens(vl_model, images):
    prompt = build_prompt(vl_model, PROMPT, [images["square"]])  # 96×96: patches of 16 pixels
    layout = PatchLayout.of(prompt, merge_size(prompt))
    unit, = _units(vl_model, prompt, "groups", ["corner=0,0,20,10"])
    assert sorted(layout.cell(row)[2:] for row in unit.patches) == [(0, 0), (0, 1)]
    assert unit.keys == [prompt.tokens.index(next(t for t in prompt.tokens if t.row == 0 and t.col == 0))]


def test_occluding_the_shape_ranks_first_on_fresh_pictures():
    """On fresh pictures of the demo task, occluding the 2×2 patches of the token that holds the shape costs the
    answer most."""
    from mask_impact.demo import demo_model_path
    from mask_impact.metrics import compute_all
    from mask_impact.models import load_model

    loaded = load_model(str(demo_model_path(True)), True, "cpu", "float32")
    count, first = 20, 0
    for example, prompt in shape_pictures(loaded, 9090, count):
        analysis = Analysis(loaded, prompt)
        _, tf = analysis.baseline(3)
        units = _units(loaded, prompt, "token")
        engine = PixelEngine(analysis, tf, "mean", units)
        drops = compute_all(engine.base_logprobs, engine.logprobs(None, units), tf.answer_ids)["logprob_drop"]
        holder = next(i for i, u in enumerate(units) if (prompt.tokens[u.keys[0]].row,
                                                          prompt.tokens[u.keys[0]].col) == (example.row, example.col))
        first += max(range(len(drops)), key=drops.__getitem__) == holder
    assert first >= 0.9 * count, first


def test_an_occlusion_run_writes_its_stage_and_generates_on_the_occluded_image(tmp_path):
    argv = ["--demo", "--stage", "pixels", "--unit", "token", "--output-dir", str(tmp_path), "--no-progress",
            "--generate-top", "1", "--output", "occluded"]
    assert main(argv, True) == 0
    data = json.loads((tmp_path / "occluded.json").read_text())
    assert data["stage"] == "pixels" and data["window_labels"] == ["occluded (mean)"]
    assert data["windows"] == [[0, data["meta"]["num_layers"] - 1]] and len(data["units"]) == 16
    assert all(len(u["patches"]) == 4 for u in data["units"])
    top = data["generations"][0]
    assert data["units"][top["unit"]]["label"] == "image1 r1 c2"  # the shape's token in testimg.png
    assert top["text"] != data["baseline"]["text"]  # generated on the occluded picture
    assert data["meta"]["settings"]["fill"] == "mean"


@pytest.mark.parametrize("argv,message", [
    (["--demo", "--stage", "pixels", "--layers", "1"], "--stage pixels occludes the image before the model"),
    (["--demo", "--stage", "pixels", "--window", "2"], "drop them"),
    (["--demo", "--stage", "pixels", "--flow", "image->last"], "no meaning with --stage pixels"),
    (["--demo", "--unit", "patch"], "it needs --stage pixels"),
    (["--demo", "--stage", "pixels", "--unit", "word"], "use --unit patch"),
    (["--demo", "--stage", "pixels", "--group", "t=text:color"], "is a text span"),
    (["--demo", "--stage", "pixels", "--fill", "grey"], "invalid choice: 'grey'"),
    (["--demo", "--stage", "pixels", "--unit", "groups", "--group", "a=pos:0-5"], "which is not an image token"),
    (["--model", "MODEL", "--prompt", "hi", "--stage", "pixels"], "no --image is given"),
    (["--demo", "--fill", "noise"], "--fill noise says what replaces occluded pixels, and only --stage pixels "
     "occludes them (this run is --stage decoder, where nothing is filled)"),
    (["--demo", "--stage", "deepstack", "--fill", "blur"], "this run is --stage deepstack"),
    (["--demo", "--stage", "vision-encoder", "--fill", "black"], "this run is --stage vision-encoder"),
])
def test_bad_occlusion_options_are_one_line(argv, message, capsys, in_tmp):
    from mask_impact.demo import demo_model_path

    argv = [str(demo_model_path(True)) if arg == "MODEL" else arg for arg in argv]
    assert message in cli_error(capsys, argv + ["--no-progress"])
    assert not (in_tmp / "output").exists()


def test_a_fill_outside_the_pixel_stage_is_refused_in_python_and_yaml_too(tmp_path):
    from mask_impact import Analyzer, InvalidArgument
    from mask_impact.batch import load_batch

    with pytest.raises(InvalidArgument, match="fill='noise' says what replaces occluded pixels, and only "
                                              "stage='pixels' occludes them"):
        Analyzer.demo(vision=True).run("What color is the shape?", fill="noise", progress=False)
    (tmp_path / "b.yaml").write_text("defaults: {demo: true}\nruns:\n  - {name: a, stage: deepstack, fill: blur}\n")
    (run,) = load_batch(str(tmp_path / "b.yaml"), {}, True)[2]
    # in the YAML file's words: its keys, not the command line's flags
    assert run.config is None and run.error == ("fill: 'blur' says what replaces occluded pixels, and only stage: "
                                                "'pixels' occludes them (this run is stage: 'deepstack', where nothing "
                                                "is filled); drop fill, or use stage: 'pixels'")


def test_text_models_have_no_pixel_stage(capsys, in_tmp):
    assert "unrecognized arguments: --stage" in cli_error(capsys, ["--demo", "--stage", "pixels"], vision=False)


# --- DeepStack ------------------------------------------------------------------------------------------------

def _deepstack_units(loaded, prompt, unit="token", groups=()):
    config = SimpleNamespace(unit=unit, groups=list(groups), flows=[], mask_mode="vision", stage="deepstack")
    return build_units(prompt, loaded.tokenizer, config, prompt.length - 1)


def test_deepstack_routes_fast_equal_naive_for_every_unit_kind(vl_model, images):
    from mask_impact.engines.deepstack import DeepStackEngine, NaiveDeepStackEngine, deepstack_routes

    prompt = build_prompt(vl_model, PROMPT, [images["wide"], images["square"]])
    analysis = Analysis(vl_model, prompt)
    _, tf = analysis.baseline(2)
    fast, naive = DeepStackEngine(analysis, tf), NaiveDeepStackEngine(analysis, tf)
    routes = deepstack_routes(2, vl_model.adapter.num_layers)
    assert routes == [("deepstack", 0), ("deepstack", 1), ("deepstack", None), ("main", None)]
    for unit, groups in {"token": [], "region:2": [], "image": [], "groups": ["box=20,10,70,50@2"]}.items():
        units = _deepstack_units(vl_model, prompt, unit, groups)
        units = units[::5] if unit == "token" else units
        for route in routes:
            expected = naive.logprobs(route, units)
            assert (fast.logprobs(route, units) - expected).abs().max() <= 2e-5, (unit, route)
            assert (expected - naive.base_logprobs).abs().max() > 1e-5, (unit, route)  # each route moves something


def test_removing_every_deepstack_feature_equals_the_model_with_deepstack_switched_off(vl_model, images, monkeypatch):
    from mask_impact.engines.deepstack import DeepStackEngine

    prompt = build_prompt(vl_model, PROMPT, [images["wide"]])
    analysis = Analysis(vl_model, prompt)
    _, tf = analysis.baseline(2)
    everything = _deepstack_units(vl_model, prompt, "image")  # one image: every image token
    got = DeepStackEngine(analysis, tf).logprobs(("deepstack", None), everything)[0]
    language = vl_model.model.model.language_model
    monkeypatch.setattr(language, "_deepstack_process", lambda hidden, mask, embeds: hidden)  # no addition at all
    with torch.no_grad():
        logits = vl_model.model(input_ids=tf.input_ids, **tf.model_kwargs).logits[0]
    reference = torch.log_softmax(logits[tf.answer_positions].float(), dim=-1)
    assert (got - reference).abs().max() <= 2e-5
    assert (reference - DeepStackEngine(analysis, tf).base_logprobs).abs().max() > 1e-3  # DeepStack matters here


def test_a_deepstack_run_names_its_routes_and_generates_with_them(tmp_path):
    argv = ["--demo", "--stage", "deepstack", "--output-dir", str(tmp_path), "--no-progress", "--generate-top", "1",
            "--output", "routes"]
    assert main(argv, True) == 0
    data = json.loads((tmp_path / "routes.json").read_text())
    assert data["window_labels"] == ["DeepStack after layer 0", "all DeepStack levels", "main embedding → image mean"]
    assert data["stage"] == "deepstack" and {u["modality"] for u in data["units"]} == {"vision"}
    top = data["generations"][0]
    assert data["units"][top["unit"]]["label"] == "image1 r1 c2"  # the shape's token
    assert top["text"] != data["baseline"]["text"]


@pytest.mark.parametrize("argv,message", [
    (["--demo", "--stage", "deepstack", "--window", "2"], "--stage deepstack removes features where the model adds"),
    (["--demo", "--stage", "deepstack", "--unit", "patch"], "it needs --stage pixels"),
    (["--demo", "--stage", "deepstack", "--unit", "groups", "--group", "a=pos:0-5"], "not an image token"),
])
def test_bad_deepstack_options_are_one_line(argv, message, capsys, in_tmp):
    assert message in cli_error(capsys, argv + ["--no-progress"])


# --- the vision encoder ---------------------------------------------------------------------------------------

def _vit_units(loaded, prompt, unit="patch", groups=()):
    config = SimpleNamespace(unit=unit, groups=list(groups), flows=[], mask_mode="vision", stage="vision-encoder")
    return build_units(prompt, loaded.tokenizer, config, prompt.length - 1)


def _block_inputs(loaded, prompt, plan=None) -> list[torch.Tensor]:
    from mask_impact.engines.vit import vit_plan

    visual, seen = loaded.model.model.visual, []
    hooks = [block.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
             for block in visual.blocks]
    try:
        with torch.no_grad(), vit_plan(loaded, plan):
            out = visual(prompt.model_kwargs["pixel_values"], grid_thw=prompt.model_kwargs["image_grid_thw"])
    finally:
        for hook in hooks:
            hook.remove()
    return seen + [out.pooler_output]


def test_the_registered_vit_attention_without_a_knockout_is_the_native_one_and_layers_below_stay_bit_identical(
        vl_model, images):
    from mask_impact.patches import PatchLayout
    from mask_impact.engines.vit import VisionPlan, _chunk_keys, image_sequences

    prompt = build_prompt(vl_model, PROMPT, [images["wide"], images["square"]])
    native = _block_inputs(vl_model, prompt)
    with torch.no_grad():
        plain = vl_model.model.model.visual(prompt.model_kwargs["pixel_values"],
                                            grid_thw=prompt.model_kwargs["image_grid_thw"]).pooler_output
    assert torch.equal(native[-1], plain)
    layout = PatchLayout.of(prompt, merge_size(prompt))
    unit = _vit_units(vl_model, prompt, "token")[3]
    depth = len(vl_model.model.model.visual.blocks)
    assert depth >= 2
    chunks = _chunk_keys(image_sequences(vl_model.adapter, layout), layout, unit, range(2))
    knocked = _block_inputs(vl_model, prompt, VisionPlan(range(1, depth), chunks))
    assert all(torch.equal(a, b) for a, b in zip(native[:2], knocked[:2]))  # the inputs of layers 0 and 1
    assert not torch.equal(native[2], knocked[2])


def test_a_vit_knockout_equals_attention_with_the_key_columns_removed_by_hand(vl_model, images):
    """Reference written without the plan: every query row but the unit's own patches attends over the keys with
    the unit's columns taken out; a unit patch keeps only itself among them."""
    from transformers import AttentionInterface

    from mask_impact.engines.vit import NaiveVisionEncoderEngine

    prompt = build_prompt(vl_model, PROMPT, [images["wide"]])
    analysis = Analysis(vl_model, prompt)
    _, tf = analysis.baseline(2)
    unit = _vit_units(vl_model, prompt, "region:2")[0]
    removed = set(unit.patches)

    def by_hand(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        rows = []
        for q in range(query.shape[2]):
            keep = [k for k in range(key.shape[2]) if k not in removed or k == q]
            scores = query[:, :, q:q + 1] @ key[:, :, keep].transpose(2, 3) * scaling  # (1, nh, 1, K')
            rows.append(torch.softmax(scores, dim=-1) @ value[:, :, keep])
        return torch.cat(rows, dim=2).transpose(1, 2).contiguous(), None

    AttentionInterface.register("by_hand", by_hand)
    config = vl_model.model.model.visual.config
    saved = config._attn_implementation_internal
    try:
        config._attn_implementation_internal = "by_hand"
        with torch.no_grad():
            logits = vl_model.model(input_ids=tf.input_ids, **tf.model_kwargs).logits[0]
    finally:
        config._attn_implementation_internal = saved
    reference = torch.log_softmax(logits[tf.answer_positions].float(), dim=-1)
    depth = len(vl_model.model.model.visual.blocks)
    got = NaiveVisionEncoderEngine(analysis, tf, [unit]).logprobs((0, depth - 1), [unit])[0]
    assert (got - reference).abs().max() <= 1e-5
    assert (reference - NaiveVisionEncoderEngine(analysis, tf, [unit]).base_logprobs).abs().max() > 1e-4


def test_vit_knockouts_fast_equal_naive_for_every_unit_kind(vl_model, images):
    from mask_impact.engines.vit import NaiveVisionEncoderEngine, VisionEncoderEngine

    prompt = build_prompt(vl_model, PROMPT, [images["wide"], images["square"]])
    analysis = Analysis(vl_model, prompt)
    _, tf = analysis.baseline(2)
    depth = len(vl_model.model.model.visual.blocks)
    for unit, groups in {"patch": [], "token": [], "region:2": [], "image": [],
                         "groups": ["box=20,10,70,50@2"]}.items():
        units = _vit_units(vl_model, prompt, unit, groups)
        units = units[::9] if unit in ("patch", "token") else units
        fast, naive = VisionEncoderEngine(analysis, tf, units), NaiveVisionEncoderEngine(analysis, tf, units)
        for window in ((0, 0), (1, depth - 1)):
            expected = naive.logprobs(window, units)
            assert (fast.logprobs(window, units) - expected).abs().max() <= 2e-5, (unit, window)
            assert (expected - naive.base_logprobs).abs().max() > 1e-5, (unit, window)


def test_the_shipped_demo_has_no_vit_attention_so_vit_knockouts_change_exactly_nothing(tmp_path):
    argv = ["--demo", "--stage", "vision-encoder", "--unit", "token", "--output-dir", str(tmp_path), "--no-progress",
            "--generate-top", "0", "--output", "vit"]
    assert main(argv, True) == 0
    data = json.loads((tmp_path / "vit.json").read_text())
    assert data["window_labels"] == ["ViT layer 0"] and len(data["units"]) == 16
    assert {v for row in data["metrics"]["logprob_drop"] for v in row} == {0.0}
    assert {v for row in data["metrics"]["kl"] for v in row} == {0.0}


@pytest.mark.parametrize("argv,message", [
    (["--demo", "--stage", "vision-encoder", "--layers", "3"], "layers are the vision tower's 1"),
    (["--demo", "--stage", "vision-encoder", "--block-from", "answer"], "--block-from answer restricts decoder"),
    (["--demo", "--stage", "vision-encoder", "--flow", "image->last"], "no meaning with --stage vision-encoder"),
])
def test_bad_vision_encoder_options_are_one_line(argv, message, capsys, in_tmp):
    assert message in cli_error(capsys, argv + ["--no-progress"])
    assert not (in_tmp / "output").exists()
