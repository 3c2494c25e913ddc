"""What both entry points do: parse → validate → load → run → write. No tensors here.

Bad input is one line on stderr and exit status 2, with nothing written. A YAML batch loads the
model once, runs every entry, keeps ``OUTPUT_DIR/BATCH/index.json`` up to date, and exits 1 at the
end if any run failed. Ctrl-C stops cleanly: finished knockouts stay in the partial file for
``--resume``.
"""

from __future__ import annotations

import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

from .config import RunConfig, UsageError, cli_options, make_config, output_paths
from .inputs import load_image, read_prompt


class Interrupted(Exception):
    """Ctrl-C during a run; says where the finished work is."""


def main(argv: list[str] | None, vision: bool) -> int:
    try:
        options = cli_options(argv, vision)
        if "config" in options:
            return run_batch(options, vision)
        config = make_config([options], vision)
        prompt_text = precheck(config)
        loaded = load(config, vision)
        paths = run_one(loaded, config, prompt_text)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (Interrupted, KeyboardInterrupt) as stop:
        print(f"interrupted; {stop or 'nothing was written'}", file=sys.stderr)
        return 130
    print(paths.pop("summary"))
    return 0


def partial_path(config: RunConfig) -> Path:
    return Path(config.output_dir) / f"{config.output}.partial.jsonl"


def precheck(config: RunConfig) -> str:
    """Everything about a run's input that can be checked before the model loads; returns the prompt text."""
    prompt_text = read_prompt(config.prompt)
    for path in config.images:
        load_image(path)
    from .report import check_writable
    from .resume import check_unlocked

    paths = output_paths(config)
    check_writable(paths, config.overwrite)
    partial = partial_path(config)
    check_unlocked(partial)
    if partial.exists() and not (config.resume or config.overwrite):
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
    name = str(demo_model_path(vision)) if config.demo else config.model
    loaded = load_model(name, vision, config.device, config.dtype)
    if config.demo:
        loaded.name = f"demo ({name})"
    return loaded


def run_one(loaded, config: RunConfig, prompt_text: str) -> dict:
    """One analysis, written atomically; returns the paths written and the terminal summary."""
    from . import report
    from .inputs import build_prompt
    from .resume import PartialStore, fingerprint_parts
    from .sweep import run

    paths = output_paths(config)
    prompt = build_prompt(loaded, prompt_text, config.images, config.raw_prompt, config.max_pixels)
    store = PartialStore(partial_path(config), fingerprint_parts(loaded, config, prompt))
    with store.open(config.resume):  # holds the run's lock until its results are in place
        try:
            result = run(loaded, prompt, config, store)
        except KeyboardInterrupt:
            done = sum(len(record["positions"]) for record in store.saved.values())
            raise Interrupted(f"{done} finished knockouts are kept in {store.path}; rerun with --resume to "
                              "continue") from None
        data = report.result_json(loaded, prompt, config, result, store.parts)
        report.check_writable(paths, config.overwrite)
        report.write_results(data, paths, then=store.remove)
    return {**paths, "summary": report.summary(data, paths), "answer": data["baseline"]["text"]}


def run_batch(options: dict, vision: bool) -> int:
    """Every run of a YAML batch with one model load; exit status 1 if any run failed."""
    from .batch import load_batch
    from .report import write_index

    name, folder, runs = load_batch(options["config"], options, vision)
    folder.mkdir(parents=True, exist_ok=True)
    index = {"schema_version": 1, "kind": "batch", "batch": name, "config": str(options["config"]),
             "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "runs": []}
    for run in runs:
        entry = {"name": run.name, "status": "pending" if run.config else "error", "error": run.error}
        if run.config:
            entry.update(prompt=run.config.prompt, images=run.config.images, mask_mode=run.config.mask_mode)
        index["runs"].append(entry)
    html = any(run.config and run.config.html for run in runs)
    write_index(index, folder, html)
    loaded = None
    for run, entry in zip(runs, index["runs"]):
        if run.config is None:
            print(f"{run.name}: error: {run.error}", file=sys.stderr)
            continue
        started = time.perf_counter()
        try:
            finished = output_paths(run.config)["json"]
            if run.config.resume and finished.exists() and not run.config.overwrite:
                entry.update(status="done", json=finished.name, note="kept from an earlier run")
                continue
            prompt_text = precheck(run.config)
            loaded = loaded or load(run.config, vision)
            paths = run_one(loaded, run.config, prompt_text)
            entry.update(status="done", answer=paths["answer"], elapsed_s=round(time.perf_counter() - started, 3),
                         **{kind: Path(path).name for kind, path in paths.items() if kind in ("json", "csv", "html")})
            print(f"{run.name}: done ({paths['json']})")
        except UsageError as error:
            entry.update(status="error", error=str(error))
            print(f"{run.name}: error: {error}", file=sys.stderr)
        except (Interrupted, KeyboardInterrupt) as stop:
            entry.update(status="interrupted", error=str(stop))
            print(f"interrupted; {stop}", file=sys.stderr)
            return 130
        finally:  # also before the return above: the index always shows the latest status
            write_index(index, folder, html)
    failed = [entry["name"] for entry in index["runs"] if entry["status"] != "done"]
    done = len(index["runs"]) - len(failed)
    print(f"batch {name}: {done} done, {len(failed)} failed" + (f" ({', '.join(failed)})" if failed else "")
          + f"; index {folder / 'index.json'}")
    return 1 if failed else 0
