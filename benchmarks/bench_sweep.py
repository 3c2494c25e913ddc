"""Side-by-side sweep benchmark: naive reference vs fast engine, same model, same input, one process.

    python benchmarks/bench_sweep.py --arch tiny                         # CPU, demo-sized prompt + image
    python benchmarks/bench_sweep.py --arch qwen3-vl-4b --image-size 1024 --device cuda

``--arch qwen3-vl-4b`` builds ../shared/configs/qwen3-vl-4b-instruct.json with random weights (weights do not
matter for speed). The naive engine (one full forward per knockout) runs on a sample of knockouts spread over
windows and units; the fast engine runs the whole sweep. Both must agree on the sample before a ratio is
printed. ``--unit region:2`` and ``--flow 'image->last'`` measure those sweeps too, on the same input, next to the
token sweep. Also printed: knockouts/s, peak memory, time per layer window, the FLOPs the sweep really needs, the
achieved TFLOP/s and the time the sweep would take at the GPU's peak bf16 rate.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import tempfile
import time
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
from mask_impact.engine import Analysis, FastEngine, NaiveEngine  # noqa: E402
from mask_impact.inputs import Prompt, TokenInfo  # noqa: E402
from mask_impact.models import LoadedModel, adapter_for, load_model  # noqa: E402
from mask_impact.sweep import auto_batch_size, score_knockouts, sweep_flops  # noqa: E402
from mask_impact.units import build_units  # noqa: E402

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, per the vendors' data sheets
CONFIG_4B = ROOT.parent / "shared" / "configs" / "qwen3-vl-4b-instruct.json"


class IdTokenizer:
    """Random-weight models have no vocabulary worth decoding: tokens print as their ids."""

    pad_token_id = None

    def __init__(self, eos: int):
        self.eos_token_id = eos

    def decode(self, ids, **kwargs) -> str:
        return " ".join(str(i) for i in ids)


def build_4b(device: torch.device, dtype: torch.dtype, num_layers: int | None = None) -> LoadedModel:
    config = transformers.Qwen3VLConfig(**json.loads(CONFIG_4B.read_text()))
    if num_layers:  # a shallower copy, to check the set-up quickly
        config.text_config.num_hidden_layers = num_layers
    config.text_config._attn_implementation = config.vision_config._attn_implementation = "sdpa"
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.Qwen3VLForConditionalGeneration(config).to(dtype).eval()
    eos = config.text_config.eos_token_id
    model.generation_config.eos_token_id = eos
    return LoadedModel(model, None, IdTokenizer(eos), adapter_for(model), "qwen3-vl-4b (random)", device, dtype)


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


def build_tiny(image_size: int, num_layers: int | None) -> tuple[LoadedModel, Prompt]:
    """The tiny random-weight VL model; the image is given to the model at ``image_size`` (not shrunk)."""
    from mask_impact.inputs import build_prompt

    folder = build_demo(Path(tempfile.mkdtemp()) / "tiny", True, num_layers=num_layers or 4)
    loaded = load_model(str(folder), True, "cpu", "float32")
    image = Path(tempfile.mkdtemp()) / "image.png"
    pixels = np.random.default_rng(0).integers(0, 255, (image_size, image_size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(image)
    return loaded, build_prompt(loaded, "What's in this image? Describe the picture.", [str(image)],
                                max_pixels=max(image_size * image_size, 64 * 64))


class CountingEngine:
    """Counts the engine's forwards and their rows, so the batch really used is reported."""

    def __init__(self, engine):
        self.engine, self.calls, self.rows = engine, 0, 0

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def logprobs(self, window, units):
        self.calls, self.rows = self.calls + 1, self.rows + len(units)
        return self.engine.logprobs(window, units)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=("tiny", "qwen3-vl-4b"), default="tiny")
    parser.add_argument("--image-size", type=int, default=None, help="square image side (tiny: 128, 4b: 1024)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num-tokens", type=int, default=5)
    parser.add_argument("--naive-sample", type=int, default=12, help="knockouts run by the naive engine")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--block-from", choices=("all", "answer"), default="all")
    parser.add_argument("--num-layers", type=int, default=None, help="override the decoder depth (quick checks)")
    parser.add_argument("--repeat", type=int, default=3, help="fast sweeps to run; the median is reported")
    parser.add_argument("--max-seconds", type=float, default=float("inf"),
                        help="stop the fast sweep after this long and extrapolate the rest")
    parser.add_argument("--mask-mode", choices=("text", "vision", "both"), default="both")
    parser.add_argument("--unit", default="token",
                        help="token (default), or region:N / image / word: measured next to token units")
    parser.add_argument("--flow", dest="flows", action="append", default=[], metavar="SRC->DST",
                        help="also measure a flow sweep (repeatable), next to token units")
    parser.add_argument("--window", type=int, default=1, help="layers per window (default 1)")
    args = parser.parse_args()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    device = torch.device(args.device)
    if args.arch == "tiny":
        loaded, prompt = build_tiny(args.image_size or 128, args.num_layers)
    else:
        loaded = build_4b(device, torch.bfloat16, args.num_layers)
        prompt = prompt_4b(loaded, args.image_size or 1024)
    cuda = device.type == "cuda"
    analysis = Analysis(loaded, prompt, block_from=args.block_from)
    baseline, tf = analysis.baseline(args.num_tokens)
    num_layers = loaded.adapter.num_layers
    windows = windows_for(list(range(num_layers)), args.window, num_layers)
    print(f"device {torch.cuda.get_device_name(device) if cuda else 'cpu'}  model {loaded.name}  "
          f"dtype {str(loaded.dtype).replace('torch.', '')}  torch {torch.__version__}  "
          f"transformers {transformers.__version__}")
    print(f"sequence {tf.input_ids.shape[1]} tokens ({sum(t.modality == 'vision' for t in prompt.tokens)} image), "
          f"answer {len(tf.answer_ids)} tokens, windows {len(windows)} of {args.window} layer(s)")
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
    if len(figures) > 1:
        token = figures["token"]
        print("\nside by side (fast knockouts/s, fast/naive ratio):")
        for name, (rate, ratio) in figures.items():
            print(f"  {name:<12} {rate:10.2f} knockouts/s  ({rate / token[0]:.2f}x token units)  ratio {ratio:.1f}x")
    if not agree:
        sys.exit(1)


