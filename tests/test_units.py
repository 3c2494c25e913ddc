"""Units of a sweep (words, image regions, whole images, named groups, flows): what they cover, that the fast
engine equals the reference for each kind, the planted answer, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from mask_impact.cli import main
from mask_impact.config import UsageError
from mask_impact.engine import Analysis
from mask_impact.engines.decoder import FastEngine, NaiveEngine
from mask_impact.inputs import build_prompt
from mask_impact.units import WORD, build_units, check_units, parse_group, parse_units
from tests.support import ROOT, cli_error, shape_pictures
from tests.test_spec import _explicit_mask_logits

PROMPT = "What's in this image? Describe the picture."


def _units(loaded, prompt, unit="token", groups=(), flows=(), mask_mode="text"):
    config = SimpleNamespace(unit=unit, groups=list(groups), flows=list(flows), mask_mode=mask_mode)
    return build_units(prompt, loaded.tokenizer, config, prompt.length - 1)


def _between(prompt, loaded, first_after: int) -> list[int]:
    """The user's text of the demo chat template: after ``first_after``, before the first <|im_end|>."""
    end = prompt.input_ids[0].tolist().index(loaded.tokenizer.convert_tokens_to_ids("<|im_end|>"))
    return list(range(first_after + 1, end))


def test_words_join_a_words_subword_tokens_and_cover_the_text(text_model):
    text = "The well-known cat's toy, 3.14 dollars!"
    prompt = build_prompt(text_model, text, [])
    units = _units(text_model, prompt, "word")
    question = [u for u in units if u.keys[0] in prompt.user_positions]
    assert [u.label for u in question] == ["The", "well-known", "cat's", "toy", ",", "3.14", "dollars", "!"]
    assert [p for u in question for p in u.keys] == prompt.user_positions  # a partition, in order
    assert "".join(prompt.tokens[p].text for p in prompt.user_positions) == text
    assert any(len(u.keys) > 1 for u in question)  # the tokenizer really split some word
    specials = [u for u in units if u.modality == "special"]
    assert specials and all(len(u.keys) == 1 for u in specials)  # special tokens stay single
    assert [m.group() for m in WORD.finditer("don't stop—well-known 3.14.")] == ["don't", "stop", "—", "well-known",
                                                                                "3.14", "."]


