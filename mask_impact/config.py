"""The run configuration: one dataclass, the command line and YAML files that fill it, validation.

Both entry points share this parser; they differ in the default model, whether ``--image`` exists,
and which ``--mask-mode`` values make sense. Precedence, highest first: command-line flags, the run's
entry in a YAML batch, the batch's ``defaults:``, the built-in defaults of ``RunConfig``. Every check
that needs no model runs before the model is loaded, so bad input fails fast, with one line on stderr
and exit status 2, and writes nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import textwrap
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime
from pathlib import Path

from .errors import OptionError, UsageError, bounded, flag, mention, quoted, spelled
from .options import STAGES, UnitOptions, check_units, parse_figure_options, parse_units
from .resources import data_path

VL_DEFAULT_MODEL = "Qwen/Qwen3-VL-4B-Instruct"
TEXT_DEFAULT_MODEL = "Qwen/Qwen3-4B"
MASK_MODES = ("text", "vision", "both")
DEMO_PROMPT_VL = "What color is the shape?"
DEMO_PROMPT_TEXT = "A=3, B=7, C=1. What is B?"
DEMO_IMAGE = data_path("testimg.png")


CHOICES = {
    "mask_mode": MASK_MODES,
    "block_from": ("all", "answer"),
    "vision_attention": ("causal", "bidirectional"),
    "engine": ("fast", "naive"),
    "stage": tuple(STAGES),
    "fill": ("mean", "blur", "black", "noise"),
    "dtype": ("auto", "float32", "bfloat16", "float16"),
}
# accelerate's ways of spreading a model's layers over the devices (``from_pretrained(device_map=...)``)
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
# Options that name the prompt: a layer of settings that gives one replaces the other from lower layers.
PROMPT_SOURCES = ("prompt", "prompt_file")
# A --prompt value that ends so (and has no white space) is meant as a file: refused when it names none.
PROMPT_FILE_SUFFIXES = (".txt", ".md", ".prompt")
# Upper bounds checked before anything is allocated: beyond them the request cannot be meant.
MAX_NUM_TOKENS = 1 << 20
MAX_LAYER_INDEX = 1 << 16
# A study's options (--dataset): only_correct is a run's too, the others the study's alone.
STUDY_OPTIONS = ("dataset", "fields", "limit", "sample", "seed", "ci", "only_correct")
# Set once for a whole batch (one model load, one folder): allowed in ``defaults:`` and on the command line.
BATCH_KEYS = ("model", "demo", "device", "dtype", "threads", "device_map", "max_memory", "offload_folder", "output_dir")


@dataclass
class RunConfig:
    model: str
    prompt: str | None = None
    prompt_file: str | None = None
    images: list[str] = field(default_factory=list)
    demo: bool = False
    raw_prompt: bool = False
    allow_special_tokens: bool = False
    mask_mode: str = "text"
    stage: str = "decoder"  # decoder | vision-encoder | pixels | deepstack
    fill: str = "mean"  # --stage pixels: mean | blur | black | noise
    unit: str = "token"  # token | word | region:N | image | groups
    groups: list[str] = field(default_factory=list)  # NAME=SPEC
    flows: list[str] = field(default_factory=list)  # SRC->DST
    num_tokens: int = 5
    layers: str = "all"
    window: int = 1
    block_from: str = "all"
    vision_attention: str = "causal"
    generate_top: int = 10
    batch_size: int | None = None  # None: chosen from free memory
    engine: str = "fast"
    device: str = "auto"
    dtype: str = "auto"
    threads: str | int | None = None  # CPU threads: None (torch's own count), "auto" (the idle CPUs) or N
    device_map: str | None = None  # None: the whole model on --device; else accelerate's big-model placement
    max_memory: str | None = None  # with device_map: "0=70GiB,cpu=200GiB"
    offload_folder: str | None = None  # with device_map: where weights that fit nowhere go (default: a temporary one)
    output: str | None = None
    output_dir: str = "output"
    overwrite: bool = False
    resume: bool = False
    html: bool = True
    progress: bool = True
    max_pixels: int | None = None  # None: the processor's own limit
    min_pixels: int | None = None  # None: the processor's own limit
    figures: str | None = None  # png | svg | pdf: figures beside the results (figures.py); None: none
    estimate: int | None = None  # K: estimate every cell (estimate.py), compute only the K largest exactly; None: all
    estimate_sample: int | None = None  # with estimate: random other cells computed exactly too (None: K of them)
    estimate_seed: int = 0  # with estimate: the seed of that sample
    figure_options: list[str] | None = None  # --figure-option KEY=VALUE: the figures' options (options.py)
    target: str | None = None  # --target TEXT: the answer scored (teacher-forced); None: the greedy answer
    contrast: str | None = None  # --contrast TEXT: a foil scored beside the target (metric logit_diff_change)
    only_correct: bool = False  # a study's --only-correct: measure only if the greedy answer starts with the target

    def settings(self) -> dict:
        return asdict(self)

    def unit_options(self) -> UnitOptions:
        """``unit``, ``groups`` and ``flows`` as typed values (options.parse_units: parsed once)."""
        return parse_units(self.unit, self.groups, self.flows)

    def as_measured(self, loaded) -> RunConfig:
        """The settings the numbers were computed under: a family whose own masks let the tokens of one image
        attend to each other both ways (Gemma 3) is measured bidirectional whatever ``--vision-attention`` says."""
        return replace(self, vision_attention="bidirectional") if loaded.adapter.bidirectional_images else self

    def validate(self, vision: bool) -> None:
        """Checks that need no model."""
        for name in CHOICES:
            allowed = CHOICES[name] if vision else text_choices(name)
            if getattr(self, name) not in allowed:
                raise OptionError(name, f"not one of: {', '.join(allowed)}", getattr(self, name))
        if not 1 <= self.num_tokens <= MAX_NUM_TOKENS:
            raise OptionError("num_tokens", f"must be between 1 and {MAX_NUM_TOKENS:,}", self.num_tokens)
        if self.window < 1:
            raise OptionError("window", "must be at least 1", self.window)
        if self.generate_top < 0:
            raise OptionError("generate_top", "must be 0 or more", self.generate_top)
        if self.batch_size is not None and self.batch_size < 1:
            raise OptionError("batch_size", "must be at least 1", self.batch_size)
        for name in ("max_pixels", "min_pixels"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise OptionError(name, "must be at least 1", getattr(self, name))
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            raise UsageError(f"{mention('min_pixels', self.min_pixels, shown=f'{self.min_pixels:,}')} is larger "
                             f"than {mention('max_pixels', self.max_pixels, shown=f'{self.max_pixels:,}')}")
        if not vision and self.images:
            raise UsageError("text-only models take no image; use mask-impact-vl (mask_impact_vl.py) with a vision-language model")
        check_units(self.unit_options(), len(self.images), vision, self.stage)  # says what needs images
        if self.mask_mode in ("vision", "both") and not self.images:
            raise UsageError(f"{mention('mask_mode', self.mask_mode)} needs an image: add "
                             f"{mention('images', 'PATH')}, or use {mention('mask_mode', 'text')}")
        STAGES[self.stage].check(self)  # the options that do not apply to the stage
        check_estimate(self)
        check_target(self.target, self.contrast)
        if self.only_correct and self.target is None:
            raise UsageError(f"{mention('only_correct')} measures the rows whose answer starts with their target: "
                             f"give a target (a dataset's target column, or {mention('target')})")
        if self.prompt is None and self.prompt_file is None:
            raise UsageError(f"no prompt given: pass {mention('prompt')} TEXT or {mention('prompt_file')} FILE, or "
                             f"{mention('demo')}")
        if self.prompt is not None and self.prompt_file is not None:
            raise UsageError(f"give {mention('prompt')} or {mention('prompt_file')}, not both")
        if self.output is not None:
            check_name(self.output, mention("output"))
        if self.figures is not None:
            check_figures(self.figures)
        if self.figure_options:  # its words checked before the model loads
            parse_figure_options(self.figure_options)
        check_device(self.device)
        if self.threads is not None and str(self.threads) != "auto" and not (
                str(self.threads).isdigit() and 1 <= int(self.threads) <= 4096):
            raise OptionError("threads", "is not understood; use auto or a count from 1", self.threads)
        check_device_map(self.device_map, self.max_memory, self.offload_folder, self.device)
        parse_layers(self.layers, None)


def field_types() -> tuple[dict[str, type], frozenset[str]]:
    """What a YAML value or an API keyword must be, per ``RunConfig`` field, read from the dataclass's own
    annotations (the first type of a union that is not None; ``list`` for ``list[str]``), and the fields whose
    annotation admits None (``int | None``: None means the default rule). So the one model of the options is
    ``RunConfig`` and no second table can drift from it."""
    import types
    import typing

    kinds, optional = {}, set()
    for name, hint in typing.get_type_hints(RunConfig).items():
        members = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        kind = next(member for member in members if member is not type(None))
        kinds[name] = typing.get_origin(kind) or kind
        if type(None) in members:
            optional.add(name)
    return {f.name: kinds[f.name] for f in fields(RunConfig)}, frozenset(optional)


FIELD_TYPES, OPTIONAL_FIELDS = field_types()


def has_field_type(name: str, value) -> bool:
    """Whether ``value`` has the type of ``RunConfig``'s field ``name``, as its annotation says: None where the
    field admits None, an integer (any ``numbers.Integral``) but not a bool for an int, strings only in a list. The
    one type check of the YAML keys (batch.normalise) and the API's keywords (api.check_options); each front end
    words the refusal its own way."""
    import numbers

    if value is None:
        return name in OPTIONAL_FIELDS
    expected = FIELD_TYPES[name]
    if expected is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if expected is list:
        return isinstance(value, list) and all(isinstance(item, str) for item in value)
    return isinstance(value, expected)


def check_estimate(config: RunConfig) -> None:
    """``--estimate K`` (with ``--estimate-sample``, ``--estimate-seed``): decoder knockouts only."""
    if config.estimate is None:
        for name in ("estimate_sample", "estimate_seed"):
            if getattr(config, name) not in (None, 0):
                an_estimate = spelled("an --estimate", "an estimate=", "an estimate")
                raise UsageError(f"{mention(name)} belongs to {an_estimate} run; give {mention('estimate')} too, or "
                                 "drop it")
        return
    if config.estimate < 1:
        raise OptionError("estimate", "must be at least 1: the number of cells computed exactly", config.estimate)
    if config.estimate_sample is not None and config.estimate_sample < 0:
        raise OptionError("estimate_sample", "must be 0 or more", config.estimate_sample)
    if config.estimate_seed < 0:
        raise OptionError("estimate_seed", "must be 0 or more", config.estimate_seed)
    if not STAGES[config.stage].estimable:
        raise UsageError(f"{mention('estimate')} estimates attention knockouts in the decoder; "
                         f"{mention('stage', config.stage)} has no such estimate: drop {mention('estimate')}, or use "
                         f"{mention('stage', 'decoder')}")


def check_target(target: str | None, contrast: str | None) -> None:
    """``--target`` (and ``--contrast``, which needs it): answers with some text in them."""
    for name, value in (("target", target), ("contrast", contrast)):
        if value is not None and not value.strip():
            raise OptionError(name, "is empty; give the answer's text", value)
    if contrast is not None and target is None:
        raise UsageError(f"{mention('contrast')} is the foil of a {mention('target')}: give {mention('target')} too "
                         "(the correct answer)")
    if contrast is not None and target is not None and contrast.strip() == target.strip():
        raise UsageError(f"{mention('contrast', contrast, quote=True)} is the {mention('target')} itself; give a "
                         "different answer as the foil")


def check_name(name: str, what: str) -> None:
    """A result or batch name: a plain file name that is neither hidden nor a path."""
    if not re.fullmatch(r"[\w\-][\w.\-]{0,199}", name):
        raise UsageError(f"{what} {quoted(name)} must be a plain name of letters, digits, '.', '_', '-' (not "
                         "starting with '.', at most 200 characters)")


def check_figures(fmt: str) -> None:
    """``--figures``: a format matplotlib writes, and matplotlib installed (checked before the model loads)."""
    from .errors import FIGURES_INSTALL
    from .options import FIGURE_FORMATS, figures_available

    if fmt not in FIGURE_FORMATS:
        raise OptionError("figures", f"not one of: {', '.join(FIGURE_FORMATS)}", fmt)
    if not figures_available():
        raise UsageError(f"{mention('figures')} needs matplotlib, which is not installed: {FIGURES_INSTALL}")


def check_device(device: str) -> None:
    """``--device`` names a device this machine has; checked before the model loads (torch is imported only to
    count the GPUs that ``cuda`` names)."""
    match = re.fullmatch(r"(auto|cpu|cuda)(?::(\d{1,3}))?", device)
    if not match or (match[2] is not None and match[1] != "cuda"):
        raise OptionError("device", "is not understood; use auto, cpu, cuda or cuda:N", device)
    if match[1] == "cuda":
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise OptionError("device", "no CUDA device is available here; use cpu", device)
        if match[2] is not None and int(match[2]) >= count:
            raise OptionError("device", f"this machine has CUDA devices 0-{count - 1}", device)


def check_device_map(device_map: str | None, max_memory: str | None, offload_folder: str | None,
                     device: str) -> None:
    """``--device-map``, ``--max-memory`` and ``--offload-folder`` go together and name what exists."""
    if device_map is None:
        if max_memory is not None or offload_folder is not None:
            raise UsageError(f"{mention('max_memory' if max_memory is not None else 'offload_folder')} places the "
                             f"model with accelerate: give it with {mention('device_map', 'auto')} (or balanced, "
                             "sequential)")
        return
    if device_map not in DEVICE_MAPS:
        raise UsageError(f"{mention('device_map', device_map, quote=True)} is not one of accelerate's: "
                         f"{', '.join(DEVICE_MAPS)}")
    if device != "auto":
        raise UsageError(f"{mention('device_map')} places every layer itself; drop {mention('device')} (or drop "
                         f"{mention('device_map')})")
    if max_memory is not None:
        parse_max_memory(max_memory)


def parse_max_memory(text: str) -> dict:
    """``0=70GiB,1=70GiB,cpu=200GiB`` → accelerate's ``max_memory`` ({0: bytes, 'cpu': bytes, 'disk': bytes})."""
    import torch
    from accelerate.utils import convert_file_size_to_int

    out: dict = {}
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for part in text.split(","):
        device, _, size = (piece.strip() for piece in part.partition("="))
        match = re.fullmatch(r"(?:cuda:)?(\d{1,3})|cpu|disk", device)
        if not match or not size:
            raise UsageError(f"{mention('max_memory', text, quote=True)}: write DEVICE=SIZE pairs, e.g. "
                             "0=70GiB,cpu=200GiB (DEVICE: a GPU number, cpu or disk)")
        key = int(match[1]) if match[1] is not None else device
        if isinstance(key, int) and key >= count:
            raise UsageError(f"{mention('max_memory')} names GPU {key}, but this machine has "
                             + (f"GPUs 0-{count - 1}" if count else "no GPU"))
        try:
            out[key] = int(size) if size.isdigit() else convert_file_size_to_int(size)  # digits: bytes
        except ValueError:
            raise UsageError(f"{mention('max_memory', part.strip(), quote=True)}: {quoted(size)} is not a size like "
                             "70GiB, 512MB or 2000000") from None
        if out[key] <= 0:
            raise UsageError(f"{mention('max_memory', part.strip(), quote=True)}: the size must be more than 0")
    return out


