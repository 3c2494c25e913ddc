"""What both entry points do: parse → validate → load → run → write. No tensors here.

Bad input is one line on stderr and exit status 2, with nothing written. A YAML batch loads the
model once, runs every entry (one that fails, for whatever reason, is reported and the others still
run), keeps ``OUTPUT_DIR/BATCH/index.json`` up to date, and exits 1 at the end if any run failed.
SIGINT (Ctrl-C) and SIGTERM stop cleanly at any stage: the message says where and what was kept
(finished knockouts stay in the partial file for ``--resume``), exit status 128 + the signal.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .config import RunConfig, UsageError, bounded, cli_options, make_config, output_dir, output_paths, possible_figures
from .errors import MaskImpactError
from .inputs import load_image, read_prompt
from .shard import is_main_process
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


def say(*args, **kwargs) -> None:
    """``print`` in the process that speaks for the run: the only one, or the main one of a launch."""
    if is_main_process():
        print(*args, **kwargs)


def one_line(error: Exception) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 1] + "…"


def main(argv: list[str] | None, vision: bool) -> int:
    stage = Stage()
    with stop_signals_raise():
        try:
            options = cli_options(argv, vision)
            if "config" in options:
                return run_batch(options, vision, stage)
            config = make_config([options], vision)
            stage.now = "checking the input"
            prompt_text = precheck(config)
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
        raise UsageError(f"{partial} holds an unfinished run; pass --resume to continue it, or --overwrite to "
                         "start over")
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
        raise UsageError("--device-map spreads one model over several devices, but a launched process takes one "
                         "GPU; drop --device-map, or run one process")
    if config.estimate is not None and launched():
        raise UsageError("--estimate computes few cells exactly, chosen by one process's estimate; run it as one "
                         "process, not under accelerate launch")
    device = config.device
    if config.device == "auto" and config.device_map is None and launched():
        device = Shard.current().device  # one device per process
    loaded = load_model(name, vision, device, config.dtype, config.device_map, config.max_memory,
                        config.offload_folder)
    if config.demo:
        loaded.name = f"demo ({name})"
    return loaded


def prepare(loaded, config: RunConfig, prompt_text: str):
    """The model's input for a run, and the fingerprint of everything that decides its numbers."""
    from .inputs import build_prompt
    from .resume import fingerprint_parts

    prompt = build_prompt(loaded, prompt_text, config.images, config.raw_prompt, config.max_pixels,
                          config.min_pixels, config.allow_special_tokens, config.num_tokens)
    for path, image in zip(config.images, prompt.images):
        area_ratio = image.resized_width * image.resized_height / (image.width * image.height)
        resized = [f"{image.resize} ({image.width}×{image.height} → {image.resized_width}×{image.resized_height})"]
        for note in image.notes + (resized if not 0.8 <= area_ratio <= 1.25 else []):
            say(f"note: image {path}: {note}", file=sys.stderr)  # said once in a launch
    return prompt, fingerprint_parts(loaded, config, prompt)


def run_one(loaded, config: RunConfig, prompt_text: str, stage: Stage | None = None) -> dict:
    """One analysis, written atomically; returns the paths written and the terminal summary."""
    from . import report
    from .api import analyze
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
            from .figures import parse_options

            from .errors import MaskImpactError

            options = parse_options(config.figure_options or [])
            try:  # an option that does not fit this result (units past its last): one line, as any bad option
                drawn = render(data, config.figures, **options)
            except MaskImpactError as error:
                raise UsageError(f"--figure-option: {error}") from None
            pictures = {possible[kind]: content for kind, content in drawn.items() if kind in possible}
        stage.now = "writing the results"
        written = {**paths, **{kind: possible[kind] for kind in possible if possible[kind] in pictures}}
        report.check_writable(written, config.overwrite)

        def finished() -> None:  # runs with the renames, before a held-back signal can arrive
            store.remove()
            stage.written = ", ".join(str(path) for path in written.values())

        report.write_results(data, paths, then=finished, figures=pictures)
    return {**written, "summary": report.summary(data, written), "answer": data["baseline"]["text"],
            "top": report.largest_knockout(data)}


