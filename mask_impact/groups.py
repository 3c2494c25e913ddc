"""Knockouts and groups built in Python: the objects ``Analyzer.run`` takes besides the command line's strings.

    from mask_impact import Box, Group, Knockout, Positions, Text

    analyzer.run(prompt, images=[picture], unit="groups", groups=[Group("cat", Box(120, 40, 380, 300))])
    analyzer.run(prompt, images=[picture], knockouts=[Knockout(Box(120, 40, 380, 300), name="cat"),
                                                     Knockout("image", "last")])

Each object is written as the command line's spec (``str(Box(...))`` is ``120,40,380,300``; ``str(Group(...))`` is
``cat=120,40,380,300``) and goes through the very checks and units a ``--group`` or ``--flow`` does, so a
``Knockout`` gives the numbers of the equivalent strings (DESIGN.md §2: a knockout is ``(keys, queries)``).
Nothing here imports torch.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

from .errors import InvalidArgument, InvalidType


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidType(f"{what} must be a number, not {type(value).__name__}")
    return float(value)


@dataclass(frozen=True, init=False)
class Box:
    """A box in pixels of the original image ``image`` (counted from 1; None: the only image): the image tokens
    whose boxes overlap it."""

    x0: float
    y0: float
    x1: float
    y1: float
    image: int | None = None

    def __init__(self, x0, y0, x1, y1, image: int | None = None):
        for name, value in zip(("x0", "y0", "x1", "y1"), (x0, y0, x1, y1)):
            object.__setattr__(self, name, _number(value, f"Box(): {name}"))
        if image is not None and (isinstance(image, bool) or not isinstance(image, numbers.Integral)):
            raise InvalidType(f"Box(): image must be an int (counted from 1) or None, not {type(image).__name__}")
        object.__setattr__(self, "image", None if image is None else int(image))

    def __str__(self) -> str:
        box = ",".join(f"{v:g}" for v in (self.x0, self.y0, self.x1, self.y1))
        return box if self.image is None else f"{box}@{self.image}"


@dataclass(frozen=True, init=False)
class Positions:
    """Prompt positions (ints, or ranges of them): ``Positions(10, range(12, 15))`` is ``pos:10,12-14``."""

    positions: tuple[int, ...]

    def __init__(self, *positions):
        flat: list[int] = []
        for item in positions:
            items = item if isinstance(item, (range, list, tuple)) else [item]
            for p in items:
                if isinstance(p, bool) or not isinstance(p, numbers.Integral):
                    raise InvalidType(f"Positions(): a position must be an int, not {type(p).__name__}")
                if p < 0:
                    raise InvalidArgument(f"Positions(): positions count from 0 (got {p})")
                flat.append(int(p))
        if not flat:
            raise InvalidArgument("Positions(): give at least one position")
        object.__setattr__(self, "positions", tuple(sorted(set(flat))))

    def __str__(self) -> str:
        runs: list[list[int]] = []
        for p in self.positions:
            if runs and runs[-1][1] == p - 1:
                runs[-1][1] = p
            else:
                runs.append([p, p])
        return "pos:" + ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


@dataclass(frozen=True)
class Text:
    """The tokens of the first occurrence of ``words`` in the user's text."""

    words: str

    def __post_init__(self) -> None:
        if not isinstance(self.words, str):
            raise InvalidType(f"Text(): words must be a str, not {type(self.words).__name__}")

    def __str__(self) -> str:
        return f'text:"{self.words}"'


SPECS = (Box, Positions, Text)


@dataclass(frozen=True)
class Group:
    """A named group: ``Group("cat", Box(120, 40, 380, 300))`` is ``--group cat=120,40,380,300``; ``spec`` may also
    be the command line's string (``"pos:3-5"``)."""

    name: str
    spec: Box | Positions | Text | str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise InvalidType(f"Group(): name must be a str, not {type(self.name).__name__}")
        if not isinstance(self.spec, (str, *SPECS)):
            raise InvalidType(f"Group(): spec must be a Box, Positions, Text or a str, not {type(self.spec).__name__}")

    def __str__(self) -> str:
        return f"{self.name}={self.spec}"


