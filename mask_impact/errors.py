"""The library's exceptions, and the one place that words a command-line error for a Python caller.

Every check of the input is written once, because the command line, YAML batches and the API share it
(config.py, units.py, inputs.py, ...). An option's bad value is an ``OptionError``, ``(option, value, why)``,
that each front end renders its own way (``worded``: ``--window 0: ...``, ``window=0: ...``, ``window: 0: ...``).
The other checks are still worded for the command line (``--unit region:0``): the command line prints such a
``UsageError`` as one line and exits 2; the API (api.py) raises it again as one of the types below, its flags
rewritten by ``python_wording`` into the keywords a caller wrote (``unit='region:0'``).

    MaskImpactError                     the base: every error the library raises on bad input
    ├── UsageError                      bad input in the command line's words (rewritten for the API)
    │   └── OptionError                 one option's bad value, as (option, value, why): each front end names
    │                                   the option its own way (``render``), no text rewritten
    ├── InvalidArgument (ValueError)    a value that cannot be meant
    ├── InvalidType (TypeError)         a wrong type, or a keyword ``run`` does not take
    ├── NotAResult (ValueError)         ``KnockoutResult.load`` of a file that is not a result it can read
    ├── MissingDependency (ImportError) an optional package is needed (matplotlib for figures, pandas)
    └── WriteFailed (OSError)           a result file could not be written (disk full, ...)
"""

from __future__ import annotations

import re


class MaskImpactError(Exception):
    """Bad input, said in one sentence."""


class UsageError(MaskImpactError):
    """Bad input, worded for the command line (``--unit``): reported as one line on stderr with exit status 2.
    The API raises it again worded for Python (``python_wording``)."""


_UNSET = object()
# The command line's flag where it is not the option's name with dashes (repeatable flags fill a list option).
FLAGS = {"images": "--image", "groups": "--group", "flows": "--flow", "figure_options": "--figure-option",
         "html": "--no-html", "progress": "--no-progress"}
YAML_KEYS = {"images": "image", "output": "name"}  # a YAML file's key where it is not the option's name
FRONTS = ("command line", "python", "yaml")


class OptionError(UsageError):
    """One option's bad value, as ``(option, value, why)`` (``option``: its ``RunConfig`` name; ``value``: as
    given, left out where the option is what is wrong, not its value). Each front end names the option its own way
    (``render``): ``--num-tokens 0: ...`` on the command line (``str(error)``), ``num_tokens=0: ...`` in Python,
    ``num_tokens: 0: ...`` in a YAML file."""

    def __init__(self, option: str, why: str, value=_UNSET):
        self.option, self.why, self.value = option, why, value
        super().__init__(self.render("command line"))

    def subject(self, front: str) -> str:
        """The option (and its value) as ``front`` writes it."""
        given = self.value is not _UNSET
        if front == "python":
            return f"{self.option}={self.value!r}" if given else f"{self.option}="
        if front == "yaml":
            key = YAML_KEYS.get(self.option, self.option)
            return f"{key}: {self.value!r}" if given else key
        flag = FLAGS.get(self.option, "--" + self.option.replace("_", "-"))
        if not given:
            return flag
        shown = self.value if isinstance(self.value, (int, float)) and not isinstance(self.value, bool) else (
            quoted(self.value))
        return f"{flag} {shown}"

    def render(self, front: str = "command line") -> str:
        return f"{bounded(self.subject(front))}: {self.why}"


def worded(error: UsageError, front: str) -> str:
    """``error``'s message for ``front`` (``FRONTS``): an ``OptionError`` rendered there; another usage error's
    command-line text, its flags rewritten for Python (``python_wording``) where it has no structure yet."""
    if isinstance(error, OptionError):
        return error.render(front)
    return python_wording(str(error)) if front == "python" else str(error)


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
                         "(--only-correct)")


MAX_ECHO = 160  # characters of a user's value quoted back in an error message


def quoted(value: object) -> str:
    """A user's value for an error message: repr, its middle cut to keep ``MAX_ECHO`` characters."""
    return bounded(repr(value))


def bounded(text: str) -> str:
    """A user's text (a path, say) for an error message, its middle cut to keep ``MAX_ECHO`` characters."""
    half = MAX_ECHO // 2
    return text if len(text) <= MAX_ECHO else text[:half] + "…" + text[-half:]


