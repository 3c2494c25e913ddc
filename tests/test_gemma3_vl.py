"""Gemma 3 with images (``gemma3``): what the identity table (tests/test_families.py) does not single out.

The tokens of one image attend to each other both ways in every decoder layer (the model's own masks): the engine's
masks are the model's, bit for bit; a knockout of a *later* image token changes an *earlier* one of the same image,
and the fast engine agrees with the naive one there; ``--vision-attention`` changes nothing; the head applies no
soft-capping (as ``Gemma3ForConditionalGeneration``); bad settings are one line. Occlusion (``--stage pixels``): a
token's pixels are the k×k patches its pooling averages; occluding it is the model on ``pixel_values`` with that block
filled by hand; fast == naive for every fill and unit kind; a fill equal to the pixels changes nothing. The vision
encoder (``--stage vision-encoder``): SigLIP's sequence is the square's patches row by row, no CLS; no knockout is
the native forward bit for bit; a knockout at every ViT layer is attention written out by hand; fast == naive.
"""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from mask_impact.cli import main
from mask_impact.engine import Analysis
from mask_impact.engines.decoder import FastEngine, NaiveEngine
from mask_impact.engines.pixels import FILLS, NaivePixelEngine, PixelEngine
from mask_impact.inputs import build_prompt
from mask_impact.knockout import apply_plan, knockout_attention_installed
from mask_impact.models import load_model
from mask_impact.units import build_units
from tests.tiny import WINDOW, build_tiny
from tests.support import TINY_PROMPT, cli_error, draw_image, tiny_argv, tower_by_hand, tower_pass

PROMPT = TINY_PROMPT  # the prompt tiny_argv gives


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("gemma3"), "gemma3")


