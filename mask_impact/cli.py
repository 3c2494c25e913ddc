"""What both entry points do: parse → validate → load → run → write. No tensors here.

Parsing and validating import neither torch nor transformers (nor anything that does): ``--help``, ``--version``
and a mistyped option answer at once; the heavy libraries load with the first step that needs them.

Bad input is one line on stderr and exit status 2, with nothing written. A YAML batch loads the
model once, runs every entry (one that fails, for whatever reason, is reported and the others still
run), keeps ``OUTPUT_DIR/BATCH/index.json`` up to date, and exits 1 at the end if any run failed.
SIGINT (Ctrl-C) and SIGTERM stop cleanly at any stage: the message says where and what was kept
(finished knockouts stay in the partial file for ``--resume``), exit status 128 + the signal.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from .config import (STUDY_OPTIONS, RunConfig, UsageError, bounded, cli_options, make_config, output_dir, output_paths,
                     possible_figures, prompt_from_command_line)
from .errors import MaskImpactError, mention, message_of
from .pipeline import prepare, say
from .shard import is_main_process, launch_shortfall
from .stopping import stop_signals_raise, stop_status

MAX_MESSAGE = 400  # characters: an error message never echoes an unbounded value


@dataclass
class Stage:
    """What a run is doing, so a stop signal can say where it came and what was kept."""

    now: str = "reading the options"
    store: object = None  # the PartialStore once the sweep has one
    written: str = ""  # the result files, once they are all in place

    def kept(self) -> str:
        if self.written:
            return f"the results were written completely ({self.written})"
        if self.store is not None and self.store.path.exists():
            done = self.store.kept()
            return (f"{done} finished knockouts are kept in {self.store.path}; rerun with --resume to continue"
                    if done else f"no knockout had finished; rerun with --resume to start from {self.store.path}")
        return "nothing was written"


def one_line(error: Exception | str) -> str:
    """The message on one line, cut to ``MAX_MESSAGE`` characters unless it is one whose every part is bounded and
    needed (``error.whole``: a list of the valid keys)."""
    text = " ".join(str(error).split())
    whole = getattr(error, "whole", False)
    return text if len(text) <= MAX_MESSAGE or whole else text[: MAX_MESSAGE - 1] + "…"


def main(argv: list[str] | None, vision: bool) -> int:
    stage = Stage()
    with stop_signals_raise():
        try:
            options, note = prompt_from_command_line(cli_options(argv, vision))
            if "config" in options or "dataset" in options:
                if note:
                    say(note, file=sys.stderr)
                return (run_batch if "config" in options else run_study)(options, vision, stage)
            stray = next((key for key in STUDY_OPTIONS if key in options), None)
            if stray:
                raise UsageError(f"{mention(stray)} belongs to a study: give {mention('dataset', 'FILE')} too")
            config = make_config([options], vision)
            note_launch()
            stage.now = "checking the input"
            prompt_text = precheck(config)
            if note:  # once the file is read: a file that cannot be is the one line of its error
                say(note, file=sys.stderr)
            stage.now = "loading the model"
            loaded = load(config, vision)
            paths = run_one(loaded, config, prompt_text, stage)
        except MaskImpactError as error:  # a UsageError, worded for the command line, or another library error
            speak(stage)(f"error: {one_line(error)}", file=sys.stderr)
            return 2
        except OSError as error:  # a path the system refuses (a name too long, ...): the user's to fix
            if error.filename is None:
                raise
            speak(stage)(f"error: {error.strerror or error}: {bounded(str(error.filename))}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as stop:
            name, status = stop_status(stop)
            say(f"interrupted ({name}) while {stage.now}; {stage.kept()}", file=sys.stderr)
            return status
    say(paths.pop("summary"))
    return 0


def note_launch() -> None:
    """One line when ``accelerate launch`` was asked for several processes and started one (shard.py)."""
    shortfall = launch_shortfall()
    if shortfall:
        say(f"note: {shortfall}", file=sys.stderr)


def speak(stage: Stage):
    """How an error is said. In a launch every process checks the input alike, and the main one says what is wrong;
    a process other than the main one that fails later (its GPU, its part of the sweep) says so itself, by rank."""
    if is_main_process() or stage.now in ("reading the options", "checking the input"):
        return say
    rank = os.environ.get("RANK", "?")
    return lambda text, **kwargs: print(f"process {rank}: {text}", **kwargs)


def partial_path(config: RunConfig) -> Path:
    return output_dir(config.output_dir) / f"{config.output}.partial.jsonl"


def precheck(config: RunConfig) -> str:
    """Everything about a run's input that can be checked before the model loads; returns the prompt text (in a
    launch: the main process's verdict, on every process)."""
    from .shard import Shard

    return Shard.current().agree(lambda: _precheck(config))


