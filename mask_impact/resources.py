"""Where the files the tool reads at run time live: the viewer, the demo image and the demo models.

A source checkout keeps them at the repository root, where they are edited and tested
(``visualize_results.html``, ``testimg.png``, ``models/demo-vl``, ``models/demo-text``). A wheel cannot
put files next to the package, so the build (setup.py) copies them into the package as ``mask_impact/data/``.
``data_path`` looks there first and then in the checkout, so the same code finds them in both.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DATA = Path(__file__).resolve().parent / "data"
CHECKOUT = Path(__file__).resolve().parent.parent


def data_path(name: str) -> Path:
    """The file or folder ``name`` (a path relative to the checkout root, one that setup.py ships) in the
    installed package, else in the checkout; the checkout's path when neither has it, so an error names the
    file one would look for."""
    shipped = PACKAGE_DATA / name
    return shipped if shipped.exists() else CHECKOUT / name
