"""The Python API: the README's example end to end, the same numbers as the command line, bad input."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from mask_impact import Analyzer, InvalidArgument, InvalidType, KnockoutResult, MaskImpactError, NotAResult
from mask_impact.cli import main
from mask_impact.config import DEMO_IMAGE, UsageError
from mask_impact.demo import demo_model_path
from mask_impact.errors import python_wording


@pytest.fixture(scope="module")
def analyzer():
    return Analyzer.demo(vision=True)


def test_the_readme_example_end_to_end(analyzer, tmp_path):
    result = analyzer.run("What color is the shape?", images=[str(DEMO_IMAGE)], unit="region:2", progress=False)
    assert result.answer == "red" and len(result.units) == 4 and len(result.windows) == 3
    drops = result.metric("logprob_drop")
    assert drops.shape == (3, 4) and np.isfinite(drops).all()
    top = result.top(3)
    assert [cell["logprob_drop"] for cell in top] == sorted(drops.ravel(), reverse=True)[:3]
    assert top[0]["label"] == "image1 r0-1 c2-3" and top[0]["window"] == (2, 2)  # the shape's block, at layer 2
    table = result.to_pandas()
    assert len(table) == 12 and {"window_label", "label", "kind", "logprob_drop", "kl"} <= set(table.columns)
    assert table.loc[(table.layer_start == 2) & (table.unit == top[0]["unit"]), "logprob_drop"].item() == \
        top[0]["logprob_drop"]
    paths = result.save(tmp_path / "cat")
    assert sorted(p.name for p in paths.values()) == ["cat.csv", "cat.html", "cat.json"]
    loaded = KnockoutResult.load(paths["json"])
    assert loaded.data == json.loads(json.dumps(result.data)) and np.array_equal(loaded.metric(), drops)
    with pytest.raises(InvalidArgument, match="already exists"):
        result.save(tmp_path / "cat")
    figures = result.plot(tmp_path / "cat")
    assert sorted(p.name for p in figures.values()) == ["cat.heatmap.png", "cat.overlay.png"]
    assert all(np.asarray(Image.open(p).convert("L"), dtype=float).std() > 20 for p in figures.values())


def test_the_api_gives_the_command_lines_numbers(analyzer, tmp_path):
    assert main(["--demo", "--flow", "image->last", "--flow", "question->last", "--output-dir", str(tmp_path),
                 "--output", "cli", "--no-progress"], True) == 0
    cli = json.loads((tmp_path / "cli.json").read_text())
    api = analyzer.run("What color is the shape?", images=str(DEMO_IMAGE), flows=["image->last", "question->last"],
                       progress=False).data
    assert api["metrics"] == cli["metrics"] and api["units"] == cli["units"] and api["generations"] == cli["generations"]
    assert api["meta"]["fingerprint"] == cli["meta"]["fingerprint"]


def test_pil_images_and_schema_1_results(analyzer, tmp_path):
    picture = Image.open(DEMO_IMAGE).convert("RGB")
    result = analyzer.run("What color is the shape?", images=[picture], mask_mode="vision", layers="2",
                          progress=False)
    assert result.data["images"][0]["path"] == "<PIL image 1>" and result.answer == "red"
    old = dict(result.data, schema_version=1, positions=[u["keys"][0] for u in result.units])
    del old["units"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    loaded = KnockoutResult.load(tmp_path / "old.json")
    assert [u["keys"] for u in loaded.units] == [u["keys"] for u in result.units]


@pytest.mark.parametrize("call,kind,message", [
    (lambda a: a.run(42), InvalidType, "prompt must be a str, not int"),
    (lambda a: a.run("hi", units="word"), InvalidType, "unexpected keyword argument 'units' \\(did you mean 'unit'"),
    (lambda a: a.run("hi", output="x"), InvalidType, "unexpected keyword argument 'output'"),
    (lambda a: a.run("hi", num_tokens="5"), InvalidType, "num_tokens must be an int, not str"),
    (lambda a: a.run("hi", num_tokens=True), InvalidType, "num_tokens must be an int, not bool"),
    (lambda a: a.run("hi", groups=[("cat", "0,0,9,9")]), InvalidType, "groups must be a list of 'NAME=SPEC'"),
    (lambda a: a.run("hi", layers=[0, "1"]), InvalidType, "layers must be 'all', a str like"),
    (lambda a: a.run("hi", layers=[]), InvalidArgument, "layers is empty"),
    (lambda a: a.run("hi", progress="yes"), InvalidType, "progress must be True, False or a callable"),
    (lambda a: a.run("hi", images=[3.5]), InvalidType, "images\\[0\\] is a float; give a path or a PIL image"),
    (lambda a: a.run("hi", images=np.zeros((8, 8, 3))), InvalidType, "images\\[0\\] is a ndarray.*fromarray"),
    (lambda a: a.run("hi", images=5), InvalidType, "images must be a list of paths or PIL images, not int"),
    (lambda a: a.run("hi", images=[_closed_picture()]), InvalidArgument,
     "images\\[0\\] is a PIL image that cannot be read \\(ValueError: Operation on closed image\\)"),
    (lambda a: Analyzer.from_pretrained(17), InvalidType, "name must be a str or a path, not int"),
    (lambda a: Analyzer.from_pretrained("demo", device=0), InvalidType, "device must be a str, not int"),
    (lambda a: Analyzer.from_pretrained("/no/such/model"), InvalidArgument, "check the model path"),
])
def test_bad_api_input_raises_the_librarys_types(analyzer, call, kind, message):
    with pytest.raises(kind, match=message) as caught:
        call(analyzer)
    assert isinstance(caught.value, MaskImpactError) and not isinstance(caught.value, UsageError)
    assert isinstance(caught.value, TypeError if kind is InvalidType else ValueError)
    assert "--" not in str(caught.value)


def _closed_picture():
    picture = Image.open(DEMO_IMAGE)
    picture.load()
    picture.close()
    return picture


# The same bad setting given to the API and to the command line: the API's message is the command line's with
# each flag written as the keyword (errors.python_wording), and names no flag.
@pytest.mark.parametrize("options,flags,keyword,flag", [
    ({"unit": "region:0"}, ["--unit", "region:0"], "unit='region:0'", "--unit region:0"),
    ({"num_tokens": 0}, ["--num-tokens", "0"], "num_tokens=", "--num-tokens"),
    ({"stage": "pixels", "layers": "1"}, ["--stage", "pixels", "--layers", "1"], "stage='pixels'", "--stage pixels"),
    ({"layers": "7"}, ["--layers", "7"], "layers=", "--layers"),
    ({"unit": "groups", "groups": ["cat=200,200,300,300"]}, ["--unit", "groups", "--group", "cat=200,200,300,300"],
     "group cat", "--group cat"),
    ({"flows": ["image->nowhere"]}, ["--flow", "image->nowhere"], "flow image->nowhere", "--flow image->nowhere"),
    ({"images": ["no-such-picture.png"]}, ["--image", "no-such-picture.png"], "images=", "--image"),
])
def test_api_errors_name_keywords_where_the_command_line_names_flags(analyzer, tmp_path, capsys, options, flags,
                                                                       keyword, flag):
    images = options.pop("images", [str(DEMO_IMAGE)])
    with pytest.raises(InvalidArgument) as caught:
        analyzer.run("What color is the shape?", images=images, progress=False, **options)
    api = str(caught.value)
    assert keyword in api and flag not in api and not re.search(r"--[a-z]", api)
    prompt = ["--prompt", "What color is the shape?"] + ([] if "--image" in flags else ["--image", str(DEMO_IMAGE)])
    status = main(["--model", str(demo_model_path(True)), *prompt, *flags, "--output-dir", str(tmp_path),
                   "--no-progress", "--device", "cpu"], True)
    cli = capsys.readouterr().err
    assert status == 2 and cli.count("\n") == 1 and flag in cli and not list(tmp_path.iterdir())
    assert api == python_wording(cli.removeprefix("error: ").strip())


def test_saving_over_a_result_names_the_keyword(analyzer, tmp_path):
    result = analyzer.run("What color is the shape?", images=[str(DEMO_IMAGE)], layers="2", progress=False)
    result.save(tmp_path / "a")
    with pytest.raises(InvalidArgument, match="already exists; pass overwrite=True to replace it, or choose another "
                                              "path$"):
        result.save(tmp_path / "a")
    assert result.save(tmp_path / "a", overwrite=True)["json"].exists()


def test_progress_callback_sees_every_cell_once_in_order(analyzer):
    seen = []
    result = analyzer.run("What color is the shape?", images=[str(DEMO_IMAGE)], mask_mode="both", batch_size=5,
                          progress=lambda done, total: seen.append((done, total)))
    total = len(result.windows) * len(result.units)
    assert total == 3 * 32
    # after every head group: a window's 32 knockouts (batches of at most 5) hold fewer than 512 answer rows
    assert seen == [(32, total), (64, total), (96, total)]
    assert result.data["meta"]["settings"]["progress"] is False  # no bar beside the callback


def test_loading_what_is_not_a_result(analyzer, tmp_path):
    result = analyzer.run("What color is the shape?", images=[str(DEMO_IMAGE)], layers="2", progress=False)
    paths = result.save(tmp_path / "run")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "newer.json").write_text(json.dumps(dict(result.data, schema_version=3)))
    (tmp_path / "index.json").write_text(json.dumps({"schema_version": 1, "kind": "batch", "runs": []}))
    (tmp_path / "cut.json").write_text(json.dumps({k: v for k, v in result.data.items() if k != "units"}))
    for name, message in [("list.json", "not a mask_impact result: its top level is a list"),
                          ("newer.json", "schema 3 result, written by a newer mask_impact; this version .* reads "
                                         "schemas 1 and 2"),
                          ("index.json", "is a batch index; load one of its runs"),
                          ("cut.json", "not a mask_impact result: it has no units"),
                          (paths["csv"].name, "not a mask_impact result: not JSON text"),
                          ("missing.json", "cannot be read \\(No such file or directory\\)")]:
        with pytest.raises(NotAResult, match=message):
            KnockoutResult.load(tmp_path / name)
    with pytest.raises(NotAResult, match="schema_version is 7"):
        KnockoutResult({"schema_version": 7})
    with pytest.raises(InvalidType, match="path must be a str or a path, not int"):
        KnockoutResult.load(3)
    with pytest.raises(InvalidArgument, match="metric='loss' is not a metric of this result; metrics: logprob_drop"):
        result.metric("loss")
    with pytest.raises(InvalidArgument, match="k must be 0 or more"):
        result.top(-1)


@pytest.mark.slow
def test_an_analyzer_around_a_model_the_caller_loaded(analyzer):
    """``Analyzer(model, processor)``: a model loaded with transformers directly gives the demo's very numbers."""
    import torch
    import transformers

    folder = str(demo_model_path(True))
    model = transformers.Qwen3VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    processor = transformers.AutoProcessor.from_pretrained(folder)
    own = Analyzer(model, processor)
    assert own.vision and own.loaded.device.type == "cpu"
    options = dict(images=[str(DEMO_IMAGE)], mask_mode="both", num_tokens=2, progress=False)
    mine, demo = own.run("What color is the shape?", **options), analyzer.run("What color is the shape?", **options)
    assert mine.data["metrics"] == demo.data["metrics"] and mine.answer == demo.answer == "red"
    with pytest.raises(InvalidType, match="give the model's processor"):
        Analyzer(model, processor.tokenizer)  # a VL model needs the image processor too
    with pytest.raises(InvalidType, match="model must be a transformers model, not str"):
        Analyzer("Qwen/Qwen3-VL-4B-Instruct")


def test_per_step_drops_add_up_to_the_summed_drop(analyzer):
    result = analyzer.run("What color is the shape?", images=[str(DEMO_IMAGE)], unit="region:2", num_tokens=3,
                          progress=False)
    steps = result.steps()
    assert steps.shape == (*result.metric().shape, len(result.data["baseline"]["token_ids"]))
    assert np.allclose(steps.sum(-1), result.metric(), atol=1e-5)
    assert (steps != 0).any()  # not a grid of zeros
    with pytest.raises(InvalidArgument, match="no per-step 'kl'"):
        result.steps("kl")
