"""Studies (``--dataset``): one run per row of a dataset, then the aggregates over the rows.

A study's folder, ``OUTPUT_DIR/NAME`` (NAME: ``--output``, default the dataset's file name), holds every row's run
as a batch's runs are held (``row7.json``, ``.csv``, ``.html``; ``index.json`` lists them, the viewer's batch
page opens them), the images a dataset holds as pictures (``images/``), and the aggregates:

    study.json   the settings, the rows (measured, excluded, failed), the baseline accuracy and every aggregate
    study.csv    long format: one line per (unit, window, metric): aggregate.COLUMNS
    study.curves.FORMAT, study.map.FORMAT   with --figures: the units' curves over the layer windows with their
                 confidence bands, and the averaged image map (figures.study_curves, figures.study_map)

Rows are runs: a row's settings are the command line's (every option of a run applies to every row) plus its own
prompt, images, target, contrast and groups; ``--resume`` keeps the rows already finished and computes the rest.
``--only-correct`` measures only the rows whose greedy answer starts with their target (the others are
``excluded``, having cost one generation). The aggregates are computed from the rows' result files, so a study
resumed, or computed in pieces, aggregates the same numbers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from .aggregate import aggregate, csv_text
from .batch import BatchRun
from .config import STUDY_OPTIONS, UsageError, check_name, make_config, output_dir
from .dataset import SUFFIXES, Row, read_dataset, save_images
from .demo_tasks import DEMO_DATASET, write_shape_dataset
from .errors import mention, quoted, worded

STUDY_KEYS = STUDY_OPTIONS[:-1]  # the study's own options (only_correct is also a run's)
ROW_KEYS = ("prompt", "prompt_file", "images", "target", "contrast")  # what the rows give: not on the command line
GRID = 8  # image units are also averaged on a GRID × GRID lattice of each picture
RESAMPLES = 2000
DEMO_STUDY_ROWS = 50
SCHEMA_VERSION = 1


@dataclass
class Study:
    name: str
    folder: Path
    dataset: str
    rows: list[Row]
    settings: dict  # the command line's run options, applied to every row
    fields: list[str] = field(default_factory=list)
    seed: int = 0
    level: float = 0.95
    limit: int | None = None
    sample: int | None = None
    figures: str | None = None

    @property
    def may_continue(self) -> bool:
        return bool(self.settings.get("resume") or self.settings.get("overwrite"))


def load_study(options: dict, vision: bool) -> Study:
    """The study's rows and settings, every option checked (one row's own bad values are that row's error)."""
    given = sorted(key for key in ROW_KEYS if key in options)
    if given:
        field = "image" if given[0] == "images" else given[0].replace("_file", "")
        raise UsageError(f"{mention(given[0])} is given by each row of a {mention('dataset')}; map its column with "
                         f"{mention('fields', f'{field}=COLUMN')}")
    if "config" in options:
        raise UsageError(f"give {mention('config')} (a batch) or {mention('dataset')} (a study), not both")
    level = options.get("ci", 0.95)
    if not 0 < level < 1:
        raise UsageError(f"{mention('ci')} must be a level between 0 and 1, e.g. 0.95 (got {quoted(level)})")
    seed = options.get("seed", 0)
    if seed < 0:
        raise UsageError(f"{mention('seed')} must be 0 or more (got {seed})")
    dataset = str(options["dataset"])
    file = Path(dataset).expanduser()
    name = options.get("output") or (file.name.removesuffix(file.suffix) if file.suffix.lower() in SUFFIXES
                                     else file.name)  # vqa.test.jsonl: vqa.test
    check_name(name, f"the study name ({mention('output')}, or the dataset's name)")
    folder = output_dir(options.get("output_dir") or "output") / name
    if dataset == DEMO_DATASET and options.get("demo") and not Path(dataset).exists():
        if not vision:
            raise UsageError(f"{mention('dataset', DEMO_DATASET)} is the vision-language demo's study: use "
                             "mask-impact-vl")
        count = max(DEMO_STUDY_ROWS, options.get("limit") or 0)  # --limit beyond 50 draws more pictures
        dataset = str(write_shape_dataset(folder / f"dataset-seed{seed}", count, seed))
    elif dataset == DEMO_DATASET and not Path(dataset).exists():
        raise UsageError(f"{mention('dataset', DEMO_DATASET)} is the demo's study: give {mention('demo')} too (or "
                         "name a dataset file)")
    rows, _ = read_dataset(dataset, options.get("fields"), options.get("limit"), options.get("sample"), seed)
    settings = {key: value for key, value in options.items() if key not in (*STUDY_KEYS, "output", "output_dir")}
    settings.setdefault("generate_top", 0)  # the aggregates use none: a row's generations would cost most of its time
    figures = settings.pop("figures", None)
    if settings.pop("figure_options", None):
        raise UsageError(f"{mention('figure_options')} sets a run's figures; a study's figures "
                         f"({mention('figures')}) take none yet: drop it")
    if figures is not None:
        from .config import check_figures

        check_figures(figures)
    return Study(name, folder, dataset, rows, settings, options.get("fields") or [], seed, level,
                 options.get("limit"), options.get("sample"), figures)


