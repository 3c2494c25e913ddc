"""The build's one custom step: copy the viewer, the demo image and the demo models into the wheel.

A checkout keeps them at the repository root, where the tests and the README refer to them; an installed
package finds them in ``mask_impact/data/`` (see mask_impact/resources.py). Everything else is in
pyproject.toml.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
# Relative to ROOT; each lands at mask_impact/data/<the same path>.
SHIPPED_FILES = ("visualize_results.html", "testimg.png", "models/demo-vl", "models/demo-text", "models/demo-vl-vit")


class BuildWithData(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):  # an editable install reads them from the checkout
            return
        for name in SHIPPED_FILES:
            source = ROOT / name
            if not source.exists():  # a wheel without them fails only when run, so refuse to build it
                raise FileNotFoundError(f"{source} is missing; the package ships it")
            files = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
            for file in files:
                target = Path(self.build_lib, "mask_impact", "data", file.relative_to(ROOT))
                self.mkpath(str(target.parent))
                self.copy_file(str(file), str(target))


setup(cmdclass={"build_py": BuildWithData})
