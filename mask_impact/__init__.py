"""mask_impact: which input tokens does a model need, at which layers, to produce its answer?"""

from .version import __version__  # noqa: F401
ERRORS = ("MaskImpactError", "InvalidArgument", "InvalidType", "NotAResult", "MissingDependency", "WriteFailed")


GROUPS = ("Box", "Positions", "Text", "Group", "Knockout")


def demo_image():
    """The demo's picture (a path): one red circle on a 4×4 grid of 32-pixel cells, 128×128 pixels."""
    from .resources import data_path

    return data_path("testimg.png")


def register_metric(name: str, metric) -> None:
    """Compute ``metric(base, knocked, answer)`` (one number per knockout) in every later ``Analyzer.run``, as
    ``result.metric(name)``: see ``mask_impact.metrics``."""
    from .metrics import register_metric as register

    register(name, metric)


def __getattr__(name: str):
    """``from mask_impact import Analyzer, KnockoutResult, MaskImpactError`` without importing torch up front."""
    if name in ("Analyzer", "KnockoutResult", "StudyResult"):
        from . import api

        return getattr(api, name)
    if name in GROUPS:
        from . import groups

        return getattr(groups, name)
    if name in ERRORS:
        from . import errors

        return getattr(errors, name)
    raise AttributeError(f"module 'mask_impact' has no attribute {name!r}")
