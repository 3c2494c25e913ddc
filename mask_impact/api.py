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
``analyze`` function. Bad input raises ``MaskImpactError`` (the command line prints the same message as one line).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import fields
from pathlib import Path

import numpy as np

from .config import RunConfig, UsageError, make_config

MaskImpactError = UsageError  # the library's error: bad input, said in one line
NOT_RUN_OPTIONS = ("model", "demo", "device", "dtype", "prompt", "prompt_file", "images", "output", "output_dir",
                   "overwrite", "resume", "html")


def analyze(loaded, config: RunConfig, prompt_text: str, store=None, prepared: tuple | None = None) -> dict:
    """One analysis of ``prompt_text`` under ``config``: the result as the JSON the command line writes
    (``store``: the run's resume state, see resume.py; ``prepared``: ``cli.prepare``'s prompt and fingerprint,
    if the caller has them already)."""
    from . import report
    from .cli import prepare
    from .sweep import run

    prompt, parts = prepared or prepare(loaded, config, prompt_text)
    result = run(loaded, prompt, config, store)
    return report.result_json(loaded, prompt, config, result, parts)


class Analyzer:
    """A loaded model and what it needs to analyse prompts; one model serves many runs."""

    def __init__(self, loaded, vision: bool):
        self.loaded, self.vision = loaded, vision

    @classmethod
    def from_pretrained(cls, name: str, device: str = "auto", dtype: str = "auto") -> Analyzer:
        """A checkpoint of a supported family (vision-language or text-only): a hub id or a local folder."""
        from .config import check_device
        from .models import VL_FAMILIES, _load_config, load_model, locate_model

        if not isinstance(name, (str, Path)):
            raise MaskImpactError(f"the model name must be a string or a path, not {type(name).__name__}")
        check_device(device)
        vision = getattr(_load_config(locate_model(str(name))), "model_type", None) in VL_FAMILIES
        return cls(load_model(str(name), vision, device, dtype), vision)

    @classmethod
    def demo(cls, vision: bool = True) -> Analyzer:
        """The tiny trained demo model (offline): Qwen3-VL with ``vision``, else Qwen3."""
        from .demo import demo_model_path
        from .models import load_model

        loaded = load_model(str(demo_model_path(vision)), vision, "cpu", "float32")
        loaded.name = f"demo ({loaded.name})"
        return cls(loaded, vision)

    def run(self, prompt: str, images=(), progress: bool = True, **options) -> KnockoutResult:
        """Analyse ``prompt`` (with ``images``: paths or PIL images); ``options`` are the command line's."""
        if not isinstance(prompt, str):
            raise MaskImpactError(f"the prompt must be a string, not {type(prompt).__name__}")
        known = {f.name for f in fields(RunConfig)} - set(NOT_RUN_OPTIONS)
        unknown = sorted(set(options) - known)
        if unknown:
            raise MaskImpactError(f"run() got an unknown option {unknown[0]!r}; options: {', '.join(sorted(known))}")
        images = [images] if isinstance(images, (str, Path)) or hasattr(images, "save") else list(images)
        with tempfile.TemporaryDirectory() as folder:
            paths, given = [], []
            for number, image in enumerate(images, start=1):
                if isinstance(image, (str, Path)):
                    paths.append(str(image))
                    given.append(str(image))
                elif hasattr(image, "save") and hasattr(image, "size"):  # a PIL image: the model reads it as a PNG
                    path = Path(folder) / f"image{number}.png"
                    image.save(path, format="PNG")
                    paths.append(str(path))
                    given.append(f"<PIL image {number}>")
                else:
                    raise MaskImpactError(f"image {number} is a {type(image).__name__}; give a path or a PIL image")
            layer = dict(options, prompt=prompt, images=paths, model=self.loaded.name, progress=progress,
                         output="api")
            config = make_config([layer], self.vision)
            data = analyze(self.loaded, config, read_inputs(config))
        for info, name in zip(data["images"], given):  # not the temporary files: what the caller gave
            info["path"] = name
        data["meta"]["settings"]["images"] = given
        data["meta"]["settings"]["output"] = None
        return KnockoutResult(data)


def read_inputs(config: RunConfig) -> str:
    """The prompt text of ``config``, its images checked readable (before any work)."""
    from .inputs import load_image, read_prompt

    text = read_prompt(config)
    for path in config.images:
        load_image(path)
    return text