def _precheck(config: RunConfig) -> str:
    from .inputs import load_image, read_prompt

    prompt_text = read_prompt(config)
    for path in config.images:
        load_image(path)
    from .report import check_writable
    from .resume import check_unlocked, unfinished

    paths = output_paths(config)
    check_writable({**paths, **possible_figures(config)}, config.overwrite)
    partial = partial_path(config)
    check_unlocked(partial)
    if unfinished(partial) and not (config.resume or config.overwrite):
        raise UsageError(f"{partial} holds an unfinished run; pass {mention('resume')} to continue it, or "
                         f"{mention('overwrite')} to start over")
    return prompt_text


def load(config: RunConfig, vision: bool):
    import transformers

    from .demo import demo_model_path
    from .models import load_model

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", module="transformers")
    from .shard import Shard, launched
    from .threads import set_threads

    chosen = set_threads(config.threads)
    if chosen and config.progress:
        say(f"note: {chosen}", file=sys.stderr)
    name = str(demo_model_path(vision)) if config.demo else config.model
    if config.device_map is not None and launched():
        raise UsageError(f"{mention('device_map')} spreads one model over several devices, but a launched process "
                         f"takes one GPU; drop {mention('device_map')}, or run one process")
    if config.estimate is not None and launched():
        raise UsageError(f"{mention('estimate')} computes few cells exactly, chosen by one process's estimate; run it "
                         "as one process, not under accelerate launch")
    device = config.device
    if config.device == "auto" and config.device_map is None and launched():
        device = Shard.current().device  # one device per process
    loaded = load_model(name, vision, device, config.dtype, config.device_map, config.max_memory,
                        config.offload_folder)
    if config.demo:
        loaded.name = f"demo ({name})"
    return loaded


def run_one(loaded, config: RunConfig, prompt_text: str, stage: Stage | None = None) -> dict:
    """One analysis, written atomically; returns the paths written and the terminal summary."""
    from . import report
    from .pipeline import analyze
    from .resume import PartialStore
    from .shard import Shard

    stage = stage or Stage()
    paths = output_paths(config)
    possible = possible_figures(config)
    stage.now = "preparing the prompt"
    prepared = prepare(loaded, config, prompt_text)
    store = PartialStore(partial_path(config), prepared[1], Shard.current())
    with report.output_folder(paths["json"].parent), store.open(config.resume):  # the lock: until results are in
        # again: a run that held the lock before may have written them
        report.check_writable({**paths, **possible}, config.overwrite)
        stage.now, stage.store = "running the sweep", store
        data = analyze(loaded, config, prompt_text, store, prepared)  # what the Python API runs too
        if data is None:  # a launched process other than the main one: its part is done
            return {**paths, "summary": "", "answer": ""}
        pictures = {}
        if config.figures:
            from .figures import render

            stage.now = "drawing the figures"
            from .options import parse_figure_options

            options = parse_figure_options(config.figure_options or [])
            try:  # an option that does not fit this result (units past its last): one line, as any bad option
                drawn = render(data, config.figures, **options)
            except MaskImpactError as error:
                raise UsageError(f"{mention('figure_options')}: {message_of(error)}") from None
            pictures = {possible[kind]: content for kind, content in drawn.items() if kind in possible}
        stage.now = "writing the results"
        written = {**paths, **{kind: possible[kind] for kind in possible if possible[kind] in pictures}}
        report.check_writable(written, config.overwrite)

        def finished() -> None:  # runs with the renames, before a held-back signal can arrive
            store.remove()
            stage.written = ", ".join(str(path) for path in written.values())

        report.write_results(data, paths, then=finished, figures=pictures)
    return {**written, "summary": report.summary(data, written), "answer": data["baseline"]["text"],
            "top": report.largest_knockout(data), "correct": data.get("correct")}


