"""Helpers the tests share (imported as ``from tests.support import ...``); the fixtures stay in conftest.py,
which pytest loads by itself and no test imports."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent


# How long a test waits for a subprocess (or for a run to reach a point) before calling it hung: a guard against
# hangs, never a speed test, so far above any run's time on a loaded machine. MASK_IMPACT_TEST_HANG_S changes it.
HANG_S = int(os.environ.get("MASK_IMPACT_TEST_HANG_S", "3600"))


@contextmanager
def watched_page(browser, width: int, height: int, **options):
    """A page of a fresh browser context at width×height that records its dialogs (dismissed) in ``page.dialogs``
    and its script errors in ``page.errors``; on leaving, no script error may have happened."""
    context = browser.new_context(viewport={"width": width, "height": height}, **options)
    page = context.new_page()
    page.dialogs = []
    page.errors = []
    page.on("dialog", lambda dialog: (page.dialogs.append(dialog.message), dialog.dismiss()))
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    yield page
    assert page.errors == []
    context.close()


TINY_PROMPT = "A=3, B=7, C=1. What is B?"


def tiny_argv(folder, *extra: str, generate_top: int = 0) -> list[str]:
    """The command line on a tiny checkpoint (tests/tiny.py) in ``folder``: ``TINY_PROMPT``, CPU, float32, a 2-token
    answer, no progress bar, then ``extra``."""
    return ["--model", str(folder), "--prompt", TINY_PROMPT, "--device", "cpu", "--dtype", "float32", "--num-tokens",
            "2", "--no-progress", "--generate-top", str(generate_top), *extra]


def one_error_worded_twice(api_error: Exception, cli: str) -> None:
    """The API's error and the command line's line (``cli``, without ``error: ``) are one error of the shared checks
    rendered for each reader (errors.worded): the same words outside the options it mentions, and no flag in
    Python's."""
    import re

    from mask_impact.errors import UsageError, worded

    error = api_error.__context__  # the shared check's error, which the API raised again in Python's words
    assert isinstance(error, UsageError)
    assert str(error) == cli and worded(error, "python") == str(api_error)
    literal = [part for part in re.split("\ue000[^\ue002]*\ue002", error.message) if part]
    assert literal and all(part in cli and part in str(api_error) for part in literal)
    assert not re.search(r"(?<![\w-])--[a-z]", str(api_error))


def cli_error(capsys, argv: list[str], vision: bool = True) -> str:
    """Run the command line in-process on bad input: exit status 2 and exactly one line on stderr."""
    from mask_impact.cli import main

    code = main(argv, vision)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


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


def pixel_stage_units(loaded, prompt, analysis, unit: str) -> list:
    """The ``--stage pixels`` units of kind ``unit`` (token, patch, region:N, image) of a prompt, image tokens only."""
    from types import SimpleNamespace

    from mask_impact.units import build_units

    config = SimpleNamespace(unit=unit, groups=[], flows=[], mask_mode="vision", stage="pixels")
    return build_units(prompt, loaded.tokenizer, config, analysis.answer_start)


def model_logprobs(loaded, tf, pixel_values):
    """(T, V) the model's own forward on ``pixel_values`` (the processor's form), the prompt's other inputs kept."""
    import torch

    with torch.no_grad():
        logits = loaded.model(input_ids=tf.input_ids, **dict(tf.model_kwargs, pixel_values=pixel_values)).logits
    return torch.log_softmax(logits[0, tf.answer_positions].float(), dim=-1)
