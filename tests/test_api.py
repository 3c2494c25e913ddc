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
from tests.support import one_error_worded_twice


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
    (lambda a: a.run(42), InvalidType, "prompt must be a str or a list of str, not int"),
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
# each option named as Python names it (errors.mention), and no flag.
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
    one_error_worded_twice(caught.value, cli.removeprefix("error: ").strip())


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


def test_a_damaged_result_is_refused_when_loaded_naming_what_is_wrong(analyzer, tmp_path):
    """Parts that do not fit together: refused by load (NotAResult), not an IndexError or a short table later."""
    good = analyzer.run("What color is the shape?", images=[str(DEMO_IMAGE)], layers="1-2", progress=False).data
    units, windows = len(good["units"]), len(good["windows"])
    drops = good["metrics"]["logprob_drop"]

    def damaged(**changes):
        return json.loads(json.dumps(dict(good, **changes)))

    cases = {
        "units is not a list of objects with a label and keys": damaged(units=None),
        f"metrics 'logprob_drop' row 0 has {units} values for {units - 1} units": damaged(units=good["units"][:-1]),
        f"metrics 'logprob_drop' row 0 has {units} values for {units + 1} units":
            damaged(units=good["units"] + good["units"][:1]),
        f"metrics 'logprob_drop' row 1 has {units - 1} values for {units} units":
            damaged(metrics=dict(good["metrics"], logprob_drop=[drops[0], drops[1][:-1]])),
        "metrics 'kl' row 0 holds a value that is not a number":
            damaged(metrics=dict(good["metrics"], kl=[["x"] * units] * windows)),
        f"metrics 'logprob_drop' has not one row per window ({windows})":
            damaged(metrics=dict(good["metrics"], logprob_drop=drops[:1])),
        "windows is not a list of [first layer, last layer] pairs": damaged(windows=[1, 2]),
        "window_labels does not name the 2 windows": damaged(window_labels=["one"]),
        "baseline is not an object with the answer's text": damaged(baseline="red"),
        "metrics is not an object of metric grids": damaged(metrics=[]),
    }
    for number, (message, data) in enumerate(cases.items()):
        (tmp_path / f"{number}.json").write_text(json.dumps(data))
        with pytest.raises(NotAResult, match=re.escape(f"is not a mask_impact result: {message}")):
            KnockoutResult.load(tmp_path / f"{number}.json")
        with pytest.raises(NotAResult, match=re.escape(message)):
            KnockoutResult(data)
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(NotAResult, match="its JSON is nested too deeply to read"):
        KnockoutResult.load(tmp_path / "deep.json")
    (tmp_path / "good.json").write_text(json.dumps(good))
    assert len(KnockoutResult.load(tmp_path / "good.json").to_pandas()) == units * windows


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


def test_a_custom_metric_written_as_logprob_drop_gives_logprob_drop(analyzer, tmp_path):
    """A callable of the baseline and knocked-out log-probabilities, passed to ``run`` or registered."""
    import torch

    import mask_impact
    from mask_impact import metrics as registry

    def my_drop(base, knocked, answer):  # Σ_t log p(y_t) − log p_KO(y_t), written from scratch
        steps = torch.arange(len(answer))
        return (base[steps, answer] - knocked[:, steps, answer]).sum(-1)

    def answer_prob(base, knocked, answer):
        return knocked[:, 0, answer[0]].exp()

    options = dict(images=[str(DEMO_IMAGE)], unit="region:2", num_tokens=2, progress=False)
    result = analyzer.run("What color is the shape?", metrics={"my_drop": my_drop}, **options)
    assert list(result.data["metrics"])[-1] == "my_drop"
    assert np.allclose(result.metric("my_drop"), result.metric("logprob_drop"), rtol=1e-6, atol=1e-6)
    assert np.abs(result.metric("my_drop")).max() > 1  # the shape's block costs the answer: not a grid of zeros
    assert "my_drop" in result.to_pandas().columns
    paths = result.save(tmp_path / "custom")
    assert paths["csv"].read_text().splitlines()[0].endswith("first_divergence,my_drop")
    mask_impact.register_metric("answer_prob", answer_prob)
    try:
        registered = analyzer.run("What color is the shape?", **options)
        base = np.exp(registered.data["baseline"]["logprobs"][0])
        # prob_change_pct = 100 (p_KO − p) / p, so p_KO = p (1 + pct / 100)
        assert np.allclose(registered.metric("answer_prob"), base * (1 + registered.metric("prob_change_pct") / 100),
                           rtol=1e-4, atol=1e-7)
        assert registered.data["metrics"]["logprob_drop"] == result.data["metrics"]["logprob_drop"]
    finally:
        registry.CUSTOM.pop("answer_prob")
    assert "answer_prob" not in analyzer.run("What color is the shape?", **options).data["metrics"]
    with pytest.raises(InvalidArgument, match="metric name 'kl' is a built-in metric's"):
        analyzer.run("What color is the shape?", metrics={"kl": my_drop}, **options)
    with pytest.raises(InvalidType, match="metric 'x' must be a callable"):
        analyzer.run("What color is the shape?", metrics={"x": 3}, **options)
    with pytest.raises(InvalidArgument, match=r"metric 'bad' returned shape \(2,\) for 4 knockouts"):
        analyzer.run("What color is the shape?", metrics={"bad": lambda base, knocked, answer: base[:, 0]}, **options)