FIGURES_INSTALL = 'pip install "mask-impact[figures]" (or pip install matplotlib)'

# Choice values a flag may be followed by in a message: rendered as the keyword with a quoted value.
_CHOICES = {
    "mask-mode": ("text", "vision", "both"),
    "stage": ("decoder", "vision-encoder", "pixels", "deepstack"),
    "fill": ("mean", "blur", "black", "noise"),
    "block-from": ("all", "answer"),
    "vision-attention": ("causal", "bidirectional"),
    "engine": ("fast", "naive"),
    "dtype": ("auto", "float32", "bfloat16", "float16"),
    "figures": ("png", "svg", "pdf"),
}
_UNIT_VALUE = r"(?:token|word|image|groups|patch|region:\d+)\b"
_DEVICE_VALUE = r"(?:auto|cpu|cuda(?::\d+)?)\b"
# Flags whose Python form is not ``name=``: switches, and what the API asks for in another way.
_PHRASES = {
    "overwrite": "overwrite=True", "raw-prompt": "raw_prompt=True", "allow-special-tokens": "allow_special_tokens=True",
    "no-html": "html=False", "no-progress": "progress=False", "demo": "Analyzer.demo()", "help": "help(Analyzer.run)",
    "model": "model", "prompt": "the prompt", "prompt-file": "the prompt file", "output": "path",
    "output-dir": "folder", "resume": "resume", "config": "the YAML file",
}
_KEYWORDS = {"image": "images", "group": "groups", "flow": "flows"}  # repeatable flags: one list keyword
_FLAG = re.compile(r"(?<![\w-])--([a-z][a-z-]*)")


def python_wording(message: str) -> str:
    """A command-line error message with every ``--flag`` written as the keyword a Python caller gives:
    ``--unit region:0`` → ``unit='region:0'``, ``--num-tokens`` → ``num_tokens=``, ``--image PATH`` →
    ``images=[PATH]``, ``--group cat`` → ``group cat``, ``--overwrite`` → ``overwrite=True``."""
    out, last = [], 0
    for match in _FLAG.finditer(message):
        flag = match[1]
        out.append(message[last:match.start()])
        rest = message[match.end():]
        phrase, used = _flag_phrase(flag, rest)
        if phrase.endswith("s=") and out[-1].endswith(" a "):  # "name it in a --flow" → "name it in flows="
            out[-1] = out[-1][:-2]
        out.append(phrase)
        last = match.end() + used
    out.append(message[last:])
    return "".join(out)


def _flag_phrase(flag: str, rest: str) -> tuple[str, int]:
    """The Python form of ``--flag`` and how many characters of ``rest`` (its value) it took along."""
    keyword = _KEYWORDS.get(flag, flag.replace("-", "_"))
    if flag in ("group", "flow"):
        spec = re.match(r" (\w+=\S+|SRC->DST|NAME=SPEC)", rest)
        if spec:
            return f'{keyword}=["{spec[1]}"]', spec.end()
        name = re.match(r" ([\w'][^\s:;,)]*)", rest)
        return (f"{flag} {name[1]}", name.end()) if name else (f"{keyword}=", 0)
    if flag == "image":
        path = re.match(r" (PATH)\b", rest)
        return (f"{keyword}=[PATH]", path.end()) if path else (f"{keyword}=", 0)
    if flag in _PHRASES:
        return _PHRASES[flag], 0
    patterns = [r"'[^']*'|\"[^\"]*\"", r"\d[\d,]*\b(?!-)"]
    if flag in _CHOICES:
        patterns.append("(?:" + "|".join(map(re.escape, _CHOICES[flag])) + r")(?![\w-])")
    elif flag == "unit":
        patterns.append(_UNIT_VALUE)
    elif flag == "device":
        patterns.append(_DEVICE_VALUE)
    value = re.match(r" (" + "|".join(patterns) + ")", rest)
    if not value:
        return f"{keyword}=", 0
    text = value[1]
    if text[0].isdigit():
        text = text.replace(",", "")
    elif text[0] not in "'\"":
        text = repr(text)
    return f"{keyword}={text}", value.end()
