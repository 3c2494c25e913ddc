"""The Python API: one model loaded once, many analyses, results as arrays and tables.

    from mask_impact import Analyzer, KnockoutResult

    analyzer = Analyzer.from_pretrained("Qwen/Qwen3-VL-4B-Instruct", device="cuda")
    result = analyzer.run("What's in this image?", images=["cat.png"], unit="region:2")
    result.top(5)                      # the most impactful (window, unit) cells
    table = result.to_pandas()         # one row per (window, unit), every metric
    result.save("output/cat")          # output/cat.json, .csv, .html: exactly what the command line writes
    same = KnockoutResult.load("output/cat.json")

Every option of the command line is a keyword of ``run`` (its long name with underscores: ``mask_mode``,
``block_from``, ``groups``, ``flows``, ``stage``, ...); the command line and YAML batches go through the same
``analyze`` function. Bad input raises a ``MaskImpactError`` (errors.py) worded for Python: a wrong type or an
unknown keyword an ``InvalidType`` (also a ``TypeError``), a value that cannot be meant an ``InvalidArgument``
(also a ``ValueError``) naming the keyword (``unit='region:0'``) where the command line names its flag.

Open for extension: ``run(metrics={name: fn})`` (or ``mask_impact.register_metric``) computes custom metrics beside
the built-ins; ``run(knockouts=[Knockout(keys, queries)])`` sweeps knockouts built in Python (groups.py); ``run``
takes a list of prompts. ``to_pandas`` is the CSV's table (``report.table_rows``).
"""

from __future__ import annotations

import difflib
import json
import numbers
import tempfile
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .config import FIELD_TYPES, RunConfig, UsageError, has_field_type, make_config
from .pipeline import analyze
from .errors import (
    InvalidArgument,
    InvalidType,
    MaskImpactError,
    MissingDependency,
    NotAResult,
    WriteFailed,
    worded,
)

__all__ = ["Analyzer", "KnockoutResult", "StudyResult", "MaskImpactError", "InvalidArgument", "InvalidType", "NotAResult",
           "MissingDependency", "WriteFailed", "analyze"]
NOT_RUN_OPTIONS = ("model", "demo", "device", "dtype", "threads", "device_map", "max_memory", "offload_folder",
                   "prompt", "prompt_file", "images", "output", "output_dir", "overwrite", "resume", "html", "progress",
                   "figures")
RUN_OPTIONS = sorted({f.name for f in fields(RunConfig)} - set(NOT_RUN_OPTIONS))
TYPE_WORDS = {str: "a str", int: "an int", bool: "True or False"}
SCHEMAS = (1, 2)


@contextmanager
def python_errors() -> Iterator[None]:
    """The shared checks' ``UsageError`` (worded for the command line) raised again worded for Python."""
    try:
        yield
    except UsageError as error:
        from .report import WriteError

        kind = WriteFailed if isinstance(error, WriteError) else InvalidArgument
        raise kind(worded(error, "python")) from None


