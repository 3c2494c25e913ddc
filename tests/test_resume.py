"""A real run killed mid-sweep (SIGKILL, Ctrl-C) resumes to exactly the uninterrupted result."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

# slow enough to stop mid-sweep: the naive engine, one knockout per batch, every batch saved
ARGS = ["--demo", "--mask-mode", "both", "--engine", "naive", "--batch-size", "1", "--num-tokens", "6",
        "--generate-top", "2", "--no-progress", "--no-html"]


def _start(tmp_path: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "mask_impact_vl.py"), *ARGS, *extra], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _stop_mid_sweep(process: subprocess.Popen, partial: Path, sig: int) -> int:
    deadline = time.time() + 120
    while time.time() < deadline:
        if partial.exists() and partial.read_text().count("\n") >= 8:
            process.send_signal(sig)
            break
        if process.poll() is not None:
            pytest.fail("the run finished before it could be stopped")
        time.sleep(0.01)
    process.wait(timeout=60)
    process.stderr_text = process.stderr.read()
    return process.returncode


def _comparable(path: Path) -> dict:
    data = json.loads(path.read_text())
    for key in ("created", "elapsed_s"):
        data["meta"].pop(key)
    for key in ("output", "resume"):
        data["meta"]["settings"].pop(key)
    return data


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference")
    done = subprocess.run([sys.executable, str(ROOT / "mask_impact_vl.py"), *ARGS, "--output", "run"], cwd=folder,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return folder / "output"


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, reference):
    partial = tmp_path / "output" / "run.partial.jsonl"
    assert _stop_mid_sweep(_start(tmp_path, "--output", "run"), partial, signal.SIGKILL) == -signal.SIGKILL
    saved = partial.read_text().count("\n")
    reference_data = json.loads((reference / "run.json").read_text())
    knockouts = len(reference_data["windows"]) * len(reference_data["positions"])
    assert 8 <= saved < 1 + knockouts  # stopped mid-sweep (header + one line per knockout), finished batches on disk
    assert not (tmp_path / "output" / "run.json").exists() and not (tmp_path / "output" / "run.csv").exists()

    # without --resume the partial run is not thrown away silently
    again = subprocess.run([sys.executable, str(ROOT / "mask_impact_vl.py"), *ARGS, "--output", "run"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "--resume" in again.stderr
    # a resume with other settings says what differs
    other = subprocess.run([sys.executable, str(ROOT / "mask_impact_vl.py"), *ARGS, "--output", "run", "--resume",
                            "--window", "3"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert other.returncode == 2 and "settings.window" in other.stderr and "Traceback" not in other.stderr

    resumed = subprocess.run([sys.executable, str(ROOT / "mask_impact_vl.py"), *ARGS, "--output", "run", "--resume"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert not partial.exists()
    assert _comparable(tmp_path / "output" / "run.json") == _comparable(reference / "run.json")
    assert (tmp_path / "output" / "run.csv").read_text() == (reference / "run.csv").read_text()
    assert len(list(csv.reader((reference / "run.csv").open()))) == 1 + knockouts


def test_ctrl_c_stops_cleanly_and_keeps_finished_work(tmp_path, reference):
    partial = tmp_path / "output" / "run.partial.jsonl"
    process = _start(tmp_path, "--output", "run")
    assert _stop_mid_sweep(process, partial, signal.SIGINT) == 130
    assert "finished knockouts are kept in" in process.stderr_text and "--resume" in process.stderr_text
    assert "Traceback" not in process.stderr_text
    assert partial.exists() and not (tmp_path / "output" / "run.json").exists()
    resumed = subprocess.run([sys.executable, str(ROOT / "mask_impact_vl.py"), *ARGS, "--output", "run", "--resume"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert _comparable(tmp_path / "output" / "run.json") == _comparable(reference / "run.json")
