"""A study's dataset (``--dataset``): its rows read from JSON Lines, CSV, Parquet or a ``datasets`` folder.

Each row gives a run's prompt and, where the dataset has them, its images, target (the gold answer), contrast (a
foil) and groups (``NAME=SPEC`` entries of that row, so that a flow like ``subject->last`` is defined per row).
``--fields prompt=question,image=image_path,target=answer`` maps the tool's fields to the dataset's columns; a
field not mapped is read from the column of its own name, if there is one. Images are paths (relative to the
dataset's file), lists of paths, pictures (``datasets``' Image feature) or Parquet's picture records
(``{"bytes": ..., "path": ...}``); a picture held in the dataset is written as a PNG into the study's folder, so
every row's run reads its image from a file like any other run.

A file that cannot be read, a field or column that does not exist, or a dataset with no rows stops the study before
anything runs (one line, exit 2); a row whose own values are bad (an empty prompt, a list where text belongs) is a
row with an ``error``: the study reports it and measures the others. Nothing here imports torch.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UsageError, bounded, mention, quoted

FIELDS = ("prompt", "image", "target", "contrast", "group")
SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}
DATASETS_INSTALL = "pip install 'mask-impact[datasets]'"


@dataclass
class Row:
    """One row of a study: ``number`` counts from 1 in the dataset's order; ``images`` holds paths, or pictures
    still to be written (``save_images``); ``error``: why the row cannot run (the others still do)."""

    number: int
    prompt: str | None = None
    images: list = field(default_factory=list)
    target: str | None = None
    contrast: str | None = None
    groups: list[str] = field(default_factory=list)
    error: str | None = None


def parse_fields(specs: list[str] | None) -> dict[str, str]:
    """``--fields prompt=question,image=image_path`` (repeatable, or comma-separated) → {field: column}."""
    from .config import close_matches

    mapping: dict[str, str] = {}
    for spec in specs or []:
        for part in spec.split(","):
            name, sep, column = (piece.strip() for piece in part.partition("="))
            if not sep or not name or not column:
                raise UsageError(f"{mention('fields', part.strip(), quote=True)}: write FIELD=COLUMN, e.g. "
                                 "prompt=question")
            if name not in FIELDS:
                near = close_matches(name, FIELDS, 1)
                raise UsageError(f"{mention('fields')}: unknown field {quoted(name)}"
                                 + (f"; did you mean {near[0]!r}?" if near else "") + f" (fields: {', '.join(FIELDS)})")
            if name in mapping:
                raise UsageError(f"{mention('fields')} maps {name} twice; give each field once")
            mapping[name] = column
    return mapping


def _dataset(path: Path | str) -> str:
    """The dataset option and its file, for a message."""
    return mention("dataset", bounded(str(path)))


def read_records(path: Path) -> tuple[list[dict], Path]:
    """The dataset's rows as dicts, and the folder its relative image paths are read from."""
    if not path.exists():
        raise UsageError(f"{_dataset(path)} does not exist")
    if path.is_dir():
        return _saved_dataset(path), path
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise UsageError(f"{_dataset(path)}: read are JSON Lines (.jsonl), CSV (.csv), Parquet "
                         "(.parquet) or a folder saved by datasets' save_to_disk")
    try:
        if kind == "parquet":
            return _parquet(path), path.parent
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UsageError(f"{_dataset(path)} is not UTF-8 text") from None
    except OSError as error:
        raise UsageError(f"{_dataset(path)} cannot be read ({error.strerror or error})") from None
    if kind == "csv":
        return [dict(row) for row in csv.DictReader(io.StringIO(text, newline=""))], path.parent
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as error:
            raise UsageError(f"{_dataset(path)} line {number}: not JSON ({error.msg}); write one JSON "
                             "object per line") from None
        if not isinstance(record, dict):
            raise UsageError(f"{_dataset(path)} line {number}: a JSON object per line, not a "
                             f"{type(record).__name__}")
        records.append(record)
    return records, path.parent


def _parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        raise UsageError(f"{_dataset(path)}: reading Parquet needs pyarrow: {DATASETS_INSTALL}") from None
    try:
        return parquet.read_table(path).to_pylist()
    except Exception as error:  # pyarrow's own errors: a file that is not Parquet
        raise UsageError(f"{_dataset(path)} cannot be read as Parquet ({type(error).__name__}: "
                         f"{bounded(str(error))})") from None


def _saved_dataset(path: Path) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise UsageError(f"{_dataset(path)} is a folder: reading one saved by datasets needs the "
                         f"datasets package: {DATASETS_INSTALL}") from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise UsageError(f"{_dataset(path)} is a folder but not one saved by datasets' "
                         "save_to_disk") from None
    if isinstance(loaded, datasets.DatasetDict):
        if len(loaded) != 1:
            raise UsageError(f"{_dataset(path)} holds the splits {', '.join(loaded)}; save the one to "
                             "study on its own (dataset_dict['test'].save_to_disk(...))")
        loaded = next(iter(loaded.values()))
    return [dict(row) for row in loaded]


def read_dataset(path: str, fields: list[str] | None = None, limit: int | None = None, sample: int | None = None,
                 seed: int = 0) -> tuple[list[Row], Path]:
    """The study's rows (``sample``: that many drawn with ``seed``, in the dataset's order; ``limit``: the first
    that many of those), and the folder relative image paths are read from."""
    mapping = parse_fields(fields)
    check_counts(limit, sample)
    records, base = read_records(Path(path).expanduser())
    return select_rows(records, base, mapping, limit, sample, seed, f"{_dataset(path)}"), base


