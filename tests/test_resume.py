"""A real run killed mid-sweep (SIGKILL, Ctrl-C) resumes to exactly the uninterrupted result."""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import HANG_S, ROOT

# slow enough to stop mid-sweep: the naive engine, one knockout per batch, every batch saved
ARGS = ["--demo", "--mask-mode", "both", "--engine", "naive", "--batch-size", "1", "--num-tokens", "6",
        "--generate-top", "2", "--no-progress", "--no-html"]


def _start(tmp_path: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "mask_impact_vl.py"), *ARGS, *extra], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _stop_mid_sweep(process: subprocess.Popen, partial: Path, sig: int) -> int:
    deadline = time.time() + HANG_S
    while time.time() < deadline:
        if partial.exists() and partial.read_text().count("\n") >= 8:
            process.send_signal(sig)
            break
        if process.poll() is not None:
            pytest.fail("the run finished before it could be stopped")
        time.sleep(0.01)
    process.wait(timeout=HANG_S)
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
                          capture_output=True, text=True, timeout=HANG_S)
    assert done.returncode == 0, done.stderr
    return folder / "output"


@pytest.mark.slow
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, reference):
    partial = tmp_path / "output" / "run.partial.jsonl"
    assert _stop_mid_sweep(_start(tmp_path, "--output", "run"), partial, signal.SIGKILL) == -signal.SIGKILL
    saved = partial.read_text().count("\n")
    reference_data = json.loads((reference / "run.json").read_text())
    knockouts = len(reference_data["windows"]) * len(reference_data["units"])
    assert 8 <= saved < 1 + knockouts  # stopped mid-sweep (header + one line per knockout), finished batches on disk
    assert not (tmp_path / "output" / "run.json").exists() and not (tmp_path / "output" / "run.csv").exists()

    # without --resume the partial run is not thrown away silently
    again = subprocess.run([sys.executable, str(ROOT / "mask_impact_vl.py"), *ARGS, "--output", "run"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=HANG_S)
    assert again.returncode == 2 and "--resume" in again.stderr
    # a resume with other settings says what differs
    other = subprocess.run([sys.executable, str(ROOT / "mask_impact_vl.py"), *ARGS, "--output", "run", "--resume",
                            "--window", "3"], cwd=tmp_path, capture_output=True, text=True, timeout=HANG_S)
    assert other.returncode == 2 and "settings.window" in other.stderr and "Traceback" not in other.stderr

    resumed = subprocess.run([sys.executable, str(ROOT / "mask_impact_vl.py"), *ARGS, "--output", "run", "--resume"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=HANG_S)
    assert resumed.returncode == 0, resumed.stderr
    assert not partial.exists()
    assert _comparable(tmp_path / "output" / "run.json") == _comparable(reference / "run.json")
    assert (tmp_path / "output" / "run.csv").read_text() == (reference / "run.csv").read_text()
    assert len(list(csv.reader((reference / "run.csv").open()))) == 1 + knockouts


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_keeps_finished_work(tmp_path, reference):
    partial = tmp_path / "output" / "run.partial.jsonl"
    process = _start(tmp_path, "--output", "run")
    assert _stop_mid_sweep(process, partial, signal.SIGINT) == 130
    assert "finished knockouts are kept in" in process.stderr_text and "--resume" in process.stderr_text
    assert "Traceback" not in process.stderr_text
    assert partial.exists() and not (tmp_path / "output" / "run.json").exists()
    resumed = subprocess.run([sys.executable, str(ROOT / "mask_impact_vl.py"), *ARGS, "--output", "run", "--resume"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=HANG_S)
    assert resumed.returncode == 0, resumed.stderr
    assert _comparable(tmp_path / "output" / "run.json") == _comparable(reference / "run.json")


# --- hardening: locks, fingerprints, validation, disk full (the text demo in-process, where a kill is not needed) --

TEXT_ARGS = ["--demo", "--batch-size", "6", "--num-tokens", "3", "--generate-top", "2", "--no-progress", "--no-html"]
BATCH = 6


def _text_main(folder: Path, *extra: str) -> int:
    from mask_impact.cli import main

    return main([*TEXT_ARGS, "--output-dir", str(folder), "--output", "run", *extra], False)


@pytest.fixture(scope="module")
def text_reference(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("text_reference")
    assert _text_main(folder) == 0
    return json.loads((folder / "run.json").read_text())


def _same_result(path: Path, reference: dict) -> None:
    data = json.loads(path.read_text())
    for key in ("baseline", "windows", "units", "metrics", "generations", "tokens"):
        assert data[key] == reference[key], key
    assert data["meta"]["fingerprint"] == reference["meta"]["fingerprint"]


def _header(reference: dict, run: str = "r1") -> dict:
    return {"run": run, "pid": 1, "parts": reference["meta"]["fingerprint"],
            "baseline": reference["baseline"]["token_ids"], "batch_size": BATCH}


def _records(reference: dict, run: str = "r1") -> list[dict]:
    """The batches an uninterrupted run with batch size 6 saves, rebuilt from its result."""
    out = []
    units = list(range(len(reference["units"])))
    for w in range(len(reference["windows"])):
        for start in range(0, len(units), BATCH):
            metrics = {name: grid[w][start: start + BATCH] for name, grid in reference["metrics"].items()}
            steps = {name: grid[w][start: start + BATCH] for name, grid in reference["steps"].items()}
            out.append({"run": run, "window": w, "start": start, "units": units[start: start + BATCH],
                        "metrics": metrics, "steps": steps, "batch_size": BATCH})
    return out


def _write_partial(folder: Path, lines: list, tail: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / "run.partial.jsonl"
    partial.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines) + tail)
    return partial


def _count_new_records(monkeypatch, stop_after: int | None = None) -> list:
    """Count the batches a run computes (and stop it like Ctrl-C after ``stop_after`` of them)."""
    from mask_impact.resume import PartialStore

    computed, original = [], getattr(PartialStore.record, "__wrapped__", PartialStore.record)

    def record(self, *args, **kwargs):
        original(self, *args, **kwargs)
        computed.append((args[0], args[1][0]))  # (window, first unit): where the batch starts
        if stop_after is not None and len(computed) >= stop_after:
            raise KeyboardInterrupt

    record.__wrapped__ = original
    monkeypatch.setattr(PartialStore, "record", record)
    return computed


@pytest.mark.slow
def test_two_runs_with_the_same_output_at_once_the_second_is_refused(tmp_path):
    argv = [sys.executable, str(ROOT / "mask_impact_analysis.py"), *TEXT_ARGS, "--engine", "naive", "--batch-size",
            "1", "--output", "run"]
    first = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = tmp_path / "output" / "run.partial.jsonl"
    try:
        deadline = time.time() + HANG_S
        while not (partial.exists() and partial.read_text().count("\n") >= 2):
            assert first.poll() is None and time.time() < deadline, "the first run ended before the test"
            time.sleep(0.01)
        first.send_signal(signal.SIGSTOP)  # paused, still holding its lock, so it cannot finish meanwhile
        second = subprocess.run([*argv, "--overwrite"], cwd=tmp_path, capture_output=True, text=True, timeout=HANG_S)
        assert first.poll() is None, "the first run ended before the second was refused"
        lines = [json.loads(line) for line in partial.read_text().splitlines()[:-1]]
    finally:
        first.kill()
        first.wait()
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert second.stderr.count("\n") == 1
    assert f"another run is writing run (pid {first.pid})" in second.stderr
    assert len({line["run"] for line in lines}) == 1 and "parts" in lines[0]  # one run's header and records

    from mask_impact.config import UsageError
    from mask_impact.resume import RunLock

    mine, other = RunLock(tmp_path / "x.partial.jsonl"), RunLock(tmp_path / "x.partial.jsonl")
    mine.acquire()
    with pytest.raises(UsageError, match=f"another run is writing x \\(pid {os.getpid()}\\)"):
        other.acquire()
    mine.release()
    other.acquire()  # free again once released
    other.release()
    assert not (tmp_path / ".x.lock").exists()


def test_records_of_another_run_are_never_merged(tmp_path, text_reference, monkeypatch):
    foreign = _records(text_reference, run="intruder")
    for record in foreign:
        record["metrics"]["logprob_drop"] = [99.0] * len(record["units"])
    # window 0 (one head group) saved by this run, window 1 only by another
    _write_partial(tmp_path, [_header(text_reference), *_records(text_reference)[:4], *foreign[4:]])
    computed = _count_new_records(monkeypatch)
    assert _text_main(tmp_path, "--resume") == 0
    _same_result(tmp_path / "run.json", text_reference)
    assert len(computed) == len(foreign) - 4


@pytest.mark.slow
def test_changed_chat_template_between_kill_and_resume_is_refused(tmp_path, capsys):
    from mask_impact.cli import main
    from mask_impact.demo import demo_model_path

    model = tmp_path / "model"
    shutil.copytree(demo_model_path(False), model)
    argv = ["--model", str(model), "--prompt", "A=3, B=7, C=1. What is B?", "--engine", "naive", "--batch-size",
            "1", "--num-tokens", "3", "--no-progress", "--no-html", "--output", "run"]
    process = subprocess.Popen([sys.executable, str(ROOT / "mask_impact_analysis.py"), *argv], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    partial = tmp_path / "output" / "run.partial.jsonl"
    assert _stop_mid_sweep(process, partial, signal.SIGKILL) == -signal.SIGKILL
    template = model / "chat_template.jinja"
    template.write_text(template.read_text().replace("assistant{{ '\\n' }}", "assistant{{ '\\n' }}Answer: "))

    os.chdir(tmp_path)
    try:
        assert main([*argv, "--resume"], False) == 2
    finally:
        os.chdir(ROOT)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "files.chat_template.jinja" in err and "input_ids" in err, err
    assert partial.exists() and not (tmp_path / "output" / "run.json").exists()


def test_finished_result_carries_its_fingerprint_and_can_be_checked(tmp_path, text_reference):
    from mask_impact.cli import load
    from mask_impact.config import make_config
    from mask_impact.inputs import build_prompt
    from mask_impact.resume import fingerprint_differences, fingerprint_parts

    result = tmp_path / "run.json"
    result.write_text(json.dumps(text_reference))
    config = make_config([{"demo": True, "batch_size": 6, "num_tokens": 3, "generate_top": 2}], False)
    loaded = load(config, False)
    parts = fingerprint_parts(loaded, config, build_prompt(loaded, config.prompt, [], False, None))
    assert text_reference["meta"]["fingerprint"] == parts
    assert {"weights", "input_ids", "files.chat_template.jinja", "files.config.json", "settings.window",
            "transformers", "torch"} <= set(parts)
    assert fingerprint_differences(result, parts) == []  # a finished result made from exactly these
    assert fingerprint_differences(result, {**parts, "settings.window": 3}) == ["settings.window"]
    assert fingerprint_differences(result, {**parts, "files.chat_template.jinja": "edited"}) == [
        "files.chat_template.jinja"]
    without = dict(text_reference, meta={key: value for key, value in text_reference["meta"].items()
                                          if key != "fingerprint"})
    result.write_text(json.dumps(without))
    assert fingerprint_differences(result, parts) == ["fingerprint"]
    assert fingerprint_differences(tmp_path / "missing.json", parts) == ["fingerprint"]


def test_records_of_the_wrong_shape_are_recomputed_not_merged(tmp_path, text_reference, monkeypatch):
    good = _records(text_reference)
    bad = [dict(record) for record in good]
    bad[0]["metrics"] = dict(bad[0]["metrics"], kl=bad[0]["metrics"]["kl"][:-1])  # a short metric list
    bad[1]["metrics"] = {k: v for k, v in bad[1]["metrics"].items() if k != "kl"}  # a metric missing
    bad[2]["metrics"] = dict(bad[2]["metrics"], logprob_drop=["x"] * BATCH)  # not numbers
    bad[3]["metrics"] = dict(bad[3]["metrics"], extra=[0.0] * BATCH)  # a metric this version does not know
    bad[4]["window"] = "0"
    bad[5]["batch_size"] = 0
    bad[6]["units"] = bad[6]["units"][:-1]  # fewer units than values
    lines = [_header(text_reference), *bad[:7], [1, 2], None, "not json", good[7]]
    _write_partial(tmp_path, lines)
    computed = _count_new_records(monkeypatch)
    assert _text_main(tmp_path, "--resume") == 0
    _same_result(tmp_path / "run.json", text_reference)
    # every batch: window 1's head group misses the cells of bad[4:7], so good[7] is computed again with them
    assert sorted(computed) == sorted((r["window"], r["start"]) for r in good)

    from mask_impact.resume import valid_record

    assert valid_record(good[0], "r1") and not valid_record(good[0], "r2")
    assert not valid_record(dict(good[0], units=[], metrics={k: [] for k in good[0]["metrics"]}), "r1")
    assert not valid_record(dict(good[0], start=-1), "r1")


@pytest.mark.parametrize("header,problem", [
    ("not json", "no valid header"),
    ("[1, 2]", "not a JSON object"),
    ('{"parts": {}, "baseline": [1], "batch_size": 1}', "no run id"),
])
def test_a_malformed_header_is_one_error_line(tmp_path, text_reference, capsys, header, problem):
    partial = _write_partial(tmp_path, [header, *_records(text_reference)[:2]])
    assert _text_main(tmp_path, "--resume") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and problem in err and "--overwrite" in err
    assert partial.exists() and not (tmp_path / "run.json").exists()


def test_kill_resume_kill_resume_equals_an_uninterrupted_run(tmp_path, text_reference, monkeypatch):
    records = _records(text_reference)
    cut = json.dumps(records[2])[:40]  # the first kill cut a line short
    partial = _write_partial(tmp_path, [_header(text_reference), *records[:2]], tail=cut)
    # the resumed run computes window 0's head group (its 4 batches: 2 were saved, see the next test) and is
    # stopped after the first batch of window 1's
    _count_new_records(monkeypatch, stop_after=5)
    assert _text_main(tmp_path, "--resume") == 130
    with partial.open("a") as file:  # ... and the second kill cut a line short too
        file.write(json.dumps(records[6])[:30])
    lines = partial.read_text().split("\n")
    assert all(json.loads(line)["run"] == "r1" for line in lines[:-1]) and len(lines) == 1 + 7 + 1

    computed = _count_new_records(monkeypatch)
    assert _text_main(tmp_path, "--resume") == 0
    assert len(computed) == len(records) - 4  # nothing the first resume finished is computed again
    _same_result(tmp_path / "run.json", text_reference)
    assert not partial.exists()


@pytest.mark.slow
def test_a_stop_between_the_batches_of_one_head_group_resumes_to_the_same_bits(tmp_path, monkeypatch):
    """The fast engine puts several batches' answer rows through the head in one matrix product, whose float
    grouping depends on its rows (one row alone takes another kernel than many). A run stopped after some of a
    group's batches were saved computes that group whole again on --resume, the saved batches included, so the
    result is the uninterrupted run's bit for bit (computing only the missing batch put its 2 rows through the
    head alone and moved the last bits of its KL)."""
    from mask_impact.cli import main

    args = ["--demo", "--batch-size", "2", "--num-tokens", "1", "--generate-top", "0", "--no-progress", "--no-html",
            "--output", "run"]
    assert main([*args, "--output-dir", str(tmp_path / "reference")], False) == 0
    reference = json.loads((tmp_path / "reference" / "run.json").read_text())
    assert len(reference["units"]) == 24  # window 0: 12 batches of 2, 12 answer rows, one head group
    _count_new_records(monkeypatch, stop_after=11)
    assert main([*args, "--output-dir", str(tmp_path / "cut")], False) == 130
    computed = _count_new_records(monkeypatch)
    assert main([*args, "--output-dir", str(tmp_path / "cut"), "--resume"], False) == 0
    assert computed == [(w, u) for w in (0, 1) for u in range(0, 24, 2)]
    _same_result(tmp_path / "cut" / "run.json", reference)


def test_another_batch_size_on_resume_keeps_the_saved_boundaries_and_says_so(tmp_path, text_reference, capsys):
    _write_partial(tmp_path, [_header(text_reference), *_records(text_reference)[:3]])
    assert _text_main(tmp_path, "--resume", "--batch-size", "4") == 0
    err = capsys.readouterr().err
    assert "batch size it was made with (6, not 4)" in err
    _same_result(tmp_path / "run.json", text_reference)
    assert json.loads((tmp_path / "run.json").read_text())["meta"]["batch_size"] == BATCH


@pytest.fixture()
def small_disk(tmp_path):
    """A real 1 MiB filesystem (tmpfs), so a full disk is a real ENOSPC."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def _fill(folder: Path) -> Path:
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as error:
        assert error.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


@pytest.mark.parametrize("when", ["mid-run", "final write"])
def test_disk_full_is_one_line_keeps_the_finished_work_and_resumes(small_disk, text_reference, monkeypatch, capsys,
                                                                   when):
    from mask_impact import report
    from mask_impact.resume import PartialStore

    output = small_disk / "out"
    fillers = []
    if when == "mid-run":  # full once the header is written: an append fails when the file needs a new page
        original = PartialStore.start

        def start(self, *args):
            original(self, *args)
            fillers.append(_fill(small_disk))

        monkeypatch.setattr(PartialStore, "start", start)
    else:  # full once the sweep is done
        original = report.result_json
        monkeypatch.setattr(report, "result_json", lambda *a: (fillers.append(_fill(small_disk)), original(*a))[1])
    assert _text_main(output) == 2
    err = capsys.readouterr().err
    partial = output / "run.partial.jsonl"
    records = [json.loads(line) for line in partial.read_text().splitlines()[1:]]  # whole lines only
    kept = sum(len(record["units"]) for record in records)
    written = partial if when == "mid-run" else output / "run.csv"
    assert err.count("\n") == 1 and err.startswith(f"error: no space left on device while writing {written}; ")
    assert f"{kept} finished knockouts are kept in {partial}; free space and rerun with --resume" in err
    assert kept < 8 * BATCH if when == "mid-run" else kept == 8 * BATCH
    assert sorted(p.name for p in output.iterdir()) == ["run.partial.jsonl"]  # no result, no temporary file

    monkeypatch.undo()
    fillers[0].unlink()
    assert _text_main(output, "--resume") == 0
    _same_result(output / "run.json", text_reference)
    assert sorted(p.name for p in output.iterdir()) == ["run.csv", "run.json"]


def test_the_files_of_a_killed_launch_are_gathered_and_only_missing_cells_computed(tmp_path, text_reference,
                                                                                   monkeypatch):
    """Process 0's file and process 1's (another run id, cells of its own part) resume in one process: together
    they hold window 0 (one head group), which is not computed again."""
    records = _records(text_reference)
    _write_partial(tmp_path, [_header(text_reference), *records[:2]])
    rank1 = tmp_path / "run.partial.rank1.jsonl"
    rank1.write_text("".join(json.dumps(line) + "\n" for line in [_header(text_reference, "r2"),
                                                                   *_records(text_reference, "r2")[2:4]]))
    stale = tmp_path / "run.partial.rank2.jsonl"  # a process that died before its header: nothing to gather
    stale.write_text("")
    computed = _count_new_records(monkeypatch)
    assert _text_main(tmp_path, "--resume") == 0
    assert len(computed) == len(records) - 4  # the four batches of both files are not computed again
    assert (records[2]["window"], records[2]["start"]) not in computed
    _same_result(tmp_path / "run.json", text_reference)
    assert not any(tmp_path.glob("run.partial*"))