def measure(args, loaded, analysis, tf, windows, knockouts, cuda: bool) -> tuple[tuple[float, float], bool]:
    """One sweep timed both ways: (fast knockouts/s, fast/naive ratio) and whether the engines agree."""
    device = loaded.device
    rng = random.Random(0)
    sample = sorted({(rng.randrange(len(windows)), rng.randrange(len(knockouts))) for _ in range(args.naive_sample)})
    naive = NaiveEngine(analysis, tf)
    naive.logprobs(windows[0], [knockouts[0]])  # warm-up: first-call costs are not the engine's speed
    naive_rows = []
    _sync(cuda)
    started = time.perf_counter()
    for w, i in sample:
        naive_rows.append(naive.logprobs(windows[w], [knockouts[i]]))
    _sync(cuda)
    naive_per_knockout = (time.perf_counter() - started) / len(sample)

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    order = sorted(range(len(windows)), key=lambda w: (w % 6, w))  # a spread of depths first
    runs = []
    for _ in range(args.repeat):
        _sync(cuda)
        started = time.perf_counter()
        fast = CountingEngine(FastEngine(analysis, tf))
        batch = args.batch_size or auto_batch_size(loaded, tf.input_ids.shape[1])
        window_times, metrics, done = {}, {}, []
        for w in order:
            t0 = time.perf_counter()
            part, batch = score_knockouts(fast, [windows[w]], knockouts, batch, progress=False)
            _sync(cuda)
            window_times[w] = time.perf_counter() - t0
            metrics[w] = {name: grid[0] for name, grid in part.items()}
            done.append(w)
            if time.perf_counter() - started > args.max_seconds:
                break
        runs.append((time.perf_counter() - started, window_times, metrics, done, batch,
                     fast.rows / max(1, fast.calls)))
    fast_total, window_times, metrics, done, batch, rows_per_call = sorted(runs, key=lambda run: run[0])[len(runs) // 2]
    if cuda:
        peak = f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    else:  # ru_maxrss is in KiB on Linux: the whole process, model and naive engine included
        peak = f"peak process memory (RSS) {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
    length = tf.input_ids.shape[1]
    if len(done) < len(windows):  # extrapolate by the work each window needs (layers a..L-1)
        done_flops = sweep_flops(loaded, [windows[w] for w in done], knockouts, length, analysis.first_affected)
        all_flops = sweep_flops(loaded, windows, knockouts, length, analysis.first_affected)
        fast_total *= all_flops / done_flops
        print(f"stopped after {len(done)} of {len(windows)} windows (--max-seconds {args.max_seconds}); "
              f"the whole-sweep figures below are extrapolated by FLOPs")

    worst = 0.0
    for (w, i), row in zip(sample, naive_rows):
        if w not in metrics:
            continue
        fast_row = fast.logprobs(windows[w], [knockouts[i]])
        drop_naive = float((naive.base_logprobs - row[0]).gather(-1, tf.answer_ids[:, None].to(row.device)).sum())
        worst = max(worst, abs(drop_naive - metrics[w]["logprob_drop"][i]))
        worst = max(worst, float((fast_row - row).abs().max()) if loaded.dtype == torch.float32 else 0.0)
    tolerance = 1e-3 if loaded.dtype == torch.float32 else 0.25
    total = len(windows) * len(knockouts)
    flops = sweep_flops(loaded, windows, knockouts, length, analysis.first_affected)
    print(f"agreement on {len(sample)} sampled knockouts: max |Δ| = {worst:.2e} (tolerance {tolerance:g}) -> "
          f"{'AGREE' if worst <= tolerance else 'DISAGREE'}")
    print(f"naive: {1 / naive_per_knockout:10.2f} knockouts/s  ({naive_per_knockout * 1e3:.1f} ms each; "
          f"whole sweep {naive_per_knockout * total:,.0f} s)")
    print(f"fast:  {total / fast_total:10.2f} knockouts/s  (whole sweep {fast_total:,.2f} s, batch limit "
          f"{batch}, {rows_per_call:.1f} rows per forward on average, {peak})")
    ratio = naive_per_knockout * total / fast_total
    if worst <= tolerance:
        print(f"ratio fast/naive: {ratio:.1f}x")
    print("seconds per window: " + " ".join(f"{w}:{window_times[w]:.2f}" for w in sorted(window_times)))
    print(f"needed matmul work {flops / 1e12:.4g} TFLOP; achieved {flops / fast_total / 1e12:.4g} TFLOP/s")
    if cuda:
        name = torch.cuda.get_device_name(device)
        peak_rate = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        if peak_rate:
            print(f"FLOP-limit time at {peak_rate:.0f} TFLOP/s (dense bf16 peak): {flops / peak_rate / 1e12:.1f} s")
    return (total / fast_total, ratio), worst <= tolerance


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


if __name__ == "__main__":
    try:
        main()
    except UsageError as error:  # a size the model cannot take: said, not silently shrunk
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
