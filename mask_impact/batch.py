"""YAML batches: many runs, one model load.

A batch file has ``defaults:`` (optional) and ``runs:`` (a list); each run may set any option by its
long name with dashes or underscores (``mask_mode``/``mask-mode``), plus ``name`` (its output name)
and ``image`` (one path or a list). ``prompt`` is always text; ``prompt_file`` names a file. Precedence, highest first: command-line flags, the run entry,
``defaults:``, built-in defaults. The model, device, dtype, ``demo`` and the output folder are set
once for the batch (in ``defaults:`` or on the command line). Relative ``image`` and ``prompt_file``
paths are read relative to the YAML file.

Errors in the file itself (syntax, unknown keys, wrong types, duplicate names) stop the batch before
anything runs; a run whose inputs are bad (a missing image, say) is reported and the others still run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from .errors import mention, worded
from .config import (BATCH_KEYS, FIELD_TYPES, RunConfig, UsageError, check_name, close_matches, has_field_type,
                     make_config, output_dir, quoted)

TOP_KEYS = ("defaults", "runs")
ALIASES = {"name": "output", "image": "images", "group": "groups", "flow": "flows"}
NEGATED = {"no_progress": "progress", "no_html": "html"}  # the command line's --no-progress / --no-html
TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false", list: "a list of paths"}
LIST_NAMES = {"images": "a path or a list of paths", "groups": "a list of NAME=SPEC strings or a mapping NAME: SPEC",
              "flows": "a SRC->DST string or a list of them"}


@dataclass
class BatchRun:
    name: str
    config: RunConfig | None  # None when the run's settings are bad
    error: str | None = None


class DuplicateKey(yaml.MarkedYAMLError):
    """A key given twice in one mapping (PyYAML keeps the last silently)."""


class StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key that a mapping already has, at any level."""

    def construct_mapping(self, node, deep=False):
        first_lines = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: keys written beside it override
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = first_lines.get(key)
            except TypeError:  # an unhashable key: the base loader says so
                break
            if first is not None:
                raise DuplicateKey(problem=f"duplicate key {quoted(key)} (first on line {first}); give each key "
                                           "once", problem_mark=key_node.start_mark)
            first_lines[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise UsageError(f"config file {path} does not exist")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=StrictLoader)
    except UnicodeDecodeError:
        raise UsageError(f"config file {path} is not UTF-8 text") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise UsageError(f"config file {path}{where}: YAML syntax error: {problem}") from None
    if not isinstance(data, dict) or "runs" not in data:
        raise UsageError(f"config file {path}: the top level must be a mapping with 'runs:' (and optional 'defaults:')")
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        raise unknown_key(f"config file {path}", unknown[0], TOP_KEYS, "top-level key")
    if not isinstance(data["runs"], list) or not data["runs"]:
        raise UsageError(f"config file {path}: 'runs:' must be a non-empty list of runs")
    if data.get("defaults") is not None and not isinstance(data["defaults"], dict):
        raise UsageError(f"config file {path}: 'defaults:' must be a mapping of option: value")
    return data


def unknown_key(where: str, key: object, valid, what: str = "key") -> UsageError:
    """``unknown key 'num_token'; did you mean 'num_tokens'? valid keys: ...``: the whole list, never cut."""
    near = close_matches(str(key).replace("-", "_"), valid, 1)
    error = UsageError(f"{where}: unknown {what} {quoted(key)}; " + (f"did you mean {near[0]!r}? " if near else "")
                       + f"valid keys: {', '.join(valid)}")
    error.whole = True  # our own list: the command line prints it in full
    return error


VISION_ONLY = ("image", "images", "max_pixels", "min_pixels", "vision_attention", "stage", "fill")


def valid_keys(vision: bool) -> list[str]:
    keys = [key for key in FIELD_TYPES if key != "output"] + ["name", "image", "group", "flow", *NEGATED]
    return sorted(key for key in keys if vision or key not in VISION_ONLY)


