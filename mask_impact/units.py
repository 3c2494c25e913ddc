"""What one swept knockout removes: units (tokens, words, image regions, whole images, named groups) and flows.

The sweep's unit of work is a ``Unit``: a set of key positions and the query positions blocked from
them (spec.py's ``Knockout``), with a label and, for vision units, the image and pixel box it covers.

- ``--unit token`` (default): one unit per position the ``--mask-mode`` selects.
- ``--unit word``: the text tokens of one word together. Words come from the tokenizer's character
  offsets: a word is a run of letters, digits and underscores (with inner apostrophes, hyphens and
  dots: ``don't``, ``well-known``, ``3.14``), or a run of other non-space characters; a token belongs to
  the word holding its first non-space character, a token of spaces alone to the word after it. Special
  tokens and line breaks stay single.
- ``--unit region:N``: the vision tokens of an N×N block of the merged grid (edge blocks are partial).
- ``--unit image``: every vision token of one image.
- ``--unit groups``: exactly the ``--group``s.
- ``--flow SRC->DST``: one unit per flow; its keys are SRC's positions, its queries DST's.

Groups (``--group NAME=SPEC``, and the built-in names of ``BUILTIN_GROUPS``) resolve against the prompt:
a pixel box (``x0,y0,x1,y1[@N]``, original-image pixels inside image N: the vision tokens of image N whose
boxes overlap it; a box reaching outside the picture is refused, with the part inside it suggested), a position
list (``pos:10-20,25``) or a text span (``text:quick brown``: the tokens of its first occurrence in the user's
text).

The options are parsed once and checked before the model loads (options.py: ``parse_units``, a cached
``UnitOptions``, and ``check_units``); ``build_units`` resolves those values here once the prompt is tokenized. No torch
at import: the command line's ``--help`` and its early checks stay quick.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import UsageError, mention, mention_name, quoted
from .options import (BUILTIN_GROUPS, IMAGE_GROUP, STAGES, GroupSpec, UnitChoice, check_units,  # noqa: F401
                      parse_flow, parse_group, parse_unit, parse_units)
from .patches import PatchLayout, merge_size, patch_box, patch_rows, token_numbers

UNIT_KINDS = ("token", "word", "region", "image", "group", "flow")
WORD = re.compile(r"\w+(?:['’.\-]\w+)*|[^\w\s]+")


# --- resolved against a prompt ---------------------------------------------------------------------------------

@dataclass
class Unit:
    """One swept knockout: ``keys`` blocked from ``queries`` (None: every query) and every position from
    ``queries_from`` on (the answer), with what a reader needs to place it."""

    index: int
    kind: str  # one of UNIT_KINDS
    label: str
    keys: list[int]
    queries: list[int] | None = None
    queries_from: int | None = None
    modality: str = "text"  # text | vision | special | mixed
    image: int | None = None  # 0-based image index, for units inside one image
    box: list[float] | None = None  # [x0, y0, x1, y1] original-image pixels: the union of its tokens' boxes
    patches: list[int] | None = None  # --stage pixels: the rows of pixel_values it replaces

    def knockout(self):
        from .spec import Knockout

        queries = None if self.queries is None else tuple(self.queries)
        return Knockout(tuple(self.keys), queries, self.queries_from)

    def as_dict(self) -> dict:
        return {"index": self.index, "kind": self.kind, "label": self.label, "keys": self.keys,
                "queries": self.queries, "queries_from": self.queries_from, "modality": self.modality,
                "image": self.image, "box": self.box, "patches": self.patches}


@dataclass
class Group:
    """A named set of positions; ``tail``: also every position from there on (the answer)."""

    name: str
    positions: list[int]
    tail: int | None = None
    box: list[float] | None = None
    image: int | None = None


def token_spans(tokenizer, ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
    """The decoded text of ``ids`` and each token's character span in it, from the tokenizer's offsets
    (re-encoding the text); where re-encoding gives other ids, by decoding growing prefixes."""
    text = tokenizer.decode(ids)
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if encoded["input_ids"] == ids:
            return text, [tuple(span) for span in encoded["offset_mapping"]]
    except (NotImplementedError, TypeError, ValueError):  # a slow tokenizer has no offsets
        pass
    spans, end = [], 0
    for i in range(len(ids)):
        new_end = len(tokenizer.decode(ids[: i + 1]))
        spans.append((min(end, new_end), new_end))
        end = new_end
    return text, spans


def _runs(positions: list[int]) -> list[list[int]]:
    """Maximal runs of consecutive positions."""
    runs: list[list[int]] = []
    for p in positions:
        if runs and runs[-1][-1] == p - 1:
            runs[-1].append(p)
        else:
            runs.append([p])
    return runs


def words(prompt, tokenizer, positions: list[int]) -> list[list[int]]:
    """``positions`` (text tokens) grouped into words, in order."""
    ids = prompt.input_ids[0].tolist()
    grouped: list[list[int]] = []
    for run in _runs(positions):
        text, spans = token_spans(tokenizer, [ids[p] for p in run])
        starts = [match.start() for match in WORD.finditer(text)]
        ends = [match.end() for match in WORD.finditer(text)]
        last_word = None
        for p, (start, end) in zip(run, spans):
            piece = text[start:end]
            reach = len(text) if piece and piece.isspace() and "\n" not in piece and "\r" not in piece else end
            first = next((i for i in range(start, reach) if not text[i].isspace()), None)
            word = None if first is None else next((w for w, (s, e) in enumerate(zip(starts, ends)) if s <= first < e),
                                                   None)
            if word is not None and word == last_word:
                grouped[-1].append(p)
            else:
                grouped.append([p])
            last_word = word
    return grouped


def regions(prompt, positions: list[int], size: int | None) -> list[list[int]]:
    """Vision ``positions`` grouped by image, then by ``size``×``size`` block of the merged grid (raster order; each
    view of LLaVA-NeXT, ``t``, on its own; tokens without a box, its image newlines, in no block); ``size`` None:
    one group per image."""
    blocks: dict[tuple, list[int]] = {}
    for p in positions:
        tok = prompt.tokens[p]
        if size is not None and tok.box is None:
            continue
        key = (tok.image,) if size is None else (tok.image, tok.t, tok.row // size, tok.col // size)
        blocks.setdefault(key, []).append(p)
    return [blocks[key] for key in sorted(blocks)]


def exact_box(prompt, tok) -> tuple[float, float, float, float]:
    """A vision token's box in original-image pixels, unrounded (``tok.box`` is rounded to 0.01 for reading)."""
    info = prompt.images[tok.image]
    if info.layout is not None:  # views (LLaVA-NeXT's): the family places the token
        return prompt.adapter.view_token_box(info, _rank_in_image(prompt, tok))
    rows = 1 + max(t.row for t in prompt.tokens if t.image == tok.image and t.row is not None)
    cols = 1 + max(t.col for t in prompt.tokens if t.image == tok.image and t.col is not None)
    if info.crop is None:  # the grid tiles the whole picture
        return (tok.col * info.width / cols, tok.row * info.height / rows, (tok.col + 1) * info.width / cols,
                (tok.row + 1) * info.height / rows)
    left, top, width, height = info.crop  # the grid tiles the crop, in resized pixels
    sx, sy = info.width / info.resized_width, info.height / info.resized_height
    return ((left + tok.col * width / cols) * sx, (top + tok.row * height / rows) * sy,
            (left + (tok.col + 1) * width / cols) * sx, (top + (tok.row + 1) * height / rows) * sy)