def run_batch(options: dict, vision: bool, stage: Stage) -> int:
    """Every run of a YAML batch with one model load; exit status 1 if any run failed."""
    from .batch import load_batch
    from .report import write_index
    from .shard import Shard

    if not is_main_process():  # a launched batch: the main process keeps the index and says how it went
        def write_index(*args):
            return None
    name, folder, runs = load_batch(options["config"], options, vision)
    configs = [run.config for run in runs if run.config]
    Shard.current().agree(lambda: check_batch_folder(folder, bool(configs) and all(c.resume or c.overwrite
                                                                                   for c in configs)))
    index = {"schema_version": 1, "kind": "batch", "batch": name, "config": str(options["config"]),
             "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "runs": []}
    for run in runs:
        entry = {"name": run.name, "status": "pending" if run.config else "error", "error": run.error}
        if run.config:
            entry.update(prompt=run.config.prompt, prompt_file=run.config.prompt_file, images=run.config.images,
                         mask_mode=run.config.mask_mode, stage=run.config.stage, unit=run.config.unit,
                         flows=run.config.flows)
        index["runs"].append(entry)
    html = any(config.html for config in configs) if configs else options.get("html", True)
    write_index(index, folder, html)
    batch = BatchState(vision)
    for run, entry in zip(runs, index["runs"]):
        if run.config is None:
            say(f"{run.name}: error: {run.error}", file=sys.stderr)
            continue
        stage.now, stage.store, stage.written = f"running {run.name} of batch {name}", None, ""
        started = time.perf_counter()
        try:
            entry.update(batch.run(run.config, stage), error=None)
            if "note" not in entry:
                entry["elapsed_s"] = round(time.perf_counter() - started, 3)
            say(f"{run.name}: {entry.get('note', 'done')} ({folder / entry['json']})")
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
            write_index(index, folder, html)
    failed = [entry["name"] for entry in index["runs"] if entry["status"] != "done"]
    done = len(index["runs"]) - len(failed)
    say(f"batch {name}: {done} done, {len(failed)} failed" + (f" ({', '.join(failed)})" if failed else "")
          + f"; index {folder / 'index.json'}")
    return 1 if failed else 0


@dataclass
class BatchState:
    """The one model a batch loads (on first need), shared by its runs."""

    vision: bool
    loaded: object = None
    model_error: bool = False

    def model(self, config: RunConfig, stage: Stage):
        if self.loaded is None:
            stage.now = "loading the model"
            try:
                self.loaded = load(config, self.vision)
            except UsageError:
                self.model_error = True
                raise
        return self.loaded

    def run(self, config: RunConfig, stage: Stage) -> dict:
        """One run of the batch; a finished result is kept on --resume only if it was made from this entry."""
        finished = output_paths(config)["json"]
        if config.resume and not config.overwrite and finished.exists():
            from .resume import fingerprint_differences

            prompt_text = read_prompt(config)
            loaded = self.model(config, stage)
            _, parts = prepare(loaded, config, prompt_text)
            differs = fingerprint_differences(finished, parts)
            if differs:
                raise UsageError(f"{finished} does not match this entry as it is now ({', '.join(differs)} "
                                 "differ); pass --overwrite to compute it again")
            return {"status": "done", "json": finished.name, "note": "kept from an earlier run"}
        prompt_text = precheck(config)
        paths = run_one(self.model(config, stage), config, prompt_text, stage)
        figures = [Path(path).name for kind, path in paths.items() if kind in ("heatmap", "overlay", "flows")]
        return {"status": "done", "answer": paths["answer"], **({"figures": figures} if figures else {}),
                **({"top": paths["top"]} if paths.get("top") else {}),  # the batch page's columns before any drop
                **{kind: Path(path).name for kind, path in paths.items() if kind in ("json", "csv", "html")}}


def check_batch_folder(folder: Path, may_continue: bool) -> None:
    """A batch folder is created if need be; an earlier batch in it is touched only with --resume/--overwrite."""
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"batch output {folder} is a file, not a folder; choose another --output or --output-dir")
    if (folder / "index.json").exists() and not may_continue:
        raise UsageError(f"{folder} holds an earlier batch (index.json); pass --resume to continue it, or "
                         "--overwrite to compute it again")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"batch output folder {folder} cannot be created ({error.strerror})") from None
    if not os.access(folder, os.W_OK):
        raise UsageError(f"batch output folder {folder} is not writable; choose another --output-dir")
