"""Results on disk (DESIGN.md §5): JSON, CSV and HTML, written as one set, and the terminal summary.

Why as one set: a reader (a person, the viewer, a batch ``--resume``) takes a JSON as the sign that a
run finished, so a JSON must never exist without its CSV and HTML. All three are written to temporary
names in the same folder and flushed to disk first; then they are renamed into place with SIGINT and
SIGTERM held back, the JSON last. A failed write (disk full, ...) removes the temporary files and is one
line (``WriteError``). Files get the mode a plain ``open()`` would give them (the umask decides), so the
HTML can be mailed to and opened by a colleague. CSV text cells that a spreadsheet would run as a
formula are prefixed with ``'``; every figure carries the settings and versions that produced it.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import math
import os
import secrets
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import torch
import transformers

from . import colours
from .config import RunConfig, UsageError
from .errors import mention
from .inputs import Prompt
from .models import LoadedModel
from .resources import data_path
from .stopping import signals_deferred
from .sweep import RunResult, top_knockouts
from .version import __version__

SCHEMA_VERSION = 2
VIEWER = data_path("visualize_results.html")
EMBED_SLOT = '<script id="embedded-data" type="application/json"></script>'
CSV_COLUMNS = ["layer_start", "layer_end", "window_label", "unit", "kind", "label", "keys", "queries", "patches", "modality", "image",
               "x0", "y0", "x1", "y1", "logprob_drop", "prob_change_pct", "kl", "top1_changed", "first_divergence"]
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # a spreadsheet runs such a cell as a formula (OWASP)


class WriteError(UsageError):
    """A file could not be written (disk full, read-only, ...): one line that names it and says why."""

    def __init__(self, error: OSError, path: Path):
        self.errno, self.path = error.errno, path
        reason = error.strerror or str(error)
        super().__init__(f"{reason[:1].lower()}{reason[1:]} while writing {path}")

    @property
    def disk_full(self) -> bool:
        return self.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def result_json(loaded: LoadedModel, prompt: Prompt, config: RunConfig, result: RunResult,
                fingerprint: dict | None = None) -> dict:
    """The result; ``fingerprint`` (resume.fingerprint_parts) goes to ``meta.fingerprint``."""
    baseline = result.baseline
    data = {
        "schema_version": SCHEMA_VERSION,
        "meta": {
            "tool_version": __version__,
            "model": loaded.name,
            "model_type": loaded.model.config.model_type,
            "geometry": loaded.adapter.geometry(),
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "device": str(loaded.device),
            "dtype": str(loaded.dtype).replace("torch.", ""),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "elapsed_s": round(result.elapsed_s, 3),
            "num_layers": result.num_layers,
            "answer_start": result.answer_start,
            "batch_size": result.batch_size,
            "processes": result.processes,
            "settings": config.as_measured(loaded).settings(),  # Gemma 3: --vision-attention as measured
            "fingerprint": fingerprint,
        },
        "prompt": prompt.text,
        "images": [vars(image) for image in prompt.images],
        "tokens": prompt.token_dicts(),
        "baseline": {
            "text": baseline.text,
            "token_ids": baseline.token_ids,
            "tokens": baseline.tokens,
            "logprobs": baseline.logprobs,
            "stopped_at_eos": baseline.stopped_at_eos,
        },
        **({"target": answer_block(result.target), "correct": result.correct} if result.target else {}),
        **({"contrast": answer_block(result.contrast)} if result.contrast else {}),
        "stage": config.stage,
        "windows": [list(window) for window in result.windows],
        "window_labels": result.window_labels,
        "units": [unit.as_dict() for unit in result.units],
        "metrics": result.metrics,
        "steps": result.steps,
        "generations": result.generations,
        **({"estimate": result.estimate} if result.estimate is not None else {}),
    }
    data["colour_scale"] = colours.scale_block(data)  # the viewer's and the figures' one map and limits
    return data


def answer_block(answer) -> dict:
    """A given answer (``--target``, ``--contrast``) as the result holds it: its text, tokens and log-probs."""
    return {"text": answer.text, "token_ids": answer.token_ids, "tokens": answer.tokens, "logprobs": answer.logprobs}


def largest_knockout(data: dict) -> dict | None:
    """The run's largest knockout by ``logprob_drop`` (special tokens left out where other units were swept), as the
    viewer's batch overview names it: ``{unit, label, window, window_label, logprob_drop}``; None without values."""
    grid = (data.get("metrics") or {}).get("logprob_drop") or []
    units = data.get("units") or []
    plain = any(unit["modality"] != "special" for unit in units)
    best = None
    for w, row in enumerate(grid):
        for u, value in enumerate(row):
            if value is None or (plain and units[u]["modality"] == "special") or not math.isfinite(value):
                continue
            if best is None or value > best[2]:
                best = (w, u, value)
    if best is None:
        return None
    w, u, value = best
    labels = data.get("window_labels") or [f"layers {a}–{b}" for a, b in data["windows"]]
    return {"unit": u, "label": units[u]["label"], "window": w, "window_label": labels[w], "logprob_drop": value}