def normalise(entry: dict, where: str, base: Path, vision: bool) -> dict:
    """Option names to ``RunConfig`` fields, values type-checked, paths made relative to the YAML file."""
    valid = valid_keys(vision)
    out = {}
    for key, value in entry.items():
        spelled = str(key).replace("-", "_")
        if spelled not in valid:
            raise unknown_key(where, key, valid)
        if spelled in NEGATED:
            if not isinstance(value, bool):
                raise UsageError(f"{where}: {key} must be true or false (got {quoted(value)})")
            spelled, value = NEGATED[spelled], not value
        field = ALIASES.get(spelled, spelled)
        if field in ("images", "flows", "groups") and isinstance(value, str):
            value = [value]
        if field == "groups" and isinstance(value, dict):  # NAME: SPEC
            empty = next((name for name, spec in value.items() if not isinstance(spec, (str, int, float))), None)
            if empty is not None:
                raise UsageError(f"{where}: group {quoted(empty)} has no SPEC (write {empty}: x0,y0,x1,y1 or pos:... "
                                 "or text:...)")
            value = [f"{name}={spec}" for name, spec in value.items()]
        if field in ("layers", "threads") and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)  # `layers: 3` means layer 3, `threads: 2` two threads
        if not has_field_type(field, value):
            kind = LIST_NAMES.get(field, TYPE_NAMES[FIELD_TYPES[field]])
            raise UsageError(f"{where}: {key} must be {kind} (got {quoted(value)})")
        out[field] = value
    if "images" in out:
        out["images"] = [str(_relative(base, image)) for image in out["images"]]
    if isinstance(out.get("prompt_file"), str):
        out["prompt_file"] = str(_relative(base, out["prompt_file"]))
    return out


def _relative(base: Path, path: str) -> Path:
    candidate = Path(path).expanduser()
    return candidate if candidate.is_absolute() else base / candidate


def load_batch(path: str, cli: dict, vision: bool) -> tuple[str, Path, list[BatchRun]]:
    """The batch's name, its output folder, and one ``BatchRun`` per entry."""
    file = Path(path)
    data = read_yaml(file)
    base = file.resolve().parent
    defaults = normalise(data.get("defaults") or {}, f"{file}: defaults", base, vision)
    name = cli.get("output") or file.stem
    check_name(name, f"the batch name ({mention('output')}, or the YAML file's name)")
    folder = output_dir(cli.get("output_dir") or defaults.get("output_dir") or "output") / name
    entries, seen = [], set()
    for number, entry in enumerate(data["runs"], start=1):
        if not isinstance(entry, dict):
            raise UsageError(f"{file}: run {number} must be a mapping of option: value")
        where = f"{file}: run {number}" + (f" ({quoted(entry['name'])})" if "name" in entry else "")
        run = normalise(entry, where, base, vision)
        fixed = sorted(set(run) & set(BATCH_KEYS))
        if fixed:
            raise UsageError(f"{where}: {fixed[0]} is set once per batch, in 'defaults:' or on the command line")
        run.setdefault("output", f"run{number}")
        if not isinstance(run["output"], str):
            raise UsageError(f"{where}: name must be a string (got {quoted(run['output'])})")
        check_name(run["output"], f"{where}: name")
        if run["output"].lower() == "index":
            raise UsageError(f"{where}: the name {run['output']!r} is reserved for the batch index; choose another")
        if run["output"] in seen:
            raise UsageError(f"{file}: two runs are named {run['output']!r}; run names must be unique")
        seen.add(run["output"])
        entries.append(run)
    command_line = {key: value for key, value in cli.items() if key not in ("config", "output", "output_dir")}
    runs = []
    for run in entries:
        try:
            config = make_config([defaults, run, command_line, {"output_dir": str(folder)}], vision)
            runs.append(BatchRun(run["output"], config))
        except UsageError as error:  # an option's value worded as the YAML file gives it (errors.OptionError)
            runs.append(BatchRun(run["output"], None, worded(error, "yaml")))
    return name, folder, runs