@pytest.fixture(scope="module")
def loaded(folder):
    return load_model(str(folder), True, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    base = tmp_path_factory.mktemp("pictures")
    return [str(draw_image(base / name, w, h)) for name, w, h in (("wide.png", 128, 64), ("tall.png", 50, 90),
                                                                   ("square.png", 64, 64))]


def _image_positions(prompt, image: int) -> list[int]:
    return [t.index for t in prompt.tokens if t.modality == "vision" and t.image == image]


def test_the_engine_masks_are_the_models_own_and_bidirectional_inside_each_image(loaded, pictures):
    """Two images: the mask each decoder layer receives in the model's own forward == ``layer_masks``; inside each
    image every token sees every other (sliding layers too), across images and for text tokens attention stays
    causal, and the sliding window acts."""
    prompt = build_prompt(loaded, PROMPT, pictures[:2])
    seen = {}
    hooks = [layer.register_forward_pre_hook(
        lambda module, args, kwargs, i=i: seen.__setitem__(i, kwargs["attention_mask"]), with_kwargs=True)
        for i, layer in enumerate(loaded.adapter.layers)]
    try:
        with torch.no_grad(), knockout_attention_installed(loaded.adapter.attention_configs()):
            loaded.model(input_ids=prompt.input_ids, **prompt.model_kwargs)
            inputs = loaded.adapter.layer_inputs(prompt.input_ids, prompt.model_kwargs)
            masks = loaded.adapter.layer_masks(inputs.hidden, inputs.visual_mask)
    finally:
        for hook in hooks:
            hook.remove()
    first, second = _image_positions(prompt, 0), _image_positions(prompt, 1)
    assert len(first) == len(second) == 4 and first[-1] < second[0]
    text = [t.index for t in prompt.tokens if t.modality != "vision"]
    for layer, (kind, mask) in enumerate(zip(loaded.adapter.layer_types, masks)):
        assert torch.equal(mask, seen[layer]), layer
        allowed = mask[0, 0]  # (S, S)
        for image in (first, second):
            assert allowed[image][:, image].all(), layer  # both ways inside the image
        assert not allowed[first][:, second].any()  # an image never sees a later one
        later = torch.ones_like(allowed).triu(1)
        assert not (allowed & later)[text].any()  # text stays causal
        if kind == "sliding_attention":
            last = prompt.length - 1
            assert allowed[last, last - WINDOW + 1] and not allowed[last, last - WINDOW]


@pytest.mark.slow
def test_a_later_image_token_knockout_changes_the_earlier_ones_of_its_image(loaded, pictures):
    """Knock out the last token of the first image at layer 0 (a sliding layer) and at layer 1 (a full one): the
    image's earlier tokens change from that layer on, every position before the image stays bit-identical;
    ``first_affected`` names the image's first token; fast == naive for it, with both ``--block-from`` modes."""
    prompt = build_prompt(loaded, PROMPT, pictures[:1])
    image = _image_positions(prompt, 0)
    for block_from in ("all", "answer"):
        analysis = Analysis(loaded, prompt, block_from)
        _, tf = analysis.baseline(3)
        if block_from == "all":
            assert analysis.first_affected(image[-1]) == image[0]
            inputs = dict(input_ids=tf.input_ids, **tf.model_kwargs)
            for window in ((0, 0), (1, 1)):
                states = []
                for plan in (analysis.plan(reference=True), analysis.plan(window, [image[-1]], reference=True)):
                    with torch.no_grad(), knockout_attention_installed(loaded.adapter.attention_configs()), \
                            apply_plan(plan):
                        states.append(loaded.model(**inputs, output_hidden_states=True).hidden_states)
                base, knocked = states
                after = window[0] + 1  # hidden_states[l + 1] leaves layer l
                assert torch.equal(base[after][:, :image[0]], knocked[after][:, :image[0]])
                assert (base[after][0, image[0]] - knocked[after][0, image[0]]).abs().max() > 1e-3, window
        naive, fast = NaiveEngine(analysis, tf), FastEngine(analysis, tf)
        units = [image[-1], image[1], image[0]]
        for window in ((0, 0), (1, 2), (3, 3)):
            expected = naive.logprobs(window, units)
            assert (fast.logprobs(window, units) - expected).abs().max() <= 2e-5, (block_from, window)


def test_vision_attention_does_not_change_what_is_measured(loaded, pictures):
    prompt = build_prompt(loaded, PROMPT, pictures[:1])
    causal, bidirectional = Analysis(loaded, prompt, "all", "causal"), Analysis(loaded, prompt, "all",
                                                                                 "bidirectional")
    image = _image_positions(prompt, 0)
    assert torch.equal(causal.vision_groups, bidirectional.vision_groups)
    assert causal.first_affected(image[-1]) == bidirectional.first_affected(image[-1]) == image[0]
    for analysis in (causal, bidirectional):  # the blocks come with the model's masks, never added twice
        assert analysis.plan().vision_groups is None and analysis.plan((0, 1), [image[-1]]).vision_groups is None
    from mask_impact.config import RunConfig
    from mask_impact.resume import fingerprint_parts

    # so it decides nothing a resume checks: the same fingerprint, recorded as measured (bidirectional)
    parts = [fingerprint_parts(loaded, RunConfig(model=loaded.name, vision_attention=v), prompt)
             for v in ("causal", "bidirectional")]
    assert parts[0] == parts[1] and parts[0]["settings.vision_attention"] == "bidirectional"


def test_the_head_applies_no_soft_capping_as_the_model(loaded):
    """``Gemma3ForConditionalGeneration`` ignores ``final_logit_softcapping``: so does the adapter's head."""
    text_config = loaded.model.config.text_config
    ids = torch.tensor([[1, 2, 3, 4]])
    try:
        text_config.final_logit_softcapping = 0.5
        with torch.no_grad():
            native = loaded.model(input_ids=ids, output_hidden_states=True)
            ours = loaded.adapter.logits(native.hidden_states[-1][:, -1:])
    finally:
        text_config.final_logit_softcapping = None
    assert native.logits.abs().max() > 0.5  # not capped
    assert (ours - native.logits[:, -1:]).abs().max() <= 1e-5


def test_raw_prompt_markup_is_the_processors_image_sequence(loaded, pictures):
    """A raw prompt gets one boi token per image; the processor writes ``\\n\\n<boi>`` + 4 image tokens +
    ``<eoi>\\n\\n`` for it, the same tokens as the chat-templated prompt holds."""
    raw = build_prompt(loaded, PROMPT, pictures[:1], raw_prompt=True)
    templated = build_prompt(loaded, PROMPT, pictures[:1])
    config, tokenizer = loaded.model.config, loaded.tokenizer

    def image_run(prompt):
        ids = prompt.input_ids[0].tolist()
        start = ids.index(config.boi_token_id)
        return ids[start - 2: start + 8]

    expected = tokenizer("\n\n", add_special_tokens=False)["input_ids"] + [config.boi_token_id] + \
        [config.image_token_id] * 4 + [config.eoi_token_id]
    assert image_run(raw)[: len(expected)] == image_run(templated)[: len(expected)] == expected
    assert torch.equal(raw.model_kwargs["pixel_values"], templated.model_kwargs["pixel_values"])
    assert [t.modality for t in raw.tokens if t.id in (config.boi_token_id, config.eoi_token_id)] == ["special"] * 2


def test_a_run_records_its_geometry(folder, pictures, in_tmp, capsys):
    assert main(tiny_argv(folder, "--image", pictures[0], "--unit", "region:1", "--layers", "0", "--output", "r"),
                True) == 0, capsys.readouterr().err
    data = json.loads((in_tmp / "output" / "r.json").read_text())
    assert data["meta"]["model_type"] == "gemma3" and data["meta"]["geometry"].startswith(
        "fixed grid: the whole picture resized to 64×64")
    assert data["meta"]["settings"]["vision_attention"] == "bidirectional"  # what the model computes
    image = data["images"][0]
    assert image["crop"] is None and (image["resized_width"], image["resized_height"]) == (64, 64)
    assert [u["box"] for u in data["units"]] == [[0, 0, 64, 32], [64, 0, 128, 32], [0, 32, 64, 64], [64, 32, 128, 64]]


@pytest.mark.parametrize("extra,message", [
    (("--stage", "vision-encoder", "--layers", "2"), "(with --stage vision-encoder, layers are the vision tower's 2)"),
    (("--stage", "vision-encoder", "--unit", "word"), "use --unit patch"),
    (("--stage", "pixels", "--unit", "word"), "use --unit patch"),
    (("--min-pixels", "1000"), "--min-pixels/--max-pixels: a gemma3 processor resizes every image to a fixed size"),
])
def test_what_gemma3_lacks_is_one_line(folder, pictures, in_tmp, capsys, extra, message):
    # the square picture keeps its size: no note about the resize before the error
    assert message in cli_error(capsys, tiny_argv(folder, "--image", pictures[2], *extra, "--output", "s"))


def test_pan_and_scan_is_refused_in_one_line(folder, pictures, tmp_path, in_tmp, capsys):
    copy = tmp_path / "pan"
    shutil.copytree(folder, copy)
    config_path = copy / "processor_config.json"
    if not config_path.exists() or "image_processor" not in json.loads(config_path.read_text()):
        config_path = copy / "preprocessor_config.json"
    data = json.loads(config_path.read_text())
    (data["image_processor"] if "image_processor" in data else data)["do_pan_and_scan"] = True
    config_path.write_text(json.dumps(data))
    err = cli_error(capsys, tiny_argv(copy, "--image", pictures[2], "--output", "p"))
    assert "this gemma3 processor has do_pan_and_scan on" in err


@pytest.mark.parametrize("markup", ["--raw-prompt", "--allow-special-tokens"])
def test_a_typed_image_soft_token_is_one_line(folder, pictures, in_tmp, capsys, markup):
    """The processor writes the image tokens for each boi token; one typed in the prompt has no pixels (it was an
    IndexError in the token table)."""
    argv = tiny_argv(folder, "--image", pictures[2], markup, "--output", "t")
    argv[argv.index("--prompt") + 1] = "Look: <image_soft_token> What is B?"
    assert ("the prompt holds the image token <image_soft_token>, which the processor writes itself; mark each "
            "image with <start_of_image> (one per --image)") in cli_error(capsys, argv)
    assert not (in_tmp / "output").exists() or not any((in_tmp / "output").iterdir())


# --- occlusion (--stage pixels): a token's k×k patches of the tower's square ---------------------------------------


def _pixel_units(loaded, prompt, analysis, unit: str) -> list:
    config = SimpleNamespace(unit=unit, groups=[], flows=[], mask_mode="vision", stage="pixels")
    return build_units(prompt, loaded.tokenizer, config, analysis.answer_start)


def _model_logprobs(loaded, tf, pixel_values: torch.Tensor) -> torch.Tensor:
    """(T, V) the answer's log-probs of the model's own forward on ``pixel_values`` (its token_type_ids, its masks)."""
    kwargs = dict(tf.model_kwargs, pixel_values=pixel_values)
    with torch.no_grad():
        logits = loaded.model(input_ids=tf.input_ids, **kwargs).logits
    return torch.log_softmax(logits[0, tf.answer_positions].float(), dim=-1)


def test_occlusion_is_the_model_on_the_picture_with_the_block_filled_by_hand(loaded, pictures):
    """Two pictures. A token's patches are the k×k patches its pooling averages, a (k·P)-pixel block of the square:
    occluding it (black) is the model's forward on ``pixel_values`` with that block set to black by hand, and a
    patch unit (mean) the same with one P-pixel patch set to its picture's mean colour; fast == naive == that. The
    patch rows are the square's blocks in token order, and a unit's box is its token's."""
    prompt = build_prompt(loaded, "What is in the picture?", pictures[:2])
    analysis = Analysis(loaded, prompt)
    _, tf = analysis.baseline(2)
    pixels, p, k = tf.model_kwargs["pixel_values"], loaded.adapter.patch_size, loaded.adapter.patch_merge
    cell, side = loaded.adapter.cell, loaded.adapter.tokens_per_side
    assert (k, cell, side, pixels.shape) == (2, 32, 2, (2, 3, 64, 64))  # 16-px patches pooled 2×2 into 2×2 tokens
    rows = loaded.adapter.patch_rows(pixels)
    assert torch.equal(loaded.adapter.pixel_values_of(rows), pixels)
    # image 1, token (0, 1), its patch (1, 0): the square's patch at row 1, column 2
    assert torch.equal(rows[4 * 4 + 1 * 4 + 2], pixels[1, :, p: 2 * p, 2 * p: 3 * p].reshape(-1))

    tokens = _pixel_units(loaded, prompt, analysis, "token")
    vision = [t for t in prompt.tokens if t.modality == "vision"]
    assert [u.box for u in tokens] == [t.box for t in vision]
    assert [u.patches for u in tokens] == [list(range(4 * n, 4 * n + 4)) for n in range(len(vision))]
    processor = loaded.processor.image_processor
    black = (0.0 - torch.tensor(processor.image_mean)) / torch.tensor(processor.image_std)  # (C,)
    chosen = [1, 6]  # image 0's token (0, 1), image 1's token (1, 0)
    expected = []
    for n in chosen:
        t = vision[n]
        by_hand = pixels.clone()
        by_hand[t.image, :, t.row * cell:(t.row + 1) * cell, t.col * cell:(t.col + 1) * cell] = black[:, None, None]
        expected.append(_model_logprobs(loaded, tf, by_hand))
    expected = torch.stack(expected)
    picked = [tokens[n] for n in chosen]
    fast, naive = PixelEngine(analysis, tf, "black", tokens), NaivePixelEngine(analysis, tf, "black", tokens)
    assert (naive.logprobs(None, picked) - expected).abs().max() <= 2e-5
    assert (fast.logprobs(None, picked) - expected).abs().max() <= 2e-5
    assert (expected - naive.base_logprobs).abs().max() > 1e-4  # the fill changes the answer's distribution

    patches = _pixel_units(loaded, prompt, analysis, "patch")
    unit = next(u for u in patches if u.label == "image2 p3,1")  # the square's patch at row 3, column 1
    image, y, x = 1, 3 * p, 1 * p
    by_hand = pixels.clone()
    by_hand[image, :, y:y + p, x:x + p] = pixels[image].double().mean(dim=(1, 2)).float()[:, None, None]
    expected = _model_logprobs(loaded, tf, by_hand)[None]
    fast, naive = PixelEngine(analysis, tf, "mean", patches), NaivePixelEngine(analysis, tf, "mean", patches)
    assert (naive.logprobs(None, [unit]) - expected).abs().max() <= 2e-5
    assert (fast.logprobs(None, [unit]) - expected).abs().max() <= 2e-5
    assert unit.box == [12.5, 67.5, 25.0, 90.0]  # x 16-32, y 48-64 of the 64-px square, the 50×90 picture's pixels


@pytest.mark.parametrize("unit", ["patch", "token", "region:1", "image"])
def test_occlusion_fast_equals_naive_for_every_fill(loaded, pictures, unit):
    """Two pictures, every fill: the tower on a batch of occluded copies and the decoder from the image's first
    position == one whole-model forward per unit."""
    prompt = build_prompt(loaded, "What is in the picture?", pictures[:2])
    analysis = Analysis(loaded, prompt)
    _, tf = analysis.baseline(2)
    units = _pixel_units(loaded, prompt, analysis, unit)
    for fill in FILLS if unit != "patch" else ("noise",):
        fast, naive = PixelEngine(analysis, tf, fill, units), NaivePixelEngine(analysis, tf, fill, units)
        expected = naive.logprobs(None, units)
        assert (fast.logprobs(None, units) - expected).abs().max() <= 2e-5, fill
        assert ((expected - naive.base_logprobs).abs().amax(dim=(1, 2)) > 1e-5).all(), fill  # every unit acts


def test_an_occlusion_whose_fill_equals_the_pixels_changes_nothing(loaded, tmp_path):
    """A picture black on its left three quarters: a black fill of a token there is the baseline itself, in both
    engines, bit for bit; the tokens of the right half, which are not all black, change the answer."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (128, 64), (0, 0, 0))
    ImageDraw.Draw(image).rectangle([96, 0, 127, 63], fill=(200, 120, 30))
    image.save(tmp_path / "black.png")
    prompt = build_prompt(loaded, "What is in the picture?", [str(tmp_path / "black.png")])
    analysis = Analysis(loaded, prompt)
    _, tf = analysis.baseline(2)
    units = _pixel_units(loaded, prompt, analysis, "token")
    fast, naive = PixelEngine(analysis, tf, "black", units), NaivePixelEngine(analysis, tf, "black", units)
    got, expected = fast.logprobs(None, units), naive.logprobs(None, units)
    left = [n for n, u in enumerate(units) if u.box[2] <= 64]  # column 0 of the 2×2 grid: x 0-32 of the 64-px square
    assert len(left) == 2
    for n in range(len(units)):
        if n in left:
            assert torch.equal(got[n], fast.base_logprobs) and torch.equal(expected[n], naive.base_logprobs)
        else:
            assert (expected[n] - naive.base_logprobs).abs().max() > 1e-5
    assert (got - expected).abs().max() <= 2e-5


def test_occlusion_from_the_command_line(folder, pictures, in_tmp, capsys):
    assert main(tiny_argv(folder, "--image", pictures[0], "--stage", "pixels", "--unit", "token", "--fill", "blur",
                      "--output", "o"), True) == 0, capsys.readouterr().err
    data = json.loads((in_tmp / "output" / "o.json").read_text())
    assert data["stage"] == "pixels" and data["window_labels"] == ["occluded (blur)"]
    assert [u["patches"] for u in data["units"]] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert [u["box"] for u in data["units"]] == [[0, 0, 64, 32], [64, 0, 128, 32], [0, 32, 64, 64], [64, 32, 128, 64]]
    kl = [value for row in data["metrics"]["kl"] for value in row]
    assert min(kl) >= -1e-6 and max(kl) > 0


def test_the_released_geometry_a_token_s_rows_are_its_56_pixel_block():
    """The released checkpoints' square (896 px, 14-px patches, 256 tokens: pooled 4×4) on a model of that geometry
    with tiny widths: a token's 16 consecutive rows are its 56-px block of ``pixel_values``, patch by patch."""
    import transformers

    from mask_impact.families.gemma3_vl import Gemma3Vision

    vision = transformers.SiglipVisionConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                             num_attention_heads=1, image_size=896, patch_size=14)
    text = dict(vocab_size=300, hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=1,
                num_key_value_heads=1, head_dim=16, model_type="gemma3_text", sliding_window=4,
                layer_types=["sliding_attention", "full_attention"])
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=256,
                                       boi_token_index=290, eoi_token_index=291, image_token_index=292)
    adapter = Gemma3Vision(transformers.Gemma3ForConditionalGeneration(config))
    assert (adapter.patch_merge, adapter.cell, adapter.tokens_per_side) == (4, 56, 16)
    pixels = torch.randn(2, 3, 896, 896)
    rows = adapter.patch_rows(pixels)
    assert rows.shape == (2 * 64 * 64, 3 * 14 * 14) and torch.equal(adapter.pixel_values_of(rows), pixels)
    n = 5 * 16 + 9  # image 1's token (5, 9)
    block = pixels[1, :, 5 * 56:6 * 56, 9 * 56:10 * 56].reshape(3, 4, 14, 4, 14).permute(1, 3, 0, 2, 4)
    assert torch.equal(rows[4096 + 16 * n: 4096 + 16 * (n + 1)], block.reshape(16, -1))