class KnockoutResult:
    """A finished analysis: the result JSON of the command line (``data``), with arrays and tables over it."""

    def __init__(self, data: dict):
        if not isinstance(data, dict) or data.get("schema_version") not in (1, 2) or "metrics" not in data:
            raise MaskImpactError("not a mask_impact result (schema 1 or 2)")
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

    def metric(self, name: str = "logprob_drop") -> np.ndarray:
        """(windows, units) array of one metric (NaN where a value is missing)."""
        if name not in self.data["metrics"]:
            raise MaskImpactError(f"no metric {name!r}; metrics: {', '.join(self.metric_names)}")
        grid = self.data["metrics"][name]
        return np.array([[np.nan if v is None else float(v) for v in row] for row in grid])

    def top(self, k: int = 10, metric: str = "logprob_drop") -> list[dict]:
        """The ``k`` (window, unit) cells with the largest ``metric``, largest first."""
        values = self.metric(metric)
        order = np.argsort(-np.nan_to_num(values, nan=-np.inf), axis=None, kind="stable")[:k]
        cells = []
        for flat in order:
            w, u = divmod(int(flat), values.shape[1])
            unit = self.units[u]
            cells.append({"window": self.windows[w], "window_label": self.window_labels[w], "unit": u,
                          "label": unit["label"], "kind": unit["kind"], metric: float(values[w, u])})
        return cells

    def to_pandas(self):
        """Long format: one row per (window, unit), with the unit's kind, label, keys and every metric."""
        try:
            import pandas as pd
        except ImportError:
            raise MaskImpactError("to_pandas() needs pandas: pip install pandas") from None
        rows = []
        for w, (start, end) in enumerate(self.windows):
            for u, unit in enumerate(self.units):
                row = {"layer_start": start, "layer_end": end, "window_label": self.window_labels[w], "unit": u,
                       "kind": unit["kind"], "label": unit["label"], "keys": unit["keys"],
                       "modality": unit["modality"], "image": unit["image"]}
                row.update({name: self.data["metrics"][name][w][u] for name in self.metric_names})
                rows.append(row)
        return pd.DataFrame(rows)

    def save(self, path: str | Path, html: bool = True, overwrite: bool = False) -> dict[str, Path]:
        """``PATH.json``, ``.csv`` and (``html``) ``.html``, written as one set like the command line's."""
        from .report import check_writable, output_folder, write_results

        base = Path(path)
        base = base.with_suffix("") if base.suffix == ".json" else base
        paths = {kind: base.with_name(f"{base.name}.{kind}") for kind in (("json", "csv", "html") if html else
                                                                          ("json", "csv"))}
        check_writable(paths, overwrite)
        with output_folder(base.parent):
            write_results(self.data, paths)
        return paths

    @classmethod
    def load(cls, path: str | Path) -> KnockoutResult:
        """A result the command line or ``save`` wrote (schema 1 or 2)."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise MaskImpactError(f"{path} cannot be read as a result ({error.__class__.__name__})") from None
        version = data.get("schema_version") if isinstance(data, dict) else None
        if isinstance(version, int) and version > 2:
            raise MaskImpactError(f"{path} is a schema {version} result; this version reads schemas 1 and 2")
        return cls(data)

    def show(self, top: int = 10):
        """In Jupyter, the viewer with this result; elsewhere a text table of the top cells."""
        try:
            from IPython import get_ipython
            from IPython.display import HTML, display
            notebook = get_ipython() is not None and "IPKernelApp" in get_ipython().config
        except ImportError:
            notebook = False
        if notebook:
            import html as html_text

            from .report import _finite, viewer_html

            page = viewer_html(_finite(self.data))
            return display(HTML(f'<iframe srcdoc="{html_text.escape(page)}" style="width:100%;height:900px;border:0">'
                                "</iframe>"))
        print(str(self) + "\n" + "\n".join(f"{c['window_label']:>14}  {c['label'][:24]:<24} {c['kind']:<7} "
                                           f"{c['logprob_drop']:>10.4f}" for c in self.top(top)))
        return None

    def __repr__(self) -> str:
        return (f"KnockoutResult(answer={self.answer!r}, {len(self.windows)} windows × {len(self.units)} units, "
                f"stage={self.data.get('stage', 'decoder')})")