def _rank_in_image(prompt, tok) -> int:
    """Which of its image's vision tokens ``tok`` is (0 for the first; an image's tokens are one run)."""
    return tok.index - next(t.index for t in prompt.tokens if t.image == tok.image)


def overlaps(box, other) -> bool:
    """Whether two boxes ``[x0, y0, x1, y1]`` share some area."""
    return box[0] < other[2] and box[2] > other[0] and box[1] < other[3] and box[3] > other[1]


def union_box(prompt, positions: list[int]) -> list[float] | None:
    """The union of the tokens' boxes, for tokens of one image (None if they span several, or none has a box)."""
    boxes = [prompt.tokens[p].box for p in positions if prompt.tokens[p].box is not None]
    if not boxes or len({prompt.tokens[p].image for p in positions}) > 1:
        return None
    return [min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)]


def modality_of(prompt, positions: list[int]) -> str:
    kinds = {prompt.tokens[p].modality for p in positions}
    return kinds.pop() if len(kinds) == 1 else "mixed"


def image_of(prompt, positions: list[int]) -> int | None:
    images = {prompt.tokens[p].image for p in positions}
    return images.pop() if len(images) == 1 else None


def _label(prompt, kind: str, positions: list[int], tokenizer=None) -> str:
    tokens = [prompt.tokens[p] for p in positions]
    if kind == "token":  # an image token by its place: their texts are all the same placeholder
        first = tokens[0]
        if first.modality != "vision":
            return first.text
        part = f" {first.part}" if first.part else ""
        return f"image{first.image + 1}{part} r{first.row}" + ("" if first.col is None else f" c{first.col}")
    if kind == "word":  # decoded together: a character split over tokens comes out whole
        text = tokenizer.decode([tok.id for tok in tokens]) if tokenizer is not None else "".join(t.text for t in tokens)
        return text.strip() or text
    first = tokens[0]
    if kind == "image":
        return f"image{first.image + 1}"
    rows = sorted({tok.row for tok in tokens})
    cols = sorted({tok.col for tok in tokens})
    span = lambda values: f"{values[0]}" if len(values) == 1 else f"{values[0]}-{values[-1]}"  # noqa: E731
    frame = f" {first.part}" if first.part else (f" t{first.t}" if first.t else "")
    return f"image{first.image + 1}{frame} r{span(rows)} c{span(cols)}"


