"""How an error names the options it speaks of (errors.py): each reader sees its own spelling, and no message of
the library spells a command-line flag in its text."""

from __future__ import annotations

import ast
import re

from mask_impact.config import build_parser
from mask_impact.errors import MAX_ECHO, OptionError, UsageError, bounded, mention, mention_name, quoted, spelled, worded
from tests.support import ROOT


def _all(error: UsageError) -> tuple[str, str, str]:
    return str(error), worded(error, "python"), worded(error, "yaml")


def test_a_mention_is_spelled_for_each_reader():
    assert _all(UsageError(f"{mention('unit', 'region:0')} is bad")) == (
        "--unit region:0 is bad", "unit='region:0' is bad", "unit: 'region:0' is bad")
    assert _all(UsageError(f"give {mention('num_tokens')}")) == ("give --num-tokens", "give num_tokens=",
                                                                  "give num_tokens")
    assert _all(UsageError(f"pass {mention('overwrite')}, {mention('progress')}")) == (
        "pass --overwrite, --no-progress", "pass overwrite=True, progress=False",
        "pass overwrite: true, progress: false")
    assert _all(UsageError(f"add {mention('images', 'PATH')} or {mention('groups', 'NAME=SPEC')}")) == (
        "add --image PATH or --group NAME=SPEC", "add images=['PATH'] or groups=['NAME=SPEC']",
        "add image: 'PATH' or groups: 'NAME=SPEC'")
    assert _all(UsageError(f"{mention_name('flow', 'image->last')} is given twice")) == (
        "--flow image->last is given twice", "flow image->last is given twice", "flow image->last is given twice")
    shown = mention("min_pixels", 4096, shown="4,096")
    assert _all(UsageError(f"{shown} {spelled('a', 'b', 'c')}")) == ("--min-pixels 4,096 a", "min_pixels=4096 b",
                                                                     "min_pixels: 4096 c")
    assert _all(OptionError("layers", "runs backwards", "5-2")) == (
        "--layers '5-2': runs backwards", "layers='5-2': runs backwards", "layers: '5-2': runs backwards")


def test_a_long_value_is_cut_for_every_reader():
    """A value quoted back keeps MAX_ECHO characters of its repr in every front end's words, not only on the
    command line."""
    error = OptionError("layers", "is not understood", "1," * 1000)
    for text in _all(error):
        assert len(text) < MAX_ECHO + 40 and "…" in text


def test_a_users_text_cannot_forge_a_mention():
    forged = "a\ue000x\ue001y\ue002b"
    for shown in (bounded(forged), quoted(forged)):
        error = UsageError(f"no file {shown}")
        assert str(error) == worded(error, "python") == worded(error, "yaml")
        assert "\\ue000x\\ue001y\\ue002" in str(error)


ERROR_TYPES = {"UsageError", "OptionError", "InvalidArgument", "InvalidType", "NotAResult", "MissingDependency",
               "WriteFailed", "NotCorrect", "WriteError"}


def _literal_text(node: ast.AST):
    """The string constants of an error's arguments, but not those of ``spelled`` (a phrase worded per reader)."""
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "spelled":
        return
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        yield node.value
    for child in ast.iter_child_nodes(node):
        yield from _literal_text(child)


def test_no_error_message_spells_a_command_line_flag():
    """A message names an option through ``mention`` so that Python and YAML readers see their own words; a flag
    written into the text would reach them as it is (the API rewrote such text with regular expressions once)."""
    flags = {flag for vision in (True, False) for flag in build_parser(vision)._option_string_actions
             if flag.startswith("--")}
    flag = re.compile("(?<![\\w-])(" + "|".join(sorted(map(re.escape, flags), key=len, reverse=True)) + ")(?![\\w-])")
    found = []
    for path in sorted((ROOT / "mask_impact").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            name = getattr(node.func, "id", getattr(node.func, "attr", None)) if isinstance(node, ast.Call) else None
            if name in ERROR_TYPES:
                for text in _literal_text(node):
                    if flag.search(text):
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {text.strip()[:60]}")
    assert len(flags) > 40 and not found, "\n".join(found)


def test_the_command_line_is_derived_from_the_options_model():
    """Every ``RunConfig`` field is an option of the command line (the vision one; the text one too unless it
    concerns images), under the flag the messages spell (``errors.flag``), as the kind of argument its annotation
    and default say: a switch sets the value ``errors.SWITCHES`` records, a list is repeatable, an int is parsed as
    one, a choice offers ``CHOICES``."""
    from dataclasses import fields

    from mask_impact.config import CHOICES, FIELD_TYPES, OPTIONS, RunConfig
    from mask_impact.errors import SWITCHES, flag

    defaults = {f.name: f.default for f in fields(RunConfig)}
    assert {o.name for o in OPTIONS if o.kind is None} == set(defaults)
    vision_only = {o.name for o in OPTIONS if o.vision}
    assert vision_only == {"images", "max_pixels", "min_pixels", "vision_attention", "stage", "fill"}
    for vision in (True, False):
        actions = {a.dest: a for a in build_parser(vision)._actions}
        for name, kind in FIELD_TYPES.items():
            if name in vision_only and not vision:
                assert name not in actions
                continue
            action = actions[name]
            assert action.option_strings == [flag(name)]
            if kind is bool:
                assert action.const is SWITCHES[name] is (not defaults[name]), name
            elif kind is list:
                assert action.__class__.__name__ == "_AppendAction", name
            elif kind is int:
                assert action.type is int and action.nargs is None, name
            else:
                assert action.type is None, name
            if name in CHOICES:
                assert tuple(action.choices) == (CHOICES[name] if vision or name not in ("mask_mode", "stage")
                                                 else CHOICES[name][:1])
        assert set(SWITCHES) == {name for name, kind in FIELD_TYPES.items() if kind is bool}
        parsed = vars(build_parser(vision).parse_args(["--num-tokens", "3", "--no-html", "--demo", "--group", "a=pos:1",
                                                       "--group", "b=pos:2", "--ci", "0.9", "--fields", "x=y"]))
        assert parsed == {"num_tokens": 3, "html": False, "demo": True, "groups": ["a=pos:1", "b=pos:2"], "ci": 0.9,
                          "fields": ["x=y"]}