def csv_text(data: dict) -> str:
    """One row per (window, unit), in window-major order; text cells are made safe for spreadsheets.

    ``keys`` and ``queries`` are position lists written like ``--layers`` (``10-20,25``); ``queries`` is empty
    for every query, and ends with ``answer`` (``10,answer``) where the answer positions are blocked too;
    ``patches`` (``--stage pixels``) lists the rows of ``pixel_values`` replaced; ``image`` counts from 1 and the
    box is in original-image pixels. A result with an estimate (``--estimate``) has one more column,
    ``estimated_logprob_drop``; its metrics are empty where no exact value was computed. Custom metrics (the
    Python API's) follow the built-in ones. ``KnockoutResult.to_pandas`` has the same columns (``table_rows``)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)  # RFC 4180 line ends: fields holding \r or \n get quoted
    header, rows = table_rows(data)
    writer.writerow(header)
    for row in rows:
        writer.writerow([_text_cell(value) if name in TEXT_COLUMNS else _blank(value)
                         for name, value in zip(header, row)])
    return buffer.getvalue()


TEXT_COLUMNS = ("window_label", "label")  # cells a spreadsheet could run as a formula (``modality`` never can)


def table_columns(data: dict) -> list[str]:
    """The CSV's header (and ``to_pandas``' columns): ``CSV_COLUMNS``, custom metrics, the estimate."""
    extra = [name for name in data["metrics"] if name not in CSV_COLUMNS]
    estimated = (data.get("estimate") or {}).get("logprob_drop")
    return CSV_COLUMNS + extra + (["estimated_logprob_drop"] if estimated else [])


def table_rows(data: dict) -> tuple[list[str], list[list]]:
    """The header and one row per (window, unit), unescaped, None where a cell is empty."""
    header = table_columns(data)
    metrics = data["metrics"]
    names = [name for name in header[CSV_COLUMNS.index("y1") + 1:] if name != "estimated_logprob_drop"]
    estimated = (data.get("estimate") or {}).get("logprob_drop")
    labels = data.get("window_labels") or [f"layers {a}–{b}" for a, b in data["windows"]]
    rows = []
    for w, (start, end) in enumerate(data["windows"]):
        for i, unit in enumerate(units_of(data)):
            queries = "" if unit["queries"] is None else ",".join(
                ([position_ranges(unit["queries"])] if unit["queries"] else [])
                + (["answer"] if unit["queries_from"] is not None else []))
            box = unit["box"] or [None] * 4
            rows.append([
                start, end, labels[w], i, unit["kind"], unit["label"], position_ranges(unit["keys"]), queries,
                position_ranges(unit.get("patches") or []), unit["modality"],
                None if unit["image"] is None else unit["image"] + 1, *box,
                *(metrics[name][w][i] for name in names),
                *([estimated[w][i]] if estimated else []),
            ])
    return header, rows


def units_of(data: dict) -> list[dict]:
    """A result's units; a schema 1 result's swept positions as one token unit each."""
    if "units" in data:
        return data["units"]
    tokens = data["tokens"]
    return [{"index": i, "kind": "token", "label": tokens[p]["text"], "keys": [p], "queries": None,
             "queries_from": None, "modality": tokens[p]["modality"], "image": tokens[p]["image"],
             "box": tokens[p]["box"], "patches": None} for i, p in enumerate(data["positions"])]


def position_ranges(positions: list[int]) -> str:
    """``[10, 11, 12, 20]`` → ``10-12,20``."""
    parts = []
    for p in positions:
        if parts and parts[-1][1] == p - 1:
            parts[-1][1] = p
        else:
            parts.append([p, p])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in parts)


def _figure(value, width: int, digits: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def _blank(value) -> object:
    return "" if value is None else value


def _text_cell(value):
    """A text cell that starts like a formula gets a leading ``'`` (shown, not run); numbers stay numbers."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def check_writable(paths: dict[str, Path], overwrite: bool) -> None:
    """Refuse to replace an existing result unless asked; make sure the folder can be made and written.

    Nothing is created here: the folder appears only when the run writes into it (``make_folder``)."""
    existing = [str(path) for path in paths.values() if path.exists()]
    if existing and not overwrite:
        raise UsageError(f"{existing[0]} already exists; pass {mention('overwrite')} to replace it, or choose another "
                         f"{mention('output')}")
    folder = next(iter(paths.values())).parent
    nearest = folder
    while not nearest.exists() and nearest != nearest.parent:
        nearest = nearest.parent
    if not nearest.is_dir():
        raise UsageError(f"output folder {folder} cannot be created ({nearest} is a file); choose another "
                         f"{mention('output_dir')}")
    if not os.access(nearest, os.W_OK):
        raise UsageError(f"output folder {folder} is not writable; choose another {mention('output_dir')}")


