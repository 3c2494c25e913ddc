"""The run options that need no model, parsed and checked before anything loads: the stages and what each one
accepts, and the unit, group and flow options as written.

The lowest layer with ``errors.py`` (docs/DESIGN.md §7): it imports nothing else of the project, and no torch, so
the command line checks its options at once. The core builds on these values: ``stages.py`` gives each stage its
engines and plan, ``units.py`` resolves the options against a tokenized prompt.

A stage (``Stage``, the registry ``STAGES``) says what it removes (for refusals), which options do not apply to it
(``check``), which units it takes and whether a first-order estimate of it exists.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache

from .errors import UsageError, mention, mention_name, quoted, spelled

FIGURE_FORMATS = ("png", "svg", "pdf")  # --figures: what matplotlib writes (figures.py draws them)
MAX_REGION = 1024
MAX_POSITIONS = 1 << 20  # positions a pos: group may list
GROUP_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
IMAGE_GROUP = re.compile(r"image([1-9][0-9]{0,3})")
BUILTIN_GROUPS = ("image", "question", "last", "answer", "prompt")  # and image1, image2, ...


FIGURE_OPTIONS = ("units", "vmax", "title", "size", "font_size", "greyscale", "contours")  # plot()'s, --figure-option's


def parse_figure_options(items: list[str]) -> dict:
    """``--figure-option KEY=VALUE`` (repeated) as ``figures.draw``'s options, checked in the command line's words
    (``UsageError``): ``units=A-B``, ``vmax=X``, ``title=TEXT``, ``size=WxH``, ``font_size=PT``, ``greyscale=1``,
    ``contours=1``."""
    options = {}
    for item in items:
        key, equals, value = str(item).partition("=")
        key = key.strip().replace("-", "_")
        if not equals or key not in FIGURE_OPTIONS:
            raise UsageError(f"{mention('figure_options', item, quote=True)} is not KEY=VALUE with KEY one of: "
                             f"{', '.join(FIGURE_OPTIONS)}")
        try:
            if key == "units":
                first, _, last = value.partition("-")
                options[key] = (int(first), int(last or first))
            elif key in ("vmax", "font_size"):
                options[key] = float(value)
                if not options[key] > 0 or not math.isfinite(options[key]):
                    raise ValueError
            elif key == "size":
                width, _, height = value.lower().partition("x")
                options[key] = (float(width), float(height))
                if not all(0 < v <= 100 for v in options[key]):
                    raise ValueError
            elif key in ("greyscale", "contours"):
                options[key] = value.strip().lower() in ("1", "true", "yes", "on")
            else:
                options[key] = value
        except ValueError:
            raise UsageError(f"{mention('figure_options', item, quote=True)}: {key} takes " + {
                "units": "A-B (unit indices)", "vmax": "a positive number", "font_size": "a positive number",
                "size": "WxH in inches (each above 0, at most 100)"}.get(key, "a value")) from None
    return options


def figures_available() -> bool:
    """matplotlib is installed (figures need it; checked without importing it)."""
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


# --- the stages -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Stage:
    """Where a unit is removed, as the options see it; subclasses refuse what does not apply (``check``)."""

    name: str
    removes: str = ""  # what it removes, in refusals: "--stage pixels occludes image patches"
    on_patches: bool = False  # its units are the patches of ``pixel_values`` (their default: ``patch``)
    unit_kinds: str = "token, word, region:N, image or groups"  # what ``--unit`` may be, said when one is refused
    no_layers: str = ""  # a stage without layers: the refusal of --layers, --window and --block-from
    estimable: bool = False  # --estimate has a first-order estimate of it
    images_only: bool = True  # it removes image tokens only: a run needs an image, its units are vision units

    @property
    def default_unit(self) -> str:
        return "patch" if self.on_patches else "token"

    def check(self, config) -> None:
        """The settings that do not apply to this stage, refused before the model loads."""
        if config.fill != "mean" and self.name != "pixels":
            raise UsageError(f"{mention('fill', config.fill)} says what replaces occluded pixels, and only "
                             f"{mention('stage', 'pixels')} occludes them (this run is {mention('stage', self.name)}, "
                             f"where nothing is filled); drop {mention('fill')}, or use {mention('stage', 'pixels')}")
        if self.no_layers and (config.layers != "all" or config.window != 1 or config.block_from != "all"):
            raise UsageError(self.no_layers)


class VisionEncoderStage(Stage):
    def check(self, config) -> None:
        super().check(config)
        if config.block_from != "all":
            raise UsageError(f"{mention('block_from', 'answer')} restricts decoder queries; in the vision encoder "
                             "every other patch of the image is blocked from the unit; drop it")


PATCH_UNITS = "patch, token, region:N, image or groups"
STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    Stage("decoder", estimable=True, images_only=False),
    VisionEncoderStage("vision-encoder", "knocks out image patches in the vision encoder", on_patches=True,
                       unit_kinds=PATCH_UNITS),
    Stage("pixels", "occludes image patches", on_patches=True, unit_kinds=PATCH_UNITS,
          no_layers=f"{mention('stage', 'pixels')} occludes the image before the model: it has no layers, so "
                    f"{mention('layers')}, {mention('window')} and {mention('block_from')} do not apply; drop them"),
    Stage("deepstack", "removes image features", unit_kinds="token, region:N, image or groups",
          no_layers=f"{mention('stage', 'deepstack')} removes features where the model adds them (its rows are the "
                    f"DeepStack levels and the main embedding), so {mention('layers')}, {mention('window')} and "
                    f"{mention('block_from')} do not apply; drop them"),
)}


# --- units, groups and flows as written ---------------------------------------------------------------------------

@dataclass(frozen=True)
class UnitChoice:
    kind: str  # token | word | region | image | groups
    size: int = 1  # region side, in merged-grid cells

    @property
    def groups_vision(self) -> bool:
        return self.kind in ("region", "image", "patch")


def parse_unit(text: str) -> UnitChoice:
    """``token``, ``word``, ``region:N``, ``image``, ``groups`` or ``patch``."""
    text = text.strip() if isinstance(text, str) else text
    if text in ("token", "word", "image", "groups", "patch"):
        return UnitChoice(text)
    match = re.fullmatch(r"region:(\d{1,6})", text.strip())
    if match:
        size = int(match[1])
        if not 1 <= size <= MAX_REGION:
            raise UsageError(f"{mention('unit', f'region:{size}')}: the block side must be between 1 and "
                             f"{MAX_REGION} tokens")
        return UnitChoice("region", size)
    raise UsageError(f"{mention('unit', text, quote=True)} is not understood; use token, word, region:N (e.g. "
                     f"region:2), image, groups, or patch (with {mention('stage', 'pixels')} or vision-encoder)")


@dataclass(frozen=True)
class GroupSpec:
    """A ``--group NAME=SPEC`` as written: ``kind`` box (``value``: x0, y0, x1, y1; ``image``: 1-based),
    pos (``value``: the positions) or text (``value``: the text)."""

    name: str
    kind: str
    value: tuple
    image: int | None = None
    source: str = ""

    def __str__(self) -> str:
        return self.source


def _positions(text: str, what: str) -> tuple[int, ...]:
    positions: list[int] = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d{1,7})\s*(?:-\s*(\d{1,7})\s*)?", part)
        if not match:
            raise UsageError(f"{what}: {quoted(part.strip())} is not a position or a range like 10-20")
        first, last = int(match[1]), int(match[2] or match[1])
        if last < first:
            raise UsageError(f"{what}: the range {first}-{last} runs backwards; write it as {last}-{first}")
        if last - first + len(positions) >= MAX_POSITIONS:
            raise UsageError(f"{what}: more than {MAX_POSITIONS:,} positions; no prompt is that long")
        positions.extend(range(first, last + 1))
    return tuple(sorted(set(positions)))


def parse_group(text: str) -> GroupSpec:
    """``NAME=x0,y0,x1,y1[@N]``, ``NAME=pos:10-20`` or ``NAME=text:quick brown`` (quotes optional)."""
    if not isinstance(text, str) or "=" not in text:
        raise UsageError(f"{mention_name('group', quoted(text))} is not understood; write NAME=x0,y0,x1,y1[@IMAGE], "
                         "NAME=pos:10-20 or NAME=text:\"some words\"")
    name, spec = (part.strip() for part in text.split("=", 1))
    what = mention_name("group", name)
    if not GROUP_NAME.fullmatch(name) or len(name) > 64:
        raise UsageError(f"{mention_name('group', f'name {quoted(name)}')} must be letters, digits and '_' (not "
                         "starting with a digit, at most 64 characters)")
    if name in BUILTIN_GROUPS or IMAGE_GROUP.fullmatch(name):
        raise UsageError(f"{mention_name('group', f'name {name!r}')} is built in ({', '.join(BUILTIN_GROUPS)}, "
                         "image1, image2, ...); choose another name")
    if spec.startswith("pos:"):
        return GroupSpec(name, "pos", _positions(spec[4:], what), source=text)
    if spec.startswith("text:"):
        words = spec[5:].strip()
        if len(words) >= 2 and words[0] == words[-1] and words[0] in "\"'":
            words = words[1:-1]
        if not words.strip():
            raise UsageError(f"{what}: the text span is empty; write e.g. {name}=text:\"quick brown\"")
        return GroupSpec(name, "text", (words,), source=text)
    box, _, image = spec.partition("@")
    try:
        values = tuple(float(v) for v in box.split(","))
        number = int(image) if image else None
    except ValueError:
        values, number = (), None
    if len(values) != 4 or not all(math.isfinite(v) for v in values) or (image and number is None):
        raise UsageError(f"{what}={quoted(spec)} is not understood; write a pixel box x0,y0,x1,y1 (optionally "
                         "@IMAGE, counting from 1), pos:10-20 or text:\"some words\"")
    x0, y0, x1, y1 = values
    if x1 <= x0 or y1 <= y0:
        raise UsageError(f"{what}: the box {box} is empty; write x0,y0,x1,y1 with x0 < x1 and y0 < y1")
    if number is not None and number < 1:
        raise UsageError(f"{what}: images are counted from 1 (got @{number})")
    return GroupSpec(name, "box", values, number, source=text)


@dataclass(frozen=True)
class FlowSpec:
    source: str
    target: str

    @property
    def label(self) -> str:
        return f"{self.source}->{self.target}"


def parse_flow(text: str) -> FlowSpec:
    """``SRC->DST``: DST's queries are blocked from SRC's keys."""
    parts = text.split("->") if isinstance(text, str) else []
    if len(parts) != 2 or not all(part.strip() for part in parts):
        raise UsageError(f"{mention_name('flow', quoted(text))} is not understood; write SOURCE->DESTINATION, e.g. "
                         "'image->last' (quote it in the shell)")
    return FlowSpec(parts[0].strip(), parts[1].strip())


@dataclass(frozen=True)
class UnitOptions:
    """The ``unit``, ``groups`` and ``flows`` options as typed values (``text``: the unit as written, for
    messages). A run's options are parsed once (``parse_units``); the checks (``check_units``) and the units of a
    prompt (units.build_units) read these."""

    text: str
    unit: UnitChoice
    groups: tuple[GroupSpec, ...]
    flows: tuple[FlowSpec, ...]


@lru_cache(maxsize=256)
def _parsed_units(unit: str, groups: tuple[str, ...], flows: tuple[str, ...]) -> UnitOptions:
    return UnitOptions(unit, parse_unit(unit), tuple(map(parse_group, groups)), tuple(map(parse_flow, flows)))


def parse_units(unit: str, groups=(), flows=()) -> UnitOptions:
    """The unit, group and flow options as written (``config.unit``, ``groups``, ``flows``) as ``UnitOptions``;
    one line (UsageError) for the first that is not understood. Equal options are parsed once per process (a value
    that cannot be a cache key, a list in a YAML list say, is parsed uncached, and refused there)."""
    groups, flows = tuple(groups or ()), tuple(flows or ())
    hashable = all(isinstance(value, str) for value in (unit, *groups, *flows))
    return (_parsed_units if hashable else _parsed_units.__wrapped__)(unit, groups, flows)


def check_units(options: UnitOptions, images: int, vision: bool, stage: str = "decoder") -> None:
    """Every check of the unit, group and flow options that needs no model (``images``: how many are given)."""
    unit, choice, specs, flows = options.text, options.unit, list(options.groups), list(options.flows)
    where = STAGES[stage]
    if where.images_only:
        what = where.removes
        if not vision:
            raise UsageError(f"{mention('stage', stage)} {what}; text-only models have none")
        if not images:
            raise UsageError(f"{mention('stage', stage)} {what}, but no {mention('images')} is given")
        if flows:
            raise UsageError(f"{mention('flows')} blocks attention in the decoder; it has no meaning with "
                             f"{mention('stage', stage)}")
        if choice.kind == "word":
            raise UsageError(f"{mention('stage', stage)} {what}; use {mention('unit')} {where.unit_kinds}")
        text = next((spec for spec in specs if spec.kind == "text"), None)
        if text is not None:
            raise UsageError(f"{mention_name('group', text.name)} is a text span; {mention('stage', stage)} {what} "
                             "only")
    if choice.kind == "patch" and not where.on_patches:
        raise UsageError(f"{mention('unit', 'patch')} is a 16×16-pixel patch of the image: it needs "
                         f"{mention('stage', 'pixels')} or vision-encoder")
    names = [spec.name for spec in specs]
    duplicate = next((name for name in names if names.count(name) > 1), None)
    if duplicate:
        raise UsageError(f"{mention_name('group', duplicate)} is given twice; give each group one name")
    if choice.groups_vision and not vision:
        raise UsageError(f"{mention('unit', unit)} groups image tokens; text-only models have none (use token, word "
                         "or groups)")
    if choice.groups_vision and not images:
        raise UsageError(f"{mention('unit', unit)} groups image tokens, but no {mention('images')} is given")
    if choice.kind == "groups" and not specs:
        raise UsageError(f"{mention('unit', 'groups')} sweeps the {mention('groups')} options, but none is given; "
                         f"add {mention('groups', 'NAME=SPEC')}")
    for spec in specs:
        group = mention_name("group", spec.name)
        if spec.kind == "box":
            if not images:
                raise UsageError(f"{group} is a pixel box, but no {mention('images')} is given")
            if spec.image is None and images > 1:
                raise UsageError(f"{group}: {images} images are given; say which one the box is on with @N (e.g. "
                                 f"{spec.source}@1)")
            if spec.image is not None and spec.image > images:
                raise UsageError(f"{group}: @{spec.image} names image {spec.image}, but "
                                 f"{images} image{'s are' if images != 1 else ' is'} given")
    if flows and choice.kind != "token":
        raise UsageError(f"{mention('flows')} runs sweep the flows themselves; drop {mention('unit', unit)}")
    for flow in flows:
        for name in (flow.source, flow.target):
            check_group_name(name, names, images, vision, mention_name("flow", flow.label))
        if flow.source == "answer":
            raise UsageError(f"{mention_name('flow', flow.label)}: answer can only be a flow's destination (its "
                             "positions follow the prompt, so nothing attends to them from it)")
    labels = [flow.label for flow in flows]
    repeated = next((label for label in labels if labels.count(label) > 1), None)
    if repeated:
        raise UsageError(f"{mention_name('flow', repeated)} is given twice")
    used = {name for flow in flows for name in (flow.source, flow.target)}
    unused = next((name for name in names if name not in used), None) if choice.kind != "groups" else None
    if unused:
        raise UsageError(f"{mention_name('group', unused)} is not used: sweep the groups with "
                         f"{mention('unit', 'groups')}, or name it in {spelled('a --flow', 'flows=', 'flows')}")


def check_group_name(name: str, groups: list[str], images: int, vision: bool, what: str) -> None:
    image = IMAGE_GROUP.fullmatch(name)
    if name == "image" or image:
        if not vision:
            raise UsageError(f"{what}: {name!r} names image tokens; text-only models have none")
        if not images:
            raise UsageError(f"{what}: {name!r} names image tokens, but no {mention('images')} is given")
        if image and int(image[1]) > images:
            raise UsageError(f"{what}: {name!r} names image {image[1]}, but {images} "
                             f"image{'s are' if images != 1 else ' is'} given")
        return
    if name not in BUILTIN_GROUPS and name not in groups:
        known = ", ".join(list(BUILTIN_GROUPS) + (["image1", "..."] if vision else []) + groups)
        raise UsageError(f"{what}: no group is named {name!r}; known groups: {known} (name others with "
                         f"{mention('groups')})")

