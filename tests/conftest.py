"""Tiny models built offline (random weights, real classes) and loaded through from_pretrained."""

from __future__ import annotations

import os

import pytest
import transformers

from mask_impact.demo import build_demo
from mask_impact.models import load_model
from tests.support import draw_image
from tests.tiny import build_tiny

transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()


@pytest.fixture(scope="session", autouse=True)
def demo_cache(tmp_path_factory):
    """Demo checkpoints for the CLI tests go to a temporary cache, never the user's."""
    folder = tmp_path_factory.mktemp("demo_cache")
    os.environ["MASK_IMPACT_CACHE"] = str(folder)
    return folder


@pytest.fixture()
def in_tmp(tmp_path, monkeypatch):
    """A temporary working folder (relative output paths land in it)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _loaded(tmp_path_factory, name: str, vision: bool, **kwargs):
    folder = build_demo(tmp_path_factory.mktemp(name), vision, **kwargs)
    return load_model(str(folder), vision, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def vl_model(tmp_path_factory):
    return _loaded(tmp_path_factory, "tiny_vl", True)


@pytest.fixture(scope="session")
def text_model(tmp_path_factory):
    return _loaded(tmp_path_factory, "tiny_qwen3", False)


@pytest.fixture(scope="session")
def moe_model(tmp_path_factory):
    return _loaded(tmp_path_factory, "tiny_vl_moe", True, moe=True)


@pytest.fixture(scope="session")
def llama_model(tmp_path_factory):
    return _loaded(tmp_path_factory, "tiny_llama", False, text_model_type="llama")


@pytest.fixture(scope="session")
def next_folder(tmp_path_factory):
    """The tiny LLaVA-NeXT checkpoint (tests/tiny.py: 64-px tiles of 16-px patches, a 3-block CLIP tower)."""
    return build_tiny(tmp_path_factory.mktemp("llava_next"), "llava_next")


@pytest.fixture(scope="session")
def next_model(next_folder):
    return load_model(str(next_folder), True, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def next_pictures(tmp_path_factory):
    """For LLaVA-NeXT's views: 128×64, 2 tiles across (3 views); 90×90, 2×2 tiles (5 views); 40×128, 2 tiles, half
    their columns unpadded."""
    base = tmp_path_factory.mktemp("next_pictures")
    return [str(draw_image(base / name, w, h, seed=n)) for n, (name, w, h) in enumerate(
        (("wide.png", 128, 64), ("square.png", 90, 90), ("tall.png", 40, 128)))]


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    return {
        "wide": str(draw_image(folder / "wide.png", 128, 64)),
        "square": str(draw_image(folder / "square.png", 96, 96, seed=1)),
        "odd": str(draw_image(folder / "odd.png", 300, 150, seed=2)),
    }


@pytest.fixture(scope="session")
def images_fixture(images):
    """The same pictures, under a name that does not clash with hypothesis' arguments."""
    return images


def pytest_collection_modifyitems(config, items):
    """The markers declared in pyproject.toml, where they follow from what a test uses: a test of the viewer in
    Chromium (the ``browser`` fixture) is ``browser``, and every ``browser`` or ``launch`` test is ``slow`` too."""
    for item in items:
        if "browser" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.browser)
        if item.get_closest_marker("browser") or item.get_closest_marker("launch"):
            item.add_marker(pytest.mark.slow)