def test_knockout_objects_give_the_numbers_of_the_equivalent_strings(analyzer):
    from mask_impact import Box, Group, Knockout, Positions, Text

    prompt, options = "What color is the shape?", dict(images=[str(DEMO_IMAGE)], num_tokens=2, progress=False)
    strings = analyzer.run(prompt, unit="groups", groups=["shape=64,0,128,64", "q=text:\"color\""], **options)
    objects = analyzer.run(prompt, knockouts=[Knockout(Box(64, 0, 128, 64), name="shape"),
                                              Knockout(Text("color"), name="q")], **options)
    grouped = analyzer.run(prompt, unit="groups", groups=[Group("shape", Box(64, 0, 128, 64)),
                                                           Group("q", Text("color"))], **options)
    assert objects.data["metrics"] == strings.data["metrics"] == grouped.data["metrics"]
    assert [u["label"] for u in objects.units] == ["shape", "q"] and objects.metric()[2, 0] > 1
    flows = analyzer.run(prompt, flows=["image->last", "question->last"], **options)
    as_objects = analyzer.run(prompt, knockouts=[Knockout("image", "last"), Knockout("question", "last")], **options)
    assert as_objects.data["metrics"] == flows.data["metrics"]
    assert [u["label"] for u in as_objects.units] == ["image->last", "question->last"]
    # one position, every query: the token knockout of the plain token sweep (in other batches: float32 rounding of
    # the values' size)
    tokens = analyzer.run(prompt, mask_mode="vision", **options)
    column = next(u["index"] for u in tokens.units if u["label"] and u["box"] == [64.0, 32.0, 96.0, 64.0])
    position = tokens.units[column]["keys"][0]
    single = analyzer.run(prompt, knockouts=[Knockout(Positions(position))], **options)
    expected = tokens.metric()[:, column]
    rounding = 16 * np.finfo(np.float32).eps * abs(expected).max()
    assert np.allclose(single.metric()[:, 0], expected, rtol=0, atol=rounding)
    assert abs(expected).max() > 1
    with pytest.raises(InvalidArgument, match="mixes group knockouts"):
        analyzer.run(prompt, knockouts=[Knockout(Positions(3)), Knockout("image", "last")], **options)
    with pytest.raises(InvalidArgument, match="swept as flows, which are the run's units; leave unit='groups' out"):
        analyzer.run(prompt, unit="groups", knockouts=[Knockout("image", "last")], **options)
    with pytest.raises(InvalidArgument, match="swept as groups; unit='region:2' asks for another unit"):
        analyzer.run(prompt, unit="region:2", knockouts=[Knockout(Positions(3))], **options)
    with pytest.raises(InvalidArgument, match="group far: the box 500,500,600,600 lies outside image 1"):
        analyzer.run(prompt, knockouts=[Knockout(Box(500, 500, 600, 600), name="far")], **options)
    with pytest.raises(InvalidType, match="keys must be a Box, Positions, Text, Group or a group name"):
        Knockout(3)