def _unit(prompt, index: int, kind: str, label: str, keys: list[int], queries=None, queries_from=None) -> Unit:
    return Unit(index, kind, label, keys, queries, queries_from, modality_of(prompt, keys), image_of(prompt, keys),
                union_box(prompt, keys))


def question_positions(prompt, tokenizer) -> list[int]:
    """The positions of the user's text (``question``); with ``--raw-prompt``, every plain-text token."""
    if prompt.user_positions is not None:
        return list(prompt.user_positions)
    return [tok.index for tok in prompt.tokens if tok.modality == "text"]


def resolve_group(spec: GroupSpec, prompt, tokenizer) -> Group:
    """A ``--group`` as positions of this prompt; one line if it covers none."""
    what = mention_name("group", spec.name)
    if spec.kind == "pos":
        outside = [p for p in spec.value if p >= prompt.length]
        if outside:
            raise UsageError(f"{what}: position {outside[0]} is past the prompt's {prompt.length} positions "
                             f"(0-{prompt.length - 1})")
        return Group(spec.name, list(spec.value))
    if spec.kind == "text":
        ids = prompt.input_ids[0].tolist()
        for run in _runs(question_positions(prompt, tokenizer)):  # never across an image or a control token
            text, spans = token_spans(tokenizer, [ids[p] for p in run])
            start = text.find(spec.value[0])
            if start >= 0:
                end = start + len(spec.value[0])
                return Group(spec.name, [p for p, (s, e) in zip(run, spans) if s < end and e > start])
        raise UsageError(f"{what}: the text {quoted(spec.value[0])} does not occur in the prompt's text")
    image = (spec.image or 1) - 1
    info = prompt.images[image]
    x0, y0, x1, y1 = spec.value
    box = ','.join(f'{v:g}' for v in spec.value)
    if x1 <= 0 or y1 <= 0 or x0 >= info.width or y0 >= info.height:
        raise UsageError(f"{what}: the box {box} lies outside image {image + 1} ({info.width}×{info.height} pixels)")
    if x0 < 0 or y0 < 0 or x1 > info.width or y1 > info.height:  # refused, not clipped: a typo must not pass
        inside = ','.join(f'{v:g}' for v in (max(0.0, x0), max(0.0, y0), min(info.width, x1), min(info.height, y1)))
        raise UsageError(f"{what}: the box {box} reaches outside image {image + 1} ({info.width}×{info.height} "
                         f"pixels: 0,0,{info.width},{info.height}); give the part inside it, {inside}")
    covered = [tok.index for tok in prompt.tokens if tok.image == image and tok.box is not None
               and overlaps(exact_box(prompt, tok), spec.value)]
    if not covered:
        raise UsageError(f"{what}: the box covers no image token")
    return Group(spec.name, covered, box=[max(0.0, x0), max(0.0, y0), min(info.width, x1), min(info.height, y1)],
                 image=image)


