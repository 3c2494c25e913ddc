"""The Python API: the README's example end to end, the same numbers as the command line, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mask_impact import Analyzer, KnockoutResult, MaskImpactError
from mask_impact.cli import main
from mask_impact.config import DEMO_IMAGE


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
    with pytest.raises(MaskImpactError, match="already exists"):
        result.save(tmp_path / "cat")


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


@pytest.mark.parametrize("call,message", [
    (lambda a: a.run(42), "the prompt must be a string, not int"),
    (lambda a: a.run("hi", colour="red"), "unknown option 'colour'"),
    (lambda a: a.run("hi", images=[3.5]), "image 1 is a float"),
    (lambda a: a.run("hi", images=[str(DEMO_IMAGE)], unit="region:0"), "between 1 and"),
    (lambda a: Analyzer.from_pretrained(17), "must be a string or a path"),
])
def test_bad_api_input_raises_the_librarys_error(analyzer, call, message):
    with pytest.raises(MaskImpactError, match=message):
        call(analyzer)


def test_loading_what_is_not_a_result(tmp_path):
    (tmp_path / "a.json").write_text("[1, 2]")
    (tmp_path / "b.json").write_text(json.dumps({"schema_version": 3, "metrics": {}}))
    with pytest.raises(MaskImpactError, match="not a mask_impact result"):
        KnockoutResult.load(tmp_path / "a.json")
    with pytest.raises(MaskImpactError, match="schema 3"):
        KnockoutResult.load(tmp_path / "b.json")
    with pytest.raises(MaskImpactError, match="cannot be read"):
        KnockoutResult.load(tmp_path / "missing.json")
