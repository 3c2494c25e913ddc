"""Both entry points end to end on --demo, and bad input: one line, exit status 2, nothing written."""

from __future__ import annotations

import csv
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from mask_impact.cli import main
from tests.support import HANG_S, ROOT, cli_error as _error

JSON_KEYS = {"schema_version", "meta", "prompt", "images", "tokens", "baseline", "windows", "units",
             "metrics", "generations"}
META_KEYS = {"tool_version", "model", "model_type", "transformers", "torch", "device", "dtype", "created",
             "elapsed_s", "settings"}
TOKEN_KEYS = {"index", "id", "text", "modality", "image", "t", "row", "col", "box"}
CSV_COLUMNS = ["layer_start", "layer_end", "window_label", "unit", "kind", "label", "keys", "queries", "patches", "modality", "image",
               "x0", "y0", "x1", "y1", "logprob_drop", "prob_change_pct", "kl", "top1_changed", "first_divergence"]


def _run_script(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=HANG_S)


@pytest.mark.slow
@pytest.mark.parametrize("script,extra", [
    ("mask_impact_vl.py", ["--mask-mode", "both", "--window", "3", "--generate-top", "3"]),
    ("mask_impact_analysis.py", ["--num-tokens", "4"]),
])
def test_demo_end_to_end(tmp_path, script, extra):
    done = _run_script(script, "--demo", "--output", "run", "--no-progress", *extra, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    data = json.loads((tmp_path / "output" / "run.json").read_text())
    assert JSON_KEYS <= set(data) and META_KEYS <= set(data["meta"])
    assert data["meta"]["settings"]["output"] == "run"
    assert all(TOKEN_KEYS <= set(token) for token in data["tokens"])
    assert [t["index"] for t in data["tokens"]] == list(range(len(data["tokens"])))
    baseline = data["baseline"]
    assert len(baseline["token_ids"]) == len(baseline["logprobs"]) == len(baseline["tokens"]) >= 1
    assert all(lp <= 0 for lp in baseline["logprobs"])
    n_windows, n_positions = len(data["windows"]), len(data["units"])
    assert n_windows == data["meta"]["num_layers"]
    for name in ("logprob_drop", "prob_change_pct", "kl"):
        grid = data["metrics"][name]
        assert len(grid) == n_windows and all(len(row) == n_positions for row in grid)
        assert all(math.isfinite(v) for row in grid for v in row)
    assert all(v >= -1e-6 for row in data["metrics"]["kl"] for v in row)
    rows = list(csv.DictReader((tmp_path / "output" / "run.csv").open()))
    assert list(rows[0]) == CSV_COLUMNS and len(rows) == n_windows * n_positions
    assert float(rows[0]["logprob_drop"]) == pytest.approx(data["metrics"]["logprob_drop"][0][0])
    assert data["generations"] and all(g["window"] in data["windows"] for g in data["generations"])
    if script == "mask_impact_vl.py":
        assert data["images"][0]["thumbnail"].startswith("data:image/png;base64,")
        assert {t["modality"] for t in data["tokens"]} == {"text", "special", "vision"}
        assert data["windows"][0] == [0, 1] and "baseline answer" in done.stdout


def test_bad_inputs_are_one_line_and_write_nothing(in_tmp, capsys, images):
    corrupt = in_tmp / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    cases = {
        "does not exist": ["--demo", "--image", "missing.png"],
        "cannot be read": ["--demo", "--image", str(corrupt)],
        "prompt is empty": ["--demo", "--prompt", "   "],
        "prompt file": ["--demo", "--prompt-file", "missing_prompt.txt"],
        "--num-tokens": ["--demo", "--num-tokens", "0"],
        "invalid choice": ["--demo", "--mask-mode", "pixels"],
        "needs an image": ["--model", "x", "--prompt", "hi", "--mask-mode", "vision"],
        "--window 0: must be at least 1": ["--demo", "--window", "0"],
        "--layers": ["--demo", "--layers", "2-1"],
    }
    for expected, argv in cases.items():
        assert expected in _error(capsys, argv), argv
    assert not (in_tmp / "output").exists() or not any((in_tmp / "output").iterdir())


def test_layer_out_of_range_is_caught_after_loading(in_tmp, capsys):
    import transformers

    from mask_impact.demo import demo_model_path

    layers = transformers.AutoConfig.from_pretrained(demo_model_path(True)).text_config.num_hidden_layers
    err = _error(capsys, ["--demo", "--layers", "99", "--no-progress"])
    assert "layer 99" in err and f"layers 0-{layers - 1}" in err
    assert not (in_tmp / "output").exists()  # no empty folder left behind by a run that failed after loading


def test_existing_output_needs_overwrite(in_tmp, capsys):
    (in_tmp / "output").mkdir()
    (in_tmp / "output" / "taken.json").write_text("{}")
    assert "--overwrite" in _error(capsys, ["--demo", "--output", "taken", "--no-progress"], vision=False)
    assert (in_tmp / "output" / "taken.json").read_text() == "{}"
    assert not (in_tmp / "output" / "taken.csv").exists()


def test_missing_model_is_named(in_tmp, capsys):
    err = _error(capsys, ["--model", str(in_tmp / "no_such_model"), "--prompt", "hi"], vision=False)
    assert "no_such_model" in err


def test_text_model_given_to_vl_script(in_tmp, capsys):
    from mask_impact.demo import demo_model_path

    err = _error(capsys, ["--model", str(demo_model_path(False)), "--prompt", "hi"], vision=True)
    assert "not a vision-language one" in err and "qwen3_vl" in err


def test_prompt_file_is_read(in_tmp, capsys):
    (in_tmp / "prompt.txt").write_text("The capital of Italy is", encoding="utf-8")
    assert main(["--demo", "--prompt-file", "prompt.txt", "--output", "p", "--no-progress", "--layers", "0",
                 "--generate-top", "0"], False) == 0
    data = json.loads((in_tmp / "output" / "p.json").read_text())
    assert data["prompt"] == "The capital of Italy is" and data["windows"] == [[0, 0]]
    assert data["generations"] == []


def test_prompt_naming_a_file_reads_it_as_the_original_tool_did(in_tmp, capsys):
    """`--prompt prompt.txt` (the original tool's documented usage) reads the file, says so, and records it."""
    (in_tmp / "prompt.txt").write_text("The capital of Italy is", encoding="utf-8")
    common = ["--demo", "--no-progress", "--layers", "0", "--generate-top", "0", "--num-tokens", "1"]
    assert main([*common, "--prompt", "prompt.txt", "--output", "file"], False) == 0
    err = capsys.readouterr().err
    assert "note: --prompt prompt.txt names a file: the prompt is read from it" in err
    data = json.loads((in_tmp / "output" / "file.json").read_text())
    assert data["prompt"] == "The capital of Italy is"
    assert (data["meta"]["settings"]["prompt_file"], data["meta"]["settings"]["prompt"]) == ("prompt.txt", None)
    assert main([*common, "--prompt-file", "prompt.txt", "--output", "same"], False) == 0
    same = json.loads((in_tmp / "output" / "same.json").read_text())
    assert same["metrics"] == data["metrics"] and same["meta"]["fingerprint"] == data["meta"]["fingerprint"]
    assert main([*common, "--prompt-text", "prompt.txt", "--output", "text"], False) == 0
    text = json.loads((in_tmp / "output" / "text.json").read_text())
    assert text["prompt"] == "prompt.txt" and text["meta"]["settings"]["prompt_file"] is None
    assert "note:" not in capsys.readouterr().err


@pytest.mark.parametrize("argv,expected", [
    (["--prompt", "missing.txt"], "no prompt file 'missing.txt' (--prompt reads a file when its value names one); to "
     "analyse these characters as text use --prompt-text"),
    (["--prompt", "notes.MD"], "no prompt file 'notes.MD'"),
    (["--prompt", "q.prompt"], "no prompt file 'q.prompt'"),
    (["--prompt", "latin1.txt"], "prompt file latin1.txt is not UTF-8 text; save it as UTF-8"),
    (["--prompt", "x", "--prompt-text", "y"], "give one prompt: --prompt or --prompt-text, not both"),
    (["--prompt-text", "x", "--prompt-file", "latin1.txt"], "give one prompt: --prompt-text or --prompt-file, not both"),
])
def test_prompt_values_that_name_no_readable_file(in_tmp, capsys, argv, expected):
    (in_tmp / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    err = _error(capsys, ["--demo", *argv], vision=False)  # one line, exit 2: no note before it
    assert expected in err
    assert not (in_tmp / "output").exists()


def test_prompt_text_that_only_mentions_a_file_is_text(in_tmp, capsys):
    """White space or another suffix: the characters are the prompt, no file is looked for."""
    common = ["--demo", "--no-progress", "--layers", "0", "--generate-top", "0", "--num-tokens", "1"]
    for number, value in enumerate(["summarise notes.txt", "report.pdf"]):
        assert main([*common, "--prompt", value, "--output", f"t{number}"], False) == 0
        assert json.loads((in_tmp / "output" / f"t{number}.json").read_text())["prompt"] == value


@pytest.mark.slow
def test_bad_input_from_a_real_process_has_no_traceback(tmp_path):
    done = _run_script("mask_impact_vl.py", "--demo", "--image", "missing.png", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0 and "missing.png" in done.stderr
    assert not (tmp_path / "output").exists()


def test_csv_keeps_one_row_per_knockout_when_tokens_hold_line_breaks():
    from mask_impact.report import csv_text

    units = [{"index": i, "kind": "token", "label": text, "keys": [i], "queries": None, "queries_from": None,
              "modality": "text", "image": None, "box": None} for i, text in enumerate(["0\r", "a\nb", "plain"])]
    metrics = {"logprob_drop": [[0.5, 1.0, 2.0]], "prob_change_pct": [[1.0, 2.0, 3.0]], "kl": [[0.1, 0.2, 0.3]],
               "top1_changed": [[False, True, False]], "first_divergence": [[None, 0, None]]}
    text = csv_text({"windows": [[0, 0]], "units": units, "metrics": metrics})
    rows = list(csv.reader(io.StringIO(text, newline="")))
    assert [row[5] for row in rows[1:]] == ["0\r", "a\nb", "plain"] and len(rows) == 4


@pytest.mark.slow
def test_threads_set_the_cpu_threads_and_leave_the_numbers(tmp_path, capsys):
    import torch

    from mask_impact.cli import main

    before = torch.get_num_threads()
    common = ["--demo", "--num-tokens", "2", "--no-progress", "--no-html", "--output-dir", str(tmp_path)]
    try:
        assert main([*common, "--output", "default"], False) == 0
        assert main([*common, "--output", "one", "--threads", "1"], False) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    default = json.loads((tmp_path / "default.json").read_text())
    one = json.loads((tmp_path / "one.json").read_text())
    assert one["meta"]["settings"]["threads"] == "1" and default["baseline"] == one["baseline"]
    for row_a, row_b in zip(default["metrics"]["logprob_drop"], one["metrics"]["logprob_drop"]):
        assert row_b == pytest.approx(row_a, abs=1e-6)
    capsys.readouterr()
    for bad in ("0", "x", "-1"):
        assert main([*common, "--output", "bad", "--threads", bad], False) == 2
        assert "--threads" in capsys.readouterr().err
