"""Every registered family's identities (DESIGN.md §2) in one table: a tiny random-weight checkpoint of each, built
offline with the real classes and processors (``tiny.build_tiny``) and loaded through ``from_pretrained``.

The checkpoints make each family's special features act: sliding windows of 4 tokens on a prompt several windows
long (Mistral, Qwen2/Qwen3, Qwen2-VL/Qwen2.5-VL, Gemma), soft-capping caps small enough to bend random scores
(Gemma 2's attention and both Gemmas' logits), a local rotary base beside the global one (Gemma 3), ViT windows
smaller than the image (Qwen2.5-VL), DeepStack (Qwen3-VL).

Adding a family: its file in ``mask_impact/families/``, its tiny checkpoint in ``tiny.build_tiny``, its row here.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from mask_impact.cli import main
from mask_impact.engine import Analysis
from mask_impact.engines.decoder import FastEngine, NaiveEngine
from mask_impact.families import REGISTRY
from mask_impact.inputs import build_prompt
from mask_impact.knockout import knockout_attention_installed
from mask_impact.models import load_model
from tests.tiny import WINDOW, build_tiny
from mask_impact.units import build_units, overlaps, positions_for
from tests.support import TINY_PROMPT, cli_error, draw_image, hidden_states_under, tiny_argv, tower_by_hand, tower_pass
from tests.test_identities import _plan_logits, assert_no_knockout_is_native

PROMPT = TINY_PROMPT  # the prompt tiny_argv gives

# model_type: the group units swept beside the tokens (VL families: image regions and whole images too)
TABLE = {
    "qwen3_vl": ("word", "region:2", "image"),
    "qwen3_vl_moe": ("word", "region:2"),
    "qwen2_vl": ("word", "region:2", "image"),
    "qwen2_5_vl": ("word", "region:2", "image"),
    "llava": ("word", "region:2", "image"),
    "llava_next": ("word", "region:2", "image"),
    "llava_onevision": ("word", "region:2", "image"),
    "gemma3": ("word", "region:2", "image"),
    "qwen3": ("word",),
    "qwen2": ("word",),
    "llama": ("word",),
    "mistral": ("word",),
    "gemma2": ("word",),
    "gemma3_text": ("word",),
}


def test_the_table_has_a_row_for_every_registered_family():
    assert set(TABLE) == set(REGISTRY)


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    return str(draw_image(tmp_path_factory.mktemp("families") / "wide.png", 128, 64))


class Checkpoints:
    """Each family's tiny checkpoint folder and loaded model, built on first use."""

    def __init__(self, tmp_path_factory):
        self.factory, self.folders, self.models = tmp_path_factory, {}, {}

    def folder(self, model_type: str):
        if model_type not in self.folders:
            self.folders[model_type] = build_tiny(self.factory.mktemp(model_type), model_type)
        return self.folders[model_type]

    def loaded(self, model_type: str):
        if model_type not in self.models:
            self.models[model_type] = load_model(str(self.folder(model_type)), REGISTRY[model_type].takes_images,
                                                 device="cpu", dtype="float32")
        return self.models[model_type]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return Checkpoints(tmp_path_factory)


@pytest.fixture(params=list(TABLE))
def case(request, checkpoints, picture):
    """(loaded model, prompt) of one family: the prompt with one picture for a VL family, longer than any window."""
    loaded = checkpoints.loaded(request.param)
    prompt = build_prompt(loaded, PROMPT, [picture] if loaded.adapter.takes_images else [])
    assert prompt.length > 4 * WINDOW
    return loaded, prompt


def test_registered_attention_without_a_knockout_is_the_native_forward(case):
    assert_no_knockout_is_native(*case)


def test_baseline_is_native_greedy_generation(case):
    loaded, prompt = case
    analysis = Analysis(loaded, prompt)
    ids, _ = analysis.generate(6)  # decoding runs past the window
    kwargs = dict(input_ids=prompt.input_ids, attention_mask=torch.ones_like(prompt.input_ids), **prompt.model_kwargs)
    with torch.no_grad():
        native = loaded.model.generate(**kwargs, max_new_tokens=6, do_sample=False,
                                       suppress_tokens=analysis.placeholder_ids() or None)[0, prompt.length:]
    assert ids == native.tolist()[: len(ids)]


@pytest.mark.slow
@pytest.mark.parametrize("block_from", ["all", "answer"])
def test_fast_equals_naive_for_token_and_group_units(case, block_from):
    loaded, prompt = case
    analysis = Analysis(loaded, prompt, block_from)
    _, tf = analysis.baseline(3)
    mode = "both" if prompt.images else "text"
    positions = positions_for(prompt, mode)
    positions = sorted(set(positions[::3] + positions[-4:]))  # a spread, and the keys nearest the answer
    knockouts = [analysis.knockout(p) for p in positions]
    for unit in TABLE[loaded.model.config.model_type]:
        config = SimpleNamespace(unit=unit, groups=[], flows=[], mask_mode=mode)
        knockouts += [u.knockout() for u in build_units(prompt, loaded.tokenizer, config, analysis.answer_start)]
    naive, fast = NaiveEngine(analysis, tf), FastEngine(analysis, tf)
    assert (naive.base_logprobs - fast.base_logprobs).abs().max() <= 1e-5
    last = loaded.adapter.num_layers - 1
    largest = 0.0
    for window in ((0, 0), (1, 2), (last, last)):
        expected = naive.logprobs(window, knockouts)
        for chunk in (slice(0, 7), slice(7, None)):  # batches that start at different positions
            got = fast.logprobs(window, knockouts[chunk])
            assert (got - expected[chunk]).abs().max() <= 2e-5, (window, chunk)
        largest = max(largest, (expected - naive.base_logprobs).abs().max().item())
    assert largest > 0.05  # the knockouts really moved the answer