def check_options(options: dict) -> dict:
    """``run``'s keyword options, type-checked, in the command line's form (lists of strings)."""
    out = {}
    for name, value in options.items():
        if name not in RUN_OPTIONS:
            close = difflib.get_close_matches(name, RUN_OPTIONS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise InvalidType(f"run() got an unexpected keyword argument {name!r}{hint}; its keywords: "
                              f"{', '.join(RUN_OPTIONS)}")
        out[name] = _option_value(name, value)
    return out


def _option_value(name: str, value):
    if name in ("groups", "flows"):
        from .groups import SPECS, Group

        if name == "groups" and isinstance(value, dict):  # {name: spec}, as in a YAML batch; spec: str or Box, ...
            if not all(isinstance(key, str) and isinstance(spec, (str, *SPECS)) for key, spec in value.items()):
                raise InvalidType("groups must map names to specs: a str, Box, Positions or Text")
            value = [f"{key}={spec}" for key, spec in value.items()]
        value = [value] if isinstance(value, (str, Group)) else value
        allowed = (str, Group) if name == "groups" else str
        if not isinstance(value, (list, tuple)) or not all(isinstance(item, allowed) for item in value):
            form = ("'NAME=SPEC' strings or Group objects, or a dict {NAME: SPEC}" if name == "groups"
                    else "'SRC->DST' strings")
            raise InvalidType(f"{name} must be a list of {form}, not {type(value).__name__}")
        return [str(item) for item in value]
    if name == "layers" and not isinstance(value, (str, bool)):  # layers=3, layers=range(0, 12), layers=[0, 5]
        layers = [value] if isinstance(value, numbers.Integral) else value
        try:
            layers = list(layers)
        except TypeError:
            layers = None
        if layers is None or not all(isinstance(l, numbers.Integral) and not isinstance(l, bool) for l in layers):
            raise InvalidType(f"layers must be 'all', a str like '0-11,20', an int or a list of ints, not "
                              f"{type(value).__name__}")
        if not layers:
            raise InvalidArgument("layers is empty; give at least one layer, or 'all'")
        return ",".join(str(int(layer)) for layer in layers)
    expected = FIELD_TYPES[name]
    if has_field_type(name, value):
        return int(value) if expected is int and value is not None else value  # a numpy integer as an int
    raise InvalidType(f"{name} must be {TYPE_WORDS[expected]}, not {type(value).__name__} ({value!r:.40})")


def _base(path, method: str) -> Path:
    """``output/cat`` from ``output/cat`` or ``output/cat.json``."""
    if not isinstance(path, (str, Path)):
        raise InvalidType(f"{method}(): path must be a str or a path, not {type(path).__name__}")
    base = Path(path)
    return base.with_suffix("") if base.suffix == ".json" else base


def _wrap(model, processor):
    """A transformers model the caller loaded, and its processor or tokenizer, as the engine's ``LoadedModel``."""
    import torch

    from .models import VL_FAMILIES, LoadedModel, adapter_for, input_device

    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise InvalidType(f"Analyzer(): model must be a transformers model, not {type(model).__name__}")
    vision = getattr(model.config, "model_type", None) in VL_FAMILIES
    tokenizer = getattr(processor, "tokenizer", processor)
    if processor is None or not callable(getattr(tokenizer, "decode", None)) or (
            vision and not hasattr(processor, "image_processor")):
        need = "processor (AutoProcessor.from_pretrained)" if vision else "tokenizer"
        raise InvalidType(f"Analyzer(): give the model's {need} as the second argument, not "
                          f"{type(processor).__name__}")
    with python_errors():
        expected = _model_class(model.config)  # a family the tool serves, or the one-line refusal
    if not isinstance(model, expected):
        raise InvalidType(f"Analyzer(): model is a {type(model).__name__}, not a {expected.__name__} (the "
                          f"transformers class of its {model.config.model_type!r} config); give the model itself, "
                          "not a module wrapping it")
    with python_errors():
        adapter = adapter_for(model)
    model.eval()
    placed = getattr(model, "hf_device_map", None)
    device = input_device(model) if placed else next(model.parameters()).device
    return LoadedModel(model, processor, tokenizer, adapter, str(getattr(model, "name_or_path", "") or "model"),
                       device, model.dtype)


DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTISATION = ("quantization_config", "load_in_8bit", "load_in_4bit")


def _dtype_name(dtype) -> str:
    """``from_pretrained``'s dtype as the command line's word: a str of ``DTYPES`` or a ``torch.dtype``."""
    if dtype is None:
        return "auto"
    if isinstance(dtype, str):
        return dtype  # checked with the command line's words (resolve_dtype)
    import torch

    if isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
        if name not in DTYPES:
            raise InvalidArgument(f"from_pretrained(): dtype=torch.{name} is not supported; use torch.float32, "
                                  "torch.bfloat16 or torch.float16")
        return name
    raise InvalidType(f"from_pretrained(): dtype must be a str ({', '.join(DTYPES)}) or a torch.dtype, not "
                      f"{type(dtype).__name__}")


def _hub_keywords(hub: dict) -> str | None:
    """Check ``from_pretrained``'s Hugging Face keywords (removing ``attn_implementation``, returned)."""
    from .models import HUB_KEYWORDS

    for key in list(hub):
        if key in QUANTISATION:
            raise InvalidArgument(f"from_pretrained(): {key} is refused: quantised weights are not supported (the "
                                  "engine runs the layers' projections itself and its identities, fast == naive and "
                                  "no knockout == the native forward, hold for float weights); load in "
                                  "dtype='bfloat16' and spread a large model with device_map='auto'")
        if key in ("torch_dtype", "attn_implementation"):
            continue
        if key not in HUB_KEYWORDS:
            close = difflib.get_close_matches(key, list(HUB_KEYWORDS) + ["attn_implementation", "dtype"], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise InvalidType(f"from_pretrained() got an unexpected keyword argument {key!r}{hint}; it passes on "
                              f"{', '.join(HUB_KEYWORDS)} and attn_implementation")
    if "torch_dtype" in hub:
        raise InvalidType("from_pretrained(): write dtype=, not torch_dtype=")
    attention = hub.pop("attn_implementation", None)
    if attention is not None and not isinstance(attention, str):
        raise InvalidType(f"from_pretrained(): attn_implementation must be a str, not {type(attention).__name__}")
    return attention


def _check_attention(attention: str, config) -> None:
    """``attn_implementation`` other than the family's own native attention is refused, with why."""
    from .families import family_class

    native = family_class(config.model_type).native_attention
    if attention != native:
        raise InvalidArgument(f"from_pretrained(): attn_implementation={attention!r} is refused for "
                              f"{config.model_type}: its native attention is {native!r}, against which the knockouts "
                              "(run through the tool's own registered attention) are checked bit for bit; leave "
                              f"attn_implementation out or give {native!r}")


def _model_class(config) -> type:
    """The transformers class a model of ``config``'s family is (the one ``from_pretrained`` loads)."""
    import transformers

    from .families import family_class

    name = family_class(getattr(config, "model_type", None)).class_name(config.model_type)
    if name == "AutoModelForCausalLM":
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]
    return getattr(transformers, name)


class Analyzer:
    """A loaded model and what it needs to analyse prompts; one model serves many runs."""

    def __init__(self, model, processor=None):
        """``Analyzer(model, processor)`` around a model already loaded with transformers (a vision-language model
        and its processor, or a causal LM and its tokenizer); ``from_pretrained`` and ``demo`` load one for you."""
        from .models import LoadedModel, VL_FAMILIES

        if isinstance(model, LoadedModel):  # what from_pretrained and demo hand over
            self.loaded = model
        else:
            self.loaded = _wrap(model, processor)
        self.vision = self.loaded.model.config.model_type in VL_FAMILIES

    @classmethod
    def from_pretrained(cls, name: str, device: str = "auto", dtype="auto", device_map: str | None = None,
                        max_memory: str | None = None, offload_folder: str | None = None, **hub) -> Analyzer:
        """A checkpoint of a supported family (vision-language or text-only): a hub id or a local folder. ``dtype``:
        ``"auto"`` (the default: bfloat16 on CUDA, float32 on the CPU), ``"float32"``, ``"bfloat16"``,
        ``"float16"`` or the ``torch.dtype``. ``device_map`` (``"auto"``, ``"balanced"``, ``"sequential"``; with
        ``max_memory`` like ``"0=70GiB,cpu=200GiB"``) spreads a model too large for one device over the GPUs and the
        CPU. Hugging Face keywords that choose the files (``revision``, ``cache_dir``, ``token``,
        ``local_files_only``) go to every ``from_pretrained``; ``attn_implementation`` is accepted when it is the
        family's own (the knockouts run through the tool's attention and are checked against that one);
        quantisation is refused."""
        from .config import check_device, check_device_map
        from .models import VL_FAMILIES, _load_config, load_model, locate_model

        dtype = _dtype_name(dtype)
        for what, value in (("name", name), ("device", device)):
            if not isinstance(value, (str, Path) if what == "name" else str):
                kind = "a str or a path" if what == "name" else "a str"
                raise InvalidType(f"from_pretrained(): {what} must be {kind}, not {type(value).__name__}")
        attention = _hub_keywords(hub)
        with python_errors():
            check_device(device)
            check_device_map(device_map, max_memory, offload_folder, device)
            config = _load_config(locate_model(str(name), hub), hub)
            if attention is not None:
                _check_attention(attention, config)
            vision = getattr(config, "model_type", None) in VL_FAMILIES
            return cls(load_model(str(name), vision, device, dtype, device_map, max_memory, offload_folder, hub))

    @classmethod
    def demo(cls, vision: bool = True) -> Analyzer:
        """The tiny trained demo model (offline): Qwen3-VL with ``vision``, else Qwen3."""
        from .demo import demo_model_path
        from .models import load_model

        loaded = load_model(str(demo_model_path(vision)), vision, "cpu", "float32")
        loaded.name = f"demo ({loaded.name})"
        return cls(loaded)

    def run(self, prompt: str | list[str], images=(), progress: bool | Callable[[int, int], None] = True,
            metrics=None, knockouts=None, **options) -> KnockoutResult | list[KnockoutResult]:
        """Analyse ``prompt`` (with ``images``: paths or PIL images); ``options`` are the command line's, by their
        long names (``unit``, ``groups``, ``flows``, ``layers``, ``window``, ``stage``, ...). ``progress``: a
        tqdm bar (True, the default; a notebook bar in Jupyter), none (False), or a callable called with
        ``(done, total)`` (window, unit) cells after every head group of the sweep (its batches whose
        answer rows share one call of the head: up to 512 answer rows).

        ``metrics``: custom metrics computed beside the built-ins, ``{name: fn}`` with ``fn(base, knocked, answer)``
        → one number per knockout (see ``mask_impact.register_metric``; registered ones are always computed).
        ``knockouts``: ``Knockout`` objects (groups.py) to sweep instead of the ``unit``s: group knockouts (every
        query) or flows. A list of prompts runs each in turn with the same settings and returns a list of results
        (``images``: the same for every prompt, or one list of images per prompt)."""
        if isinstance(prompt, (list, tuple)):
            if not prompt:
                raise InvalidArgument("prompt is an empty list; give a str or a list of str")
            per_prompt = (isinstance(images, (list, tuple)) and len(images) > 0
                          and all(isinstance(item, (list, tuple)) for item in images))
            if per_prompt and len(images) != len(prompt):
                raise InvalidArgument(f"images has {len(images)} lists for {len(prompt)} prompts; give one list per "
                                      "prompt, or one list for all")
            for number, text in enumerate(prompt):
                if not isinstance(text, str):
                    raise InvalidType(f"prompt[{number}] must be a str, not {type(text).__name__}")
            return [self.run(text, images[number] if per_prompt else images, progress, metrics, knockouts,
                             **options) for number, text in enumerate(prompt)]
        if not isinstance(prompt, str):
            raise InvalidType(f"prompt must be a str or a list of str, not {type(prompt).__name__}")
        if not (isinstance(progress, bool) or callable(progress)):
            raise InvalidType(f"progress must be True, False or a callable(done, total), not {type(progress).__name__}")
        extra = self._metrics(metrics)
        options = check_options(options)
        if knockouts is not None:
            from .groups import as_options

            groups, flows, unit = as_options(knockouts, options.get("groups", []), options.get("flows", []),
                                             options.get("unit"))
            options.update(groups=groups, flows=flows, **({"unit": unit} if unit is not None else {}))
        one = isinstance(images, (str, Path)) or hasattr(images, "save") or hasattr(images, "__array__")
        images = [images] if one else images
        try:
            images = list(images)
        except TypeError:
            raise InvalidType(f"images must be a list of paths or PIL images, not {type(images).__name__}") from None
        from .metrics import extra_metrics

        with tempfile.TemporaryDirectory() as folder, python_errors(), extra_metrics(extra):
            paths, given = [], []
            for number, image in enumerate(images):
                paths.append(image_file(image, number, Path(folder)))
                given.append(str(image) if isinstance(image, (str, Path)) else f"<PIL image {number + 1}>")
            layer = dict(options, prompt=prompt, images=paths, model=self.loaded.name, output="api",
                         progress=progress is True)
            config = make_config([layer], self.vision)
            data = analyze(self.loaded, config, read_inputs(config), on_progress=None if isinstance(progress, bool)
                           else progress)
        for info, name in zip(data["images"], given):  # not the temporary files: what the caller gave
            info["path"] = name
        data["meta"]["settings"]["images"] = given
        data["meta"]["settings"]["output"] = None
        return KnockoutResult(data)

    def study(self, dataset, fields=None, limit: int | None = None, sample: int | None = None, seed: int = 0,
              ci: float = 0.95, only_correct: bool = False, progress: bool = True, **options) -> StudyResult:
        """A study: one run per row of ``dataset`` with the same ``options`` (``run``'s), then each unit's metrics
        averaged over the rows with a bootstrap confidence interval (study.py, aggregate.py). ``dataset``: a file or
        folder the command line's ``--dataset`` reads, a list of dicts, a pandas DataFrame or a ``datasets.Dataset``;
        its rows give ``prompt`` and, where present, ``image``, ``target``, ``contrast`` and ``group`` (``fields``:
        ``{"prompt": "question", ...}`` maps them to other columns). ``limit``, ``sample`` (with ``seed``),
        ``ci`` (the level), ``only_correct`` as on the command line. A row that cannot run is recorded with its
        error (``result.data["row_table"]``) and the others still run."""
        from tqdm.auto import tqdm

        from .dataset import FIELDS, check_counts, parse_fields, read_dataset, select_rows
        from .errors import NotCorrect
        from .study import ROW_KEYS, Study, row_runs, study_data

        given = sorted(set(options) & set(ROW_KEYS))
        if given:
            raise InvalidArgument(f"{given[0]} is given by each row of the dataset; map its column with "
                                  f"fields={{'{given[0].rstrip('s').replace('_file', '')}': COLUMN}}")
        if isinstance(fields, dict):
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in fields.items()):
                raise InvalidType(f"fields must map field names ({', '.join(FIELDS)}) to column names")
            fields = [f"{k}={v}" for k, v in fields.items()]
        for name, value in (("limit", limit), ("sample", sample), ("seed", seed)):
            if value is not None and (not isinstance(value, numbers.Integral) or isinstance(value, bool)):
                raise InvalidType(f"{name} must be an int, not {type(value).__name__}")
        if isinstance(ci, bool) or not isinstance(ci, numbers.Real) or not 0 < ci < 1:
            raise InvalidArgument(f"ci must be a level between 0 and 1, e.g. 0.95 (got {ci!r})")
        options = check_options({**options, **({"only_correct": True} if only_correct else {})})
        with tempfile.TemporaryDirectory() as folder, python_errors():
            if isinstance(dataset, (str, Path)):
                rows, _ = read_dataset(str(dataset), fields, limit, sample, seed)
                name = str(dataset)
            else:
                check_counts(limit, sample)
                records = dataset.to_dict("records") if hasattr(dataset, "to_dict") and hasattr(dataset, "columns") \
                    else [dict(row) for row in dataset] if not isinstance(dataset, dict) else None
                if records is None:
                    raise InvalidType("dataset must be a path, a list of dicts, a DataFrame or a datasets.Dataset, "
                                      "not a dict")
                rows = select_rows(records, Path.cwd(), parse_fields(fields), limit, sample, seed, "dataset")
                name = f"<{type(dataset).__name__} of {len(records)} rows>"
            settings = dict({"generate_top": 0}, **options, model=self.loaded.name, progress=False, html=False)
            study = Study("study", Path(folder), name, rows, settings, fields or [], seed, float(ci), limit, sample)
            runs = row_runs(study, self.vision, "python")
            index, results = {"runs": []}, {}
            for run in tqdm(runs, unit="row", disable=progress is not True, dynamic_ncols=True):
                entry = {"name": run.name, "status": "error", "error": run.error}
                if run.config is not None:
                    try:
                        results[run.name] = analyze(self.loaded, run.config, read_inputs(run.config))
                        entry.update(status="done", error=None, json=None)
                    except NotCorrect as excluded:
                        entry.update(status="excluded", answer=excluded.answer, correct=False)
                    except UsageError as error:
                        entry["error"] = str(error)
                index["runs"].append(entry)
            data = study_data(study, index, results)
        return StudyResult(data, [KnockoutResult(results[entry["name"]]) for entry in index["runs"]
                                  if entry["status"] == "done"])

    @staticmethod
    def _metrics(metrics) -> dict:
        """The custom metrics of one run: the registered ones, then ``metrics`` (a dict name → callable)."""
        from .metrics import CUSTOM, check_metric

        if metrics is None:
            metrics = {}
        if not isinstance(metrics, dict):
            raise InvalidType(f"metrics must be a dict {{name: callable(base, knocked, answer)}}, not "
                              f"{type(metrics).__name__}")
        for name, metric in metrics.items():
            check_metric(name, metric)
        return {**CUSTOM, **metrics}

    def __repr__(self) -> str:
        loaded = self.loaded
        kind = "vision-language" if self.vision else "text"
        return (f"Analyzer({loaded.name!r}, {loaded.model.config.model_type} {kind}, "
                f"{loaded.adapter.num_layers} layers, device={str(loaded.device)!r}, "
                f"dtype={str(loaded.dtype).replace('torch.', '')!r})")