def run_batch(options: dict, vision: bool, stage: Stage) -> int:
    """Every run of a YAML batch with one model load; exit status 1 if any run failed."""
    from .batch import load_batch

    name, folder, runs = load_batch(options["config"], options, vision)  # the whole file checked: no torch yet
    note_launch()
    index = run_all(name, folder, runs, {"config": str(options["config"])}, options, vision, stage)
    return 1 if any(entry["status"] not in ("done", "excluded") for entry in index["runs"]) else 0


def run_study(options: dict, vision: bool, stage: Stage) -> int:
    """A study (``--dataset``): one run per row with one model load, then the aggregates over the rows (study.py);
    exit status 1 if any row failed."""
    from .study import load_study, row_runs, write_study

    study = load_study(options, vision)  # the dataset read and every option checked: no torch yet
    note_launch()
    from .shard import Shard

    shard = Shard.current()
    shard.agree(lambda: check_batch_folder(study.folder, study.may_continue))
    runs = row_runs(study, vision)
    index = run_all(study.name, study.folder, runs, {"dataset": study.dataset, "study": "study.json"}, options,
                    vision, stage, what="study", share=shard)
    if is_main_process():
        stage.now = "writing the study"
        paths, data = write_study(study, index)
        if options.get("html", True):  # the batch page, with the study's aggregates to draw
            from .report import write_index

            write_index({**index, "study_data": data}, study.folder, True)
        say(f"study {study.name}: wrote " + ", ".join(str(path) for path in paths))
    return 1 if any(entry["status"] not in ("done", "excluded") for entry in index["runs"]) else 0


