"""The one path every front end calls: a run's model input prepared (``prepare``) and analysed (``analyze``).

The command line (cli.py, batch runs included) and the Python API (api.py) both go through here, so a result is the
same JSON whichever wrote it; neither front end imports the other (docs/DESIGN.md §7).
"""

from __future__ import annotations

import sys
from typing import Callable

from .config import RunConfig
from .shard import is_main_process


def say(*args, **kwargs) -> None:
    """``print`` in the process that speaks for the run: the only one, or the main one of a launch."""
    if is_main_process():
        print(*args, **kwargs)


def prepare(loaded, config: RunConfig, prompt_text: str):
    """The model's input for a run, and the fingerprint of everything that decides its numbers."""
    from .inputs import build_prompt
    from .resume import fingerprint_parts
    from .stages import check_available

    check_available(loaded, config)  # before the prompt's notes: a refusal is the run's one line

    prompt = build_prompt(loaded, prompt_text, config.images, config.raw_prompt, config.max_pixels,
                          config.min_pixels, config.allow_special_tokens, config.num_tokens)
    for path, image in zip(config.images, prompt.images):
        area_ratio = image.resized_width * image.resized_height / (image.width * image.height)
        resized = [f"{image.resize} ({image.width}×{image.height} → {image.resized_width}×{image.resized_height})"]
        for note in image.notes + (resized if not 0.8 <= area_ratio <= 1.25 else []):
            say(f"note: image {path}: {note}", file=sys.stderr)  # said once in a launch
    return prompt, fingerprint_parts(loaded, config, prompt)


def analyze(loaded, config: RunConfig, prompt_text: str, store=None, prepared: tuple | None = None,
            on_progress: Callable[[int, int], None] | None = None) -> dict:
    """One analysis of ``prompt_text`` under ``config``: the result as the JSON the command line writes
    (``store``: the run's resume state, see resume.py, None in a launched process other than the main one, which
    computes only its part; ``prepared``: ``prepare``'s prompt and fingerprint, if the caller has them already;
    ``on_progress(done, total)``: cells finished)."""
    from . import report
    from .sweep import run

    prompt, parts = prepared or prepare(loaded, config, prompt_text)
    result = run(loaded, prompt, config, store, on_progress)
    if result is None:  # a launched process other than the main one: its part is in its partial file
        return None
    return report.result_json(loaded, prompt, config, result, parts)