def image_file(image, number: int, folder: Path) -> str:
    """A path for ``images[number]``: a path as given; a PIL image written losslessly into ``folder``."""
    if isinstance(image, (str, Path)):
        return str(image)
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a dependency
        Image = None
    if Image is None or not isinstance(image, Image.Image):
        hint = " (PIL.Image.fromarray makes one of an array)" if hasattr(image, "__array__") else ""
        raise InvalidType(f"images[{number}] is a {type(image).__name__}; give a path or a PIL image{hint}")
    from .pictures import upright

    image = upright(image)  # an opened photo's EXIF orientation, which the lossless copy would drop
    path = folder / f"image{number + 1}"
    for format in ("PNG", "TIFF"):  # TIFF keeps the modes PNG cannot (CMYK, 32-bit float, ...)
        try:
            image.save(path.with_suffix(f".{format.lower()}"), format=format)
            return str(path.with_suffix(f".{format.lower()}"))
        except (OSError, ValueError, KeyError, AttributeError) as error:
            problem = error
    raise InvalidArgument(f"images[{number}] is a PIL image that cannot be read ({type(problem).__name__}: "
                          f"{str(problem)[:120]})")


def read_inputs(config: RunConfig) -> str:
    """The prompt text of ``config``, its images checked readable (before any work)."""
    from .inputs import load_image, read_prompt

    text = read_prompt(config)
    for path in config.images:
        load_image(path)
    return text