# --- the vision encoder (--stage vision-encoder): SigLIP, one sequence per image, its patches row by row -----------


def _vit(loaded, pictures):
    prompt = build_prompt(loaded, "What is in the picture?", pictures[:2])
    analysis = Analysis(loaded, prompt)
    _, tf = analysis.baseline(2)
    return prompt, analysis, tf


def _vit_units(loaded, prompt, analysis, unit: str) -> list:
    config = SimpleNamespace(unit=unit, groups=[], flows=[], mask_mode="vision", stage="vision-encoder")
    return build_units(prompt, loaded.tokenizer, config, analysis.answer_start)


def test_vit_without_a_knockout_is_native_and_layers_below_the_window_stay_bit_identical(loaded, pictures):
    """The model's forward through the registered ViT attention with no plan, or a plan that blocks nothing, is the
    model as loaded, bit for bit (every block's input, the logits); a knockout at ViT layer 1 leaves block 0's and
    block 1's inputs bit-identical and changes the answer. Every block reaches the features: both are rows."""
    from mask_impact.engines.vit import NaiveVisionEncoderEngine, VisionPlan

    prompt, analysis, tf = _vit(loaded, pictures)
    assert len(loaded.adapter.vision_layers) == loaded.adapter.vision_depth == 2
    native = tower_pass(loaded, tf, registered=False)
    for plan in (None, VisionPlan(range(2), [None, None])):
        blocks, logits = tower_pass(loaded, tf, plan)
        assert all(torch.equal(a, b) for a, b in zip(native[0], blocks)) and torch.equal(native[1], logits)
    unit = _vit_units(loaded, prompt, analysis, "token")[6]
    blocks, logits = tower_pass(loaded, tf, NaiveVisionEncoderEngine(analysis, tf, [unit]).plan_for((1, 1), unit))
    assert torch.equal(blocks[0], native[0][0]) and torch.equal(blocks[1], native[0][1])
    assert not torch.equal(logits, native[1])


