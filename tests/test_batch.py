"""YAML batches: precedence, precise errors, one bad run among good ones, the shipped examples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mask_impact.batch import load_batch
from mask_impact.cli import main
from mask_impact.config import UsageError
from tests.support import ROOT


def _batch(tmp_path: Path, text: str, cli: dict | None = None, vision: bool = True):
    path = tmp_path / "batch.yaml"
    path.write_text(text, encoding="utf-8")
    return load_batch(str(path), {"config": str(path), **(cli or {})}, vision)


@pytest.mark.parametrize("defaults,run,cli,expected", [
    ("", "", {}, 5),                                  # built-in default
    ("num_tokens: 3", "", {}, 3),                     # defaults: beats built-in
    ("num_tokens: 3", "num_tokens: 7", {}, 7),        # run entry beats defaults:
    ("num_tokens: 3", "num_tokens: 7", {"num_tokens": 9}, 9),  # command line beats everything
    ("", "num_tokens: 7", {"num_tokens": 2}, 2),
])
def test_precedence_cli_over_run_over_defaults_over_builtin(tmp_path, defaults, run, cli, expected):
    text = f"defaults:\n  demo: true\n  {defaults}\nruns:\n  - name: a\n    {run}\n"
    _, _, runs = _batch(tmp_path, text, cli)
    assert runs[0].error is None and runs[0].config.num_tokens == expected


def test_falsy_command_line_values_still_win(tmp_path):
    text = "defaults:\n  demo: true\n  generate_top: 4\nruns:\n  - name: a\n    html: true\n    generate_top: 6\n"
    _, _, runs = _batch(tmp_path, text, {"generate_top": 0, "html": False})
    assert runs[0].config.generate_top == 0 and runs[0].config.html is False


def test_batch_folder_names_and_paths(tmp_path):
    (tmp_path / "pics").mkdir()
    text = ("defaults:\n  demo: true\n  output_dir: results\nruns:\n  - prompt: hi\n    image: pics/a.png\n"
            "  - name: second\n    images: [pics/a.png, /abs/b.png]\n    mask-mode: vision\n")
    name, folder, runs = _batch(tmp_path, text)
    assert name == "batch" and folder == Path("results") / "batch"
    assert [run.name for run in runs] == ["run1", "second"]
    assert runs[0].config.images == [str(tmp_path / "pics" / "a.png")]
    assert runs[1].config.images == [str(tmp_path / "pics" / "a.png"), "/abs/b.png"]
    assert runs[1].config.mask_mode == "vision" and runs[1].config.output_dir == str(folder)
    name, folder, _ = _batch(tmp_path, text, {"output": "mine", "output_dir": "elsewhere"})
    assert folder == Path("elsewhere") / "mine"


@pytest.mark.parametrize("text,message", [
    ("runs:\n  - name: a\n   prompt: x\n", "line 3"),
    ("- just\n- a list\n", "top level must be a mapping with 'runs:'"),
    ("runs: []\n", "non-empty list"),
    ("runs:\n  - name: a\n    colour: red\n", "unknown key 'colour'; valid keys: allow_special_tokens, batch_size, block_from"),
    ("defaults:\n  promt: x\nruns:\n  - name: a\n", "defaults: unknown key 'promt'"),
    ("runs:\n  - name: a\n    num_tokens: five\n", "num_tokens must be an integer (got 'five')"),
    ("runs:\n  - name: a\n    overwrite: 1\n", "overwrite must be true or false"),
    ("runs:\n  - name: a\n  - name: a\n", "two runs are named 'a'"),
    ("runs:\n  - name: a\n    model: other\n", "model is set once per batch"),
    ("extra: 1\nruns:\n  - name: a\n", "unknown top-level key 'extra'"),
    ("runs:\n  - prompt: x\n    prompt: y\n", "line 3, column 5: YAML syntax error: duplicate key 'prompt' (first on "
     "line 2)"),
    ("defaults:\n  demo: true\ndefaults:\n  num_tokens: 2\nruns:\n  - name: a\n",
     "line 3, column 1: YAML syntax error: duplicate key 'defaults' (first on line 1)"),
    ("runs:\n  - name: a\n    groups:\n      obj: pos:1\n      obj: pos:2\n",
     "line 5, column 7: YAML syntax error: duplicate key 'obj' (first on line 4)"),
    ("runs:\n  - {name: a, flow: x, flow: y}\n", "line 2, column 24: YAML syntax error: duplicate key 'flow' (first "
     "on line 2)"),
])
def test_yaml_errors_are_precise(tmp_path, text, message):
    with pytest.raises(UsageError, match=None) as caught:
        _batch(tmp_path, text)
    assert message in str(caught.value)


def test_a_merge_key_is_overridden_by_the_keys_beside_it(tmp_path):
    """YAML's `<<: *anchor` is no duplicate: the keys written beside it replace the merged ones."""
    text = ("defaults:\n  demo: true\nruns:\n  - &base\n    name: a\n    prompt: x\n    num_tokens: 2\n"
            "  - <<: *base\n    name: b\n    prompt: y\n")
    _, _, runs = _batch(tmp_path, text)
    assert [(run.name, run.config.prompt, run.config.num_tokens) for run in runs] == [("a", "x", 2), ("b", "y", 2)]


def test_missing_config_file(tmp_path, capsys):
    assert main(["--config", str(tmp_path / "nope.yaml")], True) == 2
    assert "does not exist" in capsys.readouterr().err


def test_text_script_rejects_image_keys(tmp_path):
    with pytest.raises(UsageError, match="unknown key 'image'"):
        _batch(tmp_path, "runs:\n  - name: a\n    image: x.png\n", vision=False)