def result_problem(data) -> str | None:
    """Why ``data`` is not a result this version reads (None if it is one)."""
    if not isinstance(data, dict):
        return f"its top level is a {type(data).__name__}, not an object"
    version = data.get("schema_version")
    if version not in SCHEMAS or isinstance(version, bool):
        return f"schema_version is {version!r}, not 1 or 2"
    if data.get("kind") == "batch":
        return "it is a batch index; load one of its runs"
    needed = ("windows", "metrics", "baseline", "tokens", "units" if version == 2 else "positions")
    missing = [key for key in needed if key not in data]
    return f"it has no {', '.join(missing)}" if missing else shape_problem(data, version)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def shape_problem(data: dict, version: int) -> str | None:
    """Why the parts of a result do not fit together (None if they do): what every method reads is checked here,
    so a damaged file is refused when loaded, not with an IndexError later."""
    windows = data["windows"]
    if not isinstance(windows, list) or not all(isinstance(w, list) and len(w) == 2 and all(map(_number, w))
                                                for w in windows):
        return "windows is not a list of [first layer, last layer] pairs"
    if not isinstance(data["baseline"], dict) or not isinstance(data["baseline"].get("text"), str):
        return "baseline is not an object with the answer's text"
    if not isinstance(data["tokens"], list) or not all(isinstance(token, dict) for token in data["tokens"]):
        return "tokens is not a list of objects"
    if version == 2:
        units = data["units"]
        if not isinstance(units, list) or not all(isinstance(u, dict) and "label" in u and "keys" in u for u in units):
            return "units is not a list of objects with a label and keys"
    else:
        units = data["positions"]
        if not isinstance(units, list) or not all(isinstance(p, int) and 0 <= p < len(data["tokens"]) for p in units):
            return "positions is not a list of token positions"
    labels = data.get("window_labels")
    if labels is not None and (not isinstance(labels, list) or len(labels) != len(windows)):
        return f"window_labels does not name the {len(windows)} windows"
    metrics = data["metrics"]
    if not isinstance(metrics, dict) or not metrics:
        return "metrics is not an object of metric grids"
    grids = dict(metrics)
    if isinstance(data.get("estimate"), dict):
        grids["estimate.logprob_drop"] = data["estimate"].get("logprob_drop")
    for name, grid in grids.items():
        if not isinstance(grid, list) or len(grid) != len(windows):
            return f"metrics {name!r} has not one row per window ({len(windows)})"
        for w, row in enumerate(grid):
            if not isinstance(row, list) or len(row) != len(units):
                return (f"metrics {name!r} row {w} has {len(row) if isinstance(row, list) else 'no'} values for "
                        f"{len(units)} units")
            if not all(value is None or isinstance(value, (int, float)) for value in row):  # bool: top1_changed
                return f"metrics {name!r} row {w} holds a value that is not a number"
    return None