def test_vit_knockout_at_every_layer_equals_attention_written_out_by_hand(loaded, pictures):
    """SigLIP's sequence: the 64-px square's 4×4 patches row by row (no CLS), while a token's patch rows come token by
    token, its 2×2 inside. A unit knocked out at both ViT layers == the model's forward with the tower's attention
    written out in the test: in the unit's image every patch loses the unit's patches but itself. Fast == naive ==
    that, for a token, a single patch, and both in one batch."""
    from mask_impact.engines.vit import NaiveVisionEncoderEngine, VisionEncoderEngine

    prompt, analysis, tf = _vit(loaded, pictures)
    token = _vit_units(loaded, prompt, analysis, "token")[6]  # image 1's token (1, 0)
    patch = next(u for u in _vit_units(loaded, prompt, analysis, "patch") if u.label == "image1 p1,2")
    picked = [token, patch]
    naive, fast = NaiveVisionEncoderEngine(analysis, tf, picked), VisionEncoderEngine(analysis, tf, picked)
    for unit, image, cells in ((token, 1, [(2, 0), (2, 1), (3, 0), (3, 1)]), (patch, 0, [(1, 2)])):
        removed = [set(), set()]
        removed[image] = {row * 4 + col for row, col in cells}  # raster positions over the 4×4 patches
        assert sorted(unit.patches) == sorted(16 * image + 4 * (2 * (r // 2) + c // 2) + 2 * (r % 2) + c % 2
                                              for r, c in cells)  # the rows: token by token, 2×2 inside
        reference = tower_by_hand(loaded, tf, removed)
        assert (naive.logprobs((0, 1), [unit])[0] - reference).abs().max() <= 1e-5
        assert (fast.logprobs((0, 1), [unit])[0] - reference).abs().max() <= 2e-5
        assert (reference - naive.base_logprobs).abs().max() > 1e-5
    assert (fast.logprobs((0, 1), picked) - naive.logprobs((0, 1), picked)).abs().max() <= 2e-5


@pytest.mark.parametrize("unit", ["patch", "token", "image"])
def test_vit_fast_equals_naive_for_every_unit_kind(loaded, pictures, unit):
    from mask_impact.engines.vit import NaiveVisionEncoderEngine, VisionEncoderEngine

    prompt, analysis, tf = _vit(loaded, pictures)
    units = _vit_units(loaded, prompt, analysis, unit)
    units = units[::5] if unit == "patch" else units
    fast, naive = VisionEncoderEngine(analysis, tf, units), NaiveVisionEncoderEngine(analysis, tf, units)
    for window in ((1, 1), (0, 1)):  # from the cached input of block 1, and from block 0
        expected = naive.logprobs(window, units)
        assert (fast.logprobs(window, units) - expected).abs().max() <= 2e-5, window
        assert ((expected - naive.base_logprobs).abs().amax(dim=(1, 2)) > 1e-6).all(), window  # every unit acts


def test_vit_from_the_command_line(folder, pictures, in_tmp, capsys):
    assert main(tiny_argv(folder, "--image", pictures[0], "--stage", "vision-encoder", "--unit", "token", "--output",
                      "v"), True) == 0, capsys.readouterr().err
    data = json.loads((in_tmp / "output" / "v.json").read_text())
    assert data["stage"] == "vision-encoder" and data["window_labels"] == ["ViT layer 0", "ViT layer 1"]
    assert [u["patches"] for u in data["units"]] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    kl = [value for row in data["metrics"]["kl"] for value in row]
    assert min(kl) >= -1e-6 and max(kl) > 0