def named_group(name: str, groups: dict[str, Group], prompt, tokenizer) -> Group:
    """A flow's end: a ``--group`` or a built-in group."""
    if name in groups:
        return groups[name]
    last = prompt.length - 1
    image = IMAGE_GROUP.fullmatch(name)
    if image or name == "image":
        wanted = None if name == "image" else int(image[1]) - 1
        positions = [tok.index for tok in prompt.tokens if tok.modality == "vision"
                     and (wanted is None or tok.image == wanted)]
        if not positions:
            raise UsageError(f"{name!r} names image tokens, but the prompt has none")
        return Group(name, positions)
    if name == "question":
        positions = question_positions(prompt, tokenizer)
        if not positions:
            raise UsageError("'question' names the user's text, but the prompt has none")
        return Group(name, positions)
    if name == "last":
        return Group(name, [last])
    if name == "answer":
        return Group(name, [], tail=last)
    if name == "prompt":
        return Group(name, list(range(prompt.length)))
    raise UsageError(f"no group is named {name!r}")  # check_units has refused it already


def positions_for(prompt, mask_mode: str) -> list[int]:
    """The prompt positions a ``--mask-mode`` sweeps: ``special`` tokens count with ``text``."""
    wanted = {"text": ("text", "special"), "vision": ("vision",), "both": ("text", "special", "vision")}[mask_mode]
    positions = [tok.index for tok in prompt.tokens if tok.modality in wanted]
    if not positions:
        raise UsageError(f"{mention('mask_mode', mask_mode)} selects no positions in this prompt")
    return positions


def build_units(prompt, tokenizer, config, answer_start: int) -> list[Unit]:
    """The units a run sweeps, in the order their first keys come (so the engine's batches waste little)."""
    options = parse_units(config.unit, config.groups, config.flows)  # parsed once: the checks' own values
    choice = options.unit
    groups = {spec.name: resolve_group(spec, prompt, tokenizer) for spec in options.groups}
    stage = STAGES[getattr(config, "stage", "decoder")]
    if stage.on_patches:
        return pixel_units(prompt, choice, groups)
    if stage.images_only:  # its units are image tokens (DeepStack)
        vision = {tok.index for tok in prompt.tokens if tok.modality == "vision"}
        for group in groups.values():
            outside = [p for p in group.positions if p not in vision]
            if outside or group.tail is not None:
                raise UsageError(f"{mention_name('group', group.name)}: {mention('stage', stage.name)} "
                                 f"{stage.removes}, but the group holds position "
                                 f"{outside[0] if outside else 'answer'}, which is not an image token")
    if config.flows:
        units = []
        for index, flow in enumerate(options.flows):
            source = named_group(flow.source, groups, prompt, tokenizer)
            target = named_group(flow.target, groups, prompt, tokenizer)
            unit = _unit(prompt, index, "flow", flow.label, source.positions, target.positions, target.tail)
            unit.box = source.box or unit.box
            units.append(unit)
        return units
    if choice.kind == "groups":
        units = []
        for index, group in enumerate(groups.values()):
            unit = _unit(prompt, index, "group", group.name, group.positions)
            unit.box = group.box or unit.box
            units.append(unit)
        return units
    positions = positions_for(prompt, config.mask_mode)
    text = [p for p in positions if prompt.tokens[p].modality == "text"]
    vision = [p for p in positions if prompt.tokens[p].modality == "vision"]
    if choice.kind == "word" and not text:
        raise UsageError(f"{mention('unit', 'word')} groups text tokens, but "
                         f"{mention('mask_mode', config.mask_mode)} selects none")
    if choice.groups_vision and not vision:
        raise UsageError(f"{mention('unit', config.unit)} groups image tokens, but "
                         f"{mention('mask_mode', config.mask_mode)} selects none; use "
                         f"{mention('mask_mode', 'vision')} or both")
    parts: list[tuple[str, list[int]]] = [("token", [p]) for p in positions]
    if choice.kind == "word":
        grouped = words(prompt, tokenizer, text)
        parts = [part for part in parts if prompt.tokens[part[1][0]].modality != "text"]
        parts += [("word", group) for group in grouped]
    elif choice.groups_vision:
        grouped = regions(prompt, vision, choice.size if choice.kind == "region" else None)
        parts = [part for part in parts if prompt.tokens[part[1][0]].modality != "vision"]
        parts += [(choice.kind, group) for group in grouped]
    parts.sort(key=lambda part: part[1][0])
    return [_unit(prompt, index, kind, _label(prompt, kind, keys, tokenizer), keys)
            for index, (kind, keys) in enumerate(parts)]


