"""The run configuration: one dataclass, the command line and YAML files that fill it, validation.

Both entry points share this parser; they differ in the default model, whether ``--image`` exists,
and which ``--mask-mode`` values make sense. Precedence, highest first: command-line flags, the run's
entry in a YAML batch, the batch's ``defaults:``, the built-in defaults of ``RunConfig``. Every check
that needs no model runs before the model is loaded, so bad input fails fast, with one line on stderr
and exit status 2, and writes nothing.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

VL_DEFAULT_MODEL = "Qwen/Qwen3-VL-4B-Instruct"
TEXT_DEFAULT_MODEL = "Qwen/Qwen3-4B"
MASK_MODES = ("text", "vision", "both")
DEMO_PROMPT_VL = "What color is the shape?"
DEMO_PROMPT_TEXT = "A=3, B=7, C=1. What is B?"
DEMO_IMAGE = Path(__file__).resolve().parent.parent / "testimg.png"


CHOICES = {
    "mask_mode": MASK_MODES,
    "block_from": ("all", "answer"),
    "vision_attention": ("causal", "bidirectional"),
    "engine": ("fast", "naive"),
    "dtype": ("auto", "float32", "bfloat16", "float16"),
}
# What a YAML value must be, per RunConfig field.
FIELD_TYPES = {
    "model": str, "prompt": str, "images": list, "demo": bool, "raw_prompt": bool, "mask_mode": str,
    "num_tokens": int, "layers": str, "window": int, "block_from": str, "vision_attention": str,
    "generate_top": int, "batch_size": int, "engine": str, "device": str, "dtype": str, "output": str,
    "output_dir": str, "overwrite": bool, "resume": bool, "html": bool, "progress": bool, "max_pixels": int,
}
# Set once for a whole batch (one model load, one folder): allowed in ``defaults:`` and on the command line.
BATCH_KEYS = ("model", "demo", "device", "dtype", "output_dir")


class UsageError(Exception):
    """Bad input from the user: reported as one line on stderr with exit status 2."""


@dataclass
class RunConfig:
    model: str
    prompt: str | None = None
    images: list[str] = field(default_factory=list)
    demo: bool = False
    raw_prompt: bool = False
    mask_mode: str = "text"
    num_tokens: int = 5
    layers: str = "all"
    window: int = 1
    block_from: str = "all"
    vision_attention: str = "causal"
    generate_top: int = 10
    batch_size: int | None = None  # None: chosen from free memory
    engine: str = "fast"
    device: str = "auto"
    dtype: str = "auto"
    output: str | None = None
    output_dir: str = "output"
    overwrite: bool = False
    resume: bool = False
    html: bool = True
    progress: bool = True
    max_pixels: int | None = None  # None: the processor's own limit

    def settings(self) -> dict:
        return asdict(self)

    def validate(self, vision: bool) -> None:
        """Checks that need no model."""
        for name, allowed in CHOICES.items():
            if name == "mask_mode" and not vision:
                allowed = ("text",)
            if getattr(self, name) not in allowed:
                raise UsageError(f"{name} {getattr(self, name)!r} is not one of: {', '.join(allowed)}")
        if self.num_tokens < 1:
            raise UsageError(f"--num-tokens must be at least 1 (got {self.num_tokens})")
        if self.window < 1:
            raise UsageError(f"--window must be at least 1 (got {self.window})")
        if self.generate_top < 0:
            raise UsageError(f"--generate-top must be 0 or more (got {self.generate_top})")
        if self.batch_size is not None and self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1 (got {self.batch_size})")
        if self.max_pixels is not None and self.max_pixels < 1:
            raise UsageError(f"--max-pixels must be at least 1 (got {self.max_pixels})")
        if not vision and self.images:
            raise UsageError("text-only models take no image; use mask_impact_vl.py with a Qwen3-VL model")
        if self.mask_mode in ("vision", "both") and not self.images:
            raise UsageError(f"--mask-mode {self.mask_mode} needs an image: add --image PATH, or use --mask-mode text")
        if self.prompt is None:
            raise UsageError("no prompt given: pass --prompt TEXT (or a text file), or --demo")
        if self.output is not None and not re.fullmatch(r"[\w.\-]+", self.output):
            raise UsageError(f"--output {self.output!r} must be a plain name (letters, digits, '.', '_', '-')")
        parse_layers(self.layers, None)


def parse_layers(spec: str, num_layers: int | None) -> list[int] | None:
    """``all`` or ``0-11,20,30-35`` → sorted layer list; range-checked once ``num_layers`` is known."""
    if spec.strip() == "all":
        return list(range(num_layers)) if num_layers is not None else None
    layers: set[int] = set()
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match:
            raise UsageError(f"--layers {spec!r} is not understood; write e.g. 'all' or '0-11,20,30-35'")
        first, last = int(match[1]), int(match[2] or match[1])
        if last < first:
            raise UsageError(f"--layers range {part.strip()!r} runs backwards; write it as {last}-{first}")
        layers.update(range(first, last + 1))
    if num_layers is not None and max(layers) >= num_layers:
        raise UsageError(f"--layers {spec} names layer {max(layers)}, but the model has layers 0-{num_layers - 1}")
    return sorted(layers)


def windows_for(layers: list[int], window: int, num_layers: int) -> list[tuple[int, int]]:
    """Window k centred on layer l: ``max(0, l - k//2) .. min(L-1, l + ceil(k/2) - 1)`` (Geva et al.)."""
    if window > num_layers:
        raise UsageError(f"--window {window} is wider than the model's {num_layers} layers")
    return [(max(0, layer - window // 2), min(num_layers - 1, layer + -(-window // 2) - 1)) for layer in layers]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit status 2, no usage dump
        raise UsageError(f"{message} (see --help)")


def build_parser(vision: bool) -> argparse.ArgumentParser:
    """Options left out of the command line are absent from the parsed namespace (not defaulted), so
    a YAML batch can tell what the user really gave; ``RunConfig`` holds the defaults."""
    what = "Qwen3-VL (text + images)" if vision else "text-only causal LMs (Qwen3, Llama, ...)"
    parser = _Parser(description=f"Attention-knockout analysis for {what}: which input tokens the model "
                     "needs, at which layers, to produce its answer.", argument_default=argparse.SUPPRESS)
    default_model = VL_DEFAULT_MODEL if vision else TEXT_DEFAULT_MODEL
    parser.add_argument("--model", help=f"hub id or local folder (default {default_model})")
    parser.add_argument("--demo", action="store_true", help="use a tiny offline demo model and default inputs")
    parser.add_argument("--config", help="YAML file with defaults: and runs: (a batch, one model load)")
    parser.add_argument("--prompt", help="prompt text, or the path of a UTF-8 text file")
    if vision:
        parser.add_argument("--image", dest="images", action="append", metavar="PATH",
                            help="image file; give several times for several images")
        parser.add_argument("--max-pixels", type=int,
                            help="refuse images larger than this many pixels (default: the processor's limit)")
    parser.add_argument("--raw-prompt", action="store_true", help="skip the chat template")
    parser.add_argument("--mask-mode", choices=MASK_MODES if vision else ("text",),
                        help="which positions to knock out (default text; special tokens are swept with text)")
    parser.add_argument("--num-tokens", type=int, help="answer length (default 5; greedy, stops at EOS)")
    parser.add_argument("--layers", help="window centres: 'all' (default) or e.g. '0-11,20,30-35'")
    parser.add_argument("--window", type=int, help="number of consecutive layers knocked out together (default 1)")
    parser.add_argument("--block-from", choices=CHOICES["block_from"],
                        help="which queries are blocked from the token: all (default), or only the answer positions")
    if vision:
        parser.add_argument("--vision-attention", choices=CHOICES["vision_attention"],
                            help="causal (default) is what Qwen3-VL computes; bidirectional reproduces the original "
                                 "tool's mask (image tokens of one image see each other both ways)")
    parser.add_argument("--generate-top", type=int,
                        help="run real greedy generation under the K most impactful knockouts (default 10)")
    parser.add_argument("--batch-size", type=int, help="knockouts per forward (default: automatic)")
    parser.add_argument("--engine", choices=CHOICES["engine"],
                        help="fast (default), or naive: one full forward per knockout (the reference, slow)")
    parser.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument("--dtype", choices=CHOICES["dtype"], help="default auto: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--output", help="result name (a batch: its folder name) under OUTPUT_DIR")
    parser.add_argument("--output-dir", help="where results go (default output)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing result of the same name")
    parser.add_argument("--resume", action="store_true", help="continue a killed run (or batch) where it stopped")
    parser.add_argument("--no-html", dest="html", action="store_false",
                        help="skip OUTPUT_DIR/NAME.html (the viewer with this result embedded)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    return parser


def cli_options(argv: list[str] | None, vision: bool) -> dict:
    """Only the options the user actually gave."""
    return vars(build_parser(vision).parse_args(argv))


def make_config(layers: list[dict], vision: bool) -> RunConfig:
    """Merge option layers, lowest precedence first, into a validated ``RunConfig``."""
    merged: dict = {}
    for layer in layers:
        merged.update(layer)
    if merged.get("demo"):
        if merged.get("model") not in (None, "demo"):
            raise UsageError("--demo brings its own model; drop --model, or drop --demo")
        merged["model"] = "demo"
        merged.setdefault("prompt", DEMO_PROMPT_VL if vision else DEMO_PROMPT_TEXT)
        if vision:
            merged.setdefault("images", [str(DEMO_IMAGE)])
    merged.setdefault("model", VL_DEFAULT_MODEL if vision else TEXT_DEFAULT_MODEL)
    config = RunConfig(**merged)
    config.validate(vision)
    if config.output is None:
        config.output = datetime.now().strftime("mask_impact_%Y%m%d_%H%M%S")
    return config


def output_paths(config: RunConfig) -> dict[str, Path]:
    kinds = ("json", "csv", "html") if config.html else ("json", "csv")
    return {ext: Path(config.output_dir) / f"{config.output}.{ext}" for ext in kinds}
