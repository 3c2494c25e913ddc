"""What both entry points do: parse → validate → load → run → write. No tensors here."""

from __future__ import annotations

import sys
import warnings

from .config import UsageError, output_paths, parse_args
from .inputs import load_image, read_prompt


def main(argv: list[str] | None, vision: bool) -> int:
    """Run one analysis; bad input is one line on stderr and exit status 2, with nothing written."""
    try:
        config = parse_args(argv, vision)
        config.prompt = read_prompt(config.prompt)
        for path in config.images:
            load_image(path)  # fail on a bad image before the model loads
        paths = output_paths(config)
        from . import report  # heavy imports (torch, transformers) only once the input is known good

        report.check_writable(paths, config.overwrite)
        loaded = _load(config, vision)
        from .inputs import build_prompt
        from .sweep import run

        prompt = build_prompt(loaded, config.prompt, config.images, config.raw_prompt)
        result = run(loaded, prompt, config)
        data = report.result_json(loaded, prompt, config, result)
        report.check_writable(paths, config.overwrite)
        report.write_results(data, paths)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
    print(report.summary(data, paths))
    return 0


def _load(config, vision: bool):
    import transformers

    from .demo import demo_model_path
    from .models import load_model

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", module="transformers")
    name = str(demo_model_path(vision)) if config.demo else config.model
    loaded = load_model(name, vision, config.device, config.dtype)
    if config.demo:
        loaded.name = f"demo ({name})"
    return loaded
