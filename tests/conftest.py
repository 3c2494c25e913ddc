"""Tiny models built offline (random weights, real classes) and loaded through from_pretrained."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import transformers
from PIL import Image, ImageDraw

from mask_impact.demo import build_demo
from mask_impact.models import load_model

transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()
ROOT = Path(__file__).resolve().parent.parent
# How long a test waits for a subprocess (or for a run to reach a point) before calling it hung: a guard against
# hangs, never a speed test, so far above any run's time on a loaded machine. MASK_IMPACT_TEST_HANG_S changes it.
HANG_S = int(os.environ.get("MASK_IMPACT_TEST_HANG_S", "3600"))


@pytest.fixture(scope="session", autouse=True)
def demo_cache(tmp_path_factory):
    """Demo checkpoints for the CLI tests go to a temporary cache, never the user's."""
    folder = tmp_path_factory.mktemp("demo_cache")
    os.environ["MASK_IMPACT_CACHE"] = str(folder)
    return folder


def cli_error(capsys, argv: list[str], vision: bool = True) -> str:
    """Run the command line in-process on bad input: exit status 2 and exactly one line on stderr."""
    from mask_impact.cli import main

    code = main(argv, vision)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


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


def draw_image(path: Path, width: int, height: int, seed: int = 0) -> Path:
    """A picture with some structure, so image tokens differ from each other."""
    image = Image.new("RGB", (width, height), (30 + 40 * seed, 60, 150))
    draw = ImageDraw.Draw(image)
    draw.rectangle([width // 2, height // 4, width - 8, height - 8], fill=(220, 40, 40))
    draw.ellipse([4, 4, width // 3, height // 2], fill=(240, 210, 40 + 50 * seed))
    image.save(path)
    return path


def hidden_states_under(loaded, tf, plans) -> list:
    """Every layer's hidden states of the teacher-forced sequence, the model run once under each attention plan
    (the registered knockout attention installed)."""
    import torch

    from mask_impact.knockout import apply_plan, knockout_attention_installed

    inputs = dict(input_ids=tf.input_ids, **tf.model_kwargs)
    states = []
    for plan in plans:
        with torch.no_grad(), knockout_attention_installed(loaded.adapter.attention_configs()), apply_plan(plan):
            states.append(loaded.model(**inputs, output_hidden_states=True).hidden_states)
    return states


def tiny_llava_runs(folder: Path, layers: str) -> Path:
    """Real command-line runs of the tiny LLaVA-1.5 (a 128×64 picture: its centre 64×64 seen, 32-px strips cropped
    off each side) and LLaVA-NeXT (a 100×150 picture: a 4×4 base view, then 8 rows × 6 kept columns of tiles and
    their newlines), vision tokens over ``layers``: ``folder/llava.json`` and ``folder/llava_next.json``."""
    from mask_impact.cli import main
    from tests.tiny import build_tiny

    for model_type, size in (("llava", (128, 64)), ("llava_next", (100, 150))):
        picture = draw_image(folder / f"{model_type}.png", *size)
        checkpoint = build_tiny(folder / f"{model_type}_model", model_type)
        assert main(["--model", str(checkpoint), "--image", str(picture), "--prompt", "What is in the picture?",
                     "--device", "cpu", "--dtype", "float32", "--num-tokens", "2", "--layers", layers, "--mask-mode",
                     "vision", "--no-progress", "--generate-top", "0", "--output-dir", str(folder), "--output",
                     model_type], True) == 0
    return folder


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


def shape_pictures(loaded, seed: int, count: int, question: str = "colour"):
    """Fresh pictures of the demo's shape task, drawn with a seeded rng: (example, prompt) pairs."""
    import random
    import tempfile

    from mask_impact.demo_tasks import QUESTIONS, draw_shape_example
    from mask_impact.inputs import build_prompt

    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as folder:
        for number in range(count):
            example = draw_shape_example(rng)
            path = Path(folder) / f"{number}.png"
            example.image.save(path)
            yield example, build_prompt(loaded, QUESTIONS[question], [str(path)])


def pytest_collection_modifyitems(config, items):
    """The markers declared in pyproject.toml, where they follow from what a test uses: a test of the viewer in
    Chromium (the ``browser`` fixture) is ``browser``, and every ``browser`` or ``launch`` test is ``slow`` too."""
    for item in items:
        if "browser" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.browser)
        if item.get_closest_marker("browser") or item.get_closest_marker("launch"):
            item.add_marker(pytest.mark.slow)


def tower_by_hand(loaded, tf, removed: list[set[int]], exempt: frozenset[int] = frozenset()):
    """(T, V) the answer's log-probs of the model's own forward with every attention call of its vision tower (a
    batched tower: CLIP, SigLIP; batch element b is image b) replaced by a masked softmax written out here, not the
    tool's: in image b's sequence every query loses each key in ``removed[b]`` but itself, at every layer of the
    tower; a query in ``exempt`` keeps every key."""
    import torch
    from transformers import AttentionInterface

    def by_hand(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        assert attention_mask is None
        out = torch.zeros_like(query)  # (B, nh, n, hs)
        for b in range(query.shape[0]):
            for q in range(query.shape[2]):
                keep = [k for k in range(key.shape[2]) if k not in removed[b] or k == q or q in exempt]
                scores = query[b, :, q:q + 1] @ key[b, :, keep].transpose(1, 2) * scaling  # (nh, 1, K')
                out[b, :, q:q + 1] = torch.softmax(scores, dim=-1) @ value[b, :, keep]
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register("tower_by_hand", by_hand)
    config = loaded.model.model.vision_tower.config
    saved = config._attn_implementation_internal
    try:
        config._attn_implementation_internal = "tower_by_hand"
        with torch.no_grad():
            logits = loaded.model(input_ids=tf.input_ids, **tf.model_kwargs).logits[0]
    finally:
        config._attn_implementation_internal = saved
    return torch.log_softmax(logits[tf.answer_positions].float(), dim=-1)


def tower_pass(loaded, tf, plan=None, registered: bool = True) -> tuple[list, object]:
    """Each vision-tower block's input and the model's logits, one forward of the whole model: through the
    registered ViT attention with ``plan`` active, or (``registered`` False) the model as loaded."""
    import contextlib

    import torch

    from mask_impact.engines.vit import vit_plan

    seen = []
    hooks = [layer.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
             for layer in loaded.adapter.vision_layers]
    try:
        with torch.no_grad(), (vit_plan(loaded, plan) if registered else contextlib.nullcontext()):
            logits = loaded.model(input_ids=tf.input_ids, **tf.model_kwargs).logits
    finally:
        for hook in hooks:
            hook.remove()
    return seen, logits