class KnockoutResult:
    """A finished analysis: the result JSON of the command line (``data``), with arrays and tables over it."""

    def __init__(self, data: dict):
        problem = result_problem(data)
        if problem:
            raise NotAResult(f"not a mask_impact result: {problem}")
        self.data = data

    @property
    def windows(self) -> list[tuple[int, int]]:
        return [tuple(window) for window in self.data["windows"]]

    @property
    def window_labels(self) -> list[str]:
        return self.data.get("window_labels") or [f"layers {a}–{b}" for a, b in self.windows]

    @property
    def units(self) -> list[dict]:
        if "units" in self.data:
            return self.data["units"]
        tokens = self.data["tokens"]  # schema 1: one token unit per swept position
        return [{"index": i, "kind": "token", "label": tokens[p]["text"], "keys": [p], "queries": None,
                 "queries_from": None, "modality": tokens[p]["modality"], "image": tokens[p]["image"],
                 "box": tokens[p]["box"], "patches": None} for i, p in enumerate(self.data["positions"])]

    @property
    def answer(self) -> str:
        return self.data["baseline"]["text"]

    @property
    def metric_names(self) -> list[str]:
        return list(self.data["metrics"])

    @property
    def estimate(self) -> np.ndarray | None:
        """(windows, units) estimated ``logprob_drop`` of an ``estimate=K`` run (None otherwise); its quality against
        the exact cells is in ``data["estimate"]`` (``spearman``, ``computed_top_k_recall``, ``missed_above_top_k``)."""
        block = self.data.get("estimate")
        if not block:
            return None
        return np.array([[np.nan if v is None else float(v) for v in row] for row in block["logprob_drop"]])

    def metric(self, name: str = "logprob_drop") -> np.ndarray:
        """(windows, units) array of one metric (NaN where a value is missing: in an ``estimate=K`` run, the cells
        not computed exactly)."""
        if name not in self.data["metrics"]:
            raise InvalidArgument(f"metric={name!r} is not a metric of this result; metrics: "
                                  f"{', '.join(self.metric_names)}")
        grid = self.data["metrics"][name]
        return np.array([[np.nan if v is None else float(v) for v in row] for row in grid])

    def steps(self, name: str = "logprob_drop") -> np.ndarray:
        """(windows, units, answer steps) array of a per-step metric (NaN where a cell was not computed): what each
        answer token contributes; summed over the steps, ``logprob_drop`` is ``metric("logprob_drop")``."""
        grids = self.data.get("steps") or {}
        if name not in grids:
            raise InvalidArgument(f"steps(): this result has no per-step {name!r}"
                                  + (f"; it has {', '.join(grids)}" if grids else " (made before version 0.3)"))
        length = len((self.data.get("target") or self.data["baseline"])["token_ids"])  # the scored answer's steps
        return np.array([[cell if cell is not None else [np.nan] * length for cell in row] for row in grids[name]],
                        dtype=float).reshape(len(grids[name]), -1, length)

    def top(self, k: int = 10, metric: str = "logprob_drop") -> list[dict]:
        """The ``k`` (window, unit) cells with the largest ``metric``, largest first; cells with no value (not
        computed exactly in an ``estimate`` run; a ``first_divergence`` that never came) are left out."""
        if not isinstance(k, numbers.Integral) or isinstance(k, bool):
            raise InvalidType(f"top(): k must be an int, not {type(k).__name__}")
        if k < 0:
            raise InvalidArgument(f"top(): k must be 0 or more (got {k})")
        values = self.metric(metric)
        order = np.argsort(-np.nan_to_num(values, nan=-np.inf), axis=None, kind="stable")
        order = [flat for flat in order if not np.isnan(values.flat[flat])][:k]
        cells = []
        for flat in order:
            w, u = divmod(int(flat), values.shape[1])
            unit = self.units[u]
            cells.append({"window": self.windows[w], "window_label": self.window_labels[w], "unit": u,
                          "label": unit["label"], "kind": unit["kind"], metric: float(values[w, u])})
        return cells

    def to_pandas(self):
        """Long format: one row per (window, unit), the CSV's very columns (``layer_start`` ... ``queries``,
        ``patches``, ``modality``, ``image``, ``x0`` ... ``y1``, every metric, custom metrics, and
        ``estimated_logprob_drop`` in an ``estimate=K`` run), with the CSV's values: ``keys``, ``queries`` and
        ``patches`` written like ``--layers`` (``4-5,8-9``; ``queries`` empty for every query, ``answer`` for the
        answer positions), ``image`` counting from 1; empty cells are None (NaN in number columns)."""
        try:
            import pandas as pd
        except ImportError:
            raise MissingDependency("to_pandas() needs pandas: pip install pandas") from None
        from .report import table_rows

        header, rows = table_rows(self.data)
        return pd.DataFrame(rows, columns=header)

    def save(self, path: str | Path, html: bool = True, overwrite: bool = False,
             figures: str | None = None) -> dict[str, Path]:
        """``PATH.json``, ``.csv``, (``html``) ``.html`` and (``figures="png"|"svg"|"pdf"``) the figures, written as
        one set like the command line's."""
        from .report import write_results

        base = _base(path, "save")
        paths = {kind: base.with_name(f"{base.name}.{kind}") for kind in (("json", "csv", "html") if html else
                                                                          ("json", "csv"))}
        pictures = self._figure_files(base, figures, None, None, None) if figures is not None else {}
        self._write({**paths, **{kind: path for kind, (path, _) in pictures.items()}}, overwrite,
                    lambda: write_results(self.data, paths, figures=dict(pictures.values())))
        return {**paths, **{kind: path for kind, (path, _) in pictures.items()}}

    def plot(self, path: str | Path | None = None, format: str = "png", metric: str | None = None,
             windows=None, kinds=None, overwrite: bool = False, greyscale: bool = False, units=None,
             vmax: float | None = None, title: str | None = None, size=None, font_size: float | None = None,
             contours: bool = False) -> dict:
        """Publication figures (figures.py): the window × unit ``heatmap``; the ``overlay`` of the units' boxes on
        the image for the chosen ``windows`` (indices or labels; default up to six, evenly spaced); the ``flows``
        curves of a flow run. ``kinds`` picks some. With ``path`` (``output/cat`` or ``output/cat.json``) writes
        ``PATH.KIND.FORMAT`` (png, svg or pdf) and returns their paths; without, returns matplotlib Figures.
        ``greyscale``: the overlay's picture drawn in grey, so only the effects are coloured. For a paper: ``units``
        ((first, last) or indices) and ``windows`` choose the heatmap's columns and rows, ``vmax`` the colour limit
        (default: the result's ``colour_scale``), ``title``, ``size`` ((width, height) in inches), ``font_size``;
        ``kinds="tokens"`` draws the prompt's tokens coloured by impact and the answer's steps (not drawn by
        default). ``metric``: default each figure's own (flows ``prob_change_pct``, as the viewer draws them; the
        others ``logprob_drop``). ``contours``: the overlay's effects as contour lines over the picture, not a
        tint."""
        from . import figures

        options = {"greyscale": bool(greyscale), "units": units, "vmax": vmax, "title": title, "size": size,
                   "font_size": font_size, "contours": bool(contours)}
        if path is None:
            self._check_figures(format, metric, windows)
            asked = self._kinds(kinds)
            figures.check_options(self.data, options)
            return figures.draw(self.data, metric, windows, asked, **options)
        base = _base(path, "plot")
        pictures = self._figure_files(base, format, metric, windows, kinds, **options)
        from .report import write_set

        files = {kind: file for kind, (file, _) in pictures.items()}
        self._write(files, overwrite, lambda: write_set(dict(pictures.values())))
        return files

    def _check_figures(self, fmt, metric: str | None, windows=None) -> None:
        from . import figures

        figures.require()
        if fmt not in figures.FORMATS:
            raise InvalidArgument(f"format={fmt!r} is not one of: {', '.join(figures.FORMATS)}")
        if metric is not None and (metric != figures.ESTIMATED or self.estimate is None):  # ESTIMATED: an estimate run's
            self.metric(metric)
        figures.chosen_windows(self.data, windows)  # refused whatever figures are drawn (not only the overlay)

    def _kinds(self, kinds) -> list[str]:
        from .figures import kinds_for

        have = kinds_for(self.data)
        asked = have if kinds is None else [kinds] if isinstance(kinds, str) else list(kinds)
        for kind in asked:
            if kind not in have + ["tokens"]:  # the token-text figure: any result, on request
                raise InvalidArgument(f"kinds={kind!r} is not a figure of this result; its figures: "
                                      f"{', '.join(have + ['tokens'])}")
        return asked

    def _figure_files(self, base: Path, fmt, metric: str, windows, kinds, **options) -> dict[str, tuple[Path, bytes]]:
        from . import figures
        from .config import figure_paths

        self._check_figures(fmt, metric, windows)
        asked = self._kinds(kinds)
        paths = figure_paths(base, fmt, asked)
        return {kind: (paths[kind], content) for kind, content in
                figures.render(self.data, fmt, metric, windows, asked, **options).items()}

    @staticmethod
    def _write(paths: dict[str, Path], overwrite: bool, write: Callable[[], None]) -> None:
        from .report import check_writable, output_folder

        with python_errors():
            check_writable(paths, overwrite)
            with output_folder(next(iter(paths.values())).parent):
                write()

    @classmethod
    def load(cls, path: str | Path) -> KnockoutResult:
        """A result the command line or ``save`` wrote (schema 1 or 2)."""
        if not isinstance(path, (str, Path)):
            raise InvalidType(f"load(): path must be a str or a path, not {type(path).__name__}")
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as error:
            raise NotAResult(f"{path} cannot be read ({error.strerror or error.__class__.__name__})") from None
        except RecursionError:
            raise NotAResult(f"{path} is not a mask_impact result: its JSON is nested too deeply to read") from None
        except ValueError as error:
            raise NotAResult(f"{path} is not a mask_impact result: not JSON text ({error.__class__.__name__})") from None
        version = data.get("schema_version") if isinstance(data, dict) else None
        if isinstance(version, int) and not isinstance(version, bool) and version > max(SCHEMAS):
            from .version import __version__

            raise NotAResult(f"{path} is a schema {version} result, written by a newer mask_impact; this version "
                             f"({__version__}) reads schemas 1 and 2: pip install --upgrade mask-impact")
        problem = result_problem(data)
        if problem:
            raise NotAResult(f"{path} is not a mask_impact result: {problem}")
        return cls(data)

    def show(self, top: int = 10, viewer: bool = False):
        """The ``top`` cells: in Jupyter a small HTML table (``viewer=True``: the whole viewer with this result,
        about 160 KB for the demo), elsewhere a text table; token labels are shown escaped (a label ``\\n`` as
        ``\\n``)."""
        try:
            from IPython import get_ipython
            from IPython.display import display
            notebook = get_ipython() is not None and "IPKernelApp" in get_ipython().config
        except ImportError:
            notebook = False
        if notebook and viewer:
            import html as html_text

            from .report import _finite, viewer_html

            page = viewer_html(_finite(self.data))
            frame = f'<iframe srcdoc="{html_text.escape(page)}" style="width:100%;height:900px;border:0"></iframe>'
            return display({"text/html": frame}, raw=True)  # raw: no warning about an iframe in HTML()
        if notebook:
            return display({"text/html": self._html(top)}, raw=True)
        print(self._text(top))
        return None

    def _text(self, top: int = 10) -> str:
        cells = self.top(top)
        width = max([len(_printable(c["label"])) for c in cells] + [5])
        width = min(width, 40)
        lines = [repr(self), f"{'window':>14}  {'label':<{width}} {'kind':<7} {'logprob_drop':>12}"]
        for c in cells:
            label = _printable(c["label"])
            label = label if len(label) <= width else label[:width - 1] + "…"
            lines.append(f"{c['window_label']:>14}  {label:<{width}} {c['kind']:<7} {c['logprob_drop']:>12.4f}")
        return "\n".join(lines)

    def _html(self, top: int = 10) -> str:
        """A small HTML summary (Jupyter's rich display of a result): what was run and its ``top`` cells."""
        from html import escape

        meta = self.data.get("meta", {})
        rows = "".join(f"<tr><td>{escape(c['window_label'])}</td><td><code>{escape(_printable(c['label']))}</code>"
                       f"</td><td>{escape(c['kind'])}</td><td style='text-align:right'>{c['logprob_drop']:.4f}"
                       "</td></tr>" for c in self.top(top))
        return (f"<div><b>KnockoutResult</b> · {escape(str(meta.get('model', '')))} · stage "
                f"{escape(str(self.data.get('stage', 'decoder')))} · {len(self.windows)} windows × "
                f"{len(self.units)} units<br>answer: <code>{escape(_printable(self.answer))}</code>"
                f"<table><thead><tr><th>window</th><th>unit</th><th>kind</th><th>logprob_drop</th></tr></thead>"
                f"<tbody>{rows}</tbody></table><small>result.show(viewer=True): the interactive viewer; "
                f"result.save(path): JSON, CSV and the viewer page</small></div>")

    def _repr_html_(self) -> str:
        return self._html()

    def __repr__(self) -> str:
        kinds = sorted({unit["kind"] for unit in self.units})
        top = self.top(1)
        best = (f", top: {top[0]['window_label']} / {_printable(top[0]['label'])!r} logprob_drop="
                f"{top[0]['logprob_drop']:.4g}" if top else "")
        return (f"KnockoutResult(answer={self.answer!r}, stage={self.data.get('stage', 'decoder')!r}, "
                f"{len(self.windows)} windows × {len(self.units)} {'/'.join(kinds)} units, "
                f"model={self.data.get('meta', {}).get('model')!r}{best})")


