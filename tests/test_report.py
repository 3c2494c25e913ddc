"""Result files: written as one set (never a JSON without its CSV/HTML), with the umask's mode, spreadsheet-safe CSV."""

from __future__ import annotations

import csv
import io
import os
import signal
import stat
from pathlib import Path

import pytest

from mask_impact import report

METRICS = {"logprob_drop": [[-1.5, 2.0]], "prob_change_pct": [[-12.0, 3.0]], "kl": [[0.1, 0.2]],
           "top1_changed": [[False, True]], "first_divergence": [[None, 0]]}


def _data(texts: tuple[str, ...] = ("a", "b")) -> dict:
    units = [{"index": i, "kind": "token", "label": text, "keys": [i], "queries": None, "queries_from": None,
              "modality": "text", "image": None, "box": None} for i, text in enumerate(texts)]
    return {"windows": [[0, 0]], "units": units, "metrics": METRICS}


def _paths(folder: Path) -> dict[str, Path]:
    return {kind: folder / f"run.{kind}" for kind in ("json", "csv", "html")}


def test_ctrl_c_during_the_renames_never_leaves_a_json_without_its_csv_and_html(tmp_path, monkeypatch):
    real_replace, order = os.replace, []

    def replace(source, target):  # Ctrl-C arrives as the first file is renamed into place
        if not order:
            os.kill(os.getpid(), signal.SIGINT)
        real_replace(source, target)
        order.append(Path(target).suffix)

    monkeypatch.setattr(os, "replace", replace)
    paths = _paths(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        report.write_results(_data(), paths)
    assert all(path.exists() for path in paths.values())
    assert order == [".csv", ".html", ".json"]  # the JSON, the sign of a finished run, comes last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.csv", "run.html", "run.json"]


def test_the_partial_file_goes_only_after_every_rename_and_a_failed_set_leaves_nothing(tmp_path, monkeypatch):
    paths, events = _paths(tmp_path), []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda source, target: (real_replace(source, target),
                                                               events.append(Path(target).name)))
    report.write_results(_data(), paths, then=lambda: events.append("partial removed"))
    assert events == ["run.csv", "run.html", "run.json", "partial removed"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers are back
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == set()

    for path in paths.values():
        path.unlink()
    real_open, events[:] = os.open, []

    def failing_open(path, flags, *args):  # the JSON's temporary file cannot be made: nothing is renamed
        if Path(path).name.startswith(".run.json."):
            raise OSError(28, "No space left on device")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", failing_open)
    with pytest.raises(report.WriteError, match="no space left on device while writing .*run.json"):
        report.write_results(_data(), paths, then=lambda: events.append("partial removed"))
    assert events == [] and list(tmp_path.iterdir()) == []  # no result, no temporary file, partial kept


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_result_files_get_the_mode_open_would_give_them(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        report.write_results(_data(), _paths(tmp_path))
        report.write_index({"runs": []}, tmp_path, html=True)
    finally:
        os.umask(old)
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in tmp_path.iterdir()}
    assert modes == dict.fromkeys(["run.json", "run.csv", "run.html", "index.json", "index.html"], mode)


def test_csv_text_cells_cannot_run_as_spreadsheet_formulas():
    texts = ("=1+1", "+SUM(A1)", "-2", "@cmd", "\tx", "\rx", "plain", "a=b")
    data = _data(texts)
    data["metrics"] = {name: [[grid[0][0]] * len(texts)] for name, grid in METRICS.items()}
    rows = list(csv.DictReader(io.StringIO(report.csv_text(data), newline="")))
    assert [row["label"] for row in rows] == ["'=1+1", "'+SUM(A1)", "'-2", "'@cmd", "'\tx", "'\rx", "plain",
                                                   "a=b"]
    assert {row["logprob_drop"] for row in rows} == {"-1.5"} and {row["prob_change_pct"] for row in rows} == {"-12.0"}