def _kept_masks(loaded, length: int, keep: torch.Tensor, visual_mask: torch.Tensor | None = None):
    """The decoder's ``attention_mask`` argument giving each kept row the keys of its original mask (its original
    sliding window and, for Gemma 3, its image's bidirectional block included), restricted to the kept positions:
    None where every layer is plain causal."""
    hidden = torch.zeros(1, length, loaded.adapter.decoder.config.hidden_size)
    with knockout_attention_installed(loaded.adapter.attention_configs()):
        masks = loaded.adapter.layer_masks(hidden, visual_mask)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    by_type = {}
    for kind, mask in zip(loaded.adapter.layer_types, masks):
        full = (causal if mask is None else mask[0, 0])[keep][:, keep][None, None]  # (1, 1, S', S')
        if loaded.model.config._attn_implementation == "eager":  # eager attention adds its mask to the scores
            full = torch.zeros(full.shape).masked_fill(~full, torch.finfo(torch.float32).min)
        by_type[kind] = full
    if set(by_type) == {"full_attention"}:
        return None
    if loaded.model.config.model_type == "mistral":  # one mask for every layer
        return next(iter(by_type.values()))
    return by_type  # per layer type (causal_mask_mapping)


def _deleted_logits(loaded, tf, deleted: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The native decoder with position ``deleted`` removed, every other token keeping its position ids and its
    original window; logits by the model's own head and soft-capping."""
    length = tf.input_ids.shape[1]
    keep = torch.tensor([i for i in range(length) if i != deleted])
    with torch.no_grad():
        inputs = loaded.adapter.layer_inputs(tf.input_ids, tf.model_kwargs)
        kwargs = dict(inputs_embeds=inputs.hidden[:, keep], position_ids=inputs.rope_position_ids[..., keep],
                      attention_mask=_kept_masks(loaded, length, keep, inputs.visual_mask))
        if inputs.deepstack:  # Qwen3-VL: the kept image rows' DeepStack features
            visual_rank = torch.cumsum(inputs.visual_mask.long(), 0) - 1
            rows = visual_rank[keep][inputs.visual_mask[keep]]
            kwargs.update(visual_pos_masks=inputs.visual_mask[keep][None],
                          deepstack_visual_embeds=[level[rows] for level in inputs.deepstack])
        hidden = loaded.adapter.decoder(**kwargs).last_hidden_state
        logits = loaded.model.lm_head(hidden)[0]  # (S - 1, V)
        cap = getattr(loaded.model.config.get_text_config(), "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
    return logits, keep


def test_knockout_at_all_layers_equals_deletion_with_kept_positions(case):
    loaded, prompt = case
    analysis = Analysis(loaded, prompt)
    _, tf = analysis.baseline(3)
    every_layer = (0, loaded.adapter.num_layers - 1)
    vision = [t.index for t in prompt.tokens if t.modality == "vision"]
    for p in sorted({1, 3, prompt.length // 2, prompt.length - 4, *vision[1:3]}):
        knocked = _plan_logits(loaded, tf.input_ids, tf.model_kwargs, analysis.plan(every_layer, [p], reference=True))
        deleted, keep = _deleted_logits(loaded, tf, p)
        after = keep > p
        assert (knocked[keep[after]] - deleted[after]).abs().max() <= 1e-4, p


def test_knockout_leaves_earlier_positions_and_lower_layers_bit_identical(case):
    loaded, prompt = case
    analysis = Analysis(loaded, prompt)
    _, tf = analysis.baseline(3)
    sparse = getattr(loaded.model.config.get_text_config(), "num_experts", None) is not None  # MoE blocks
    for window, p in (((0, 0), 2), ((1, 2), prompt.length // 2), ((3, 3), prompt.length - 2)):
        base, knocked = hidden_states_under(loaded, tf, (analysis.plan(reference=True),
                                                         analysis.plan(window, [p], reference=True)))
        for layer in range(len(base)):
            if layer <= window[0]:  # hidden_states[l] enters layer l: untouched below the window
                assert torch.equal(base[layer], knocked[layer])
            if sparse:  # a token's expert matmuls run over the rows routed with it: its last bits may move
                assert (base[layer][:, :p] - knocked[layer][:, :p]).abs().max() <= 1e-6
            else:
                assert torch.equal(base[layer][:, :p], knocked[layer][:, :p])
        assert not torch.equal(base[-1][:, p + 1:], knocked[-1][:, p + 1:])



# --- what only some families have ------------------------------------------------------------------------------

def test_gemma2_attention_soft_capping_is_applied_and_acts(checkpoints):
    """SDPA drops Gemma 2's attention soft-capping: the model must run eager natively, and the cap must matter (so
    the identities above, which pass, really test the knockout attention's own cap)."""
    import transformers

    loaded = checkpoints.loaded("gemma2")
    assert loaded.model.config._attn_implementation == "eager"
    prompt = build_prompt(loaded, PROMPT, [])
    try:
        uncapped = transformers.AutoModelForCausalLM.from_pretrained(str(checkpoints.folder("gemma2")),
                                                                     attn_implementation="sdpa", dtype=torch.float32)
    except ValueError as refused:  # transformers from 5.2x refuses the SDPA path that would drop the cap
        assert "scaled_dot_product_attention" in str(refused)
        return
    with torch.no_grad():
        capped_logits = loaded.model(input_ids=prompt.input_ids).logits
        sdpa_logits = uncapped(input_ids=prompt.input_ids).logits
    assert (capped_logits - sdpa_logits).abs().max() > 1e-3


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text"])
def test_final_logit_soft_capping_bounds_the_engine_logits(checkpoints, model_type):
    loaded = checkpoints.loaded(model_type)
    cap = loaded.model.config.final_logit_softcapping
    hidden = torch.randn(1, 3, loaded.model.config.hidden_size) * 10  # (1, T, H)
    with torch.no_grad():
        logits = loaded.adapter.logits(hidden)
        raw = loaded.model.lm_head(loaded.adapter.norm(hidden))
    assert torch.equal(logits, torch.tanh(raw / cap) * cap)
    assert logits.abs().max() < cap and (logits - raw).abs().max() > 0.1  # the cap really bends these logits


VL_STAGES = [(t, stage) for t, cls in REGISTRY.items() if cls.takes_images for stage in cls.stages
             if stage in ("pixels", "vision-encoder")]


@pytest.mark.parametrize("model_type,stage", VL_STAGES, ids=[f"{t}-{s}" for t, s in VL_STAGES])
def test_stages_fast_equal_naive(checkpoints, picture, model_type, stage):
    from mask_impact.engines.pixels import NaivePixelEngine, PixelEngine
    from mask_impact.engines.vit import NaiveVisionEncoderEngine, VisionEncoderEngine

    loaded = checkpoints.loaded(model_type)
    prompt = build_prompt(loaded, "What is in the picture?", [picture])
    analysis = Analysis(loaded, prompt)
    _, tf = analysis.baseline(2)
    for unit in ("token", "region:2", "image"):
        config = SimpleNamespace(unit=unit, groups=[], flows=[], mask_mode="vision", stage=stage)
        units = build_units(prompt, loaded.tokenizer, config, analysis.answer_start)
        if stage == "pixels":
            fast, naive, windows = PixelEngine(analysis, tf, "mean", units), NaivePixelEngine(analysis, tf, "mean",
                                                                                          units), [None]
        else:
            fast, naive = VisionEncoderEngine(analysis, tf, units), NaiveVisionEncoderEngine(analysis, tf, units)
            windows = [(0, 0), (1, loaded.adapter.vision_depth - 1)]
        for window in windows:
            expected = naive.logprobs(window, units)
            assert (fast.logprobs(window, units) - expected).abs().max() <= 2e-5, (unit, window)
            assert (expected - naive.base_logprobs).abs().max() > 1e-5, (unit, window)


def test_llava_occlusion_is_the_model_on_the_picture_with_the_patch_filled_by_hand(checkpoints, picture):
    """LLaVA-1.5 (one 14×14 patch of the centre crop per token): occluding a token is the model run natively on
    ``pixel_values`` whose block under that token is set to the fill by hand; fast == naive == that; the patch rows
    are the picture's blocks, row by row; a unit's box is its token's."""
    from mask_impact.engines.pixels import NaivePixelEngine, PixelEngine

    loaded = checkpoints.loaded("llava")
    prompt = build_prompt(loaded, "What is in the picture?", [picture])
    analysis = Analysis(loaded, prompt)
    _, tf = analysis.baseline(2)
    pixels, p = tf.model_kwargs["pixel_values"], loaded.adapter.patch_size  # (1, C, H, W)
    rows = loaded.adapter.patch_rows(pixels)
    side = pixels.shape[-1] // p
    assert torch.equal(loaded.adapter.pixel_values_of(rows), pixels)
    assert torch.equal(rows[side + 2], pixels[0, :, p: 2 * p, 2 * p: 3 * p].reshape(-1))  # row 1, column 2
    config = SimpleNamespace(unit="token", groups=[], flows=[], mask_mode="vision", stage="pixels")
    units = build_units(prompt, loaded.tokenizer, config, analysis.answer_start)
    vision = [t for t in prompt.tokens if t.modality == "vision"]
    assert [u.box for u in units] == [t.box for t in vision] and [u.patches for u in units] == [[n] for n in
                                                                                               range(len(vision))]
    processor = loaded.processor.image_processor
    black = (0.0 - torch.tensor(processor.image_mean)) / torch.tensor(processor.image_std)  # (C,)
    fast, naive = PixelEngine(analysis, tf, "black", units), NaivePixelEngine(analysis, tf, "black", units)
    chosen = [0, side + 2, len(units) - 1]
    expected = []
    for n in chosen:
        row, col = vision[n].row, vision[n].col
        by_hand = pixels.clone()
        by_hand[0, :, row * p: (row + 1) * p, col * p: (col + 1) * p] = black[:, None, None]
        with torch.no_grad():
            logits = loaded.model(input_ids=tf.input_ids, pixel_values=by_hand).logits
        expected.append(torch.log_softmax(logits[0, tf.answer_positions].float(), dim=-1))
    expected = torch.stack(expected)  # (3, T, V)
    picked = [units[n] for n in chosen]
    assert (naive.logprobs(None, picked) - expected).abs().max() <= 2e-5
    assert (fast.logprobs(None, picked) - expected).abs().max() <= 2e-5
    assert (expected - naive.base_logprobs).abs().max() > 1e-4  # the fill changes the answer's distribution


def test_llava_occlusion_from_the_command_line(checkpoints, picture, in_tmp, capsys):
    assert main(tiny_argv(checkpoints.folder("llava"), "--image", picture, "--stage", "pixels", "--unit", "region:2",
                      "--fill", "blur", "--output", "o"), True) == 0, capsys.readouterr().err
    data = json.loads((in_tmp / "output" / "o.json").read_text())
    assert data["stage"] == "pixels" and data["window_labels"] == ["occluded (blur)"]
    assert len(data["units"]) == 4 and all(len(u["patches"]) == 4 for u in data["units"])  # 4×4 tokens, 2×2 blocks
    assert data["units"][0]["box"] == [32.0, 0.0, 64.0, 32.0]  # the 128×64 picture's centre crop starts at x = 32
    kl = [value for row in data["metrics"]["kl"] for value in row]
    assert min(kl) >= -1e-6 and max(kl) > 0  # each blurred block changes the answer's distribution, some more


# --- LLaVA-1.5's vision encoder: CLIP, its CLS first, its features those of layer −2 ------------------------------

def _llava_two(checkpoints, tmp_path):
    """The tiny LLaVA-1.5 (3 CLIP layers, features of layer −2) on two pictures: two 17-long sequences, a batch."""
    loaded = checkpoints.loaded("llava")
    paths = [str(draw_image(tmp_path / f"{n}.png", w, h, seed=n)) for n, (w, h) in enumerate(((128, 64), (50, 90)))]
    prompt = build_prompt(loaded, "What is in the picture?", paths)
    analysis = Analysis(loaded, prompt)
    _, tf = analysis.baseline(2)
    return loaded, prompt, analysis, tf


def _vit_units(loaded, prompt, analysis, unit: str) -> list:
    config = SimpleNamespace(unit=unit, groups=[], flows=[], mask_mode="vision", stage="vision-encoder")
    return build_units(prompt, loaded.tokenizer, config, analysis.answer_start)


def test_llava_vit_without_a_knockout_is_native_and_the_blocks_after_the_feature_layer_are_no_rows(checkpoints,
                                                                                                   tmp_path):
    """The model's forward through the registered ViT attention with no plan, or a plan that blocks nothing, is the
    model as loaded, bit for bit (every block's input, the logits). A knockout at ViT layer 1 leaves the inputs of
    blocks 0 and 1 bit-identical; one at block 2, after the feature layer (−2: block 2's input), changes nothing the
    decoder gets: only blocks 0 and 1 are rows."""
    from mask_impact.engines.vit import NaiveVisionEncoderEngine, VisionPlan

    loaded, prompt, analysis, tf = _llava_two(checkpoints, tmp_path)
    adapter = loaded.adapter
    assert (len(adapter.vision_layers), adapter.vision_depth, loaded.model.config.vision_feature_layer) == (3, 2, -2)
    native = tower_pass(loaded, tf, registered=False)
    for plan in (None, VisionPlan(range(3), [None, None])):
        blocks, logits = tower_pass(loaded, tf, plan)
        assert all(torch.equal(a, b) for a, b in zip(native[0], blocks)) and torch.equal(native[1], logits)
    unit = _vit_units(loaded, prompt, analysis, "token")[5]
    engine = NaiveVisionEncoderEngine(analysis, tf, [unit])
    blocks, logits = tower_pass(loaded, tf, engine.plan_for((1, 1), unit))
    assert torch.equal(blocks[0], native[0][0]) and torch.equal(blocks[1], native[0][1])
    assert not torch.equal(blocks[2], native[0][2]) and not torch.equal(logits, native[1])
    blocks, logits = tower_pass(loaded, tf, engine.plan_for((2, 2), unit))
    assert torch.equal(logits, native[1])


def test_llava_vit_knockout_at_every_layer_equals_attention_written_out_by_hand(checkpoints, tmp_path):
    """CLIP's sequence is CLS at position 0, then the crop's patches row by row. A unit knocked out at every ViT layer
    == the model's forward with its tower's attention written out in the test at all three blocks (the one after
    the feature layer included): in the unit's image, every position, CLS included, loses the unit's patches but a
    patch itself; CLS is never removed. The CLS decision matters: exempting CLS's query gives another answer. Fast ==
    naive == that, also for the two units of both images in one batch."""
    from mask_impact.engines.vit import NaiveVisionEncoderEngine, VisionEncoderEngine

    loaded, prompt, analysis, tf = _llava_two(checkpoints, tmp_path)
    tokens, regions = _vit_units(loaded, prompt, analysis, "token"), _vit_units(loaded, prompt, analysis, "region:2")
    picked = [tokens[5], regions[6]]  # image 0's token (1, 1), image 1's bottom-right 2×2 block
    naive, fast = NaiveVisionEncoderEngine(analysis, tf, picked), VisionEncoderEngine(analysis, tf, picked)
    for n, unit in enumerate(picked):
        removed = [set(), set()]
        for row in unit.patches:  # 16 patches per image, row by row
            removed[row // 16].add(1 + row % 16)  # after CLS
        reference = tower_by_hand(loaded, tf, removed)
        assert (naive.logprobs((0, 1), [unit])[0] - reference).abs().max() <= 1e-5
        assert (fast.logprobs((0, 1), [unit])[0] - reference).abs().max() <= 2e-5
        assert (reference - naive.base_logprobs).abs().max() > 1e-4
        if n == 0:
            assert (tower_by_hand(loaded, tf, removed, exempt=frozenset({0})) - reference).abs().max() > 1e-6
    assert (fast.logprobs((1, 1), picked) - naive.logprobs((1, 1), picked)).abs().max() <= 2e-5  # one batch, 2 images


def test_llava_vit_from_the_command_line(checkpoints, picture, in_tmp, capsys):
    assert main(tiny_argv(checkpoints.folder("llava"), "--image", picture, "--stage", "vision-encoder", "--unit",
                      "region:2", "--output", "v"), True) == 0, capsys.readouterr().err
    data = json.loads((in_tmp / "output" / "v.json").read_text())
    assert data["stage"] == "vision-encoder" and data["window_labels"] == ["ViT layer 0", "ViT layer 1"]
    assert len(data["units"]) == 4 and data["units"][0]["box"] == [32.0, 0.0, 64.0, 32.0]  # the centre crop's
    kl = [value for row in data["metrics"]["kl"] for value in row]
    assert min(kl) >= -1e-6 and max(kl) > 0
    err = cli_error(capsys, tiny_argv(checkpoints.folder("llava"), "--image", picture, "--stage", "vision-encoder",
                                  "--layers", "2", "--output", "w"))
    assert ("layers are the vision tower's 2 below its feature layer (vision_feature_layer -2; the blocks after it "
            "change nothing)") in err


@pytest.mark.parametrize("model_type,crop", [("qwen2_5_vl", None), ("llava", [32, 0, 64, 64])])
def test_a_vl_family_run_records_its_model_type_and_geometry(checkpoints, picture, in_tmp, capsys, model_type, crop):
    assert main(tiny_argv(checkpoints.folder(model_type), "--image", picture, "--unit", "region:2", "--layers", "0",
                      "--output", "r"), True) == 0, capsys.readouterr().err
    data = json.loads((in_tmp / "output" / "r.json").read_text())
    assert data["meta"]["model_type"] == model_type and data["meta"]["geometry"].startswith(
        "merged grid" if crop is None else "fixed grid")
    assert data["images"][0]["crop"] == crop  # the 128×64 picture: LLaVA sees its centre 64×64 of 128×64
    assert {u["kind"] for u in data["units"]} == {"region"} and all(u["box"] for u in data["units"])


@pytest.mark.parametrize("model_type,stage,message", [
    ("qwen2_vl", "deepstack", "--stage deepstack is not available for qwen2_vl models (it has no DeepStack)"),
    ("qwen2_5_vl", "deepstack", "it has no DeepStack"),
    ("qwen2_5_vl", "vision-encoder", "--stage vision-encoder is not available for qwen2_5_vl models (its ViT attends "
                                     "within windows of reordered patches"),
    ("llava_onevision", "vision-encoder", "--stage vision-encoder is not available for llava_onevision models (its "
                                          "SigLIP tower's views are not yet laid out as knockout sequences); it "
                                          "supports --stage decoder, pixels"),
])
def test_a_stage_the_family_lacks_is_one_line(checkpoints, picture, in_tmp, capsys, model_type, stage, message):
    err = cli_error(capsys, tiny_argv(checkpoints.folder(model_type), "--image", picture, "--stage", stage, "--output",
                                  "s"))
    assert message in err
    assert not (in_tmp / "output").exists() or not any((in_tmp / "output").iterdir())


@pytest.mark.parametrize("model_type,sizes", [("llava", "a fixed size"), ("llava_next", "fixed sizes"),
                                              ("llava_onevision", "fixed sizes"), ("gemma3", "a fixed size")])
def test_pixel_bounds_on_a_fixed_size_processor_are_one_line(checkpoints, picture, in_tmp, capsys, model_type,
                                                             sizes):
    err = cli_error(capsys, tiny_argv(checkpoints.folder(model_type), "--image", picture, "--max-pixels", "4096",
                                  "--output", "s"))
    assert f"--min-pixels/--max-pixels: a {model_type} processor resizes every image to {sizes}" in err
    assert not (in_tmp / "output").exists() or not any((in_tmp / "output").iterdir())


def test_a_model_type_without_an_adapter_is_one_line_naming_the_families(tmp_path, in_tmp, capsys):
    import transformers

    from mask_impact.demo import build_tokenizer

    transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path / "gpt2")
    build_tokenizer().save_pretrained(tmp_path / "gpt2")
    err = cli_error(capsys, tiny_argv(tmp_path / "gpt2", "--output", "g"), vision=False)
    assert "model type 'gpt2' is not supported" in err and all(t in err for t in REGISTRY)


# --- token geometry: the box of the token that holds a marker -------------------------------------------------

MARKERS = [(40, 50), (100, 10), (140, 80), (5, 90)]  # top-left corners of 4×4 red squares in a 150×100 picture


def _marked_picture(path, corner) -> str:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (150, 100), (128, 128, 128))  # resized to 160×96: the boxes map back by the ratio
    ImageDraw.Draw(image).rectangle([corner[0], corner[1], corner[0] + 3, corner[1] + 3], fill=(255, 0, 0))
    image.save(path)
    return str(path)


def _redness(loaded, prompt) -> torch.Tensor:
    """(n_vis,) red minus green of the pixels each vision token is made of, in ``pixel_values`` (what the vision
    tower sees): a Qwen token's merge × merge patches, a LLaVA token's patch of the crop."""
    from mask_impact.patches import PatchLayout, token_numbers

    processor = loaded.processor.image_processor
    mean, std = torch.tensor(processor.image_mean), torch.tensor(processor.image_std)
    values = prompt.model_kwargs["pixel_values"].float()
    vision = [t for t in prompt.tokens if t.modality == "vision"]
    if loaded.model.config.model_type == "llava_onevision":  # as LLaVA-NeXT, the tile map pooled as the model does
        pixels = values[0] * std[None, :, None, None] + mean[None, :, None, None]
        layout, p = prompt.images[0].layout, loaded.adapter.patch_size
        grid, (across, down) = layout["base_grid"], layout["tiles"]
        red = (pixels[:, 0] - pixels[:, 1]).unflatten(1, (grid, p)).unflatten(3, (grid, p)).mean((2, 4))  # (v, g, g)
        base = red[0].flatten()
        tiles = red[1:1 + across * down].reshape(down, across, grid, grid).permute(0, 2, 1, 3).reshape(
            down * grid, across * grid)[layout["rows"]][:, layout["cols"]]
        if layout["pooled"]:
            tiles = torch.nn.functional.interpolate(tiles[None, None], layout["out"], mode="bilinear")[0, 0]
        tiles = torch.cat([tiles, torch.zeros(tiles.shape[0], 1)], dim=1).flatten()  # newlines: no pixels
        return torch.cat([base, tiles])
    if loaded.model.config.model_type == "llava_next":  # (1, views, C, H, W): the base view, then the tiles
        pixels = values[0] * std[None, :, None, None] + mean[None, :, None, None]
        layout, p = prompt.images[0].layout, loaded.adapter.patch_size
        grid, across = layout["base_grid"], layout["tiles"][0]
        cells = []
        for t in vision:
            if t.box is None:  # an image newline: no pixels
                cells.append(torch.zeros(3, 1))
                continue
            r, c = (t.row, t.col) if t.t == 0 else (layout["rows"][t.row], layout["cols"][t.col])
            view = 0 if t.t == 0 else 1 + (r // grid) * across + c // grid
            r, c = r % grid, c % grid
            cells.append(pixels[view, :, r * p:(r + 1) * p, c * p:(c + 1) * p].reshape(3, -1))
    elif loaded.model.config.model_type in ("llava", "gemma3"):  # (n, C, H, W): LLaVA's crop, Gemma 3's square
        pixels = values * std[None, :, None, None] + mean[None, :, None, None]
        p = loaded.adapter.cell if loaded.model.config.model_type == "gemma3" else loaded.adapter.patch_size
        cells = [pixels[t.image, :, t.row * p:(t.row + 1) * p, t.col * p:(t.col + 1) * p].reshape(3, -1) for t in vision]
    else:  # rows of patches, each (C, T·P·P)
        pixels = values.reshape(values.shape[0], 3, -1) * std[:, None] + mean[:, None]
        layout, numbers = PatchLayout.of(prompt, loaded.adapter.merge_size), token_numbers(prompt)
        cells = [pixels[layout.token_rows(*numbers[t.index])].transpose(0, 1).reshape(3, -1) for t in vision]
    return torch.stack([(cell[0] - cell[1]).mean() for cell in cells])


@pytest.mark.parametrize("model_type", [t for t, cls in REGISTRY.items() if cls.takes_images])
def test_the_token_whose_box_holds_a_marker_is_the_one_whose_pixels_show_it(checkpoints, tmp_path, model_type):
    """Markers in known places: the one token whose box holds a marker is the token whose pixels are red. A marker
    that no box holds (LLaVA's centre crop cuts off the side strips) is in no token's pixels. LLaVA-NeXT sees the
    picture twice, in its base view and in its tiles: one token of each view holds the marker, the reddest of that
    view; its newline tokens have no box and no pixels."""
    loaded = checkpoints.loaded(model_type)
    held = 0
    for number, corner in enumerate(MARKERS):
        prompt = build_prompt(loaded, "Where is the red dot?", [_marked_picture(tmp_path / f"{number}.png", corner)])
        every = [t for t in prompt.tokens if t.modality == "vision"]
        redness_of_all = _redness(loaded, prompt)
        for view in sorted({t.t for t in every}):
            vision = [t for t in every if t.t == view and t.box is not None]
            redness = redness_of_all[[every.index(t) for t in vision]]
            holding = [t for t in vision if t.box[0] <= corner[0] and corner[0] + 4 <= t.box[2]
                       and t.box[1] <= corner[1] and corner[1] + 4 <= t.box[3]]
            if holding:
                assert len(holding) == 1, (corner, view)  # boxes of one view do not overlap
                assert vision.index(holding[0]) == int(redness.argmax()), (corner, view)
                held += 1
            else:  # a marker across a box edge (LLaVA-NeXT's tiles): the reddest token is one it overlaps
                square = [corner[0], corner[1], corner[0] + 4, corner[1] + 4]
                touched = [vision.index(t) for t in vision if overlaps(t.box, square)]
                if touched:
                    assert int(redness.argmax()) in touched, (corner, view)
                    held += 1
                else:  # outside every box (LLaVA's centre crop): in no token's pixels
                    assert redness.max() < 0.01, corner
        if model_type in ("llava_next", "llava_onevision"):  # both views tile the whole picture; newlines end each row of the tiles
            assert {t.part for t in every} == {"base", "tiles", "newline"}
            assert all((t.box is None) == (t.part == "newline") for t in every)
            for view in (0, 1):
                boxes = torch.tensor([t.box for t in every if t.t == view and t.box is not None])
                assert boxes[:, 2].max() == 150 and boxes[:, 3].max() == 100 and boxes[:, :2].min() == 0
            continue
        if model_type != "llava":  # the Qwen grid tiles the whole picture: resized 150×100 → 160×96 (Gemma 3: 64×64)
            boxes = torch.tensor([t.box for t in vision])
            resized = (64, 64) if model_type == "gemma3" else (160, 96)
            assert (prompt.images[0].resized_width, prompt.images[0].resized_height) == resized
            assert boxes[:, 2].max() == 150 and boxes[:, 3].max() == 100 and boxes[:, :2].min() == 0
    assert held >= 2


# --- LLaVA-NeXT: anyres tiles and image newlines -----------------------------------------------------------------

SIZES = [(128, 64), (150, 100), (100, 150), (64, 64), (300, 70), (37, 200), (200, 37), (1000, 30), (30, 1000),
         (500, 333)]


def test_llava_next_lays_out_exactly_the_tokens_the_processor_inserts(checkpoints, tmp_path):
    """For every aspect ratio: the geometry's token count == the ``<image>`` placeholders the processor inserts ==
    its ``_get_number_of_features`` (less the CLS) == the features the model scatters (its forward checks that)."""
    from PIL import Image

    loaded = checkpoints.loaded("llava_next")
    processor = loaded.processor
    for width, height in SIZES:
        path = tmp_path / f"{width}x{height}.png"
        Image.new("RGB", (width, height), (90, 30, 200)).save(path)
        prompt = build_prompt(loaded, "What is it?", [str(path)])
        vision = [t for t in prompt.tokens if t.modality == "vision"]
        placeholders = int((prompt.input_ids == loaded.model.config.image_token_id).sum())
        features = processor._get_number_of_features(height, width, 64, 64) - 1
        assert len(vision) == placeholders == features == loaded.adapter.image_tokens(prompt.images[0]), (width, height)
        layout = prompt.images[0].layout
        rows, cols = len(layout["rows"]), len(layout["cols"])
        assert [t.part for t in vision] == ["base"] * 16 + (["tiles"] * cols + ["newline"]) * rows, (width, height)
        with torch.no_grad():
            loaded.model(input_ids=prompt.input_ids, **prompt.model_kwargs)


def test_llava_onevision_lays_out_exactly_the_tokens_the_processor_inserts(checkpoints, tmp_path):
    """As LLaVA-NeXT's, with the tiles' map pooled beyond ``anyres_max_4`` (SigLIP: no CLS to take off): the
    geometry's count == the processor's placeholders == its ``_get_number_of_features`` == what the model scatters,
    pooled and unpooled sizes both among them."""
    from PIL import Image

    loaded = checkpoints.loaded("llava_onevision")
    pooled = set()
    for width, height in SIZES + [(400, 400), (384, 200)]:
        path = tmp_path / f"{width}x{height}.png"
        Image.new("RGB", (width, height), (90, 30, 200)).save(path)
        prompt = build_prompt(loaded, "What is it?", [str(path)])
        vision = [t for t in prompt.tokens if t.modality == "vision"]
        placeholders = int((prompt.input_ids == loaded.model.config.image_token_id).sum())
        features = loaded.processor._get_number_of_features(height, width, 64, 64)
        assert len(vision) == placeholders == features == loaded.adapter.image_tokens(prompt.images[0]), (width, height)
        layout = prompt.images[0].layout
        rows, cols = layout["out"]
        pooled.add(layout["pooled"])
        assert [t.part for t in vision] == ["base"] * 16 + (["tiles"] * cols + ["newline"]) * rows, (width, height)
        with torch.no_grad():
            loaded.model(input_ids=prompt.input_ids, **prompt.model_kwargs)
    assert pooled == {True, False}


def test_llava_next_run_records_its_geometry_and_regions_skip_the_newlines(checkpoints, in_tmp, capsys, tmp_path):
    path = str(draw_image(tmp_path / "tall.png", 100, 150))
    assert main(tiny_argv(checkpoints.folder("llava_next"), "--image", path, "--unit", "region:2", "--layers", "0",
                      "--output", "r"), True) == 0, capsys.readouterr().err
    data = json.loads((in_tmp / "output" / "r.json").read_text())
    assert data["meta"]["model_type"] == "llava_next" and data["meta"]["geometry"].startswith("anyres")
    assert data["images"][0]["layout"]["cols"] == [1, 2, 3, 4, 5, 6]  # the padding's columns unpadded away
    newlines = [t["index"] for t in data["tokens"] if t["part"] == "newline"]
    assert len(newlines) == 8 and all(t["box"] is None for t in data["tokens"] if t["part"] == "newline")
    assert {u["kind"] for u in data["units"]} == {"region"} and all(u["box"] for u in data["units"])
    assert not any(set(u["keys"]) & set(newlines) for u in data["units"])
    assert {u["label"].split(" ")[1] for u in data["units"]} == {"base", "tiles"}


@pytest.mark.parametrize("model_type,size", [("llava_next", (40, 128)), ("llava_onevision", (300, 70))])
@pytest.mark.parametrize("block_from", ["all", "answer"])
def test_fast_equals_naive_on_a_picture_the_model_unpads(checkpoints, tmp_path, model_type, size, block_from):
    """The table's 128×64 picture fills its tiles exactly; these leave padding that ``unpad_image`` cuts: columns
    (40×128: 2 of 4 kept) or rows (300×70: 4 of 8 kept, a 4×20 map that OneVision pools to 3×17)."""
    loaded = checkpoints.loaded(model_type)
    prompt = build_prompt(loaded, PROMPT, [str(draw_image(tmp_path / "unpadded.png", *size))])
    layout = prompt.images[0].layout  # kept rows and columns of the 8-row map, the pooled size
    assert (layout["rows"], layout["cols"], layout.get("out")) == {
        "llava_next": (list(range(8)), [1, 2], None), "llava_onevision": ([2, 3, 4, 5], list(range(20)), [3, 17])
    }[model_type]
    test_fast_equals_naive_for_token_and_group_units((loaded, prompt), block_from)


@pytest.mark.parametrize("pinpoints,tile,patch", [
    ([[64, 128], [128, 64], [128, 128], [192, 64], [64, 192]], 64, 16),  # the tiny checkpoint's
    ([[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]], 336, 14),  # llava-v1.6's
    ([[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)], 384, 14),  # llava-onevision's
])
def test_no_kept_tile_cell_lies_wholly_in_the_padding(pinpoints, tile, patch):
    """``unpad_image`` keeps whole rows (columns) of cells; the first and last it keeps always overlap the picture
    (``layout_cell`` gives the bound, and raises where a cell would not), so every tile token has a box: the two
    corner cells over many sizes (a 10-px lattice up to 1,000 × 1,000, and thin strips)."""
    from mask_impact.families.llava_next import anyres_layout, layout_cell, layout_tokens

    sizes = [(w, h) for w in range(1, 1000, 10) for h in range(1, 1000, 10)] + \
        [(w, h) for w in range(1, 50) for h in (1, 2, 3, 7, 500, 3000)]
    unpadded = 0
    for width, height in sizes:
        layout = anyres_layout(width, height, pinpoints, tile, patch)
        grid, rows, cols = layout["base_grid"], len(layout["rows"]), len(layout["cols"])
        assert layout_tokens(layout) == grid * grid + rows * (cols + 1)
        if rows == 0 or cols == 0:  # a strip too thin for unpad_image to keep a row (column): no tile cells
            continue
        unpadded += (rows, cols) != (layout["tiles"][1] * grid, layout["tiles"][0] * grid)
        for n in (grid * grid, grid * grid + (rows - 1) * (cols + 1) + cols - 1):  # the first and last kept cell
            _, _, _, part, (x0, y0, x1, y1) = layout_cell(layout, width, height, n)
            assert part == "tiles" and 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height, (width, height, n)
    assert unpadded > len(sizes) // 2


# --- LLaVA-OneVision with several images in one prompt: one padded-square view each, then a newline ---------------

def _ov_pair(loaded, tmp_path, sizes=((128, 64), (50, 150)), text=PROMPT):
    paths = [str(draw_image(tmp_path / f"{n}.png", w, h, seed=n)) for n, (w, h) in enumerate(sizes)]
    return build_prompt(loaded, text, paths)


def test_llava_onevision_several_images_lay_out_the_tokens_the_processor_inserts(checkpoints, tmp_path):
    """Each image of a multi-image prompt: g×g patches of its picture padded to a square, then one newline; the
    count == the processor's placeholders (``num_image_tokens + 1`` each) == what the model scatters. The patches
    wholly in the padding (rows above and below a wide picture, columns beside a tall one) have no box."""
    loaded = checkpoints.loaded("llava_onevision")
    for sizes in (((128, 64), (50, 150)), ((150, 100), (64, 64), (37, 200))):
        prompt = _ov_pair(loaded, tmp_path, sizes)
        assert prompt.model_kwargs["batch_num_images"].tolist() == [len(sizes)]
        assert prompt.model_kwargs["pixel_values"].shape == (len(sizes), 1, 3, 64, 64)  # one view each
        vision = [t for t in prompt.tokens if t.modality == "vision"]
        placeholders = int((prompt.input_ids == loaded.model.config.image_token_id).sum())
        assert len(vision) == placeholders == len(sizes) * (loaded.processor.num_image_tokens + 1) == len(sizes) * 17
        for k, (width, height) in enumerate(sizes):
            mine = [t for t in vision if t.image == k]
            assert [t.part for t in mine][-1] == "newline" and (mine[-1].row, mine[-1].col, mine[-1].box) == (3, None,
                                                                                                                None)
            assert prompt.images[k].layout == {"base_grid": 4, "patch": 16, "square": max(width, height),
                                               "offset": [(max(width, height) - width) // 2,
                                                          (max(width, height) - height) // 2]}
            assert all((t.box is None) == (t.part in ("padding", "newline")) for t in mine)
            boxes = torch.tensor([t.box for t in mine if t.box is not None])  # they tile the whole picture
            assert boxes[:, :2].min() == 0 and boxes[:, 2].max() == width and boxes[:, 3].max() == height
        with torch.no_grad():
            loaded.model(input_ids=prompt.input_ids, **prompt.model_kwargs)
    first = [t for t in vision if t.image == 0]  # 150×100 in a 150-px square: 25 px above and below
    assert [t.part for t in first[:4]] == ["base"] * 4 and first[0].box == [0.0, 0.0, 37.5, 12.5]
    third = [t for t in vision if t.image == 2]  # 37×200: 81 px left, 82 right; a 50-px cell
    assert [t.part for t in third[:4]] == ["padding", "base", "base", "padding"]
    assert (third[1].box, third[2].box) == ([0.0, 0.0, 19.0, 50.0], [19.0, 0.0, 37.0, 50.0])
    assert third[0].box is None and third[3].box is None and (third[0].row, third[0].col) == (0, 0)


@pytest.mark.parametrize("block_from", ["all", "answer"])
def test_llava_onevision_several_images_fast_equals_naive(checkpoints, tmp_path, block_from):
    loaded = checkpoints.loaded("llava_onevision")
    prompt = _ov_pair(loaded, tmp_path)
    assert {t.part for t in prompt.tokens if t.modality == "vision"} == {"base", "padding", "newline"}
    test_fast_equals_naive_for_token_and_group_units((loaded, prompt), block_from)


def test_llava_onevision_several_images_no_knockout_is_native_and_generation_matches(checkpoints, tmp_path):
    loaded = checkpoints.loaded("llava_onevision")
    case = (loaded, _ov_pair(loaded, tmp_path))
    test_registered_attention_without_a_knockout_is_the_native_forward(case)
    test_baseline_is_native_greedy_generation(case)


def test_llava_onevision_several_images_the_box_holding_a_marker_is_the_reddest_token(checkpoints, tmp_path):
    """Two marked pictures in one prompt: in each image, the token whose box holds its marker is the reddest of that
    image's patches in ``pixel_values`` (one 64×64 view per image); the patches wholly in the padding show only the
    fill, grey as the processor's mean colour."""
    from PIL import Image, ImageDraw

    loaded = checkpoints.loaded("llava_onevision")
    processor = loaded.processor.image_processor
    mean, std = torch.tensor(processor.image_mean), torch.tensor(processor.image_std)
    for corners in (((40, 50), (10, 120)), ((140, 80), (60, 5)), ((5, 90), (30, 70))):
        paths = []
        for k, ((width, height), corner) in enumerate(zip(((150, 100), (80, 160)), corners)):
            image = Image.new("RGB", (width, height), (128, 128, 128))
            ImageDraw.Draw(image).rectangle([corner[0], corner[1], corner[0] + 3, corner[1] + 3], fill=(255, 0, 0))
            image.save(tmp_path / f"{k}.png")
            paths.append(str(tmp_path / f"{k}.png"))
        prompt = build_prompt(loaded, "Where are the red dots?", paths)
        pixels = prompt.model_kwargs["pixel_values"][:, 0] * std[None, :, None, None] + mean[None, :, None, None]
        red = (pixels[:, 0] - pixels[:, 1]).unflatten(1, (4, 16)).unflatten(3, (4, 16)).mean((2, 4))  # (2, 4, 4)
        for k, corner in enumerate(corners):
            patches = [t for t in prompt.tokens if t.image == k and t.part != "newline"]
            redness = torch.stack([red[k, t.row, t.col] for t in patches])
            holding = [t for t in patches if t.box is not None and t.box[0] <= corner[0] and corner[0] + 4 <= t.box[2]
                       and t.box[1] <= corner[1] and corner[1] + 4 <= t.box[3]]
            assert len(holding) == 1 and patches.index(holding[0]) == int(redness.argmax()), (k, corner)
            padding = [n for n, t in enumerate(patches) if t.part == "padding"]
            assert len(padding) == (0, 8)[k]  # 150×100: 25 px above, less than a 37.5-px cell; 80×160: columns 0, 3
            assert all(redness[padding].abs() < 1e-6)  # the fill: grey, no red