def run_all(name: str, folder: Path, runs: list, about: dict, options: dict, vision: bool, stage: Stage,
            what: str = "batch", share=None) -> dict:
    """The runs of a batch or study, one model load, ``folder/index.json`` kept up to date; returns the index. A
    run that fails, for whatever reason, is reported and the others still run; a study's row whose answer misses
    its target under ``only_correct`` is ``excluded``.

    ``share``: a launch's ``Shard`` that shares the runs themselves (a study's rows): process k takes runs k, k + N,
    ... and computes each alone (``shard.alone``: no collective call, its own partial file); each finished run's
    entry goes to ``folder/.status/NAME.json`` (tagged with this launch's token), and the main process, after its
    own runs, merges the others' entries as they come and writes the index. Returns, in a process other than the
    main one, the index of its own runs."""
    from .report import write_index
    from .shard import Shard, alone

    if not is_main_process():  # a launched batch: the main process keeps the index and says how it went
        def write_index(*args):
            return None
    configs = [run.config for run in runs if run.config]
    if what == "batch":
        Shard.current().agree(lambda: check_batch_folder(folder, bool(configs) and all(c.resume or c.overwrite
                                                                                       for c in configs)))
    index = {"schema_version": 1, "kind": "batch", "batch": name, **about,
             "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "processes": share.count if share is not None else 1, "runs": []}
    for run in runs:
        entry = {"name": run.name, "status": "pending" if run.config else "error", "error": run.error}
        if run.config:
            entry.update(prompt=run.config.prompt, prompt_file=run.config.prompt_file, images=run.config.images,
                         mask_mode=run.config.mask_mode, stage=run.config.stage, unit=run.config.unit,
                         flows=run.config.flows, **({"target": run.config.target} if run.config.target else {}))
        index["runs"].append(entry)
    html = any(config.html for config in configs) if configs else options.get("html", True)
    batch = BatchState(vision)
    shared = share is not None and share.count > 1
    mine = [k for k in range(len(runs)) if not shared or k % share.count == share.index]
    if shared:
        import secrets
        from dataclasses import replace

        token = share.broadcast(secrets.token_hex(8) if share.is_main else None)  # this launch's status files
        batch.model(configs[0], stage)  # on this process's device, before the runs go alone
        runs = [run if run.config is None else type(run)(run.name, replace(run.config, progress=False), run.error)
                for run in runs]
    started = time.perf_counter()
    with alone() if shared else _nothing():
        batch.check_resume([(runs[k].name, runs[k].config) for k in mine if runs[k].config], stage)  # before any run
        write_index(index, folder, html)
        bar = _rows_bar(len(runs), shared and is_main_process() and options.get("progress", True))
        for k in mine:
            _run_entry(runs[k], index["runs"][k], batch, folder, what, name, stage,
                       lambda: write_index(index, folder, html))
            bar.update(1)
            if shared and not is_main_process():
                _write_status(folder, runs[k].name, token, index["runs"][k])
        if shared and is_main_process():
            _gather_statuses(folder, index, [k for k in range(len(runs)) if k not in mine], token, bar,
                             lambda: write_index(index, folder, html))
        bar.close()
    index["elapsed_s"] = round(time.perf_counter() - started, 3)  # the runs, all processes' (not the start-up)
    if shared and not is_main_process():
        index["runs"] = [index["runs"][k] for k in mine]
        return index
    failed = [entry["name"] for entry in index["runs"] if entry["status"] not in ("done", "excluded")]
    excluded = sum(entry["status"] == "excluded" for entry in index["runs"])
    done = len(index["runs"]) - len(failed) - excluded
    say(f"{what} {name}: {done} done" + (f", {excluded} excluded (answer not the target)" if excluded else "")
        + f", {len(failed)} failed" + (f" ({', '.join(failed[:20])}{', …' if len(failed) > 20 else ''})"
                                        if failed else "") + f"; index {folder / 'index.json'}")
    return index


@contextmanager
def _nothing():
    yield


def _rows_bar(total: int, shown: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="row", disable=not shown, dynamic_ncols=True)


def _write_status(folder: Path, name: str, token: str, entry: dict) -> None:
    """A run's index entry for the main process (``run_all``'s ``share``), written atomically."""
    import json

    from .report import write_atomic

    (folder / ".status").mkdir(exist_ok=True)
    write_atomic(folder / ".status" / f"{name}.json", json.dumps({"token": token, "entry": entry}))


def _gather_statuses(folder: Path, index: dict, others: list[int], token: str, bar, save) -> None:
    """The main process: the other processes' entries, as their status files appear (this launch's only)."""
    import json

    waiting = {index["runs"][k]["name"]: k for k in others if index["runs"][k]["status"] != "error"}
    while waiting:
        merged = 0
        for name, k in list(waiting.items()):
            path = folder / ".status" / f"{name}.json"
            try:
                status = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if status.get("token") == token:
                index["runs"][k] = status["entry"]
                del waiting[name]
                path.unlink(missing_ok=True)
                merged += 1
        if merged:  # the index once per look, not once per entry: it is rewritten whole
            bar.update(merged)
            save()
        if waiting:
            time.sleep(0.1)
    try:
        (folder / ".status").rmdir()  # empty once every entry is in
    except OSError:
        pass
    bar.update(sum(index["runs"][k]["status"] == "error" for k in others))


def _run_entry(run, entry: dict, batch, folder: Path, what: str, name: str, stage: Stage, save) -> None:
    """One run of a batch or study, its outcome in ``entry``; ``save()`` writes the index."""
    from .errors import NotCorrect

    if run.config is None:
        say(f"{run.name}: error: {run.error}", file=sys.stderr)
        return
    stage.now, stage.store, stage.written = f"running {run.name} of {what} {name}", None, ""
    started = time.perf_counter()
    try:
        entry.update(batch.run(run.config, stage), error=None)
        if "note" not in entry:
            entry["elapsed_s"] = round(time.perf_counter() - started, 3)
        say(f"{run.name}: {entry.get('note', 'done')} ({folder / entry['json']})")
    except NotCorrect as excluded:
        entry.update(status="excluded", answer=excluded.answer, correct=False, error=None)
        say(f"{run.name}: excluded: {one_line(excluded)}")
    except UsageError as error:
        entry.update(status="error", error=one_line(error))
        if batch.model_error:  # no run can go on without the model: the batch ends with this one line
            raise
        say(f"{run.name}: error: {one_line(error)}", file=sys.stderr)
    except KeyboardInterrupt as stop:
        entry.update(status="interrupted", error=f"{stop_status(stop)[0]}: {stage.kept()}")
        raise
    except Exception as error:  # a defect in one run must not cost the others theirs
        entry.update(status="failed", error=one_line(f"{type(error).__name__}: {error}"))
        say(f"{run.name}: failed: {entry['error']}", file=sys.stderr)
    finally:  # also on the way out: the index always shows the latest status
        save()


@dataclass
class BatchState:
    """The one model a batch loads (on first need), shared by its runs."""

    vision: bool
    loaded: object = None
    model_error: bool = False
    kept: set = field(default_factory=set)  # the finished results --resume found to match their entries

    def model(self, config: RunConfig, stage: Stage):
        if self.loaded is None:
            stage.now = "loading the model"
            try:
                self.loaded = load(config, self.vision)
            except UsageError:
                self.model_error = True
                raise
        return self.loaded

    def check_resume(self, runs: list[tuple[str, RunConfig]], stage: Stage) -> None:
        """On ``--resume``, every entry with a finished result or a killed run's partial file must match it as the
        entry is now, before any run starts: a flag added on resuming (``--engine naive``) would otherwise leave
        the finished runs refused and the others computed with the new settings, a mixed batch."""
        from .inputs import read_prompt
        from .resume import fingerprint_differences, partial_differences, unfinished

        stale = []
        for name, config in runs:
            finished, partial = output_paths(config)["json"], partial_path(config)
            if not config.resume or config.overwrite or not (finished.exists() or unfinished(partial)):
                continue
            try:
                prompt_text = read_prompt(config)
            except UsageError:
                continue  # its own input is bad: the run reports that itself
            stage.now = "checking the runs to resume"
            _, parts = prepare(self.model(config, stage), config, prompt_text)
            differs = (fingerprint_differences(finished, parts) if finished.exists()
                       else partial_differences(partial, parts))
            if differs:
                stale.append(f"{name} ({', '.join(differs)})")
            elif finished.exists():
                self.kept.add(config.output)
        if stale:
            runs_do = f"{len(stale)} runs of this batch do" if len(stale) > 1 else "1 run of this batch does"
            raise UsageError(f"{mention('resume')}: {runs_do} not match how it was started: {'; '.join(stale)} "
                             "differ; nothing was run. Resume with the settings it was started with, or pass "
                             f"{mention('overwrite')} to compute again")

    def run(self, config: RunConfig, stage: Stage) -> dict:
        """One run of the batch; a finished result is kept on --resume only if it was made from this entry (checked
        for every entry before the first run: ``check_resume``)."""
        finished = output_paths(config)["json"]
        if config.resume and not config.overwrite and finished.exists() and config.output in self.kept:
            return {"status": "done", "json": finished.name, "note": "kept from an earlier run"}
        prompt_text = precheck(config)
        paths = run_one(self.model(config, stage), config, prompt_text, stage)
        figures = [Path(path).name for kind, path in paths.items() if kind in ("heatmap", "overlay", "flows")]
        return {"status": "done", "answer": paths["answer"], **({"figures": figures} if figures else {}),
                **({"correct": paths["correct"]} if paths.get("correct") is not None else {}),
                **({"top": paths["top"]} if paths.get("top") else {}),  # the batch page's columns before any drop
                **{kind: Path(path).name for kind, path in paths.items() if kind in ("json", "csv", "html")}}


def check_batch_folder(folder: Path, may_continue: bool) -> None:
    """A batch folder is created if need be; an earlier batch in it is touched only with --resume/--overwrite."""
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"batch output {folder} is a file, not a folder; choose another {mention('output')} or "
                         f"{mention('output_dir')}")
    if (folder / "index.json").exists() and not may_continue:
        raise UsageError(f"{folder} holds an earlier batch (index.json); pass {mention('resume')} to continue it, or "
                         f"{mention('overwrite')} to compute it again")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"batch output folder {folder} cannot be created ({error.strerror})") from None
    if not os.access(folder, os.W_OK):
        raise UsageError(f"batch output folder {folder} is not writable; choose another {mention('output_dir')}")
