"""Side-by-side sweep benchmark: naive reference vs fast engine, same model, same input, one process.

    python benchmarks/bench_sweep.py --arch tiny                         # CPU, demo-sized prompt + image
    python benchmarks/bench_sweep.py --arch medium                       # CPU, hidden 1024, 4 layers, fp32
    python benchmarks/bench_sweep.py --arch qwen3-vl-4b --num-layers 2 --image-size 256 --device cpu
    python benchmarks/bench_sweep.py --arch qwen3-vl-4b --image-size 1024 --device cuda
    python benchmarks/bench_sweep.py --processes 1,2 --plan 8             # processes: see bench_processes.py

``--arch qwen3-vl-4b`` builds benchmarks/configs/qwen3-vl-4b-instruct.json with random weights (weights do not
matter for speed); ``--arch medium`` is the same family at a width that fits a few CPU cores (hidden 1024,
intermediate 3072, 8 query / 2 key-value heads of 128, 4 layers, a 3-block vision tower, float32).

Timings on a shared machine are noisy, so every figure is measured side by side: each repeat runs the whole
sweep batch by batch, every batch once with each fast-engine variant (the engine as it is; ``--without SAVING``:
one of ``engines.decoder.Savings`` off; ``--also-threads N``), a different variant going first each batch; the naive engine
runs its sample of knockouts window by window in between, and the plain matmul of the model's MLP shapes at the
row counts the sweep used ends the repeat. Min and median over the repeats are
printed for each, and every ratio comes from the same repeats. Both engines must agree on the sample before a
ratio is printed. Threads: ``--threads``, or by default the CPUs other processes leave idle (printed).

Also printed: knockouts/s, peak memory, time per layer window, the FLOPs the sweep needs (decoder layers as the
fast engine must compute them, and the head), the FLOP/s achieved, the machine's own measured matmul rate for
the same shapes and dtype, and the fraction of it achieved — over the whole sweep, and over its batches alone (the
engine's set-up, one unmasked pass with the vision encoder, is timed but its work is not in the count); on a GPU
also the time at the data sheet's peak.
``--unit region:2`` and ``--flow 'image->last'`` measure those sweeps too, on the same input, next to the token
sweep. ``--stage vision-encoder|pixels|deepstack`` measures that stage's sweep (patch units; DeepStack: token units)
in the command line's own batches, the naive sample and the fast sweep in turn over the repeats (min and median),
with the matmul work it needs (ViT layers, mergers, decoder, head). ``--flops-only`` (with ``--arch qwen3-vl-4b``)
computes each ``--stage`` sweep's TFLOP for the 4B configuration and its time at the H200's dense bf16 peak
without building anything:

    python benchmarks/bench_sweep.py --arch qwen3-vl-4b --image-size 1024 --flops-only --stage vision-encoder

Every size option is honoured or refused with one line.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, fields
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import transformers
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mask_impact.config import UsageError, windows_for  # noqa: E402
from mask_impact.demo import build_demo  # noqa: E402
from mask_impact.engine import Analysis  # noqa: E402
from mask_impact.engines.decoder import FastEngine, NaiveEngine, Savings  # noqa: E402
from mask_impact.inputs import Prompt, TokenInfo  # noqa: E402
from mask_impact.models import LoadedModel, adapter_for, load_model  # noqa: E402
from mask_impact.metrics import METRICS, compute_all  # noqa: E402
from mask_impact.threads import idle_threads  # noqa: E402
from mask_impact.sweep import auto_batch_size, is_out_of_memory, next_batch, next_group, sweep_flops  # noqa: E402
from mask_impact.units import build_units  # noqa: E402

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, per the vendors' data sheets
# the 4B model's architecture (its config.json, no weights), carried in the repository
CONFIG_4B = ROOT / "benchmarks" / "configs" / "qwen3-vl-4b-instruct.json"
# --arch medium: the 4B configuration at a width a few CPU cores can sweep in a minute
MEDIUM_TEXT = dict(hidden_size=1024, intermediate_size=3072, num_attention_heads=8, num_key_value_heads=2,
                   head_dim=128, num_hidden_layers=4)
MEDIUM_VISION = dict(depth=3, hidden_size=256, intermediate_size=1024, num_heads=4,
                     deepstack_visual_indexes=[0, 1, 2], out_hidden_size=1024)
DEFAULT_IMAGE = {"tiny": 128, "medium": 256, "qwen3-vl-4b": 1024}
DEFAULT_DTYPE = {"tiny": "float32", "medium": "float32", "qwen3-vl-4b": "bfloat16"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class IdTokenizer:
    """Random-weight models have no vocabulary worth decoding: tokens print as their ids."""

    pad_token_id = None

    def __init__(self, eos: int):
        self.eos_token_id = eos

    def decode(self, ids, **kwargs) -> str:
        return " ".join(str(i) for i in ids)


def build_from_4b(device: torch.device, dtype: torch.dtype, num_layers: int | None, text: dict | None = None,
                  vision: dict | None = None, name: str = "qwen3-vl-4b") -> LoadedModel:
    """The 4B configuration (its sizes overridden by ``text``/``vision``), random weights."""
    raw = json.loads(CONFIG_4B.read_text())
    raw["text_config"].update(text or {})
    raw["vision_config"].update(vision or {})
    if num_layers:
        raw["text_config"]["num_hidden_layers"] = num_layers
    config = transformers.Qwen3VLConfig(**raw)
    config.text_config._attn_implementation = config.vision_config._attn_implementation = "sdpa"
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.Qwen3VLForConditionalGeneration(config).to(dtype).eval()
    eos = config.text_config.eos_token_id
    model.generation_config.eos_token_id = eos
    return LoadedModel(model, None, IdTokenizer(eos), adapter_for(model), f"{name} (random)", device, dtype)


def prompt_4b(loaded: LoadedModel, image_size: int) -> Prompt:
    """The chat layout of a one-image question, with Qwen's real special-token ids."""
    config = loaded.model.config
    image_processor = transformers.Qwen2VLImageProcessor(
        patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
        size={"shortest_edge": 64 * 64, "longest_edge": 2048 * 2048},
    )
    pixels = np.random.default_rng(0).integers(0, 255, (image_size, image_size, 3), dtype=np.uint8)
    encoded = image_processor(images=[Image.fromarray(pixels)], return_tensors="pt")
    grid = encoded["image_grid_thw"]
    n_image = int(grid.prod() // 4)
    im_start, im_end, newline = 151644, 151645, 198
    text = [785, 374, 304, 419, 2168, 30]  # a few ordinary token ids ("What is in this image?")
    ids = ([im_start, 872, newline, config.vision_start_token_id] + [config.image_token_id] * n_image
           + [config.vision_end_token_id] + text + [im_end, newline, im_start, 77091, newline])
    input_ids = torch.tensor([ids])
    types = (input_ids == config.image_token_id).long()
    columns = int(grid[0, 2]) // 2  # merged-grid columns
    tokens = [TokenInfo(i, t, str(t), "text") for i, t in enumerate(ids)]
    for n, i in enumerate(range(4, 4 + n_image)):  # the image's tokens: t, then row, then column
        tokens[i] = TokenInfo(i, ids[i], str(ids[i]), "vision", 0, 0, n // columns, n % columns)
    kwargs = {"pixel_values": encoded["pixel_values"].to(loaded.device, loaded.dtype), "image_grid_thw": grid,
              "mm_token_type_ids": types}
    return Prompt("benchmark", input_ids, kwargs, tokens, [])


def build_tiny(image_size: int, num_layers: int | None, device: torch.device,
               dtype: str) -> tuple[LoadedModel, Prompt]:
    """The tiny random-weight VL model; the image is given to the model at ``image_size`` (not shrunk)."""
    from mask_impact.inputs import build_prompt

    folder = build_demo(Path(tempfile.mkdtemp()) / "tiny", True, num_layers=num_layers or 4)
    loaded = load_model(str(folder), True, str(device), dtype)
    image = Path(tempfile.mkdtemp()) / "image.png"
    pixels = np.random.default_rng(0).integers(0, 255, (image_size, image_size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(image)
    return loaded, build_prompt(loaded, "What's in this image? Describe the picture.", [str(image)],
                                max_pixels=max(image_size * image_size, 64 * 64))


def build(args, device: torch.device) -> tuple[LoadedModel, Prompt]:
    image_size = args.image_size or DEFAULT_IMAGE[args.arch]
    dtype = args.dtype or DEFAULT_DTYPE[args.arch]
    if args.arch == "tiny":
        loaded, prompt = build_tiny(image_size, args.num_layers, device, dtype)
    else:
        text, vision = (MEDIUM_TEXT, MEDIUM_VISION) if args.arch == "medium" else (None, None)
        loaded = build_from_4b(device, DTYPES[dtype], args.num_layers, text, vision, args.arch)
        prompt = prompt_4b(loaded, image_size)
    grid = prompt.model_kwargs["image_grid_thw"][0].tolist()
    if grid[1:] != [image_size // 16] * 2:  # the sizes were checked; this is the processor agreeing
        raise UsageError(f"the processor gave a {grid[1] * 16}x{grid[2] * 16} image for --image-size {image_size}")
    return loaded, prompt


def check_sizes(args) -> None:
    """Every size option is honoured exactly or refused here, in one line."""
    image_size = DEFAULT_IMAGE[args.arch] if args.image_size is None else args.image_size  # 0 is no default
    if image_size % 32 or not 64 <= image_size <= (2048 if args.arch != "tiny" else 4096):
        raise UsageError(f"--image-size {image_size}: the model takes square images of 64.. pixels in steps of 32 "
                         "(one merged token is 32x32 pixels); anything else would be resized, not honoured")
    for name in ("num_layers", "num_tokens", "naive_sample", "repeat", "window", "batch_size", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} {value}: must be at least 1")
    if any(n < 1 for n in args.also_threads):
        raise UsageError(f"--also-threads {min(args.also_threads)}: must be at least 1")
    if args.arch == "medium" and args.num_layers is None:
        args.num_layers = MEDIUM_TEXT["num_hidden_layers"]


class LayerRows:
    """Records the rows (batch × positions) entering every decoder layer, while ``active``: the M of its matmuls."""

    def __init__(self, layers):
        self.rows: list[int] = []
        self.active = False
        self.handles = [layer.register_forward_pre_hook(self._hook, with_kwargs=True) for layer in layers]

    def _hook(self, module, args, kwargs):
        if not self.active:
            return
        hidden = args[0] if args else kwargs["hidden_states"]
        self.rows.append(hidden.shape[0] * hidden.shape[1])

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=("tiny", "medium", "qwen3-vl-4b"), default="tiny")
    parser.add_argument("--image-size", type=int, default=None,
                        help="square image side, a multiple of 32 (tiny: 128, medium: 256, 4b: 1024)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                        help="tiny, medium: float32; qwen3-vl-4b: bfloat16")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: the CPUs other processes leave idle, at least 1)")
    parser.add_argument("--num-tokens", type=int, default=5)
    parser.add_argument("--naive-sample", type=int, default=12, help="knockouts run by the naive engine")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--block-from", choices=("all", "answer"), default="all")
    parser.add_argument("--num-layers", type=int, default=None, help="override the decoder depth (medium: 4)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="interleaved repeats of naive, fast (and ablated) runs; min and median are reported")
    parser.add_argument("--max-seconds", type=float, default=float("inf"),
                        help="stop each fast sweep after this long and extrapolate the rest by FLOPs")
    parser.add_argument("--mask-mode", choices=("text", "vision", "both"), default="both")
    parser.add_argument("--unit", default="token",
                        help="token (default), or region:N / image / word: measured next to token units")
    parser.add_argument("--flow", dest="flows", action="append", default=[], metavar="SRC->DST",
                        help="also measure a flow sweep (repeatable), next to token units")
    parser.add_argument("--window", type=int, default=1, help="layers per window (default 1)")
    parser.add_argument("--stage", action="append", default=[], choices=("vision-encoder", "pixels", "deepstack"),
                        help="also measure a sweep of this stage (repeatable), fast vs naive, next to token units")
    parser.add_argument("--flops-only", action="store_true",
                        help="with --arch qwen3-vl-4b: print the token sweep's and each --stage sweep's needed TFLOP "
                             "and its time at the H200's dense bf16 peak, computed from the configuration (nothing is "
                             "built or run)")
    parser.add_argument("--without", action="append", default=[], choices=[f.name for f in fields(Savings)],
                        help="also time the fast engine with this saving off, in the same repeats (repeatable)")
    parser.add_argument("--profile", action="store_true",
                        help="after the token sweep, profile its first group of batches (window 0, the costliest) and "
                             "print the top operators by self time (torch.profiler; on a GPU its kernels' time)")
    parser.add_argument("--also-threads", type=int, action="append", default=[], metavar="N",
                        help="also time the fast engine on N threads, in the same repeats (repeatable)")
    args = parser.parse_args()
    check_sizes(args)
    if args.flops_only:
        flops_only(args)
        return
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    device = torch.device(args.device)
    torch_threads, (threads, why) = torch.get_num_threads(), idle_threads()
    torch.set_num_threads(args.threads or threads)
    loaded, prompt = build(args, device)
    cuda = device.type == "cuda"
    analysis = Analysis(loaded, prompt, block_from=args.block_from)
    _, tf = analysis.baseline(args.num_tokens)
    num_layers = loaded.adapter.num_layers
    windows = windows_for(list(range(num_layers)), args.window, num_layers)
    text = loaded.adapter.decoder.config
    print(f"device {torch.cuda.get_device_name(device) if cuda else 'cpu'}  model {loaded.name}  "
          f"dtype {str(loaded.dtype).replace('torch.', '')}  torch {torch.__version__}  "
          f"transformers {transformers.__version__}")
    print(f"threads {torch.get_num_threads()} ({'--threads' if args.threads else 'default'}; the default: {why}; "
          f"torch's own {torch_threads})")
    print(f"decoder: {num_layers} layers, hidden {text.hidden_size}, intermediate {text.intermediate_size}, heads "
          f"{text.num_attention_heads}/{text.num_key_value_heads} of {text.head_dim}, vocabulary {text.vocab_size:,}")
    image_tokens = sum(t.modality == "vision" for t in prompt.tokens)
    side = args.image_size or DEFAULT_IMAGE[args.arch]
    stopped = f", stopped at EOS (asked {args.num_tokens})" if len(tf.answer_ids) < args.num_tokens else ""
    print(f"sequence {tf.input_ids.shape[1]} tokens ({image_tokens} image, from a {side}-pixel square), answer "
          f"{len(tf.answer_ids)} tokens{stopped}, windows {len(windows)} of {args.window} layer(s)")
    sweeps = [("token", dict(unit="token"))]
    if args.unit != "token":
        sweeps.append((args.unit, dict(unit=args.unit)))
    if args.flows:
        sweeps.append(("flows", dict(unit="token", flows=args.flows)))
    figures, agree = {}, True
    for name, options in sweeps:
        config = SimpleNamespace(**{"groups": [], "flows": [], "mask_mode": args.mask_mode, **options})
        units = build_units(prompt, loaded.tokenizer, config, analysis.answer_start)
        print(f"\n== {name}: {len(units)} units x {len(windows)} windows = {len(units) * len(windows):,} knockouts")
        figures[name], ok = measure(args, loaded, analysis, tf, windows, [unit.knockout() for unit in units], cuda)
        agree = agree and ok
        if args.profile and name == "token":
            profile_group(loaded, analysis, tf, windows, [unit.knockout() for unit in units], args.batch_size, cuda)
    for stage in args.stage:
        print(f"\n== --stage {stage}")
        figures[f"--stage {stage}"], ok = measure_stage(args, loaded, analysis, tf, stage, cuda)
        agree = agree and ok
    if len(figures) > 1:
        token = figures["token"]
        print("\nside by side (fast knockouts/s, fast/naive ratio):")
        for name, (rate, ratio) in figures.items():
            print(f"  {name:<24} {rate:10.2f} knockouts/s  ({rate / token[0]:.2f}x token units)  ratio {ratio:.1f}x")
    if not agree:
        sys.exit(1)


@dataclass
class Repeat:
    """One repeat: every engine over the same batches, in lockstep (seconds per engine, set-up included)."""

    seconds: dict[str, float]  # "fast", "without NAME" per switched-off saving, "on N thread(s)"
    setup: dict[str, float]  # of those seconds, the engine's set-up: the unmasked pass (vision encoder included)
    naive_per_knockout: float
    naive_rows: dict  # (window index, unit index) -> (1, T, V) log-probs
    metrics: dict  # engine -> window index -> metric -> [value per unit]
    window_times: dict  # window index -> seconds of the fast engine
    batch: int
    rows_per_forward: float


def measure_stage(args, loaded, analysis, tf, stage: str, cuda: bool) -> tuple[tuple[float, float], bool]:
    """A sweep of a stage before the decoder (units: patches; DeepStack: tokens), the fast engine over every cell
    in the sweep's own batches (``next_batch`` under the command line's batch size), the naive one over a sample,
    interleaved over ``--repeat`` repeats (a different engine first each repeat): (fast cells/s, fast/naive ratio
    from the medians) and whether they agree on the sample."""
    rows, units, fast, naive = stage_engines(loaded, analysis, tf, stage)
    cells = len(rows) * len(units)
    unit = units[0].kind
    length = tf.input_ids.shape[1]
    batch = args.batch_size or auto_batch_size(loaded, length)
    print(f"{len(units)} {unit} units x {len(rows)} rows = {cells:,} cells; batches: the sweep's own, up to {batch} rows")
    rng = random.Random(0)
    sample = sorted({(rng.randrange(len(rows)), rng.randrange(len(units))) for _ in range(args.naive_sample)})
    naive.logprobs(rows[0], units[:1])  # warm-up, both engines
    fast.logprobs(rows[0], units[:1])

    def sweep() -> dict:
        out = {}
        for w, row in enumerate(rows):
            done, parts = 0, []
            while done < len(units):
                chunk = next_batch(fast, units, done, batch)
                parts.append(fast.logprobs(row, chunk))
                done += len(chunk)
            out[w] = torch.cat(parts)
        return out

    naive_times, fast_times = [], []
    for repeat in range(args.repeat):
        steps = [("naive", lambda: [naive.logprobs(rows[w], [units[i]]) for w, i in sample]), ("fast", sweep)]
        for name, step in steps if repeat % 2 == 0 else steps[::-1]:
            result, seconds = _timed(cuda, step)
            if name == "naive":
                naive_rows = result
                naive_times.append(seconds / len(sample))
            else:
                computed = result
                fast_times.append(seconds)
    worst = max(float((computed[w][i] - got[0]).abs().max()) for (w, i), got in zip(sample, naive_rows))
    tolerance = 1e-3 if loaded.dtype == torch.float32 else 0.25
    naive_med, fast_med = statistics.median(naive_times), statistics.median(fast_times)
    ratio = naive_med * cells / fast_med
    ratios = sorted(n * cells / f for n, f in zip(naive_times, fast_times))
    print(f"agreement on {len(sample)} sampled cells: max |Δ log p| = {worst:.2e} (tolerance {tolerance:g}) -> "
          f"{'AGREE' if worst <= tolerance else 'DISAGREE'}")
    print(f"{args.repeat} repeats, the naive sample and the fast sweep in turn (each repeat the other first); min / "
          f"median:")
    print(f"  naive: {1 / min(naive_times):10.2f} / {1 / naive_med:10.2f} cells/s  ({min(naive_times) * 1e3:.1f} / "
          f"{naive_med * 1e3:.1f} ms each)")
    print(f"  fast:  {cells / min(fast_times):10.2f} / {cells / fast_med:10.2f} cells/s  (whole sweep "
          f"{min(fast_times):.3f} / {fast_med:.3f} s)")
    print(f"ratio fast/naive: {ratio:.1f}x (medians; per repeat {', '.join(f'{r:.1f}' for r in ratios)})")
    vision = [tok.index for tok in analysis.prompt.tokens if tok.modality == "vision"]
    work = stage_flops(loaded.model.config, stage, rows, units, len(vision), min(vision), length, len(tf.answer_ids))
    print(f"needed matmul work {describe_work(work)}; achieved {sum(work.values()) / fast_med / 1e12:.4g} TFLOP/s")
    return (cells / fast_med, ratio), worst <= tolerance


def stage_engines(loaded, analysis, tf, stage: str):
    """The rows, units, fast and naive engines of a stage's sweep, as the command line makes them (the stage
    registry's plan, its default units, every layer)."""
    from mask_impact.config import RunConfig
    from mask_impact.stages import PLANS, STAGES

    config = RunConfig(model=loaded.name, stage=stage, unit=STAGES[stage].default_unit, mask_mode="vision")
    units = build_units(analysis.prompt, loaded.tokenizer, config, analysis.answer_start)
    fast, naive = (PLANS[stage](loaded, config, fast) for fast in (True, False))
    return fast.rows, units, fast.make_engine(analysis, tf, units), naive.make_engine(analysis, tf, units)


def stage_flops(config, stage: str, rows: list, units: list, tokens: int, start: int, length: int, answer: int) -> dict:
    """Matmul FLOPs a stage's fast sweep needs (one image; from the configuration alone): per cell, the ViT layers
    it re-runs over the image's patches (``vision-encoder``: layers a.. of its window; ``pixels``: all), the mergers
    of the levels those layers reach, the decoder from the image's first position (``deepstack``: from the unit's
    first position, no ViT), and the head at the answer positions. ``tokens``: the image's decoder tokens, from
    ``start`` on; ``length``: the teacher-forced sequence; ``answer``: its answer positions."""
    v, t = config.vision_config, config.text_config
    d, inner, depth, merge = v.hidden_size, v.intermediate_size, v.depth, v.spatial_merge_size ** 2
    n = tokens * merge  # the image's patches
    vit_layer = n * 2 * (4 * d * d + 2 * d * inner) + 4 * n * n * d  # qkv + proj + MLP; scores + weighted sum
    merger = tokens * 2 * ((d * merge) ** 2 + d * merge * v.out_hidden_size)
    h, nh, nkv = t.hidden_size, t.num_attention_heads, t.num_key_value_heads
    hd = getattr(t, "head_dim", None) or h // nh
    per_token = 2 * (h * nh * hd * 2 + 2 * h * nkv * hd + 3 * h * t.intermediate_size)

    def decoder(first: int) -> float:
        queries = length - first
        return t.num_hidden_layers * (queries * per_token + 4 * nh * hd * queries * (first + length) / 2)

    head = 2 * answer * h * t.vocab_size
    work = {"ViT layers": 0.0, "mergers": 0.0, "decoder layers": 0.0, "head": 0.0}
    levels = list(v.deepstack_visual_indexes)
    for row in rows:
        for unit in units:
            if stage == "deepstack":
                work["decoder layers"] += decoder(min(unit.keys))
            else:
                first = row[0] if stage == "vision-encoder" else 0
                work["ViT layers"] += (depth - first) * vit_layer
                work["mergers"] += (1 + sum(level >= first for level in levels)) * merger
                work["decoder layers"] += decoder(start)
            work["head"] += head
    return work


def describe_work(work: dict) -> str:
    return f"{sum(work.values()) / 1e12:.4g} TFLOP (" + ", ".join(f"{k} {v / 1e12:.4g}" for k, v in work.items()) + ")"


def flops_only(args) -> None:
    """``--flops-only``: the needed TFLOP of the token sweep (every prompt token, ``--window``) and of each
    ``--stage`` sweep, and its time at a GPU's dense bf16 peak, from the configuration alone (no weights, nothing
    run): one square image of ``--image-size``, the benchmark's prompt."""
    from mask_impact.engines.deepstack import deepstack_routes

    if args.arch != "qwen3-vl-4b":
        raise UsageError("--flops-only computes the 4B configuration's figures: give --arch qwen3-vl-4b")
    raw = json.loads(CONFIG_4B.read_text())
    if args.num_layers:
        raw["text_config"]["num_hidden_layers"] = args.num_layers
    config = transformers.Qwen3VLConfig(**raw)
    side = args.image_size or DEFAULT_IMAGE[args.arch]
    grid = side // config.vision_config.patch_size
    tokens = grid * grid // config.vision_config.spatial_merge_size ** 2
    start, answer = 4, args.num_tokens  # prompt_4b: <|im_start|> user \n <|vision_start|>, then the image
    length = start + tokens + 1 + 6 + 5 + answer - 1  # teacher-forced: the prompt and all but the last answer token
    peak = PEAK_BF16_TFLOPS["H200"]
    layers = config.text_config.num_hidden_layers
    windows = windows_for(list(range(layers)), args.window, layers)  # one per layer, as a real run's (refused first)
    print(f"{CONFIG_4B.name}: ViT {config.vision_config.depth} layers (hidden {config.vision_config.hidden_size}), "
          f"decoder {config.text_config.num_hidden_layers} layers (hidden {config.text_config.hidden_size}); a "
          f"{side}x{side} image = {grid * grid:,} patches, {tokens:,} image tokens; sequence {length} tokens")
    decoder = SimpleNamespace(adapter=SimpleNamespace(decoder=SimpleNamespace(config=config.text_config),
                                                      num_layers=config.text_config.num_hidden_layers))
    prompt = length - answer + 1
    image = range(start, start + tokens)
    positions = [p for p in range(prompt) if args.mask_mode == "both" or (p in image) == (args.mask_mode == "vision")]
    first = (lambda position: prompt - 1) if args.block_from == "answer" else (lambda position: position)
    linear, attention, head = sweep_flops(decoder, windows, positions, length, first, prompt - 1, answer)
    total = linear + attention + head
    print(f"token sweep (the decoder, --mask-mode {args.mask_mode}: {len(positions):,} of the {prompt:,} prompt tokens, "
          f"--block-from {args.block_from}, x {len(windows)} windows of {args.window} layer(s)): needed "
          f"{total / 1e12:,.4g} TFLOP (layers {linear / 1e12:,.4g}, attention "
          f"{attention / 1e12:,.4g}, head {head / 1e12:,.4g}); FLOP-limit time at {peak:.0f} TFLOP/s (H200, dense "
          f"bf16 peak): {total / peak / 1e12:,.1f} s")
    for stage in args.stage:
        if stage == "deepstack":
            rows = deepstack_routes(len(config.vision_config.deepstack_visual_indexes), config.text_config.num_hidden_layers)
            units = [SimpleNamespace(kind="token", keys=[start + n], patches=None) for n in range(tokens)]
        else:
            depth = config.vision_config.depth
            rows = windows_for(list(range(depth)), 1, depth) if stage == "vision-encoder" else [(0, 0)]
            units = [SimpleNamespace(kind="patch", keys=[start], patches=[n]) for n in range(grid * grid)]
        work = stage_flops(config, stage, rows, units, tokens, start, length, answer)
        total = sum(work.values())
        print(f"--stage {stage}: {len(units):,} {units[0].kind} units x {len(rows)} rows = {len(units) * len(rows):,} "
              f"cells; needed {describe_work(work)}; FLOP-limit time at {peak:.0f} TFLOP/s (H200, dense bf16 peak): "
              f"{total / peak / 1e12:,.0f} s ({total / peak / 1e12 / 3600:.2f} h)")


def profile_group(loaded, analysis, tf, windows, knockouts, batch_size: int | None, cuda: bool) -> None:
    """torch.profiler over the sweep's first head group of window 0 (after one unprofiled run of it): the top
    operators by self time, with their input shapes."""
    from torch.profiler import ProfilerActivity, profile

    engine = FastEngine(analysis, tf)
    group = next_group(engine, knockouts, 0, batch_size or auto_batch_size(loaded, tf.input_ids.shape[1]))
    group_metrics(engine, windows[0], group, tf.answer_ids)
    _sync(cuda)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=True) as profiler:
        group_metrics(engine, windows[0], group, tf.answer_ids)
        _sync(cuda)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(f"\nprofile of one group of batches ({sum(map(len, group))} knockouts in {len(group)} batch(es), window "
          f"{windows[0][0]}-{windows[0][1]}), top operators by {key}:")
    print(profiler.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=40))
    print(profiler.key_averages(group_by_input_shape=True).table(sort_by=key, row_limit=15, max_name_column_width=30,
                                                                  max_shapes_column_width=60))


def _timed(cuda: bool, function, *args):
    _sync(cuda)
    started = time.perf_counter()
    result = function(*args)
    _sync(cuda)
    return result, time.perf_counter() - started


@dataclass(frozen=True)
class Variant:
    """A fast engine to time: its savings, and the threads it runs on."""

    savings: Savings
    threads: int


def lockstep(args, loaded, analysis, tf, windows, knockouts, sample, variants: dict[str, Variant], naive,
             cuda: bool, recorder: LayerRows | None = None) -> Repeat:
    """The sweep once for every engine variant, batch by batch in turn (each batch started by the next variant),
    and the naive sample window by window: a burst of load on a shared host lands on all of them alike. Batches
    and head calls are the sweep's own (``next_group``)."""
    seconds, engines, threads = {}, {}, torch.get_num_threads()
    for name, variant in variants.items():
        torch.set_num_threads(variant.threads)
        engines[name], seconds[name] = _timed(cuda, FastEngine, analysis, tf, variant.savings)
    setup = dict(seconds)
    torch.set_num_threads(threads)
    batch = args.batch_size or auto_batch_size(loaded, tf.input_ids.shape[1])
    metrics = {name: {} for name in variants}
    window_times, naive_rows, naive_seconds, forwards, rows = {}, {}, 0.0, 0, 0
    order = sorted(range(len(windows)), key=lambda w: (w % 6, w))  # a spread of depths first
    started = time.perf_counter()
    for w in order:
        for name in variants:
            metrics[name][w] = {metric: [None] * len(knockouts) for metric in METRICS}
        window_times[w], done = 0.0, 0
        while done < len(knockouts):
            group = next_group(engines["fast"], knockouts, done, batch)  # the sweep's batches, one head call
            chunk = [knockout for part in group for knockout in part]
            spent, names = {}, list(engines)
            try:
                for name in names[forwards % len(names):] + names[: forwards % len(names)]:  # each goes first in turn
                    engine = engines[name]
                    if recorder is not None:
                        recorder.active = name == "fast"
                    torch.set_num_threads(variants[name].threads)
                    values, spent[name] = _timed(cuda, group_metrics, engine, windows[w], group, tf.answer_ids)
                    for metric, column in values.items():
                        metrics[name][w][metric][done: done + len(chunk)] = column
            except (RuntimeError, MemoryError) as error:  # the sweep's own rule: halve the batch, retry
                if not is_out_of_memory(error) or batch == 1:
                    raise
                batch //= 2
                continue
            finally:
                torch.set_num_threads(threads)
            for name, value in spent.items():
                seconds[name] += value
            window_times[w] += spent["fast"]
            forwards, rows, done = forwards + len(group), rows + len(chunk), done + len(chunk)
        for s_w, i in sample:
            if s_w == w:
                naive_rows[(s_w, i)], spent = _timed(cuda, naive.logprobs, windows[s_w], [knockouts[i]])
                naive_seconds += spent
        if time.perf_counter() - started > args.max_seconds:
            break
    if recorder is not None:
        recorder.active = False
    if len(window_times) < len(windows):  # extrapolate by the work each window needs (layers a..L-1)
        length = tf.input_ids.shape[1]
        scale = (sum(needed_flops(loaded, windows, knockouts, length, analysis, tf))
                 / sum(needed_flops(loaded, [windows[w] for w in window_times], knockouts, length, analysis, tf)))
        seconds = {name: setup[name] + (value - setup[name]) * scale for name, value in seconds.items()}
    for s_w, i in sample:  # the naive sample is timed whole, whatever --max-seconds cut
        if (s_w, i) not in naive_rows:
            naive_rows[(s_w, i)], spent = _timed(cuda, naive.logprobs, windows[s_w], [knockouts[i]])
            naive_seconds += spent
    return Repeat(seconds, setup, naive_seconds / len(sample), naive_rows, metrics, window_times, batch,
                  rows / max(1, forwards))


def group_metrics(engine: FastEngine, window: tuple[int, int], group: list[list], answer: torch.Tensor) -> dict:
    """Every metric of a group of batches (one head call), batch by batch as the sweep computes them."""
    values = [compute_all(engine.base_logprobs, part, answer) for part in engine.logprobs_batches(window, group)]
    return {metric: [value for part in values for value in part[metric]] for metric in values[0]}


def measure(args, loaded, analysis, tf, windows, knockouts, cuda: bool) -> tuple[tuple[float, float], bool]:
    """One sweep timed every way, interleaved: (fast knockouts/s, fast/naive ratio) and whether they agree."""
    device = loaded.device
    rng = random.Random(0)
    sample = sorted({(rng.randrange(len(windows)), rng.randrange(len(knockouts))) for _ in range(args.naive_sample)})
    threads = torch.get_num_threads()
    variants = {"fast": Variant(Savings(), threads),
                **{f"without {name}": Variant(Savings(**{name: False}), threads) for name in args.without},
                **{f"on {n} thread(s)": Variant(Savings(), n) for n in args.also_threads if n != threads}}
    naive = NaiveEngine(analysis, tf)
    naive.logprobs(windows[0], [knockouts[0]])  # warm-ups: first-call costs are not the engines' speed
    for variant in variants.values():
        torch.set_num_threads(variant.threads)
        FastEngine(analysis, tf, variant.savings).logprobs(windows[0], knockouts[:4])
    torch.set_num_threads(threads)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    gemm, recorder = GemmProbe(loaded), LayerRows(loaded.adapter.layers)
    repeats, gemm_rates = [], []
    try:
        for repeat in range(args.repeat):
            repeats.append(lockstep(args, loaded, analysis, tf, windows, knockouts, sample, variants, naive, cuda,
                                    recorder if repeat == 0 else None))
            if repeat == 0:
                gemm.choose(recorder.rows)
            gemm_rates.append(gemm.rate(cuda))
    finally:
        recorder.remove()
    if cuda:
        peak = f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    else:  # ru_maxrss is in KiB on Linux: the whole process, model and naive engine included
        peak = f"peak process memory (RSS) {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"

    first = repeats[0]
    worst = agreement(loaded, tf, windows, knockouts, naive, first)
    tolerance = 1e-3 if loaded.dtype == torch.float32 else 0.25
    total = len(windows) * len(knockouts)
    length = tf.input_ids.shape[1]
    layer_flops, head_flops = needed_flops(loaded, windows, knockouts, length, analysis, tf)
    flops = layer_flops + head_flops
    naive_times = [r.naive_per_knockout for r in repeats]
    fast_times = [r.seconds["fast"] for r in repeats]
    median_run = sorted(repeats, key=lambda r: r.seconds["fast"])[len(repeats) // 2]
    naive_min, naive_med = min(naive_times), statistics.median(naive_times)
    fast_min, fast_med = min(fast_times), statistics.median(fast_times)
    print(f"agreement on {len(sample)} sampled knockouts: max |Δ| = {worst:.2e} (tolerance {tolerance:g}) -> "
          f"{'AGREE' if worst <= tolerance else 'DISAGREE'}")
    engines = "the fast sweep" if len(variants) == 1 else f"the sweep batch by batch with {', '.join(variants)}"
    print(f"{args.repeat} repeats, each running {engines}, the naive sample window by window, then the matmul "
          f"probe; min / median:")
    print(f"  naive: {1 / naive_min:10.2f} / {1 / naive_med:10.2f} knockouts/s  ({naive_min * 1e3:.1f} / "
          f"{naive_med * 1e3:.1f} ms each; whole sweep {naive_med * total:,.0f} s)")
    setup_med = statistics.median(r.setup["fast"] for r in repeats)
    print(f"  fast:  {total / fast_min:10.2f} / {total / fast_med:10.2f} knockouts/s  (whole sweep {fast_min:,.2f} / "
          f"{fast_med:,.2f} s, of which the engine's set-up {setup_med:.2f} s; batch limit {median_run.batch}, "
          f"{median_run.rows_per_forward:.1f} rows per forward)")
    ratio = naive_med * total / fast_med
    ratios = sorted(n * total / f for n, f in zip(naive_times, fast_times))
    if worst <= tolerance:
        print(f"ratio fast/naive: {ratio:.1f}x (medians; per repeat {', '.join(f'{r:.1f}' for r in ratios)})")
    for name in list(variants)[1:]:
        times = [r.seconds[name] for r in repeats]
        gains = ", ".join(f"{off / on:.2f}" for off, on in zip(times, fast_times))
        drift = max(abs(a - b) for w in first.metrics[name] for a, b in
                    zip(first.metrics[name][w]["logprob_drop"], first.metrics["fast"][w]["logprob_drop"]))
        print(f"  fast {name}: {total / min(times):.2f} / {total / statistics.median(times):.2f} knockouts/s "
              f"(whole sweep {min(times):,.2f} / {statistics.median(times):,.2f} s); its time / fast's "
              f"{statistics.median(times) / fast_med:.2f} (medians; per repeat {gains}); max |Δ logprob_drop| "
              f"against fast {drift:.1e}")
    print(f"  {peak}")
    print("seconds per window (median run): " + " ".join(f"{w}:{median_run.window_times[w]:.2f}"
                                                         for w in sorted(median_run.window_times)))
    achieved = flops / fast_med
    batches_med = statistics.median(r.seconds["fast"] - r.setup["fast"] for r in repeats)
    gemm_med = statistics.median(gemm_rates)
    print(f"needed matmul work {flops / 1e12:.4g} TFLOP (decoder layers {layer_flops / 1e12:.4g}, head "
          f"{head_flops / 1e12:.4g}; the knockouts' batches, not the set-up's unmasked pass); achieved "
          f"{achieved / 1e12:.4g} TFLOP/s over the whole sweep, {flops / batches_med / 1e12:.4g} over its batches")
    print(f"measured matmul rate for the MLP's {gemm.describe()}: {gemm_med / 1e12:.4g} TFLOP/s (median; min "
          f"{min(gemm_rates) / 1e12:.4g}, max {max(gemm_rates) / 1e12:.4g}) -> fraction of that limit achieved "
          f"{achieved / gemm_med:.2f} over the whole sweep, {flops / batches_med / gemm_med:.2f} over its batches "
          f"(the set-up's time left out, as its work is not in the count); the sweep at that rate: {flops / gemm_med:.3g} s")
    if cuda:
        name = torch.cuda.get_device_name(device)
        peak_rate = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        if peak_rate:
            print(f"FLOP-limit time at {peak_rate:.0f} TFLOP/s (dense bf16 peak): {flops / peak_rate / 1e12:.1f} s")
    return (total / fast_med, ratio), worst <= tolerance


def agreement(loaded, tf, windows, knockouts, naive, run: Repeat) -> float:
    """Largest difference between the engines on the naive sample: the log-prob drop, and in fp32 every log-prob."""
    fast = FastEngine(naive.analysis, tf)
    worst = 0.0
    for (w, i), row in run.naive_rows.items():
        if w not in run.metrics["fast"]:
            continue
        drop_naive = float((naive.base_logprobs - row[0]).gather(-1, tf.answer_ids[:, None].to(row.device)).sum())
        worst = max(worst, abs(drop_naive - run.metrics["fast"][w]["logprob_drop"][i]))
        if loaded.dtype == torch.float32:
            worst = max(worst, float((fast.logprobs(windows[w], [knockouts[i]]) - row).abs().max()))
    return worst


def needed_flops(loaded, windows, knockouts, length: int, analysis, tf) -> tuple[float, float]:
    """Matmul FLOPs the sweep needs, (decoder layers, head): ``sweep.sweep_flops``, which the command line prints."""
    linear, attention, head = sweep_flops(loaded, windows, knockouts, length, analysis.first_affected,
                                          tf.answer_start, len(tf.answer_ids))
    return linear + attention, head


class GemmProbe:
    """The machine's own matmul rate on the MLP's shapes — (M, hidden) @ (hidden, intermediate) and back — in the
    model's dtype, at the row counts M the sweep's layers really took. Four M, each standing for a quarter of
    the sweep's MLP work (work-weighted quantiles); the rate is the one that does all four quarters in the time
    they take (a harmonic mean)."""

    def __init__(self, loaded: LoadedModel):
        config = loaded.adapter.decoder.config
        self.hidden, self.intermediate = config.hidden_size, config.intermediate_size
        self.device, self.dtype = loaded.device, loaded.dtype
        self.rows: list[int] = []

    def choose(self, layer_rows: list[int]) -> None:
        ordered = sorted(layer_rows)
        total, running, marks = sum(ordered), 0, [1 / 8, 3 / 8, 5 / 8, 7 / 8]
        for m in ordered:
            running += m
            while marks and running >= marks[0] * total:
                self.rows.append(m)
                marks.pop(0)
        generator = torch.Generator(device="cpu").manual_seed(0)
        self.up = torch.randn(self.intermediate, self.hidden, generator=generator).to(self.device, self.dtype)
        self.down = torch.randn(self.hidden, self.intermediate, generator=generator).to(self.device, self.dtype)
        self.inputs = {m: torch.randn(m, self.hidden, generator=generator).to(self.device, self.dtype)
                       for m in set(self.rows)}

    def describe(self) -> str:
        return f"{self.hidden}x{self.intermediate} matmuls at M = {', '.join(str(m) for m in self.rows)} rows"

    def rate(self, cuda: bool) -> float:
        seconds_per_flop = 0.0
        for m in self.rows:
            x = self.inputs[m]
            best = float("inf")
            for _ in range(3):
                _sync(cuda)
                started = time.perf_counter()
                torch.matmul(torch.matmul(x, self.up.t()), self.down.t())  # (M, H) -> (M, I) -> (M, H)
                _sync(cuda)
                best = min(best, time.perf_counter() - started)
            seconds_per_flop += best / (2 * 2 * m * self.hidden * self.intermediate)
        return len(self.rows) / seconds_per_flop


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


if __name__ == "__main__":
    if any(arg.split("=")[0] in ("--processes", "--plan") for arg in sys.argv[1:]):  # a sweep split between processes
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_processes import main as processes_main

        processes_main(sys.argv[1:])
        sys.exit(0)
    try:
        main()
    except UsageError as error:  # a size the model cannot take: said, not silently shrunk
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