def test_regions_tile_each_image_with_partial_blocks_at_the_edges(vl_model, images):
    prompt = build_prompt(vl_model, PROMPT, [images["odd"], images["square"]])
    vision = [t for t in prompt.tokens if t.modality == "vision"]
    units = _units(vl_model, prompt, "region:2", mask_mode="vision")
    assert sorted(p for u in units for p in u.keys) == [t.index for t in vision]  # every image token exactly once
    for number, info in enumerate(prompt.images):
        rows = max(t.row for t in vision if t.image == number) + 1
        cols = max(t.col for t in vision if t.image == number) + 1
        mine = [u for u in units if u.image == number]
        assert len(mine) == -(-rows // 2) * -(-cols // 2)
        for u in mine:
            cells = {(prompt.tokens[p].row // 2, prompt.tokens[p].col // 2) for p in u.keys}
            assert len(cells) == 1
            (r, c), = cells
            assert len(u.keys) == (min(rows, 2 * r + 2) - 2 * r) * (min(cols, 2 * c + 2) - 2 * c)
            assert u.label.startswith(f"image{number + 1} r{2 * r}") and u.kind == "region"
            boxes = [prompt.tokens[p].box for p in u.keys]
            assert u.box == [min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes),
                             max(b[3] for b in boxes)]
        assert any(len(u.keys) < 4 for u in mine) == (rows % 2 == 1 or cols % 2 == 1)
    whole = _units(vl_model, prompt, "image", mask_mode="vision")
    assert [u.label for u in whole] == ["image1", "image2"]
    for u, info in zip(whole, prompt.images):
        assert u.box == pytest.approx([0, 0, info.width, info.height], abs=0.02)
    mixed = _units(vl_model, prompt, "image", mask_mode="both")  # text tokens stay single beside the images
    assert len(mixed) == 2 + sum(t.modality != "vision" for t in prompt.tokens)
    assert [u.keys[0] for u in mixed] == sorted(u.keys[0] for u in mixed)  # in the order of their first keys


def test_named_groups_resolve_to_the_tokens_they_name(vl_model, images):
    prompt = build_prompt(vl_model, PROMPT, [images["odd"]])
    token = next(t for t in prompt.tokens if t.row == 1 and t.col == 2)
    x0, y0, x1, y1 = token.box
    inside = f"{x0 + 1},{y0 + 1},{x1 - 1},{y1 - 1}"  # strictly inside one token's box
    across = f"{x0 + 1},{y0 + 1},{x1 + 1},{y1 + 1}"  # reaching into its right, lower and lower-right neighbours
    groups = [f"one={inside}", f"four={across}@1", "span=pos:2-4,7", 'words=text:"in this"']
    units = {u.label: u for u in _units(vl_model, prompt, "groups", groups)}
    assert units["one"].keys == [token.index] and units["one"].kind == "group"
    assert {(prompt.tokens[p].row, prompt.tokens[p].col) for p in units["four"].keys} == {(1, 2), (1, 3), (2, 2),
                                                                                        (2, 3)}
    assert units["span"].keys == [2, 3, 4, 7] and units["span"].modality == "mixed"
    words = units["words"].keys
    joined = lambda keys: "".join(prompt.tokens[p].text for p in keys)  # noqa: E731
    assert "in this" in joined(words) and "in this" not in joined(words[1:]) and "in this" not in joined(words[:-1])


def test_flow_groups_are_the_question_the_last_position_the_answer_and_the_images(vl_model, images):
    prompt = build_prompt(vl_model, PROMPT, [images["wide"], images["square"]])
    vision = [t.index for t in prompt.tokens if t.modality == "vision"]
    flows = ["image->last", "image2->question", "question->answer", "image1->prompt"]
    units = {u.label: u for u in _units(vl_model, prompt, flows=flows)}
    last = prompt.length - 1
    question = _between(prompt, vl_model, max(vision) + 1)  # after the second image's <|vision_end|>
    assert "".join(prompt.tokens[p].text for p in question) == PROMPT and prompt.user_positions == question
    assert units["image->last"].keys == vision and units["image->last"].queries == [last]
    assert units["image2->question"].keys == [p for p in vision if prompt.tokens[p].image == 1]
    assert units["image2->question"].queries == question
    assert units["question->answer"].keys == question
    assert units["question->answer"].queries == [] and units["question->answer"].queries_from == last
    assert units["image1->prompt"].queries == list(range(prompt.length))
    assert all(u.kind == "flow" for u in units.values())


@pytest.mark.parametrize("family", ["vl", "text"])
def test_named_flows_equal_the_model_run_with_a_hand_built_mask(family, vl_model, text_model, images):
    loaded = vl_model if family == "vl" else text_model
    prompt = build_prompt(loaded, PROMPT, [images["wide"]] if family == "vl" else [])
    analysis = Analysis(loaded, prompt)
    _, tf = analysis.baseline(3)
    vision = [t.index for t in prompt.tokens if t.modality == "vision"]
    question = _between(prompt, loaded, max(vision) + 1 if vision else 2)  # after "<|im_start|>user\n"
    answer = tf.answer_positions.tolist()
    by_hand = {"question->last": (question, [prompt.length - 1]), "question->answer": (question, answer)}
    if family == "vl":
        by_hand.update({"image->last": (vision, [prompt.length - 1]), "image->question": (vision, question)})
    units = _units(loaded, prompt, flows=list(by_hand))
    naive = NaiveEngine(analysis, tf)
    for unit in units:
        keys, queries = by_hand[unit.label]
        reference = _explicit_mask_logits(loaded, tf, (0, 1), keys, queries)
        assert (naive.logprobs((0, 1), [unit.knockout()])[0] - reference).abs().max() <= 1e-5, unit.label


CASES = [("vl", dict(unit="region:2", mask_mode="both")), ("vl", dict(unit="image", mask_mode="vision")),
         ("vl", dict(unit="word", mask_mode="both")),
         ("vl", dict(unit="groups", groups=["box=10,5,70,40", "words=text:this image", "span=pos:3-5"])),
         ("vl", dict(flows=["image->last", "question->answer", "image->question", "last->answer"])),
         ("text", dict(unit="word")), ("text", dict(unit="groups", groups=["words=text:Describe the"])),
         ("text", dict(flows=["question->last", "prompt->answer"]))]


@pytest.mark.slow
@pytest.mark.parametrize("block_from", ["all", "answer"])
@pytest.mark.parametrize("family,options", CASES, ids=[f"{f}-{o.get('unit', 'flow')}" for f, o in CASES])
def test_fast_equals_naive_for_every_kind_of_unit(family, options, block_from, vl_model, text_model, images):
    loaded = vl_model if family == "vl" else text_model
    prompt = build_prompt(loaded, PROMPT, [images["wide"]] if family == "vl" else [])
    attentions = ("causal", "bidirectional") if family == "vl" else ("causal",)
    for vision_attention in attentions:
        analysis = Analysis(loaded, prompt, block_from, vision_attention)
        _, tf = analysis.baseline(2)
        knockouts = [unit.knockout() for unit in _units(loaded, prompt, **options)]
        naive, fast = NaiveEngine(analysis, tf), FastEngine(analysis, tf)
        for window in ((0, 1), (2, 3)):
            expected = naive.logprobs(window, knockouts)
            assert (fast.logprobs(window, knockouts) - expected).abs().max() <= 2e-5, (window, vision_attention)
        assert (expected - naive.base_logprobs).abs().max() > 0  # some unit moved the answer


def test_token_units_are_the_positions_the_mask_mode_selects(vl_model, images):
    prompt = build_prompt(vl_model, PROMPT, [images["wide"]])
    units = _units(vl_model, prompt, mask_mode="both")
    assert [u.keys for u in units] == [[p] for p in range(prompt.length)]
    assert [u.label for u in units] == [t.text if t.modality != "vision" else f"image1 r{t.row} c{t.col}"
                                        for t in prompt.tokens]
    assert all(u.knockout().queries is None for u in units)


@pytest.mark.slow
def test_planted_region_ranks_first_and_image_to_last_destroys_the_answer():
    """On fresh pictures of the demo task: the 2×2 block holding the shape is the most needed region, and
    blocking the last position from the image at every layer loses the colour."""
    from mask_impact.demo import demo_model_path
    from mask_impact.metrics import compute_all
    from mask_impact.models import load_model

    loaded = load_model(str(demo_model_path(True)), True, "cpu", "float32")
    every_layer = (0, loaded.adapter.num_layers - 1)
    count, first, changed, drops = 30, 0, 0, []
    for example, prompt in shape_pictures(loaded, 4242, count):
        analysis = Analysis(loaded, prompt)
        baseline, tf = analysis.baseline(3)
        engine = FastEngine(analysis, tf)
        regions = _units(loaded, prompt, "region:2", mask_mode="vision")
        values = compute_all(engine.base_logprobs, engine.logprobs(every_layer, [u.knockout() for u in regions]),
                             tf.answer_ids)["logprob_drop"]
        holder = next(i for i, u in enumerate(regions) if any(
            (prompt.tokens[p].row, prompt.tokens[p].col) == (example.row, example.col) for p in u.keys))
        first += max(range(len(values)), key=values.__getitem__) == holder
        flow = _units(loaded, prompt, flows=["image->last"])[0].knockout()
        drops.append(compute_all(engine.base_logprobs, engine.logprobs(every_layer, [flow]),
                                 tf.answer_ids)["prob_change_pct"][0])
        ids, _ = analysis.generate(3, analysis.plan(every_layer, [flow]))
        changed += loaded.tokenizer.decode(ids, skip_special_tokens=True).strip() != baseline.text.strip()
    assert first >= 0.9 * count, first
    assert changed >= 0.9 * count and sum(drops) / count <= -80, (changed, drops)


def test_results_list_units_and_the_csv_has_a_row_per_window_and_unit(tmp_path):
    common = ["--output-dir", str(tmp_path), "--no-progress", "--generate-top", "2", "--demo"]
    assert main(["--unit", "region:2", "--output", "region", *common], True) == 0
    data = json.loads((tmp_path / "region.json").read_text())
    assert data["schema_version"] == 2 and "positions" not in data
    assert [u["kind"] for u in data["units"]] == ["region"] * 4  # the 128×128 demo picture: 4×4 tokens
    assert data["meta"]["settings"]["mask_mode"] == "vision"  # what region units group
    assert all(len(row) == 4 for row in data["metrics"]["logprob_drop"])
    top = data["generations"][0]
    assert data["units"][top["unit"]]["label"] == top["label"]
    rows = (tmp_path / "region.csv").read_text().splitlines()
    assert len(rows) == 1 + len(data["windows"]) * 4
    assert rows[1].startswith('0,0,layer 0,0,region,image1 r0-1 c0-1,"4-5,8-9",,,vision,1,0.0,0.0,64.0,64.0,')
    assert main(["--flow", "image->last", "--flow", "question->answer", "--output", "flow", *common], True) == 0
    flows = json.loads((tmp_path / "flow.json").read_text())["units"]
    assert [(u["label"], u["queries"], u["queries_from"]) for u in flows] == [
        ("image->last", [31], None), ("question->answer", [], 31)]
    assert ",answer," in (tmp_path / "flow.csv").read_text().splitlines()[2]


def test_a_batch_names_groups_and_flows_in_yaml(tmp_path):
    config = tmp_path / "batch.yaml"
    config.write_text("defaults: {demo: true, no_progress: true, generate_top: 0}\n"
                      "runs:\n"
                      "  - {name: objects, unit: groups, group: {shape: '64,0,128,64', corner: 'pos:4'}}\n"
                      "  - {name: flows, flow: 'image->last'}\n"
                      "  - {name: two, flow: ['image->last', 'q->last'], group: 'q=text:\"What color\"'}\n")
    assert main(["--config", str(config), "--output-dir", str(tmp_path)], True) == 0
    folder = tmp_path / "batch"
    labels = lambda name: [u["label"] for u in json.loads((folder / f"{name}.json").read_text())["units"]]  # noqa
    assert labels("objects") == ["shape", "corner"] and labels("flows") == ["image->last"]
    assert labels("two") == ["image->last", "q->last"]


@pytest.mark.parametrize("argv,message", [
    (["--demo", "--flow", "image->nowhere"], "no group is named 'nowhere'"),
    (["--demo", "--flow", "image-last"], "is not understood; write SOURCE->DESTINATION"),
    (["--demo", "--unit", "region:0"], "between 1 and"),
    (["--demo", "--unit", "regions"], "--unit 'regions' is not understood"),
    (["--demo", "--unit", "groups"], "none is given"),
    (["--demo", "--group", "q=text:"], "the text span is empty"),
    (["--demo", "--group", "q=text:''"], "the text span is empty"),
    (["--demo", "--group", "image=pos:1"], "is built in"),
    (["--demo", "--group", "a=pos:1", "--group", "a=pos:2"], "given twice"),
    (["--demo", "--group", "a=1,2,3"], "is not understood; write a pixel box"),
    (["--demo", "--group", "a=5,5,1,9"], "the box 5,5,1,9 is empty"),
    (["--demo", "--group", "a=1,1,9,9@2"], "names image 2, but 1 image is given"),
    (["--demo", "--flow", "answer->last"], "answer can only be a flow's destination"),
    (["--demo", "--flow", "image->last", "--unit", "word"], "drop --unit word"),
    (["--demo", "--flow", "image->last", "--flow", "image->last"], "given twice"),
    (["--demo", "--unit", "region:2", "--mask-mode", "text"], "--mask-mode text selects none"),
    (["--demo", "--group", "a=500,0,600,20", "--unit", "groups"], "lies outside image 1 (128×128 pixels)"),
    (["--demo", "--group", "a=0,0,5000,5000", "--unit", "groups"],  # partly outside: refused, not clipped
     "the box 0,0,5000,5000 reaches outside image 1 (128×128 pixels: 0,0,128,128); give the part inside it, "
     "0,0,128,128"),
    (["--demo", "--group", "a=-4,10,20,30", "--flow", "a->last"], "the box -4,10,20,30 reaches outside image 1"),
    (["--demo", "--group", "a=text:zebra", "--unit", "groups"], "does not occur in the prompt's text"),
    (["--demo", "--group", "a=pos:2-900", "--unit", "groups"], "position 32 is past the prompt's 32 positions"),
    (["--demo", "--flow", "question->image"], "--flow question->image blocks nothing"),
    (["--demo", "--flow", "image->question", "--block-from", "answer"],
     "blocks nothing with --block-from answer: none of its queries is an answer position"),
    (["--model", "MODEL", "--prompt", "hi", "--flow", "image->last"], "no --image is given"),
])
def test_bad_unit_group_and_flow_options_are_one_line(argv, message, capsys, in_tmp):
    from mask_impact.demo import demo_model_path

    argv = [str(demo_model_path(True)) if arg == "MODEL" else arg for arg in argv]
    err = cli_error(capsys, argv + ["--no-progress"])
    assert message in err, err
    assert not (in_tmp / "output").exists()


@pytest.mark.parametrize("argv,message", [
    (["--demo", "--flow", "image->last"], "'image' names image tokens; text-only models have none"),
    (["--demo", "--unit", "image"], "text-only models have none"),
    (["--demo", "--group", "a=1,1,5,5"], "no --image is given"),
])
def test_image_groups_on_a_text_model_are_refused(argv, message, capsys, in_tmp):
    assert message in cli_error(capsys, argv, vision=False)


def test_check_units_needs_no_model():
    check_units(parse_units("groups", ["a=1,2,3,4@2", "b=pos:1-3", "c=text:x y"], []), 2, True)
    check_units(parse_units("token", ["a=1,2,3,4@2"], ["a->last", "image2->a"]), 2, True)
    with pytest.raises(UsageError, match="say which one the box is on with @N"):
        check_units(parse_units("token", ["a=1,2,3,4"], []), 2, True)
    assert parse_group("q=text:'quick brown'").value == ("quick brown",)
    assert parse_group("p=pos:3,1-2").value == (1, 2, 3)
    assert parse_group("b=0,0,10.5,20@1").value == (0.0, 0.0, 10.5, 20.0)
    imports = subprocess.run([sys.executable, "-c", "import sys, mask_impact.units; print('torch' in sys.modules)"],
                             capture_output=True, text=True, cwd=ROOT, check=True)
    assert imports.stdout.strip() == "False"  # the early checks run before torch is imported


# --- defects found by a hostile pass, each with the case that showed it ---------------------------------------------

def test_a_flow_whose_queries_see_only_themselves_is_refused(capsys, in_tmp):
    """The reason is true: a query at the key itself does not come before it, it is never blocked from itself."""
    itself = ": every query comes before every key or is the first key itself (a position is never blocked from itself)"
    err = cli_error(capsys, ["--demo", "--flow", "last->last", "--no-progress"])
    assert "--flow last->last blocks nothing" + itself in err
    err = cli_error(capsys, ["--demo", "--group", "a=pos:5", "--flow", "a->a", "--no-progress"])
    assert "--flow a->a blocks nothing" + itself in err
    err = cli_error(capsys, ["--demo", "--group", "a=pos:3", "--group", "b=pos:3-5", "--flow", "b->a", "--no-progress"])
    assert "--flow b->a blocks nothing" + itself in err
    err = cli_error(capsys, ["--demo", "--group", "a=pos:3", "--group", "b=pos:4-5", "--flow", "b->a", "--no-progress"])
    assert err.endswith("--flow b->a blocks nothing: every query comes before every key, and attention only looks "
                        "back\n")  # no query at a key: nothing added


def test_block_from_answer_is_written_into_each_unit(tmp_path):
    argv = ["--demo", "--unit", "word", "--block-from", "answer", "--output-dir", str(tmp_path), "--no-progress",
            "--generate-top", "0", "--output", "answer"]
    assert main(argv, False) == 0
    data = json.loads((tmp_path / "answer.json").read_text())
    last = len(data["tokens"]) - 1
    assert all(u["queries"] == [] and u["queries_from"] == last for u in data["units"])
    assert all(row.split(",")[7] == "answer" for row in (tmp_path / "answer.csv").read_text().splitlines()[1:]
               if '"' not in row)


def test_box_groups_and_text_spans_are_exact(vl_model, images, tmp_path):
    prompt = build_prompt(vl_model, PROMPT, [images["odd"]])  # 300 pixels over 9 columns: 33.33... each
    unit, = _units(vl_model, prompt, "groups", ["a=0,0,33.332,29.999"])
    assert [(prompt.tokens[p].row, prompt.tokens[p].col) for p in unit.keys] == [(0, 0)]  # not column 1 at 33.333...
    with pytest.raises(UsageError, match="does not occur"):  # raw markup: text is never matched across the image
        _units(vl_model, build_prompt(vl_model, "Look at<|vision_start|><|image_pad|><|vision_end|>this.",
                                      [images["wide"]], raw_prompt=True), "groups", ['x=text:"atthis"'])


def test_word_labels_decode_split_characters_whole(text_model):
    prompt = build_prompt(text_model, "café naïve 🙂🙂", [])
    labels = [u.label for u in _units(text_model, prompt, "word") if u.keys[0] in prompt.user_positions]
    assert labels == ["café", "naïve", "🙂🙂"]


def test_units_over_several_images_have_no_box_and_patch_stages_refuse_them(vl_model, images, capsys, in_tmp):
    prompt = build_prompt(vl_model, PROMPT, [images["wide"], images["square"]])
    unit, = _units(vl_model, prompt, flows=["image->last"])
    assert unit.box is None and unit.image is None
    vision = [t.index for t in prompt.tokens if t.modality == "vision"]
    err = cli_error(capsys, ["--demo", "--image", images["wide"], "--image", images["square"], "--stage", "pixels",
                             "--unit", "groups", "--group", f"g=pos:{vision[0]},{vision[-1]}", "--no-progress"])
    assert "holds tokens of several images" in err


@pytest.mark.parametrize("argv,message", [
    (["--demo", "--group", "a=pos:3"], "--group a is not used"),
    (["--demo", "--group", "a=pos:0-9999999", "--unit", "groups"], "more than 1,048,576 positions"),
    (["--demo", "--unit", " region:2"], None),  # spaces around the unit are not part of it
])
def test_more_options_found_wanting(argv, message, capsys, in_tmp):
    if message is None:
        assert main(argv + ["--no-progress", "--generate-top", "0"], True) == 0
        return
    assert message in cli_error(capsys, argv + ["--no-progress"])


def test_a_yaml_group_without_spec_is_one_line(tmp_path, capsys):
    config = tmp_path / "b.yaml"
    config.write_text("defaults: {demo: true}\nruns:\n  - {unit: groups, group: {a: }}\n")
    assert "group 'a' has no SPEC" in cli_error(capsys, ["--config", str(config), "--output-dir", str(tmp_path)])


def test_a_runs_unit_group_and_flow_options_are_parsed_once(vl_model, images, monkeypatch):
    """The checks before loading (RunConfig.validate) and the units of the prompt (build_units) read one parse of
    each option: each group and flow is parsed once, and equal options give the same UnitOptions."""
    from collections import Counter

    from mask_impact import options
    from mask_impact.config import RunConfig

    calls = Counter()
    for name in ("parse_unit", "parse_group", "parse_flow"):
        original = getattr(options, name)
        monkeypatch.setattr(options, name, lambda text, original=original, name=name: (
            calls.update([(name, text)]), original(text))[1])
    options._parsed_units.cache_clear()
    config = RunConfig(model="demo", prompt=PROMPT, images=[images["square"]], mask_mode="both",
                       groups=["a=0,0,48,48"], flows=["a->last", "question->last"])
    config.validate(True)
    prompt = build_prompt(vl_model, PROMPT, config.images)
    units = build_units(prompt, vl_model.tokenizer, config, prompt.length - 1)
    assert [u.label for u in units] == ["a->last", "question->last"]
    assert calls == Counter({("parse_unit", "token"): 1, ("parse_group", "a=0,0,48,48"): 1,
                             ("parse_flow", "a->last"): 1, ("parse_flow", "question->last"): 1})
    assert config.unit_options() is parse_units("token", ["a=0,0,48,48"], ["a->last", "question->last"])
    options._parsed_units.cache_clear()