def test_one_bad_run_is_reported_and_the_others_run(tmp_path, monkeypatch, capsys, images):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "batch.yaml").write_text(
        "defaults:\n  demo: true\n  generate_top: 1\n  layers: '0-1'\nruns:\n"
        "  - name: good\n    prompt: hello\n"
        f"  - name: missing_image\n    image: {tmp_path / 'gone.png'}\n"
        "  - name: no_image_for_vision\n    images: []\n    mask_mode: vision\n"
        f"  - name: also_good\n    image: {images['wide']}\n    mask_mode: both\n")
    assert main(["--config", "batch.yaml", "--no-progress"], True) == 1
    captured = capsys.readouterr()
    assert "2 done, 2 failed (missing_image, no_image_for_vision)" in captured.out
    index = json.loads((tmp_path / "output" / "batch" / "index.json").read_text())
    status = {run["name"]: run for run in index["runs"]}
    assert status["good"]["status"] == status["also_good"]["status"] == "done"
    assert "gone.png does not exist" in status["missing_image"]["error"]
    assert "needs an image" in status["no_image_for_vision"]["error"]
    for name in ("good", "also_good"):
        data = json.loads((tmp_path / "output" / "batch" / f"{name}.json").read_text())
        assert data["windows"] == [[0, 0], [1, 1]] and data["meta"]["settings"]["output"] == name
    assert not (tmp_path / "output" / "batch" / "missing_image.json").exists()
    assert (tmp_path / "output" / "batch" / "index.html").exists()


@pytest.mark.slow
@pytest.mark.parametrize("script,config,vision", [
    ("mask_impact_vl.py", "prompts_config_vl.yaml", True),
    ("mask_impact_analysis.py", "prompts_config.yaml", False),
])
def test_shipped_example_configs_run(tmp_path, monkeypatch, script, config, vision):
    monkeypatch.chdir(tmp_path)
    assert main(["--config", str(ROOT / config), "--no-progress", "--generate-top", "1"], vision) == 0
    index = json.loads((tmp_path / "output" / Path(config).stem / "index.json").read_text())
    assert index["runs"] and all(run["status"] == "done" for run in index["runs"])
    if vision:
        runs = {run["name"]: run for run in index["runs"]}
        text_only = json.loads((tmp_path / "output" / "prompts_config_vl" / "question_text_only.json").read_text())
        with_image = json.loads((tmp_path / "output" / "prompts_config_vl" / "question_with_image.json").read_text())
        assert text_only["images"] == [] and len(with_image["images"]) == 1
        assert runs["everything_window3"]["mask_mode"] == "both"


@pytest.mark.parametrize("name", ["index", "INDEX", "Index"])
def test_a_run_named_index_is_refused(tmp_path, name):
    with pytest.raises(UsageError, match=f"name '{name}' is reserved for the batch index"):
        _batch(tmp_path, f"defaults:\n  demo: true\nruns:\n  - name: {name}\n  - name: other\n")


def test_a_resume_with_other_settings_is_refused_before_any_run(tmp_path, monkeypatch, capsys):
    """A batch resumed with a flag it was not started with (`--engine naive`) refused the finished runs but computed
    the others with the new settings, a mixed batch: now every entry is checked before the first run starts."""
    monkeypatch.chdir(tmp_path)
    head = "defaults:\n  demo: true\n  generate_top: 0\n  layers: '0'\n  num_tokens: 1\nruns:\n"
    first = "  - name: first\n    prompt: 'A=3, B=7. What is B?'\n"
    (tmp_path / "batch.yaml").write_text(head + first)
    assert main(["--config", "batch.yaml", "--no-progress"], False) == 0
    folder = tmp_path / "output" / "batch"
    index = (folder / "index.json").read_text()
    (tmp_path / "batch.yaml").write_text(head + first + "  - name: second\n    prompt: 'A=1, B=2. What is A?'\n")
    capsys.readouterr()

    assert main(["--config", "batch.yaml", "--no-progress", "--resume", "--engine", "naive"], False) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --resume: 1 run of this batch does not match"), err
    assert "first (settings.engine) differ; nothing was run" in err
    assert not (folder / "second.json").exists() and (folder / "index.json").read_text() == index

    assert main(["--config", "batch.yaml", "--no-progress", "--resume"], False) == 0  # as started: goes on
    runs = {run["name"]: run for run in json.loads((folder / "index.json").read_text())["runs"]}
    assert runs["first"]["note"] == "kept from an earlier run" and runs["second"]["status"] == "done"
    assert json.loads((folder / "second.json").read_text())["meta"]["settings"]["engine"] == "fast"


@pytest.mark.parametrize("name,value,ok", [
    ("num_tokens", 3, True), ("num_tokens", True, False), ("num_tokens", "3", False), ("num_tokens", None, False),
    ("batch_size", None, True), ("estimate", None, True), ("max_pixels", 2.5, False), ("window", None, False),
    ("unit", 3, False), ("groups", ["a=pos:1"], True), ("groups", [1], False), ("flows", ["a->b"], True),
    ("target", None, True), ("target", "red", True), ("raw_prompt", "yes", False), ("raw_prompt", False, True),
])
def test_the_yaml_keys_and_the_api_keywords_share_one_type_check(tmp_path, name, value, ok):
    """A value's type is refused or taken alike by a YAML run and by run()'s keyword (config.has_field_type, read
    from RunConfig's annotations): before, None passed for estimate in Python but not in YAML."""
    from mask_impact.api import check_options
    from mask_impact.batch import normalise
    from mask_impact.errors import MaskImpactError

    def takes(check) -> bool:
        try:
            check()
        except MaskImpactError:
            return False
        return True

    assert takes(lambda: check_options({name: value})) is ok
    assert takes(lambda: normalise({name: value}, "batch.yaml: run 1", tmp_path, True)) is ok
