"""Results on disk (DESIGN.md §5): JSON and CSV, written atomically, and the terminal summary.

Files are written to a temporary name in the same folder and renamed into place, so a crash never
leaves a half-written result; every figure carries the settings and versions that produced it.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers

from . import __version__
from .config import RunConfig, UsageError
from .inputs import Prompt
from .models import LoadedModel
from .sweep import RunResult, top_knockouts

SCHEMA_VERSION = 1
VIEWER = Path(__file__).resolve().parent.parent / "visualize_results.html"
EMBED_SLOT = '<script id="embedded-data" type="application/json"></script>'
CSV_COLUMNS = ["layer_start", "layer_end", "position", "token_id", "token_text", "modality", "image", "row", "col",
               "logprob_drop", "prob_change_pct", "kl", "top1_changed", "first_divergence"]


def result_json(loaded: LoadedModel, prompt: Prompt, config: RunConfig, result: RunResult) -> dict:
    baseline = result.baseline
    return {
        "schema_version": SCHEMA_VERSION,
        "meta": {
            "tool_version": __version__,
            "model": loaded.name,
            "model_type": loaded.model.config.model_type,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "device": str(loaded.device),
            "dtype": str(loaded.dtype).replace("torch.", ""),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "elapsed_s": round(result.elapsed_s, 3),
            "num_layers": result.num_layers,
            "answer_start": result.answer_start,
            "batch_size": result.batch_size,
            "settings": config.settings(),
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
        "windows": [list(window) for window in result.windows],
        "positions": result.positions,
        "metrics": result.metrics,
        "generations": result.generations,
    }


def csv_text(data: dict) -> str:
    """One row per knockout, in window-major order."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)  # RFC 4180 line ends: fields holding \r or \n get quoted
    writer.writerow(CSV_COLUMNS)
    metrics, tokens = data["metrics"], data["tokens"]
    for w, (start, end) in enumerate(data["windows"]):
        for i, position in enumerate(data["positions"]):
            token = tokens[position]
            writer.writerow([
                start, end, position, token["id"], token["text"], token["modality"],
                _blank(token["image"]), _blank(token["row"]), _blank(token["col"]),
                metrics["logprob_drop"][w][i], metrics["prob_change_pct"][w][i], metrics["kl"][w][i],
                metrics["top1_changed"][w][i], _blank(metrics["first_divergence"][w][i]),
            ])
    return buffer.getvalue()


def _blank(value) -> object:
    return "" if value is None else value


def check_writable(paths: dict[str, Path], overwrite: bool) -> None:
    """Refuse to replace an existing result unless asked; make sure the folder can be written."""
    existing = [str(path) for path in paths.values() if path.exists()]
    if existing and not overwrite:
        raise UsageError(f"{existing[0]} already exists; pass --overwrite to replace it, or choose another --output")
    folder = next(iter(paths.values())).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"output folder {folder} cannot be created ({error.strerror})") from None
    if not os.access(folder, os.W_OK):
        raise UsageError(f"output folder {folder} is not writable; choose another --output-dir")


def write_atomic(path: Path, text: str) -> None:
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


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


def write_results(data: dict, paths: dict[str, Path]) -> None:
    data = _finite(data)
    write_atomic(paths["json"], json.dumps(data, ensure_ascii=False, indent=1))
    write_atomic(paths["csv"], csv_text(data))
    if "html" in paths:
        write_atomic(paths["html"], viewer_html(data))


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
    metrics, tokens = data["metrics"], data["tokens"]
    windows = [tuple(w) for w in data["windows"]]
    lines = [f"baseline answer: {data['baseline']['text']!r}", "",
             f"{'layers':>9}  {'pos':>5}  {'token':<16} {'modality':<8} {'logprob_drop':>12} {'prob_chg%':>10} {'kl':>8}"]
    index = {(tuple(w), p): (wi, pi) for wi, w in enumerate(windows) for pi, p in enumerate(data["positions"])}
    for window, position in top_knockouts(metrics, windows, data["positions"], top):
        w, i = index[(window, position)]
        token = tokens[position]
        text = repr(token["text"])[1:-1][:16]
        lines.append(f"{window[0]:>4}-{window[1]:<4}  {position:>5}  {text:<16} {token['modality']:<8} "
                     f"{metrics['logprob_drop'][w][i]:>12.4f} {metrics['prob_change_pct'][w][i]:>10.2f} "
                     f"{metrics['kl'][w][i]:>8.4f}")
    lines += ["", "wrote " + ", ".join(str(path) for path in paths.values())]
    return "\n".join(lines)
