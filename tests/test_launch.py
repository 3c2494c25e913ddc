"""A sweep split between processes with ``accelerate launch`` equals the one-process sweep, and a run killed with
any number of processes resumes with any other (shard.py, resume.py)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mask_impact.shard import Shard, launch_shortfall
from tests.support import HANG_S, ROOT

TEXT = ["--demo", "--num-tokens", "3", "--batch-size", "4", "--no-html"]
# one flow over the VL demo: fewer cells (2 windows) than the 3 processes that share them
FLOW = ["--demo", "--flow", "image->last", "--layers", "1,2", "--window", "1", "--num-tokens", "2", "--no-html"]
# slow enough to kill mid-sweep: the naive engine, one knockout per batch
SLOW = ["--demo", "--mask-mode", "both", "--engine", "naive", "--batch-size", "1", "--num-tokens", "4",
        "--generate-top", "2", "--no-progress", "--no-html"]


def _accelerate() -> list[str]:
    found = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip("accelerate's launcher is not installed next to this Python")
    # --multi_gpu is accelerate's torchrun launcher: on a machine without GPUs its processes talk over gloo (its
    # --cpu launcher starts one process unless MPI is set up)
    return [found, "launch", "--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend",
            "no"]


def _launch(folder: Path, processes: int, script: str, args: list[str], **kwargs):
    command = [*_accelerate(), "--num_processes", str(processes), str(ROOT / script), *args]
    return subprocess.Popen(command, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _single(folder: Path, script: str, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=folder, capture_output=True, text=True,
                          timeout=HANG_S)


def _assert_same_numbers(a: dict, b: dict, tolerance: float = 1e-5) -> None:
    assert a["baseline"]["token_ids"] == b["baseline"]["token_ids"]
    assert a["windows"] == b["windows"] and a["units"] == b["units"]
    for name in a["metrics"]:
        for row_a, row_b in zip(a["metrics"][name], b["metrics"][name], strict=True):
            for x, y in zip(row_a, row_b, strict=True):
                assert (x is None) == (y is None) and (x is None or abs(x - y) <= tolerance), (name, x, y)
    assert [g["unit"] for g in a["generations"]] == [g["unit"] for g in b["generations"]]


def test_each_process_gets_a_contiguous_part_of_equal_cost():
    cells = list(range(10))
    costs = [10.0, 10.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]  # the first cells cost most (early windows)
    parts = [Shard(k, 3).part(cells, costs) for k in range(3)]
    assert sum(parts, []) == cells  # every cell once, in order
    totals = [sum(costs[c] for c in part) for part in parts]
    assert max(totals) - min(totals) <= max(costs)  # equal within one cell
    assert parts[0] == [0]  # by count it would have taken three cells and most of the work
    assert sum((Shard(k, 4).part([0], [1.0]) for k in range(4)), []) == [0]  # more processes than cells: idle ones
    assert Shard().part(cells, costs) == cells


@pytest.mark.launch
@pytest.mark.slow
def test_two_processes_equal_one_for_token_units(tmp_path):
    single = _single(tmp_path, "mask_impact_analysis.py", [*TEXT, "--output", "one", "--no-progress"])
    assert single.returncode == 0, single.stderr
    launched = _launch(tmp_path, 2, "mask_impact_analysis.py", [*TEXT, "--output", "two"])
    out, err = launched.communicate(timeout=HANG_S)
    assert launched.returncode == 0, err
    one = json.loads((tmp_path / "output" / "one.json").read_text())
    two = json.loads((tmp_path / "output" / "two.json").read_text())
    _assert_same_numbers(one, two)
    assert two["meta"]["processes"] == 2 and one["meta"]["processes"] == 1
    assert two["meta"]["fingerprint"] == one["meta"]["fingerprint"]  # the process count decides no number
    assert out.count("wrote ") == 1  # one result, written by the main process
    assert err.count("knockout/s") >= 1 and "sweep: 2 windows × 24 positions" in err  # the main process's bar
    assert sorted(p.name for p in (tmp_path / "output").iterdir()) == ["one.csv", "one.json", "two.csv", "two.json"]


@pytest.mark.launch
@pytest.mark.slow
def test_three_processes_share_two_flow_cells(tmp_path):
    single = _single(tmp_path, "mask_impact_vl.py", [*FLOW, "--output", "one", "--no-progress"])
    assert single.returncode == 0, single.stderr
    launched = _launch(tmp_path, 3, "mask_impact_vl.py", [*FLOW, "--output", "three", "--no-progress"])
    _, err = launched.communicate(timeout=HANG_S)
    assert launched.returncode == 0, err  # the idle process finishes too
    one = json.loads((tmp_path / "output" / "one.json").read_text())
    three = json.loads((tmp_path / "output" / "three.json").read_text())
    assert len(one["windows"]) * len(one["units"]) == 2
    _assert_same_numbers(one, three)


def _records(path: Path) -> int:
    return sum(1 for line in path.read_text().split("\n")[1:] if line.endswith("}"))


@pytest.mark.launch
@pytest.mark.slow
def test_a_launch_killed_mid_sweep_resumes_with_one_process(tmp_path):
    reference = _single(tmp_path, "mask_impact_vl.py", [*SLOW, "--output", "reference"])
    assert reference.returncode == 0, reference.stderr
    partial = tmp_path / "output" / "run.partial.jsonl"
    rank1 = tmp_path / "output" / "run.partial.rank1.jsonl"
    launched = _launch(tmp_path, 2, "mask_impact_vl.py", [*SLOW, "--output", "run"])
    deadline = time.time() + HANG_S
    while time.time() < deadline:
        if rank1.exists() and _records(rank1) >= 3 and partial.exists() and _records(partial) >= 3:
            break
        if launched.poll() is not None:
            pytest.fail("the launched run finished before it could be killed: " + launched.stderr.read()[-2000:])
        time.sleep(0.02)
    worker = json.loads(rank1.read_text().split("\n")[0])["pid"]
    os.kill(worker, signal.SIGKILL)  # one process dies; the launcher stops the other
    launched.communicate(timeout=HANG_S)
    assert launched.returncode != 0
    assert not (tmp_path / "output" / "run.json").exists()
    kept = _records(partial) + _records(rank1)  # one knockout per record (batch size 1)

    again = _single(tmp_path, "mask_impact_vl.py", [*SLOW, "--output", "run"])
    assert again.returncode == 2 and "--resume" in again.stderr  # the killed run is not thrown away silently

    resumed = _single(tmp_path, "mask_impact_vl.py", [*SLOW, "--output", "run", "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming run.partial.jsonl: {kept} finished knockouts kept" in resumed.stderr
    assert not partial.exists() and not rank1.exists()
    data = json.loads((tmp_path / "output" / "run.json").read_text())
    _assert_same_numbers(json.loads((tmp_path / "output" / "reference.json").read_text()), data)
    assert data["meta"]["processes"] == 1


@pytest.mark.launch
@pytest.mark.slow
def test_a_launched_batch_equals_the_one_process_batch(tmp_path):
    batch = tmp_path / "batch.yaml"
    batch.write_text("defaults:\n  demo: true\n  num_tokens: 2\n  html: false\nruns:\n"
                     "  - name: one\n    prompt: \"A=3, B=7, C=1. What is B?\"\n"
                     "  - name: two\n    prompt: \"A=5, B=2, C=9. What is C?\"\n")
    single = _single(tmp_path, "mask_impact_analysis.py", ["--config", str(batch), "--output", "single",
                                                           "--no-progress"])
    assert single.returncode == 0, single.stderr
    launched = _launch(tmp_path, 2, "mask_impact_analysis.py", ["--config", str(batch), "--output", "two",
                                                                "--no-progress"])
    out, err = launched.communicate(timeout=HANG_S)
    assert launched.returncode == 0, err
    assert out.count("batch two: 2 done, 0 failed") == 1  # said once, by the main process
    for name in ("one", "two"):
        _assert_same_numbers(json.loads((tmp_path / "output" / "single" / f"{name}.json").read_text()),
                             json.loads((tmp_path / "output" / "two" / f"{name}.json").read_text()))
    index = json.loads((tmp_path / "output" / "two" / "index.json").read_text())
    assert [run["status"] for run in index["runs"]] == ["done", "done"]

    # bad input in a launch: the main process says it in one line, the other stops quietly, nothing is written
    again = _launch(tmp_path, 2, "mask_impact_analysis.py", ["--config", str(batch), "--output", "two",
                                                             "--no-progress"])
    _, err = again.communicate(timeout=HANG_S)
    assert again.returncode != 0
    assert err.count("error: ") == 1 and "holds an earlier batch" in err


def test_a_launch_that_starts_fewer_processes_than_asked_says_so():
    """`accelerate launch --cpu --num_processes 2` runs one copy of the command (meta.processes 1): the run says so
    in one line, with the count asked for, read from the launcher's command line."""
    cpu_launch = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    note = launch_shortfall(cpu_launch, "python accelerate launch --cpu --num_processes 2 mask_impact_vl.py")
    assert note.startswith("accelerate launch was asked for 2 processes but started 1") and "--multi_gpu" in note
    assert "several processes" in launch_shortfall(cpu_launch, "")  # the launcher's command line unknown
    assert launch_shortfall({**cpu_launch, "WORLD_SIZE": "2", "RANK": "0"}, "") is None  # several did start
    assert launch_shortfall({"ACCELERATE_USE_CPU": "True"}, "") is None  # --num_processes 1: no MASTER_ADDR
    assert launch_shortfall({"MASTER_ADDR": "10.0.0.1"}, "") is None  # not accelerate's launcher