def parse_layers(spec: str, num_layers: int | None) -> list[int] | None:
    """``all`` or ``0-11,20,30-35`` → sorted layer list; range-checked once ``num_layers`` is known."""
    if spec.strip() == "all":
        return list(range(num_layers)) if num_layers is not None else None
    ranges = []
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match:
            raise OptionError("layers", "is not understood; write e.g. 'all' or '0-11,20,30-35'", spec)
        first, last = (int(text) if len(text) <= 12 else 10 ** 12 for text in (match[1], match[2] or match[1]))
        if last < first:
            raise OptionError("layers", f"the range {quoted(part.strip())} runs backwards; write it as {last}-{first}",
                              spec)
        ranges.append((first, last))
    highest = max(last for _, last in ranges)  # checked before any list of layers is made
    limit = num_layers if num_layers is not None else MAX_LAYER_INDEX
    if highest >= limit:
        have = f"the model has layers 0-{num_layers - 1}" if num_layers is not None else "no model has that many"
        raise OptionError("layers", f"names layer {highest:,}, but {have}", spec)
    return sorted({layer for first, last in ranges for layer in range(first, last + 1)})


def windows_for(layers: list[int], window: int, num_layers: int) -> list[tuple[int, int]]:
    """Window k centred on layer l: ``max(0, l - k//2) .. min(L-1, l + ceil(k/2) - 1)`` (Geva et al.)."""
    if window > num_layers:
        raise OptionError("window", f"is wider than the model's {num_layers} layers", window)
    return [(max(0, layer - window // 2), min(num_layers - 1, layer + -(-window // 2) - 1)) for layer in layers]


class _Parser(argparse.ArgumentParser):
    """One line and exit status 2 for every error (no usage dump), no abbreviations, "did you mean" for a typo."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, formatter_class=_HelpFormatter, **kwargs)

    def error(self, message: str) -> None:
        raise UsageError(f"{message} (see {mention('help')})")

    def parse_args(self, args=None, namespace=None):
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {bounded(' '.join(extras))}{self.suggestion(extras)}")
        return namespace

    def suggestion(self, extras: list[str]) -> str:
        """``; did you mean --unit?`` for the first unknown flag that resembles one (a typo, or a shortened flag)."""
        flags = [flag for flag in self._option_string_actions if flag.startswith("--")
                 and self._option_string_actions[flag].help is not argparse.SUPPRESS]
        for extra in extras:
            if not extra.startswith("--"):
                continue
            given = extra.split("=", 1)[0]
            near = [flag for flag in flags if flag.startswith(given)] or close_matches(given, flags, 1)
            if near:
                return f"; did you mean {' or '.join(near[:3])}?"
        return ""


def close_matches(word: str, valid, count: int = 3) -> list[str]:
    """The valid words most like ``word`` (a typo), best first (difflib)."""
    import difflib

    return difflib.get_close_matches(word, list(valid), n=count, cutoff=0.6)


@dataclass(frozen=True)
class Option:
    """One command-line option as the help shows it: its section, its help text (a function of the command, vision
    or text, where they differ) and its metavar. The rest is derived: the flag from ``errors.flag`` (the one table
    of spellings, which the messages use too), and for a ``RunConfig`` field the kind of argument from its annotation
    and default (a switch, an integer, a repeatable value) and the choices from ``CHOICES``. ``kind`` is the value's
    type for an option that is not a ``RunConfig`` field (a batch's or a study's)."""

    name: str  # the RunConfig field it sets, or the parsed option's name
    group: str
    help: str | Callable[[bool], str]
    metavar: str | None = None
    vision: bool = False  # only on the vision-language command
    kind: type | None = None  # not a RunConfig field: str, int, float, or list (repeatable)


def _default_model(vision: bool) -> str:
    return f"hub id or local folder (default {VL_DEFAULT_MODEL if vision else TEXT_DEFAULT_MODEL})"


OPTIONS: tuple[Option, ...] = (
    Option("model", "input", _default_model),
    Option("demo", "input", "use a tiny offline demo model and default inputs (default off)"),
    Option("prompt", "input", "the prompt: its text, or a UTF-8 text file to read it from when the value names one",
           "TEXT|FILE"),
    Option("prompt_text", "input", "the prompt's text, always (even if it names a file)", "TEXT", kind=str),
    Option("prompt_file", "input", "read the prompt from this UTF-8 text file"),
    Option("allow_special_tokens", "input", "read control tokens typed in the prompt (e.g. <|im_end|>) as control "
                                            "tokens (default off: they are plain text)"),
    Option("images", "input", "image file; give several times for several images (default none)", "PATH",
           vision=True),
    Option("max_pixels", "input", "resize larger images down to at most this many pixels (default: the processor's)",
           vision=True),
    Option("min_pixels", "input", "resize smaller images up to at least this many pixels (default: the processor's)",
           vision=True),
    Option("raw_prompt", "input", "skip the chat template (default off)"),
    Option("mask_mode", "what to knock out",  # the text command has one choice: nothing to say
           lambda vision: "which positions to knock out (default text; special tokens are swept with text)"
           if vision else argparse.SUPPRESS),
    Option("unit", "what to knock out",
           lambda vision: "what one knockout removes: token (default), word, "
           + ("region:N (an N×N block of image tokens), image (each whole image), patch (--stage pixels and "
              "vision-encoder, the default there), " if vision else "")
           + "or groups (exactly the --group options)"),
    Option("groups", "what to knock out",
           lambda vision: "name a group of tokens: "
           + ("a pixel box x0,y0,x1,y1[@IMAGE] (inside the picture), " if vision else "")
           + "pos:10-20 (positions) or text:\"some words\" (their first occurrence in the prompt's text); repeatable "
             "(default none)", "NAME=SPEC"),
    Option("flows", "what to knock out",
           lambda vision: "block DST's queries from SRC's keys, e.g. 'question->last' (quote it); groups: "
           + ("image, image1, ..., " if vision else "") + "question, last, answer, prompt and every --group; "
             "repeatable (default none)", "SRC->DST"),
    Option("layers", "what to knock out", "window centres: 'all' (default) or e.g. '0-11,20,30-35'"),
    Option("window", "what to knock out", "number of consecutive layers knocked out together (default 1)"),
    Option("block_from", "what to knock out",
           "which queries are blocked from the unit: all (default), or only the answer positions"),
    Option("vision_attention", "what to knock out",
           "causal (default) is what the model computes; bidirectional reproduces the original tool's mask (image "
           "tokens of one image see each other both ways). Gemma 3's own masks are bidirectional inside each image: "
           "there it changes nothing", vision=True),
    Option("stage", "stages",
           "decoder (default): attention knockouts in the decoder; vision-encoder: attention knockouts between an "
           "image's patches in the ViT (--layers/--window count ViT layers); pixels: occlusion of the image the "
           "model sees; deepstack: remove a unit's DeepStack features, level by level, or replace its main "
           "embedding by the image's mean", vision=True),
    Option("fill", "stages", "--stage pixels: what replaces the occluded patches: mean (the image's mean colour, "
                             "default), blur, black or noise (seeded)", vision=True),
    Option("num_tokens", "scoring", "answer length (default 5; greedy, stops at EOS)"),
    Option("target", "scoring", "score this answer (the gold label) instead of the greedy one: every metric is about "
                                "its tokens; the greedy answer is still recorded, with whether it starts with the "
                                "target (default: the greedy answer)", "TEXT"),
    Option("contrast", "scoring", "with --target: a foil; adds the metric logit_diff_change, the change in "
                                  "log p(target) - log p(foil) (default none)", "TEXT"),
    Option("generate_top", "scoring", "run real greedy generation under the K most impactful knockouts (default 10)"),
    Option("estimate", "scoring", "estimate every knockout from one forward and backward pass (first order), then "
                                  "compute exactly only the K cells with the largest estimated effect and a random "
                                  "sample of others (the estimate's quality is reported); default: every cell "
                                  "exactly", "K"),
    Option("estimate_sample", "scoring", "with --estimate: how many random other cells to compute exactly (default K)",
           "R"),
    Option("estimate_seed", "scoring", "with --estimate: the sample's seed (default 0)", "N"),
    Option("output", "output", "result name under OUTPUT_DIR (default mask_impact_YYYYMMDD_HHMMSS, the start time; a "
                               "batch: its folder, default the YAML file's name)"),
    Option("output_dir", "output", "where results go (default output)"),
    Option("overwrite", "output", "replace an existing result of the same name (default off: refused)"),
    Option("resume", "output", "continue a killed run (or batch) where it stopped (default off)"),
    Option("figures", "output", "also write figures beside the results: OUTPUT_DIR/NAME.heatmap.FORMAT, .overlay "
                                "(units on the image) or .flows (with --flow); needs matplotlib (default none)",
           "png|svg|pdf"),
    Option("figure_options", "output", "with --figures: units=A-B, vmax=X, title=TEXT, size=WxH (inches), "
                                       "font_size=PT, greyscale=1, contours=1; repeat for several (default none)",
           "KEY=VALUE"),
    Option("html", "output", "skip OUTPUT_DIR/NAME.html, the viewer with this result embedded (default: written)"),
    Option("progress", "output", "hide the progress bar (default: shown)"),
    Option("engine", "scale-out", "fast (default), or naive: one full forward per knockout (the reference, slow)"),
    Option("batch_size", "scale-out", "knockouts per forward (default: chosen from free memory)"),
    Option("device", "scale-out", "auto (default), cpu, cuda or cuda:N"),
    Option("dtype", "scale-out", "default auto: bfloat16 on CUDA, float32 on CPU"),
    Option("threads", "scale-out", "CPU threads (default: torch's own count; auto: the CPUs other processes leave "
                                   "idle)", "N|auto"),
    Option("device_map", "scale-out", "spread a model too large for one device over the GPUs and the CPU with "
                                      "accelerate (default none: the whole model on --device); for several processes "
                                      "use accelerate launch", "|".join(DEVICE_MAPS)),
    Option("max_memory", "scale-out", "with --device-map: memory each device may hold, e.g. 0=70GiB,cpu=200GiB "
                                      "(default: accelerate's estimate)", "DEV=SIZE,..."),
    Option("offload_folder", "scale-out", "with --device-map: where weights that fit nowhere else go (default: a "
                                          "temporary folder)"),
    Option("config", "batches", "a batch: a YAML file with defaults: and runs:, one model load; the other options "
                                "given apply to every run (default: one run)", "YAML", kind=str),
    Option("dataset", "studies", "a study: JSON Lines, CSV or Parquet, or a folder saved by datasets' save_to_disk "
                                 "(with --demo: demo-shapes, fresh pictures of the demo's task); one run per row, the "
                                 "other options given apply to every row, --generate-top defaulting to 0 (default: "
                                 "one run)", "FILE", kind=str),
    Option("fields", "studies", "which columns hold prompt, image, target, contrast and group (default: the columns "
                                "of those names)", "FIELD=COLUMN,...", kind=list),
    Option("limit", "studies", "study the first N rows (default all)", "N", kind=int),
    Option("sample", "studies", "study N rows drawn at random, seeded (default all)", "N", kind=int),
    Option("seed", "studies", "the seed of --sample and of the bootstrap (default 0)", "N", kind=int),
    Option("only_correct", "studies", "measure only the rows whose greedy answer starts with their target, as the "
                                      "papers do (default off: every row)"),
    Option("ci", "studies", "the confidence level of the intervals, a bootstrap over rows (default 0.95)", "LEVEL",
           kind=float),
)


def argument_kind(option: Option, vision: bool) -> dict:
    """``add_argument``'s keywords besides the flag, the destination and the help: from ``RunConfig``'s annotation
    and default of the field (a bool: a switch that sets the other value; a list: repeatable; an int: parsed as one),
    from ``CHOICES``, or from the option's own ``kind``."""
    kind = option.kind or FIELD_TYPES[option.name]
    keywords: dict = {} if option.metavar is None else {"metavar": option.metavar}
    if kind is bool:
        default = next(f.default for f in fields(RunConfig) if f.name == option.name)
        return {"action": "store_false" if default else "store_true"}
    if kind is list:
        return {**keywords, "action": "append"}
    if kind in (int, float):
        keywords["type"] = kind
    if option.name in CHOICES:
        keywords["choices"] = CHOICES[option.name] if vision else text_choices(option.name)
    return keywords


def text_choices(name: str) -> tuple[str, ...]:
    """A choice list on the text command: the first alone for the choices that concern images."""
    return CHOICES[name][:1] if name in ("mask_mode", "stage") else CHOICES[name]


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description and the examples as written; each option's help wrapped."""

    def __init__(self, prog: str):
        super().__init__(prog, max_help_position=30, width=min(120, shutil.get_terminal_size().columns))


def build_parser(vision: bool) -> argparse.ArgumentParser:
    """Options left out of the command line are absent from the parsed namespace (not defaulted), so
    a YAML batch can tell what the user really gave; ``RunConfig`` holds the defaults, and each help
    text says it. Nothing here imports torch: ``--help`` and a mistyped flag answer at once."""
    from .version import __version__

    what = ("vision-language models (Qwen3-VL, Qwen2-VL, Qwen2.5-VL, LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, "
            "Gemma 3; text + images)" if vision
            else "text-only causal LMs (Qwen3, Qwen2, Llama, Mistral, Gemma 2, Gemma 3)")
    top = _Parser(description=textwrap.fill(f"Attention-knockout analysis for {what}: which input tokens the model "
                                            "needs, at which layers, to produce its answer.", 100),
                  usage="%(prog)s (--demo | --prompt TEXT|FILE | --prompt-text TEXT | --prompt-file FILE"
                        + (" [--image PATH]..." if vision else "") + " | --config YAML) [options]",
                  epilog=examples(vision), argument_default=argparse.SUPPRESS)
    top.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    section = {name: top.add_argument_group(name, text) for name, text in (
        ("input", "a prompt is required: --prompt, --prompt-text or --prompt-file (--demo brings its own)"),
        ("what to knock out", "each knockout blocks a unit's keys from queries, in a window of layers"),
        ("stages", "where a unit is removed" if vision else None),
        ("scoring", "the answer scored (teacher-forced) is the model's own greedy continuation, or --target"),
        ("output", None),
        ("scale-out", "devices, memory, speed"),
        ("batches", None),
        ("studies", "a dataset of prompts (and images, targets): one run per row, then averages with confidence "
                    "intervals over the rows"),
    )}
    for option in OPTIONS:
        if option.vision and not vision:
            continue
        help_text = option.help(vision) if callable(option.help) else option.help
        section[option.group].add_argument(flag(option.name), dest=option.name, help=help_text,
                                           **argument_kind(option, vision))
    return top


def examples(vision: bool) -> str:
    """The help's closing examples."""
    if vision:
        command = "mask-impact-vl"
        lines = [f"{command} --demo",
                 f"{command} --image cat.png --prompt \"What's in this image?\" --mask-mode vision --unit region:2",
                 f"{command} --image cat.png --prompt \"What color is the cat?\" --flow 'image->last' --window 3",
                 f"{command} --image cat.png --prompt \"What's here?\" --stage pixels --fill blur --figures png",
                 f"{command} --config prompts_config_vl.yaml",
                 f"{command} --dataset vqa.jsonl --fields target=answer --flow 'image->last' --window 3 --only-correct"]
    else:
        command = "mask-impact"
        lines = [f"{command} --demo",
                 f"{command} --model Qwen/Qwen3-4B --prompt-file prompt.txt --num-tokens 10 --unit word",
                 f"{command} --prompt \"A=3, B=7. What is B?\" --flow 'question->last' --layers 0-11",
                 f"{command} --config prompts_config.yaml",
                 f"{command} --dataset facts.csv --fields target=object --flow 'subject->last' --window 9"]
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def cli_options(argv: list[str] | None, vision: bool) -> dict:
    """Only the options the user actually gave."""
    return vars(build_parser(vision).parse_args(argv))


def prompt_from_command_line(options: dict) -> tuple[dict, str | None]:
    """The command line's prompt options as settings, and a note for stderr (or None).

    ``--prompt VALUE`` reads the file VALUE when it names an existing regular file, as the original tool's
    ``--prompt prompt.txt`` did; a VALUE that looks like a file name (no white space, a text file's suffix) but
    names none is refused rather than analysed as those few characters. ``--prompt-text`` is always text (YAML's
    ``prompt:`` and the API's prompt are too); ``--prompt-file`` always a file."""
    given = [name for name in ("prompt", "prompt_text", "prompt_file") if name in options]
    if len(given) > 1:
        raise UsageError(f"give one prompt: {mention(given[0])} or {mention(given[1])}, not both")
    options = dict(options)
    if "prompt_text" in options:
        options["prompt"] = options.pop("prompt_text")
        return options, None
    value = options.get("prompt")
    if value is None:
        return options, None
    if os.path.isfile(value):
        options["prompt_file"] = options.pop("prompt")
        return options, (f"note: --prompt {bounded(value)} names a file: the prompt is read from it (use "
                         "--prompt-text to analyse these characters as text)")
    if not any(c.isspace() for c in value) and value.lower().endswith(PROMPT_FILE_SUFFIXES):
        raise UsageError(f"no prompt file {quoted(value)} ({mention('prompt')} reads a file when its value names "
                         f"one); to analyse these characters as text use {mention('prompt_text')}")
    return options, None


def make_config(layers: list[dict], vision: bool) -> RunConfig:
    """Merge option layers, lowest precedence first, into a validated ``RunConfig``."""
    merged: dict = {}
    for layer in layers:
        if any(layer.get(source) is not None for source in PROMPT_SOURCES):
            for source in PROMPT_SOURCES:  # the higher layer's prompt replaces the lower one's, whichever kind
                merged.pop(source, None)
        merged.update(layer)
    if merged.get("demo"):
        if merged.get("model") not in (None, "demo"):
            raise UsageError(f"{mention('demo')} brings its own model; drop {mention('model')}, or drop "
                             f"{mention('demo')}")
        merged["model"] = "demo"
        if merged.get("prompt_file") is None:
            merged.setdefault("prompt", DEMO_PROMPT_VL if vision else DEMO_PROMPT_TEXT)
        if vision:
            merged.setdefault("images", [str(DEMO_IMAGE)])
    merged.setdefault("model", VL_DEFAULT_MODEL if vision else TEXT_DEFAULT_MODEL)
    if isinstance(merged.get("unit"), str):
        merged["unit"] = merged["unit"].strip()
    stage = STAGES.get(merged.get("stage")) if vision else None
    if stage is not None:
        merged.setdefault("unit", stage.default_unit)
        if stage.images_only:
            merged.setdefault("mask_mode", "vision")
    if vision and isinstance(merged.get("unit"), str) and merged["unit"].startswith(("region", "image")):
        merged.setdefault("mask_mode", "vision")  # what these units group
    config = RunConfig(**merged)
    config.validate(vision)
    if config.output is None:
        config.output = datetime.now().strftime("mask_impact_%Y%m%d_%H%M%S")
    return config


def output_paths(config: RunConfig) -> dict[str, Path]:
    kinds = ("json", "csv", "html") if config.html else ("json", "csv")
    return {ext: output_dir(config.output_dir) / f"{config.output}.{ext}" for ext in kinds}


def figure_paths(base: Path, fmt: str, kinds) -> dict[str, Path]:
    """``BASE.KIND.FORMAT`` for each figure kind (``output/cat`` → ``output/cat.heatmap.png``)."""
    return {kind: base.with_name(f"{base.name}.{kind}.{fmt}") for kind in kinds}


def possible_figures(config: RunConfig) -> dict[str, Path]:
    """The figures a run may write (which ones it does depends on its units: figures.kinds_for)."""
    if config.figures is None:
        return {}
    kinds = (["heatmap"] + (["flows"] if config.flows else ["overlay"] if config.images else [])
             + (["estimate"] if config.estimate else []))
    return figure_paths(output_dir(config.output_dir) / config.output, config.figures, kinds)


def output_dir(value: str) -> Path:
    """``--output-dir`` as the user means it: ``~`` is their home folder."""
    return Path(value).expanduser()
