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
