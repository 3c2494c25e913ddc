"""ruff over the whole tree with the rules pyproject.toml selects (pyflakes: unused imports and variables, undefined
names), as part of the test command, so CI runs it too."""

from __future__ import annotations

import subprocess
import sys

from tests.support import ROOT


def test_ruff_finds_nothing():
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(ROOT)], capture_output=True,
                          text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