def check_counts(limit: int | None, sample: int | None) -> None:
    for name, value in (("limit", limit), ("sample", sample)):
        if value is not None and value < 1:
            raise UsageError(f"{mention(name)} must be at least 1 (got {value})")


def select_rows(records: list[dict], base: Path, mapping: dict[str, str], limit: int | None = None,
                sample: int | None = None, seed: int = 0, what: str = "the dataset") -> list[Row]:
    """``records`` (dicts, one per row) as the study's ``Row``s; ``mapping``: field → column (parse_fields)."""
    if not records:
        raise UsageError(f"{what} has no rows")
    if not all(isinstance(record, dict) for record in records):
        raise UsageError(f"{what}: each row must be a mapping of column: value")
    columns = list(dict.fromkeys(column for record in records for column in record))
    for name, column in mapping.items():
        if not any(column in record for record in records):
            from .config import close_matches

            near = close_matches(str(column), [str(c) for c in columns], 1)
            raise UsageError(f"{mention('fields', f'{name}={column}')}: {what} has no column {quoted(column)}"
                             + (f"; did you mean {near[0]!r}?" if near else "") + f" (columns: "
                             f"{bounded(', '.join(map(str, columns)))})")
    column_of = {name: mapping.get(name, name) for name in FIELDS}
    if not any(column_of["prompt"] in record for record in records):
        raise UsageError(f"{what} has no column {quoted(column_of['prompt'])} for the prompts; map one with "
                         f"{mention('fields', 'prompt=COLUMN')} (columns: {bounded(', '.join(map(str, columns)))})")
    numbers = list(range(len(records)))
    if sample is not None and sample < len(numbers):
        numbers = sorted(random.Random(seed).sample(numbers, sample))
    if limit is not None:
        numbers = numbers[:limit]
    return [row_of(records[i], i + 1, column_of, base) for i in numbers]


def row_of(record: dict, number: int, column_of: dict[str, str], base: Path) -> Row:
    """One record as a ``Row``; a value the row cannot run with becomes its ``error``."""
    row = Row(number)
    try:
        prompt = record.get(column_of["prompt"])
        if not isinstance(prompt, str) or not prompt.strip():
            raise UsageError(f"its prompt ({column_of['prompt']}) is {'empty' if isinstance(prompt, str) or prompt is None else 'not text'}")
        row.prompt = prompt
        for name in ("target", "contrast"):
            value = record.get(column_of[name])
            if isinstance(value, bool) or not isinstance(value, (str, int, float, type(None))):
                raise UsageError(f"its {name} ({column_of[name]}) is a {type(value).__name__}, not text")
            text = None if value is None else str(value)
            setattr(row, name, text if text is not None and text.strip() else None)
        row.images = _images(record.get(column_of["image"]), base, column_of["image"])
        row.groups = _groups(record.get(column_of["group"]), column_of["group"])
    except UsageError as error:
        row.error = str(error)
    return row


def _images(value, base: Path, column: str) -> list:
    if value is None or value == "":
        return []
    if isinstance(value, str) and value.startswith("["):  # a CSV cell holding a JSON list of paths
        try:
            value = json.loads(value)
        except ValueError:
            raise UsageError(f"its {column} starts with '[' but is not a JSON list of paths") from None
    items = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for item in items:
        if isinstance(item, str):
            candidate = Path(item).expanduser()
            out.append(str(candidate if candidate.is_absolute() else base / candidate))
        elif isinstance(item, dict) and (item.get("bytes") or item.get("path")):  # Parquet's picture record
            out.append(item["bytes"] if item.get("bytes") else str(base / item["path"]))
        elif hasattr(item, "save"):  # a PIL picture (datasets' Image feature)
            out.append(item)
        else:
            raise UsageError(f"its {column} holds a {type(item).__name__}; give paths or pictures")
    return out


def _groups(value, column: str) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str) and value.startswith("["):
        try:
            value = json.loads(value)
        except ValueError:
            raise UsageError(f"its {column} starts with '[' but is not a JSON list of NAME=SPEC entries") from None
    if isinstance(value, dict):
        value = [f"{name}={spec}" for name, spec in value.items()]
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(item, str) for item in items):
        raise UsageError(f"its {column} must be NAME=SPEC text or a list of them")
    return list(items)


def save_images(row: Row, folder: Path) -> list[str]:
    """The row's images as paths: a picture held in the dataset (bytes or a PIL image) written losslessly as
    ``folder/row{N}_image{K}.png`` (once: a resumed study finds it)."""
    paths = []
    for k, image in enumerate(row.images, start=1):
        if isinstance(image, str):
            paths.append(image)
            continue
        path = folder / f"row{row.number}_image{k}.png"
        if not path.exists():
            from PIL import Image

            folder.mkdir(parents=True, exist_ok=True)
            picture = Image.open(io.BytesIO(image)) if isinstance(image, bytes) else image
            temporary = path.with_suffix(f".png.{os.getpid()}.tmp")  # processes of a launch may write it at once
            picture.save(temporary, format="PNG")
            temporary.replace(path)
        paths.append(str(path))
    return paths
