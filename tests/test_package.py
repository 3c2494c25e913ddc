"""The installable package: a wheel built from the checkout carries the viewer, the demo image and the demo
models, and its two commands run the demo from an unrelated folder.

Offline and without reinstalling torch: the wheel is built with this environment's setuptools
(``--no-build-isolation``) from a copy of the checkout (so the build leaves nothing in it), and installed
without dependencies into a fresh virtual environment that sees this one's packages through a ``.pth`` file
(``venv --system-site-packages`` would see the base interpreter's, not this environment's). The checkout itself
is kept off that environment's path, and the tests check that what runs comes from the installed copy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from mask_impact import __version__
from tests.support import HANG_S, ROOT

SHIPPED = ["visualize_results.html", "testimg.png",
           *(str(p.relative_to(ROOT)) for p in sorted((ROOT / "models").glob("demo-*/*")) if p.is_file())]
COMMANDS = {"mask-impact-vl": "mask_impact.entry:entry_vl", "mask-impact": "mask_impact.entry:entry_text"}


def _setuptools_version() -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in metadata.version("setuptools").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return ()


pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(_setuptools_version() < (77,),
                                 reason="building the wheel offline needs setuptools>=77 (the test extra)")]


def _run(argv: list, cwd: Path, timeout: int = HANG_S) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSAFEPATH")}
    done = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("package")
    # what a build reads: the root's files (pyproject.toml, setup.py, the viewer, ...), the package and the demo
    # models; not the tests, outputs or virtual environments
    source = folder / "src"
    source.mkdir()
    for path in ROOT.iterdir():
        if path.is_file():
            shutil.copy2(path, source)
    for name in ("mask_impact", "models"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "data"))
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-index", "--no-build-isolation",
          "-w", folder / "dist", source], cwd=folder)
    (built,) = (folder / "dist").glob("mask_impact-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", "--without-pip", folder], cwd=folder)
    purelib = "import sysconfig; print(sysconfig.get_path('purelib'))"
    site_packages = Path(_run([folder / "bin" / "python", "-c", purelib], cwd=folder).stdout.strip())
    # this environment's packages (torch, transformers, pip), but never the checkout
    paths = [p for p in sys.path if p and Path(p).is_dir() and Path(p).resolve() != ROOT.resolve()]
    (site_packages / "parent_environment.pth").write_text("\n".join(paths) + "\n")
    _run([folder / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--force-reinstall",
          wheel], cwd=folder)
    return folder


@pytest.fixture()
def elsewhere(tmp_path) -> Path:
    """A working folder outside the checkout, so nothing can be imported from it."""
    assert ROOT.resolve() not in tmp_path.resolve().parents
    return tmp_path


def test_wheel_carries_the_package_and_its_data(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        for name in SHIPPED:
            assert archive.read(f"mask_impact/data/{name}") == (ROOT / name).read_bytes(), name
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = archive.read(entry_points).decode()
        (metadata_file,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta_lines = archive.read(metadata_file).decode().splitlines()
        requires = [line for line in meta_lines if line.startswith(("Provides-Extra:", "Requires-Dist:"))]
        licence = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
        assert licence and archive.read(licence[0]) == (ROOT / "LICENSE").read_bytes()
        assert archive.read("mask_impact/py.typed") == b""  # the package's type hints are for checkers too
    assert "License-Expression: MIT" in meta_lines
    assert {"models/demo-vl/model.safetensors", "models/demo-text/model.safetensors"} <= set(SHIPPED)
    assert {n for n in names if n.count("/") == 1 and n.endswith(".py")} == {
        f"mask_impact/{p.name}" for p in (ROOT / "mask_impact").glob("*.py")}
    assert {n.split("/")[0] for n in names} == {"mask_impact", f"mask_impact-{__version__}.dist-info"}
    for command, target in COMMANDS.items():
        assert f"{command} = {target}" in scripts
    # the figures extra is matplotlib, and the test extra has it too (plus what runs the example notebook)
    assert {"Provides-Extra: figures", "Provides-Extra: notebook", "Provides-Extra: test"} <= set(requires)
    extras = {extra: {line.split()[1].split(">")[0].split(";")[0].split("<")[0] for line in requires
                      if line.startswith("Requires-Dist:") and f'extra == "{extra}"' in line}
              for extra in ("figures", "notebook", "test")}
    assert extras["figures"] == {"matplotlib"}
    assert extras["notebook"] == {"pandas", "matplotlib", "ipywidgets"}
    (transformers,) = [line for line in requires if line.startswith("Requires-Dist: transformers")]
    assert set(transformers.split(maxsplit=1)[1].removeprefix("transformers").split(",")) == {">=5.17", "<5.40"}
    assert {"matplotlib", "pytest", "pandas", "nbclient", "nbformat", "ipykernel"} <= extras["test"]


def test_installed_package_reads_its_own_data(venv, elsewhere):
    probe = ("import mask_impact, mask_impact.config as c, mask_impact.report as r, mask_impact.demo as d;"
             "print(mask_impact.__file__, c.DEMO_IMAGE, r.VIEWER, d.demo_model_path(True), d.demo_model_path(False),"
             " sep='\\n')")
    paths = [Path(line) for line in _run([venv / "bin" / "python", "-c", probe], cwd=elsewhere).stdout.split("\n")
             if line]
    assert len(paths) == 5
    package = paths[0].parent
    assert venv.resolve() in package.resolve().parents
    assert paths[1:] == [package / "data" / "testimg.png", package / "data" / "visualize_results.html",
                         package / "data" / "models" / "demo-vl", package / "data" / "models" / "demo-text"]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_installed_command_runs_the_demo(venv, elsewhere, command):
    output = elsewhere / "results"
    _run([venv / "bin" / command, "--demo", "--no-progress", "--output-dir", output, "--output", "demo"],
         cwd=elsewhere)
    assert sorted(p.name for p in output.iterdir()) == ["demo.csv", "demo.html", "demo.json"]
    data = json.loads((output / "demo.json").read_text())
    assert data["baseline"]["text"].strip()
    shipped = venv.resolve()  # the trained demo model and image from the wheel, not a random model
    folder = "demo-vl" if command == "mask-impact-vl" else "demo-text"
    assert data["meta"]["model"].startswith(f"demo ({shipped}") and data["meta"]["model"].endswith(f"/{folder})")
    if command == "mask-impact-vl":
        assert data["images"][0]["path"].startswith(str(shipped))
    html = (output / "demo.html").read_text(encoding="utf-8")
    assert '<script id="embedded-data" type="application/json"></script>' not in html  # the viewer, data filled in
    assert '<script id="embedded-data" type="application/json">' in html
