"""mask_impact: which input tokens does a model need, at which layers, to produce its answer?"""

__version__ = "0.3.0"
ERRORS = ("MaskImpactError", "InvalidArgument", "InvalidType", "NotAResult", "MissingDependency", "WriteFailed")


def __getattr__(name: str):
    """``from mask_impact import Analyzer, KnockoutResult, MaskImpactError`` without importing torch up front."""
    if name in ("Analyzer", "KnockoutResult"):
        from . import api

        return getattr(api, name)
    if name in ERRORS:
        from . import errors

        return getattr(errors, name)
    raise AttributeError(f"module 'mask_impact' has no attribute {name!r}")