class StudyResult:
    """A study's aggregates (``data``: what ``study.json`` holds) and its measured rows' results (``runs``)."""

    def __init__(self, data: dict, runs: list[KnockoutResult]):
        self.data, self.runs = data, runs

    @property
    def accuracy(self) -> float | None:
        """The share of rows (with a target) whose greedy answer starts with it."""
        return self.data["accuracy"]["value"]

    def to_pandas(self):
        """The aggregates as ``study.csv`` holds them: one row per (unit, window, metric)."""
        from .aggregate import COLUMNS
        from .errors import MissingDependency

        try:
            import pandas
        except ImportError:
            raise MissingDependency('to_pandas() needs pandas: pip install "mask-impact[notebook]"') from None
        return pandas.DataFrame(self.data["aggregates"], columns=COLUMNS)

    def plot(self, path: str | Path | None = None, format: str = "png", metric: str | None = None,
             overwrite: bool = False) -> dict:
        """The study's figures: the units' ``curves`` over the layer windows with their confidence bands, and the
        averaged image ``map`` (where the units have grid cells); ``metric`` default: ``prob_change_pct`` with
        targets, else ``logprob_drop``. With ``path``: written as ``PATH.KIND.FORMAT``, their paths returned;
        without: matplotlib Figures."""
        from . import figures
        from .options import FIGURE_FORMATS

        figures.require()
        if format not in FIGURE_FORMATS:
            raise InvalidArgument(f"format={format!r} is not one of: {', '.join(FIGURE_FORMATS)}")
        metric = metric or self.data["primary"]
        if not any(entry["metric"] == metric for entry in self.data["aggregates"]):
            raise InvalidArgument(f"metric={metric!r} is not aggregated in this study")
        if path is None:
            drawn = {"curves": figures.study_curves(self.data, metric)}
            if any(entry["kind"] == "grid" for entry in self.data["aggregates"]):
                drawn["map"] = figures.study_map(self.data, metric)
            return drawn
        base = _base(path, "plot")
        contents = figures.render_study(self.data, format, metric)
        files = {kind: base.with_name(f"{base.name}.{kind}.{format}") for kind in contents}
        from .report import write_set

        KnockoutResult._write(files, overwrite, lambda: write_set({files[k]: contents[k] for k in contents}))
        return files

    def save(self, folder: str | Path, overwrite: bool = False) -> dict[str, Path]:
        """``folder/study.json``, ``study.csv`` and each measured row's result (``rowN.json``, ``.csv``), as the
        command line writes a study; returns the study's two paths."""
        from .aggregate import csv_text
        from .report import _finite, write_set

        folder = Path(folder).expanduser()
        paths = {"json": folder / "study.json", "csv": folder / "study.csv"}
        rows = {}
        data = json.loads(json.dumps(_finite(self.data)))
        for entry, run in zip([e for e in data["row_table"] if e["status"] == "done"], self.runs):
            entry["json"] = f"{entry['name']}.json"
            rows[folder / entry["json"]] = run
        folder.mkdir(parents=True, exist_ok=True)

        def write() -> None:
            from .report import csv_text as result_csv

            texts: dict[Path, str | bytes] = {}
            for path, run in rows.items():
                texts[path.with_suffix(".csv")] = result_csv(_finite(run.data))
                texts[path] = json.dumps(_finite(run.data), ensure_ascii=False, indent=1)
            texts[paths["csv"]] = csv_text(data["aggregates"])
            texts[paths["json"]] = json.dumps(data, ensure_ascii=False, indent=1)
            write_set(texts)

        KnockoutResult._write({**paths, **{str(p): p for p in rows}}, overwrite, write)
        return paths

    @classmethod
    def load(cls, path: str | Path) -> StudyResult:
        """A study the command line or ``save`` wrote: its ``study.json`` (or the folder holding it), with the
        measured rows' results read from their files beside it."""
        path = Path(path)
        path = path / "study.json" if path.is_dir() else path
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise NotAResult(f"{path} cannot be read as a study ({type(error).__name__})") from None
        if not isinstance(data, dict) or data.get("kind") != "study" or "aggregates" not in data:
            raise NotAResult(f"{path} is not a mask_impact study (no kind 'study' with aggregates)")
        runs = [KnockoutResult.load(path.parent / entry["json"]) for entry in data["row_table"]
                if entry["status"] == "done" and entry.get("json")]
        return cls(data, runs)

    def __repr__(self) -> str:
        rows = self.data["rows"]
        accuracy = "" if self.accuracy is None else f", accuracy {self.accuracy:.0%}"
        return (f"StudyResult({self.data['name']!r}: {rows['measured']} of {rows['total']} rows measured"
                f"{accuracy}, {len(self.data['aggregates'])} aggregates)")


def _printable(text: str) -> str:
    """``text`` with every character a terminal or table would act on escaped (``\\n``, ``\\t``, ``\\x1b``)."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in str(text))