@contextmanager
def output_folder(folder: Path) -> Iterator[None]:
    """Create ``folder`` (and its missing parents) for a run; if the run fails, remove what it created and
    left empty."""
    created = []  # the folders this run makes, deepest first
    missing = folder
    while not os.path.exists(missing) and missing != missing.parent:
        created.append(missing)
        missing = missing.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        _remove_empty(created)
        raise UsageError(f"output folder {folder} cannot be created ({error.strerror})") from None
    try:
        yield
    except BaseException:
        _remove_empty(created)
        raise


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first: a parent empties once its child is gone
        if not os.path.isdir(folder):  # (os.path's isdir: False, not an error, for a name the system refuses)
            continue  # never made (mkdir stopped above it)
        if any(folder.iterdir()):
            return
        folder.rmdir()


def _temporary(path: Path, text: str | bytes) -> Path:
    """``text`` (UTF-8) or bytes in a new file beside ``path``, flushed to disk, with the mode ``open()`` would
    give it."""
    data = memoryview(text.encode("utf-8") if isinstance(text, str) else text)
    while True:
        temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666 minus the umask
            break
        except FileExistsError:
            continue
        except OSError as error:
            raise WriteError(error, path) from None
    try:
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)
    except BaseException as error:  # Ctrl-C included: no temporary file stays behind
        os.close(fd)
        temp.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise WriteError(error, path) from None
        raise
    os.close(fd)
    return temp


def write_set(texts: dict[Path, str | bytes], then: Callable[[], None] | None = None) -> None:
    """Write every file of ``texts`` or none: temporary files first, then the renames, in order, with signals
    held back; then ``then()`` (e.g. removing the partial file). A failure leaves no temporary file."""
    temps: dict[Path, Path] = {}
    try:
        for path, text in texts.items():
            temps[path] = _temporary(path, text)
        with signals_deferred():  # a signal held back here arrives after the block, when all is in place
            for path, temp in temps.items():
                _rename(temp, path)
            _sync_folder(next(iter(texts)).parent)
            if then is not None:
                then()
    finally:
        for temp in temps.values():
            temp.unlink(missing_ok=True)


def _rename(temp: Path, path: Path) -> None:
    try:
        os.replace(temp, path)
    except OSError as error:
        raise WriteError(error, path) from None


