"""Random argument combinations and file contents at both CLIs: exit 0 or 2, never a traceback,
never a half-written result (property-based, with hypothesis)."""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mask_impact.cli import main

pytestmark = pytest.mark.slow

OPTIONS = {
    "--num-tokens": ["-1", "0", "1", "3", "x"],
    "--layers": ["all", "0", "1-2", "0,3", "99", "2-1", "a", ""],
    "--window": ["0", "1", "2", "9", "z"],
    "--block-from": ["all", "answer", "x"],
    "--generate-top": ["0", "1", "-1"],
    "--batch-size": ["1", "4", "0"],
    "--raw-prompt": [None],
}
VL_OPTIONS = {"--mask-mode": ["text", "vision", "both", "pixels"], "--vision-attention": ["causal", "bidirectional"],
              "--max-pixels": ["1", "100000"]}
counter = itertools.count()


def _options(table):
    return st.fixed_dictionaries({}, optional={key: st.sampled_from(values) for key, values in table.items()})


prompts = st.one_of(st.text(max_size=40), st.just("   "), st.builds(lambda b: ("file", b), st.binary(max_size=60)),
                    st.just(("file", "The capital of France is".encode())), st.just("missing_prompt.txt"))
images = st.one_of(st.none(), st.just("good"), st.just("missing"), st.just("truncated"),
                   st.builds(lambda b: ("bytes", b), st.binary(max_size=200)))


def _materialise(folder: Path, prompt, image, good_image: str) -> tuple[str, list[str]]:
    n = next(counter)
    if isinstance(prompt, tuple):
        path = folder / f"prompt{n}.txt"
        path.write_bytes(prompt[1])
        prompt = str(path)
        argv = ["--prompt-file", prompt]
    elif prompt == "missing_prompt.txt":
        argv = ["--prompt-file", prompt]
    else:
        argv = ["--prompt", prompt]
    if image == "good":
        argv += ["--image", good_image]
    elif image == "missing":
        argv += ["--image", str(folder / "missing.png")]
    elif image == "truncated":
        path = folder / f"truncated{n}.png"
        data = Path(good_image).read_bytes()
        path.write_bytes(data[: len(data) // 2])
        argv += ["--image", str(path)]
    elif isinstance(image, tuple):
        path = folder / f"random{n}.png"
        path.write_bytes(image[1])
        argv += ["--image", str(path)]
    return prompt, argv


def _check(folder: Path, argv: list[str], vision: bool, capsys) -> None:
    name = f"r{next(counter)}"
    code = main(["--demo", "--no-progress", "--output-dir", str(folder / "out"), "--output", name, *argv], vision)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    files = [folder / "out" / f"{name}.{ext}" for ext in ("json", "csv", "html")]
    if code == 2:
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert not any(path.exists() for path in files)
    else:
        assert code == 0, err
        data = json.loads(files[0].read_text())
        rows = list(csv.reader(files[1].open(newline="")))
        assert len(rows) == 1 + len(data["windows"]) * len(data["units"])
        assert "embedded-data" in files[2].read_text()
    assert not list((folder / "out").glob(".*.tmp")) if (folder / "out").exists() else True


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(options=_options({**OPTIONS, **VL_OPTIONS}), prompt=prompts, image=images)
def test_vl_cli_never_crashes(tmp_path, capsys, images_fixture, options, prompt, image):
    _, argv = _materialise(tmp_path, prompt, image, images_fixture["square"])
    for key, value in options.items():
        argv += [key] if value is None else [key, value]
    _check(tmp_path, argv, True, capsys)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(options=_options(OPTIONS), prompt=prompts)
def test_text_cli_never_crashes(tmp_path, capsys, options, prompt):
    _, argv = _materialise(tmp_path, prompt, None, "")
    for key, value in options.items():
        argv += [key] if value is None else [key, value]
    _check(tmp_path, argv, False, capsys)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(st.text(max_size=200), st.builds(
    lambda key, value: f"defaults:\n  demo: true\nruns:\n  - name: a\n    {key}: {value}\n",
    st.sampled_from(["num_tokens", "window", "mask_mode", "image", "layers", "prompt", "bogus", "name"]),
    st.sampled_from(["1", "0", "x", "[1, 2]", "{a: 1}", "''", "null", "true", "99"]))))
def test_random_yaml_never_crashes(tmp_path, capsys, text):
    path = tmp_path / f"batch{next(counter)}.yaml"
    path.write_text(text, encoding="utf-8")
    code = main(["--config", str(path), "--no-progress", "--output-dir", str(tmp_path / "out"), "--generate-top",
                 "0", "--layers", "0", "--overwrite"], True)
    err = capsys.readouterr().err
    assert code in (0, 1, 2) and "Traceback" not in err
    if code == 2:
        assert err.startswith("error: ") and err.count("\n") == 1, err
