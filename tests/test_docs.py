"""The README is the front door and docs/ the reference: lines fit, links resolve, the test command is CI's."""

from __future__ import annotations

import re

from tests.support import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_every_line_fits_in_120_characters():
    long = [f"{page.relative_to(ROOT)}:{number}" for page in PAGES
            for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1) if len(line) > 120]
    assert not long


def test_every_relative_link_names_a_file_that_exists():
    broken = [f"{page.relative_to(ROOT)} → {target}" for page in PAGES
              for target in LINK.findall(page.read_text(encoding="utf-8"))
              if "://" not in target and not (page.parent / target).exists()]
    assert not broken
    contents = (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    unlisted = [page.name for page in PAGES[1:] if page.name != "index.md" and f"({page.name})" not in contents]
    assert not unlisted  # every reference page is in the contents


def test_the_readme_starts_with_what_to_run_and_keeps_cis_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()
    command = 'pip install -e ".[test]" && python -m pytest -q'
    assert command in ci  # CI runs the README's command (then the fast subset on 5.17.0)
    assert command in readme
    first_command = next(n for n, line in enumerate(readme.splitlines(), 1) if line.startswith("pip install"))
    assert first_command < 40 and len(readme.splitlines()) < 150
    assert "docs/viewer.png" in readme and "(docs/index.md)" in readme