def _sync_folder(folder: Path) -> None:
    """The renames themselves reach the disk."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    write_set({path: text})


def write_index(index: dict, folder: Path, html: bool) -> None:
    """A batch's ``index.json`` (and ``index.html``, the viewer listing its runs)."""
    index = _finite(index)
    write_atomic(folder / "index.json", json.dumps(index, ensure_ascii=False, indent=1))
    if html:
        write_atomic(folder / "index.html", viewer_html(index))


def viewer_html(data: dict) -> str:
    """The viewer with this result (already free of NaN/inf) embedded. ``<``, ``>`` and ``&`` are written as JSON escapes, so no
    prompt or token text (``</script>`` included) can end the data block early; the page parses it
    with ``JSON.parse`` and shows every string as text."""
    payload = json.dumps(data, ensure_ascii=False)
    payload = payload.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    template = VIEWER.read_text(encoding="utf-8")
    if EMBED_SLOT not in template:
        raise RuntimeError(f"{VIEWER} has no embedded-data slot")
    return template.replace(EMBED_SLOT, EMBED_SLOT.replace("></script>", f">{payload}</script>"), 1)


def write_results(data: dict, paths: dict[str, Path], then: Callable[[], None] | None = None,
                  figures: dict[Path, bytes] | None = None) -> None:
    """JSON, CSV, (if asked) HTML and ``figures`` as one set, the JSON renamed into place last; then ``then()``."""
    data = _finite(data)
    texts: dict[Path, str | bytes] = {paths["csv"]: csv_text(data)}
    if "html" in paths:
        texts[paths["html"]] = viewer_html(data)
    texts.update(figures or {})
    texts[paths["json"]] = json.dumps(data, ensure_ascii=False, indent=1)
    write_set(texts, then)


def _finite(value):
    """JSON has no NaN/inf: write them as null (strict parsers reject the bare tokens)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


def summary(data: dict, paths: dict[str, Path], top: int = 10) -> str:
    """The baseline, the most impactful knockouts as a table, and where the files are."""
    metrics, units, windows = data["metrics"], data["units"], data["windows"]
    given = [f"target: {data['target']['text']!r} (the greedy answer {'starts' if data['correct'] else 'does not start'}"
             " with it; the metrics are about the target)"] if data.get("target") else []
    given += [f"contrast: {data['contrast']['text']!r}"] if data.get("contrast") else []
    lines = [f"baseline answer: {data['baseline']['text']!r}", *given, "",
             f"{'layers':>9}  {'keys':>9}  {'unit':<20} {'modality':<8} {'logprob_drop':>12} {'prob_chg%':>10} "
             f"{'kl':>8}"]
    for w, i in top_knockouts(metrics, top):
        unit = units[i]
        label = repr(unit["label"])[1:-1][:20]
        keys = position_ranges(unit["keys"])
        keys = keys if len(keys) <= 9 else keys[:8] + "…"
        lines.append(f"{windows[w][0]:>4}-{windows[w][1]:<4}  {keys:>9}  {label:<20} {unit['modality']:<8} "
                     f"{_figure(metrics['logprob_drop'][w][i], 12, 4)} {_figure(metrics['prob_change_pct'][w][i], 10, 2)} "
                     f"{_figure(metrics['kl'][w][i], 8, 4)}")
    if data.get("estimate"):
        block = data["estimate"]
        figure = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        lines += ["", f"estimate: {block['top_k']} largest and {block['sample']} random cells computed exactly; "
                      f"Spearman {figure(block['spearman'])} (random cells: {figure(block['spearman_sample'])}), "
                      f"top-{block['top_k']} recall among the computed cells {figure(block['computed_top_k_recall'])} "
                      "(an upper bound: cells not computed are not ranked)"]
        missed = block.get("missed_above_top_k")
        if missed:
            low, high = missed["ci"]
            lines.append(f"not computed, with a drop above the top {block['top_k']}'s smallest ({missed['threshold']:.4g}"
                         f"): about {missed['estimate']:.3g} of {missed['not_computed']:,} cells ({missed['level']:.0%} "
                         f"CI {low:,}-{high:,}; {missed['sample_above']} of the {missed['sample']} random cells were)")
    lines += ["", "wrote " + ", ".join(str(path) for path in paths.values())]
    return "\n".join(lines)