@dataclass(frozen=True)
class Knockout:
    """One swept knockout: every query in ``queries`` blocked from every key in ``keys``, at every layer of a window.

    ``keys``: a ``Box``, ``Positions``, ``Text`` or ``Group``, or the name of a group (a built-in one, ``image``,
    ``image1``, ``question``, ``last``, ``prompt``, or one given in ``groups``). ``queries``: None (every query: the
    group knockout, a unit of ``unit="groups"``) or the same kinds (``answer`` too): a flow ``keys->queries``.
    ``name`` labels the unit (default ``ko1``, ``ko2``, ... in the order given)."""

    keys: Box | Positions | Text | Group | str
    queries: Box | Positions | Text | Group | str | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        for what, value in (("keys", self.keys), ("queries", self.queries)):
            if not (isinstance(value, (str, Group, *SPECS)) or (what == "queries" and value is None)):
                raise InvalidType(f"Knockout(): {what} must be a Box, Positions, Text, Group or a group name"
                                  + (", or None (every query)" if what == "queries" else "")
                                  + f", not {type(value).__name__}")
        if self.name is not None and not isinstance(self.name, str):
            raise InvalidType(f"Knockout(): name must be a str, not {type(self.name).__name__}")


def as_options(knockouts, groups: list[str], flows: list[str], unit) -> tuple[list[str], list[str], str | None]:
    """``run(knockouts=[...])`` as the command line's ``groups``, ``flows`` and ``unit``: group knockouts (every
    query) become ``--group``s swept with ``--unit groups``; flows become ``--flow``s between named groups."""
    items = [knockouts] if isinstance(knockouts, Knockout) else knockouts
    if not isinstance(items, (list, tuple)) or not all(isinstance(k, Knockout) for k in items):
        raise InvalidType(f"knockouts must be a list of Knockout objects, not {type(knockouts).__name__}")
    if not items:
        raise InvalidArgument("knockouts is empty; give at least one Knockout")
    kinds = {k.queries is None for k in items}
    if len(kinds) > 1:
        raise InvalidArgument("knockouts mixes group knockouts (queries=None) with flows (queries given); a run "
                              "sweeps either groups or flows: run them separately")
    if flows:
        raise InvalidArgument("give knockouts or flows, not both (a flow is Knockout(SRC, DST))")
    as_groups = kinds == {True}
    if as_groups and unit not in (None, "groups"):
        raise InvalidArgument(f"knockouts with queries=None are swept as groups; unit={unit!r} asks for another "
                              "unit (leave unit out, or give unit='groups')")
    if not as_groups and unit is not None:
        raise InvalidArgument(f"knockouts with queries given are swept as flows, which are the run's units; leave "
                              f"unit={unit!r} out")
    groups, flows, taken = list(groups), [], {g.split("=", 1)[0].strip() for g in groups}

    def name_of(end, default: str) -> str:  # a group name for one end of a knockout
        if isinstance(end, str):
            return end
        group = end if isinstance(end, Group) else Group(default, end)
        if group.name not in taken:
            groups.append(str(group))
            taken.add(group.name)
        elif str(group) not in groups:
            raise InvalidArgument(f"group {group.name} is given twice with different specs")
        return group.name

    for number, knockout in enumerate(items, 1):
        name = knockout.name or f"ko{number}"
        if as_groups:
            if isinstance(knockout.keys, str):
                if knockout.keys not in taken:
                    raise InvalidArgument(f"Knockout({knockout.keys!r}) with every query names no group given in "
                                          "groups; for a built-in group write a flow, e.g. Knockout('image', 'last'),"
                                          " or unit='image'")
                continue
            keys = knockout.keys if isinstance(knockout.keys, Group) else Group(name, knockout.keys)
            name_of(keys, name)
        else:
            source = name_of(knockout.keys, name if knockout.name else f"{name}_keys")
            target = name_of(knockout.queries, f"{name}_queries")
            flows.append(f"{source}->{target}")
    return groups, flows, "groups" if as_groups else unit