def pixel_units(prompt, choice, groups: dict) -> list:
    """The units of a stage on patches (occlusion, the vision encoder): patches, tokens (their patches), regions,
    images or groups, each with its rows of ``pixel_values`` (``patches``)."""
    def make_unit(index: int, kind: str, label: str | None, keys: list[int]) -> Unit:
        return _unit(prompt, index, kind, label if label is not None else _label(prompt, kind, keys), keys)

    layout = PatchLayout.of(prompt, merge_size(prompt))
    vision = [tok.index for tok in prompt.tokens if tok.modality == "vision"]
    numbers = token_numbers(prompt)
    if choice.kind == "patch":
        owners: dict[int, list[int]] = {}  # a patch's tokens: one, or up to four pooled tile tokens (OneVision)
        for p in vision:
            for row in layout.token_rows(*numbers[p]):
                owners.setdefault(row, []).append(p)
        boxes = {row: patch_box(prompt, layout, row) for row in owners}
        units = []  # a patch wholly in the padding of a square shows none of the picture: no unit, as its token
        for index, row in enumerate(sorted((row for row in owners if boxes[row] is not None), key=layout.cell)):
            image, t, patch_row, patch_col = layout.cell(row)
            label = f"image{image + 1}{f' t{t}' if t else ''} p{patch_row},{patch_col}"
            unit = make_unit(index, "patch", label, owners[row])
            unit.patches, unit.box = [row], boxes[row]
            units.append(unit)
        return units
    if choice.kind == "groups":
        parts = []
        for group in groups.values():
            outside = [p for p in group.positions if p not in numbers]
            if outside or group.tail is not None:
                raise UsageError(f"{mention_name('group', group.name)}: this stage removes image patches, but the "
                                 f"group holds position {outside[0] if outside else 'answer'}, which is not an image "
                                 "token")
            if len({numbers[p][0] for p in group.positions}) > 1:
                raise UsageError(f"{mention_name('group', group.name)} holds tokens of several images; this stage "
                                 "removes the patches of one image at a time: give one group per image")
            rows = patch_rows(prompt, layout, group.positions)
            if group.box is not None:  # a pixel box: its own patches, finer than the tokens
                rows = [row for row in rows if (box := patch_box(prompt, layout, row, exact=True)) is not None
                        and overlaps(box, group.box)]
            if not rows:
                raise UsageError(f"{mention_name('group', group.name)} holds no image patch (an image newline token "
                                 "has no pixels)")

            parts.append(("group", group.name, group.positions, rows, group.box))
    else:
        size = None if choice.kind == "image" else choice.size if choice.kind == "region" else 1  # token: 1×1
        grouped = regions(prompt, vision, size)
        parts = [(choice.kind, None, keys, patch_rows(prompt, layout, keys), None) for keys in grouped]
    units = []
    for index, (kind, label, keys, rows, box) in enumerate(parts):
        unit = make_unit(index, kind, label, keys)
        unit.patches = rows
        unit.box = box or unit.box
        units.append(unit)
    return units