def test_a_list_of_prompts_is_the_runs_one_by_one(analyzer):
    prompts = ["What color is the shape?", "What shape is it?"]
    options = dict(images=[str(DEMO_IMAGE)], unit="region:2", num_tokens=2, progress=False)
    both = analyzer.run(prompts, **options)
    alone = [analyzer.run(prompt, **options) for prompt in prompts]
    assert [r.answer for r in both] == [r.answer for r in alone] and both[0].answer == "red"
    assert [r.data["metrics"] for r in both] == [r.data["metrics"] for r in alone]
    per_prompt = analyzer.run(prompts, images=[[str(DEMO_IMAGE)], [str(DEMO_IMAGE)]], unit="region:2", num_tokens=2,
                              progress=False)
    assert [r.data["metrics"] for r in per_prompt] == [r.data["metrics"] for r in alone]
    with pytest.raises(InvalidType, match=r"prompt\[1\] must be a str, not int"):
        analyzer.run(["hi", 3])
    with pytest.raises(InvalidArgument, match="images has 1 lists for 2 prompts"):
        analyzer.run(prompts, images=[[str(DEMO_IMAGE)]])


def test_to_pandas_has_the_csvs_columns_and_values(analyzer, tmp_path):
    import pandas as pd

    result = analyzer.run("What color is the shape?", images=[str(DEMO_IMAGE)], unit="region:2",
                          mask_mode="both", num_tokens=2, progress=False)
    table = result.to_pandas()
    paths = result.save(tmp_path / "r", html=False)
    csv = pd.read_csv(paths["csv"], keep_default_na=False, dtype=str)
    assert list(table.columns) == list(csv.columns)
    assert {"queries", "patches", "x0", "y0", "x1", "y1"} <= set(table.columns)
    assert table["keys"].tolist() == csv["keys"].tolist()  # one format: 4-5,8-9
    assert any("-" in keys and "," in keys for keys in table["keys"])
    assert table["image"].dropna().tolist() == [float(v) for v in csv["image"] if v]  # counted from 1
    assert np.allclose(table["logprob_drop"].astype(float), csv["logprob_drop"].astype(float), rtol=1e-12)
    flows = analyzer.run("What color is the shape?", images=[str(DEMO_IMAGE)], flows=["image->last"], num_tokens=2,
                         progress=False).to_pandas()
    assert flows["queries"].iloc[0] != ""  # a flow lists its queries, written like its keys


def test_repr_show_and_html_escape_token_labels(analyzer, capsys):
    result = analyzer.run("What color is the shape?", images=[str(DEMO_IMAGE)], unit="region:2", num_tokens=1,
                          progress=False)
    text = repr(result)
    assert text.startswith("KnockoutResult(answer='red', stage='decoder', 3 windows × 4 region units")
    assert "image1 r0-1 c2-3" in text
    assert repr(analyzer).startswith("Analyzer('demo (") and "qwen3_vl vision-language, 3 layers" in repr(analyzer)
    data = json.loads(json.dumps(result.data))
    data["units"][0]["label"] = "a\nb\x1b[31m"
    data["metrics"]["logprob_drop"][0][0] = 99.0
    odd = KnockoutResult(data)
    odd.show(top=2)
    out = capsys.readouterr().out
    assert "a\\nb\\x1b[31m" in out and "\x1b" not in out
    assert len(out.splitlines()) == 4  # the repr, the header, two cells: the \n label breaks no line
    page = odd._repr_html_()
    assert len(page) < 5000 and "<iframe" not in page and "a\\nb\\x1b[31m" in page
    assert "<script" not in KnockoutResult(dict(data, baseline=dict(data["baseline"], text="<script>")))._repr_html_()


def test_from_pretrained_takes_torch_dtypes_and_hub_keywords(analyzer):
    import torch

    folder = demo_model_path(True)
    own = Analyzer.from_pretrained(folder, device="cpu", dtype=torch.float32, revision="main",
                                   attn_implementation="sdpa", local_files_only=True)
    assert own.loaded.dtype == torch.float32
    options = dict(images=[str(DEMO_IMAGE)], unit="region:2", num_tokens=2, progress=False)
    assert own.run("What color is the shape?", **options).data["metrics"] == \
        analyzer.run("What color is the shape?", **options).data["metrics"]
    for keywords, kind, message in [
        ({"dtype": torch.int8}, InvalidArgument, "dtype=torch.int8 is not supported"),
        ({"dtype": 3}, InvalidType, "dtype must be a str .* or a torch.dtype, not int"),
        ({"quantization_config": object()}, InvalidArgument, "quantization_config is refused: quantised weights"),
        ({"load_in_4bit": True}, InvalidArgument, "load_in_4bit is refused"),
        ({"revison": "main"}, InvalidType, "unexpected keyword argument 'revison' \\(did you mean 'revision'"),
        ({"attn_implementation": "eager"}, InvalidArgument, "attn_implementation='eager' is refused for qwen3_vl: "
                                                             "its native attention is 'sdpa'"),
        ({"torch_dtype": torch.float32}, InvalidType, "write dtype=, not torch_dtype="),
    ]:
        with pytest.raises(kind, match=message):
            Analyzer.from_pretrained(folder, device="cpu", **keywords)


