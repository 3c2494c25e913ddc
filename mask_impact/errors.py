"""The library's exceptions, and how an error message names the options it speaks of.

Every check of the input is written once, because the command line, YAML batches and the API share it
(config.py, units.py, inputs.py, ...). A message names an option the way the reader wrote it: ``--unit region:0``
on the command line, ``unit='region:0'`` in Python, ``unit: region:0`` in a YAML file. So a message never spells a
flag: it holds a *mention* (``mention("unit", "region:0")``, ``mention_name("group", "cat")``), which carries the
option's three spellings, and each front end renders the message for its reader (``worded``). The command line
prints ``str(error)``, the command line's wording; the API raises the error again as one of the types below in
Python's (api.py), a batch records a run's error in YAML's. Nothing is guessed from message text.

An option's bad value is an ``OptionError``, ``(option, value, why)``: ``--num-tokens 0: ...``, ``num_tokens=0:
...``, ``num_tokens: 0: ...``.

    MaskImpactError                     the base: every error the library raises on bad input
    ├── UsageError                      bad input: one line on stderr and exit status 2 on the command line
    │   └── OptionError                 one option's bad value, as (option, value, why)
    ├── InvalidArgument (ValueError)    a value that cannot be meant
    ├── InvalidType (TypeError)         a wrong type, or a keyword ``run`` does not take
    ├── NotAResult (ValueError)         ``KnockoutResult.load`` of a file that is not a result it can read
    ├── MissingDependency (ImportError) an optional package is needed (matplotlib for figures, pandas)
    └── WriteFailed (OSError)           a result file could not be written (disk full, ...)
"""

from __future__ import annotations

FRONTS = ("command line", "python", "yaml")
_UNSET = object()
# A mention in a message: its spellings for FRONTS, between characters of Unicode's private use area (which no
# option, value or path the tool quotes back can hold: see ``bounded``).
_OPEN, _SEP, _CLOSE = "\ue000", "\ue001", "\ue002"
# The command line's flag where it is not the option's name with dashes (repeatable flags fill a list option).
FLAGS = {"images": "--image", "groups": "--group", "flows": "--flow", "figure_options": "--figure-option",
         "html": "--no-html", "progress": "--no-progress"}
YAML_KEYS = {"images": "image", "output": "name"}  # a YAML file's key where it is not the option's name
SWITCHES = {"overwrite": True, "raw_prompt": True, "allow_special_tokens": True, "html": False, "progress": False,
            "demo": True, "resume": True, "only_correct": True}  # and the value that the flag sets
# An option named without a value, in Python's words where the API asks for it in another way than ``name=`` (a
# switch: ``name=VALUE``, the value its flag sets).
PYTHON_PHRASES = {
    "demo": "Analyzer.demo()", "help": "help(Analyzer.run)", "model": "model", "prompt": "the prompt",
    "prompt_file": "the prompt file", "output": "path", "output_dir": "folder", "resume": "resume",
    "config": "the YAML file",
}
LISTS = ("images", "groups", "flows", "figure_options")  # a value given to these is one item of the list


def flag(option: str) -> str:
    """``option``'s flag on the command line: ``num_tokens`` → ``--num-tokens``."""
    return FLAGS.get(option, "--" + option.replace("_", "-"))


def mention(option: str, value=_UNSET, *, quote: bool = False, shown: str | None = None) -> str:
    """``option`` (a ``RunConfig`` name, or a command-line-only one such as ``config``), with ``value`` where the
    message speaks of one, for a message of this module's errors: ``--layers 7`` / ``layers=7`` / ``layers: 7``.
    On the command line the value is shown as ``shown``, else quoted (``quote``) or as it is; in Python and YAML as
    its repr (one item of a list option: ``images=[...]``), cut to ``MAX_ECHO`` characters (``quoted``)."""
    key = YAML_KEYS.get(option, option)
    if value is _UNSET:
        if option in SWITCHES:
            set_to = SWITCHES[option]
            return spelled(flag(option), PYTHON_PHRASES.get(option, f"{option}={set_to}"),
                           f"{key}: {'true' if set_to else 'false'}")
        return spelled(flag(option), PYTHON_PHRASES.get(option, f"{option}="), key)
    given = quoted(value)  # repr, its middle cut as every value quoted back
    if shown is None:
        shown = given if quote else str(value)
    python = f"{option}=[{given}]" if option in LISTS else f"{option}={given}"
    return spelled(f"{flag(option)} {shown}", python, f"{key}: {given}")