def row_runs(study: Study, vision: bool, front: str = "command line") -> list[BatchRun]:
    """One ``BatchRun`` per row (``rowN``, N its number in the dataset); a row that cannot run carries its error,
    worded for ``front`` (errors.worded). Pictures held in the dataset are written to ``images/`` first."""
    runs = []
    for row in study.rows:
        name = f"row{row.number}"
        if row.error:
            runs.append(BatchRun(name, None, f"row {row.number}: {row.error}"))
            continue
        try:
            images = save_images(row, study.folder / "images")
            own = {"prompt": row.prompt, "images": images, "target": row.target, "contrast": row.contrast,
                   "groups": list(study.settings.get("groups", [])) + row.groups, "output": name,
                   "output_dir": str(study.folder), "html": study.settings.get("html", True)}
            runs.append(BatchRun(name, make_config([study.settings, own], vision)))
        except UsageError as error:
            runs.append(BatchRun(name, None, f"row {row.number}: {worded(error, front)}"))
        except OSError as error:  # a picture the dataset holds that cannot be decoded or written
            runs.append(BatchRun(name, None, f"row {row.number}: its image cannot be read ({error})"))
    if not any(run.config for run in runs):  # the options themselves, or the dataset as a whole, are wrong
        errors = {run.error.split(": ", 1)[1] for run in runs}
        raise UsageError(f"no row of {study.dataset} can run: {runs[0].error}" if len(errors) > 1 else
                         f"no row of {study.dataset} can run: {errors.pop()}")
    return runs


def row_results(study: Study, index: dict, results: dict | None = None) -> list[tuple[dict, dict]]:
    """(index entry, result) of each measured row: from ``results`` (name → result) if given, else read from its
    result file."""
    out = []
    for entry in index["runs"]:
        if entry["status"] == "done":
            data = results[entry["name"]] if results is not None else json.loads(
                (study.folder / entry["json"]).read_text(encoding="utf-8"))
            out.append((entry, data))
    return out


def study_data(study: Study, index: dict, results: dict | None = None) -> dict:
    """``study.json``: the settings, the rows, the accuracy and the aggregates (aggregate.aggregate), of the rows
    in ``index`` (its ``runs``: name, status, and ``json`` or ``answer``); ``results``: see ``row_results``."""
    measured = row_results(study, index, results)
    results = [data for _, data in measured]
    statuses = [entry["status"] for entry in index["runs"]]
    with_target = [data["correct"] for data in results if "correct" in data] + [
        False for entry in index["runs"] if entry["status"] == "excluded"]
    first = results[0] if results else None
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "study",
        "name": study.name,
        "dataset": study.dataset,
        "fields": study.fields,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": first["meta"]["model"] if first else None,
        "settings": {key: value for key, value in study.settings.items()},
        "row_settings": ({key: value for key, value in first["meta"]["settings"].items()
                          if key not in ("prompt", "prompt_file", "images", "target", "contrast", "groups", "output")}
                         if first else None),
        "elapsed_s": index.get("elapsed_s"),  # the rows (in a launch: all processes'), not the start-up
        "processes": index.get("processes", 1),
        "rows": {"total": len(statuses), "measured": statuses.count("done"), "excluded": statuses.count("excluded"),
                 "failed": len(statuses) - statuses.count("done") - statuses.count("excluded"),
                 "limit": study.limit, "sample": study.sample, "seed": study.seed},
        "accuracy": {"rows": len(with_target), "correct": sum(with_target),
                     "value": sum(with_target) / len(with_target) if with_target else None},
        "ci": {"level": study.level, "method": "percentile bootstrap over rows", "resamples": RESAMPLES,
               "seed": study.seed},
        "grid": GRID,
        "primary": "prob_change_pct" if any("target" in data for data in results) else "logprob_drop",
        "aggregates": aggregate(results, GRID, study.level, RESAMPLES, study.seed),
        "row_table": [{"name": entry["name"], "status": entry["status"], "json": entry.get("json"),
                       "error": entry.get("error"), **_row_summary(data)} for entry, data in measured] + [
            {"name": entry["name"], "status": entry["status"], "json": None, "error": entry.get("error"),
             "answer": entry.get("answer"), "correct": entry.get("correct")}
            for entry in index["runs"] if entry["status"] != "done"],
    }


def _row_summary(data: dict) -> dict:
    return {"prompt": data["prompt"], "answer": data["baseline"]["text"],
            "target": (data.get("target") or {}).get("text"), "correct": data.get("correct")}


def study_paths(folder: Path, figures: str | None) -> dict[str, Path]:
    paths = {"json": folder / "study.json", "csv": folder / "study.csv"}
    if figures:
        paths.update({kind: folder / f"study.{kind}.{figures}" for kind in ("curves", "map")})
    return paths


def write_study(study: Study, index: dict) -> tuple[list[Path], dict]:
    """``study.json``, ``study.csv`` (and the figures) as one set, the JSON last; returns the paths written and
    the study's data."""
    from .report import _finite, write_set

    data = _finite(study_data(study, index))
    paths = study_paths(study.folder, study.figures)
    texts: dict[Path, str | bytes] = {paths["csv"]: csv_text(data["aggregates"])}
    if study.figures:
        from .figures import render_study

        for kind, content in render_study(data, study.figures).items():
            texts[paths[kind]] = content
    texts[paths["json"]] = json.dumps(data, ensure_ascii=False, indent=1)
    write_set(texts)
    return list(texts), data