def test_a_module_wrapping_a_model_is_refused_in_the_librarys_words(analyzer):
    import torch

    class Wrap(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

    model = analyzer.loaded.model
    with pytest.raises(InvalidType, match="model is a Wrap, not a Qwen3VLForConditionalGeneration .*not a module "
                                          "wrapping it"):
        Analyzer(Wrap(model), analyzer.loaded.processor)
    with pytest.raises(InvalidType, match="model is a Qwen3VLModel, not a Qwen3VLForConditionalGeneration"):
        Analyzer(model.model, analyzer.loaded.processor)


def test_the_public_names_import_without_torch():
    import subprocess
    import sys

    from tests.support import ROOT

    code = ("import sys, mask_impact\n"
            "from mask_impact import Box, Group, Knockout, Positions, Text, demo_image, register_metric\n"
            "assert demo_image().is_file() and demo_image().name == 'testimg.png'\n"
            "assert str(Group('cat', Box(1, 2, 30.5, 40, image=2))) == 'cat=1,2,30.5,40@2'\n"
            "assert str(Positions(3, range(5, 8), 10)) == 'pos:3,5-7,10' and str(Text('a b')) == 'text:\"a b\"'\n"
            "assert 'torch' not in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr


def test_an_opened_photo_is_given_to_the_model_upright(tmp_path):
    """A PIL image opened from a phone photo keeps its EXIF orientation, which the copy handed to the model would
    drop: the copy is the picture as viewers show it."""
    from mask_impact.api import image_file

    exif = Image.Exif()
    exif[0x0112] = 6  # turn 90° clockwise to show
    stored = np.zeros((64, 128, 3), np.uint8)
    stored[0, :8] = 255  # the stored top row's left end: shown at the top right
    Image.fromarray(stored).save(tmp_path / "phone.png", exif=exif)
    with Image.open(tmp_path / "phone.png") as photo:
        copy = image_file(photo, 0, tmp_path)
    with Image.open(copy) as given:
        shown = np.asarray(given.convert("RGB"))
    assert shown.shape == (128, 64, 3)
    assert shown[:8, -1].min() == 255 and shown[8:, -1].max() == 0 and shown[:, :-1].max() == 0


@pytest.mark.parametrize("options,flags,cli,python,yaml", [
    ({"num_tokens": 0}, ["--num-tokens", "0"], "--num-tokens 0: must be between 1 and 1,048,576",
     "num_tokens=0: must be between 1 and 1,048,576", "num_tokens: 0: must be between 1 and 1,048,576"),
    ({"layers": "5-2"}, ["--layers", "5-2"], "--layers '5-2': the range '5-2' runs backwards; write it as 2-5",
     "layers='5-2': the range '5-2' runs backwards; write it as 2-5",
     "layers: '5-2': the range '5-2' runs backwards; write it as 2-5"),
    ({"generate_top": -1}, ["--generate-top", "-1"], "--generate-top -1: must be 0 or more",
     "generate_top=-1: must be 0 or more", "generate_top: -1: must be 0 or more"),
])
def test_an_option_error_is_one_error_worded_by_each_front_end(analyzer, tmp_path, capsys, options, flags, cli, python,
                                                                yaml):
    """(option, value, why) rendered where it is read: the command line's flag, Python's keyword, YAML's key; no
    message text rewritten."""
    assert main(["--demo", *flags, "--output-dir", str(tmp_path), "--no-progress"], True) == 2
    assert capsys.readouterr().err == f"error: {cli}\n"
    with pytest.raises(InvalidArgument) as caught:
        analyzer.run("What color is the shape?", images=[str(DEMO_IMAGE)], progress=False, **options)
    assert str(caught.value) == python
    name, value = next(iter(options.items()))
    batch = tmp_path / "batch.yaml"
    batch.write_text(f"defaults:\n  demo: true\nruns:\n  - {{name: bad, {name}: {json.dumps(value)}}}\n")
    assert main(["--config", str(batch), "--output-dir", str(tmp_path), "--no-progress"], True) == 1
    assert f"bad: error: {yaml}" in capsys.readouterr().err
