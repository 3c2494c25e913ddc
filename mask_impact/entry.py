"""The two commands' entry points (``mask-impact-vl``, ``mask-impact``, and the scripts mask_impact_vl.py and
mask_impact_analysis.py): the stop signals' handlers first, then the (slow) imports, then the command."""

from __future__ import annotations

import sys

from .stopping import ignore_stop_signals, install_stop_handlers, stop_status


def entry(vision: bool) -> int:
    """What the two scripts and the two installed commands run: handlers first, then the (slow) imports,
    then the command."""
    install_stop_handlers()
    try:
        from .cli import main
    except KeyboardInterrupt as stop:
        name, status = stop_status(stop)
        print(f"interrupted ({name}) while starting; nothing was written", file=sys.stderr)
        return status
    try:
        return main(sys.argv[1:], vision)
    finally:  # the work is done or said: a signal during the interpreter's shutdown must not raise there
        ignore_stop_signals()


def entry_vl() -> int:
    """The installed ``mask-impact-vl`` command (as ``mask_impact_vl.py``)."""
    return entry(vision=True)


def entry_text() -> int:
    """The installed ``mask-impact`` command (as ``mask_impact_analysis.py``)."""
    return entry(vision=False)