@pytest.mark.launch
@pytest.mark.slow
def test_the_cpu_launcher_asked_for_two_processes_is_named(tmp_path):
    found = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip("accelerate's launcher is not installed next to this Python")
    command = [found, "launch", "--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", str(ROOT / "mask_impact_analysis.py"), "--demo", "--prompt-file", "none.txt"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=HANG_S)
    lines = [line for line in done.stderr.splitlines() if line.startswith(("note: ", "error: "))]
    assert lines[0].startswith("note: accelerate launch was asked for 2 processes but started 1"), done.stderr
    assert lines[1].startswith("error: ") and "none.txt" in lines[1], done.stderr
    assert done.returncode != 0 and "returned non-zero exit status 2" in done.stderr  # the launcher re-raises


STUDY = ["--demo", "--dataset", "demo-shapes", "--flow", "image->last", "--flow", "question->last", "--window", "3",
         "--limit", "7", "--no-html", "--no-progress", "--threads", "1"]


def _study(folder: Path) -> dict:
    return json.loads((folder / "s" / "study.json").read_text())


@pytest.mark.launch
def test_a_study_shared_by_rows_equals_the_one_process_study(tmp_path):
    """Two processes take whole rows (1, 3, 5, 7 and 2, 4, 6); two launchers as two "machines" sharing the folder
    do the same: the aggregates and every row's result equal the one-process study's."""
    one, two, machines = tmp_path / "one", tmp_path / "two", tmp_path / "machines"
    for folder in (one, two, machines):
        folder.mkdir()
    args = [*STUDY, "--output", "s", "--output-dir"]
    single = _single(one, "mask_impact_vl.py", [*args, str(one)])
    assert single.returncode == 0, single.stderr
    launched = _launch(two, 2, "mask_impact_vl.py", [*args, str(two)])
    out, err = launched.communicate(timeout=HANG_S)
    assert launched.returncode == 0, err
    found = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    port = str(29500 + os.getpid() % 1000)
    launchers = [subprocess.Popen([found, "launch", "--multi_gpu", "--num_machines", "2", "--machine_rank", str(rank),
                                   "--main_process_ip", "127.0.0.1", "--main_process_port", port, "--num_processes",
                                   "2", "--mixed_precision", "no", "--dynamo_backend", "no",
                                   str(ROOT / "mask_impact_vl.py"), *args, str(machines)],
                                  cwd=machines, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for rank in (0, 1)]
    for process in launchers:
        _, err = process.communicate(timeout=HANG_S)
        assert process.returncode == 0, err
    reference = _study(one)
    for folder in (two, machines):
        data = _study(folder)
        assert data["aggregates"] == reference["aggregates"] and data["rows"] == reference["rows"]
        assert data["processes"] == 2 and not (folder / "s" / ".status").exists()
        for row in range(1, 8):
            a = json.loads((one / "s" / f"row{row}.json").read_text())
            b = json.loads((folder / "s" / f"row{row}.json").read_text())
            assert a["metrics"] == b["metrics"] and a["baseline"] == b["baseline"]
    assert "study s: 7 done" in out
