"""The command line answers `--help`, `--version` and bad options before torch or transformers load: the checks
run in a subprocess where both are made unimportable. Also: options grouped, every default said, no abbreviations,
"did you mean" for a mistyped flag or YAML key (config.py, batch.py, cli.py)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mask_impact import __version__
from mask_impact.config import UsageError, build_parser, cli_options
from tests.support import HANG_S, ROOT, cli_error

SCRIPTS = {True: "mask_impact_vl.py", False: "mask_impact_analysis.py"}
GROUPS = ("input:", "what to knock out:", "stages:", "scoring:", "output:", "scale-out:", "batches:", "examples:")


@pytest.fixture(scope="module")
def no_torch(tmp_path_factory) -> dict:
    """An environment in which `import torch` and `import transformers` raise."""
    folder = tmp_path_factory.mktemp("no_torch")
    for name in ("torch", "transformers", "torchvision", "accelerate"):
        (folder / name).mkdir()
        (folder / name / "__init__.py").write_text(f"raise ImportError('{name} is unimportable in this test')\n")
    return {**os.environ, "PYTHONPATH": str(folder)}


def _run(env: dict, vision: bool, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / SCRIPTS[vision]), *args], env=env, cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=HANG_S)


def test_the_fake_torch_is_unimportable(no_torch):
    done = subprocess.run([sys.executable, "-c", "import torch"], env=no_torch, capture_output=True, text=True,
                          timeout=HANG_S)
    assert done.returncode == 1 and "unimportable in this test" in done.stderr


@pytest.mark.parametrize("vision", [True, False])
def test_help_without_torch_groups_the_options_and_ends_with_examples(no_torch, vision):
    done = _run(no_torch, vision, "--help")
    assert done.returncode == 0 and done.stderr == "", done.stderr
    text = done.stdout
    groups = [g for g in GROUPS if vision or g != "stages:"]
    positions = [text.find("\n" + group) for group in groups]
    assert all(p > 0 for p in positions) and positions == sorted(positions), positions  # in this order
    assert text.rstrip().splitlines()[-1].startswith("  mask-impact")  # an example closes it
    assert "mask_impact_YYYYMMDD_HHMMSS" in text  # --output's default
    assert ("{text}" not in text and "--mask-mode" not in text) if not vision else "{text,vision,both}" in text


@pytest.mark.parametrize("vision", [True, False])
def test_version_without_torch(no_torch, vision):
    done = _run(no_torch, vision, "--version")
    assert done.returncode == 0 and done.stdout.strip().endswith(__version__)


@pytest.mark.parametrize("args,message", [
    (["--unitt", "word"], "unrecognized arguments: --unitt word; did you mean --unit?"),
    (["--num", "1", "--demo"], "did you mean --num-tokens?"),  # an abbreviation is not taken silently
    (["--demo", "--num-tokens", "0"], "--num-tokens 0: must be between 1"),  # validation, not only parsing
    (["--demo", "--window", "x"], "argument --window: invalid int value: 'x'"),
    (["--demo", "--device", "gpu"], "--device 'gpu': is not understood"),
])
def test_argument_errors_without_torch_are_one_line(no_torch, args, message):
    done = _run(no_torch, True, *args)
    assert done.returncode == 2 and done.stdout == "", done.stderr
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr


def test_an_unknown_yaml_key_without_torch_gets_a_suggestion_and_every_valid_key(no_torch, tmp_path):
    (tmp_path / "b.yaml").write_text("defaults:\n  demo: true\nruns:\n  - prompt: hi\n    num_token: 2\n")
    done = _run(no_torch, True, "--config", "b.yaml", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "unknown key 'num_token'; did you mean 'num_tokens'?" in done.stderr
    from mask_impact.batch import valid_keys

    assert done.stderr.rstrip().endswith("valid keys: " + ", ".join(valid_keys(True)))  # not cut
    assert not (tmp_path / "output").exists()


def test_an_unknown_top_level_yaml_key_gets_a_suggestion(in_tmp, capsys):
    (in_tmp / "b.yaml").write_text("default:\n  demo: true\nruns:\n  - prompt: hi\n")
    assert "unknown top-level key 'default'; did you mean 'defaults'? valid keys: defaults, runs" in cli_error(
        capsys, ["--config", "b.yaml"])


@pytest.mark.parametrize("vision", [True, False])
def test_every_option_says_its_default(vision):
    parser = build_parser(vision)
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)) or action.help == argparse.SUPPRESS:
            continue
        if action.dest.startswith("prompt"):  # none: the input group says a prompt is required
            assert "a prompt is required" in parser.format_help()
            continue
        assert "default" in action.help, action.option_strings


def test_no_abbreviations_and_the_text_commands_single_mask_mode_is_still_accepted():
    with pytest.raises(UsageError, match="did you mean --num-tokens"):
        cli_options(["--num-tok", "1"], vision=True)
    assert cli_options(["--mask-mode", "text"], vision=False) == {"mask_mode": "text"}
    with pytest.raises(UsageError, match="invalid choice: 'vision'"):
        cli_options(["--mask-mode", "vision"], vision=False)
    assert cli_options(["--num-tokens", "1"], vision=True) == {"num_tokens": 1}