def mention_name(option: str, name: str) -> str:
    """A group or flow the user named (``option``: ``group`` or ``flow``): ``--group cat`` on the command line,
    ``group cat`` in Python and YAML."""
    return spelled(f"--{option} {name}", f"{option} {name}", f"{option} {name}")


def spelled(command_line: str, python: str, yaml: str) -> str:
    """A phrase that each front end words its own way, for a message of this module's errors (``mention`` where
    it is one option)."""
    return _OPEN + _SEP.join((command_line, python, yaml)) + _CLOSE


def render(message: str, front: str = "command line") -> str:
    """``message`` with each mention spelled for ``front`` (``FRONTS``)."""
    if _OPEN not in message:
        return message
    index, out, rest = FRONTS.index(front), [], message
    while _OPEN in rest:
        before, _, rest = rest.partition(_OPEN)
        inside, _, rest = rest.partition(_CLOSE)
        out += [before, inside.split(_SEP)[index]]
    return "".join(out) + rest


class MaskImpactError(Exception):
    """Bad input, said in one sentence. ``str(error)`` words it for the command line; ``worded`` for each front
    end, from ``message`` (which holds the mentions)."""

    def __init__(self, message: str = ""):
        self.message = message
        super().__init__(render(message))


class UsageError(MaskImpactError):
    """Bad input: reported as one line on stderr with exit status 2 on the command line, raised again as an
    ``InvalidArgument`` by the API."""


class OptionError(UsageError):
    """One option's bad value, as ``(option, value, why)`` (``option``: its ``RunConfig`` name; ``value``: as
    given, left out where the option is what is wrong, not its value): ``--num-tokens 0: ...`` on the command line,
    ``num_tokens=0: ...`` in Python, ``num_tokens: 0: ...`` in a YAML file."""

    def __init__(self, option: str, why: str, value=_UNSET):
        self.option, self.why, self.value = option, why, value
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        subject = mention(option, value, quote=not number) if value is not _UNSET else mention(option)
        super().__init__(f"{subject}: {why}")


def worded(error: BaseException, front: str) -> str:
    """``error``'s message for ``front`` (``FRONTS``): its mentions spelled there."""
    return render(error.message, front) if isinstance(error, MaskImpactError) else str(error)


def message_of(error: BaseException) -> str:
    """``error``'s message with its mentions, to be quoted in another error's message."""
    return error.message if isinstance(error, MaskImpactError) else str(error)


class InvalidArgument(MaskImpactError, ValueError):
    """An argument whose value cannot be meant (a layer the model lacks, a group outside its image, ...)."""


class InvalidType(MaskImpactError, TypeError):
    """An argument of the wrong type, or an unknown keyword."""


class NotAResult(MaskImpactError, ValueError):
    """A file that is not a mask_impact result this version can read."""


class MissingDependency(MaskImpactError, ImportError):
    """An optional package that the call needs is not installed; the message says how to install it."""


class WriteFailed(MaskImpactError, OSError):
    """A result file could not be written; the message names it and says why."""


class NotCorrect(MaskImpactError):
    """``only_correct``: the greedy answer does not start with the target, so the run measures nothing."""

    def __init__(self, answer: str, target: str):
        self.answer, self.target = answer, target
        super().__init__(f"the answer {answer!r} does not start with the target {target!r}: not measured "
                         f"({mention('only_correct')})")


_ESCAPED = {ord(mark): mark.encode("unicode_escape").decode() for mark in (_OPEN, _SEP, _CLOSE)}
MAX_ECHO = 160  # characters of a user's value quoted back in an error message


def quoted(value: object) -> str:
    """A user's value for an error message: repr, its middle cut to keep ``MAX_ECHO`` characters."""
    return bounded(repr(value))


def bounded(text: str) -> str:
    """A user's text (a path, say) for an error message, its middle cut to keep ``MAX_ECHO`` characters."""
    half = MAX_ECHO // 2
    text = text.translate(_ESCAPED)  # a mention's marks in a user's text would read as one
    return text if len(text) <= MAX_ECHO else text[:half] + "…" + text[-half:]


FIGURES_INSTALL = 'pip install "mask-impact[figures]" (or pip install matplotlib)'
