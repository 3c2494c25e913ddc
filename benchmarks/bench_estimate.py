"""The estimate (``--estimate``) against the exact map on random-weight models, and what it costs.

    python benchmarks/bench_estimate.py --arch tiny                       # CPU, the tiny VL model, 128x128 image
    python benchmarks/bench_estimate.py --arch medium                     # CPU, hidden 1024, 4 layers
    python benchmarks/bench_estimate.py --arch qwen3-vl-4b --image-size 1024 --flops-only
    python benchmarks/bench_estimate.py --arch qwen3-vl-4b --image-size 1024 --device cuda [--no-exact]

Builds the model of ``bench_sweep.py`` (same builders, same prompt), sweeps every (layer, token) cell exactly
with the fast engine and estimates every cell (estimate.py), then prints: Spearman's ρ of estimate vs exact over
the whole map, the top-20 recall (of the 20 cells with the largest exact |drop|, the share among the estimate's 20
largest |estimate|; and the same for the signed drop), the time of both, and the estimate's FLOPs — counted from
the configuration (``estimate_flops``) and by torch's ``FlopCounterMode`` on the real pass — in units of one plain
forward and of one forward+backward pass (3 forwards: the backward of a training step computes weight gradients
too). ``--flops-only`` prints the count for the configuration without building anything; ``--no-exact`` times the
estimate alone (no exact map, no quality figures; bench_sweep.py times the exact sweep).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import transformers

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_sweep import CONFIG_4B, DEFAULT_IMAGE, DTYPES, build, check_sizes  # noqa: E402
from mask_impact.config import UsageError, windows_for  # noqa: E402
from mask_impact.engine import Analysis  # noqa: E402
from mask_impact.engines.decoder import FastEngine  # noqa: E402
from mask_impact.estimate import estimate_flops, forward_flops, layer_changes, spearman  # noqa: E402
from mask_impact.metrics import logprob_drop  # noqa: E402
from mask_impact.sweep import auto_batch_size, next_group  # noqa: E402
from mask_impact.threads import idle_threads  # noqa: E402
from mask_impact.units import build_units  # noqa: E402


def recall(estimate: torch.Tensor, exact: torch.Tensor, k: int, key) -> float:
    """Of the k cells with the largest ``key(exact)``, the share among the k largest ``key(estimate)``."""
    truth = set(torch.topk(key(exact).flatten(), k).indices.tolist())
    found = set(torch.topk(key(estimate).flatten(), k).indices.tolist())
    return len(truth & found) / k


def exact_map(loaded, analysis, tf, windows, knockouts, batch_size: int | None) -> torch.Tensor:
    """(W, U) logprob_drop of every cell, the fast engine in the sweep's own batches and head calls."""
    engine = FastEngine(analysis, tf)
    batch = batch_size or auto_batch_size(loaded, tf.input_ids.shape[1])
    rows = []
    for window in windows:
        row, done = [], 0
        while done < len(knockouts):
            group = next_group(engine, knockouts, done, batch)
            knocked = torch.cat(engine.logprobs_batches(window, group))
            row.append(logprob_drop(engine.base_logprobs, knocked, tf.answer_ids))
            done += knocked.shape[0]
        rows.append(torch.cat(row))
    return torch.stack(rows).double().cpu()


def counted_flops(analysis, tf, knockouts) -> float:
    """What torch's FlopCounterMode counts for one estimate pass (matmuls, forward and backward), without the vision
    tower's forward (the baseline runs it too; ``estimate_flops`` leaves it out)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        layer_changes(analysis, tf, knockouts)
    vision = [sum(counts.values()) for name, counts in counter.get_flop_counts().items() if name.endswith("model.visual")]
    return counter.get_total_flops() - sum(vision)


def flops_only(args) -> None:
    """The estimate's FLOPs and kept probabilities for the 4B configuration, from the configuration alone."""
    config = transformers.Qwen3VLConfig(**json.loads(CONFIG_4B.read_text()))
    text = config.text_config
    if args.num_layers:
        text.num_hidden_layers = args.num_layers
    side = args.image_size or DEFAULT_IMAGE[args.arch]
    tokens = (side // config.vision_config.patch_size) ** 2 // config.vision_config.spatial_merge_size ** 2
    length = 4 + tokens + 1 + 6 + 5 + args.num_tokens - 1  # bench_sweep.prompt_4b's layout, teacher-forced
    prompt = length - args.num_tokens + 1
    report(text, length, args.num_tokens, prompt, f"{CONFIG_4B.name}, a {side}x{side} image ({tokens:,} image tokens)")


def report(text, length: int, answer: int, keys: int, what: str, counted: float | None = None) -> None:
    estimate = estimate_flops(text, length, answer, keys)
    forward = forward_flops(text, length, answer)
    kept = text.num_hidden_layers * text.num_attention_heads * length * length * 4
    print(f"{what}: sequence {length} tokens, {keys:,} token units x {text.num_hidden_layers} layers")
    print(f"  estimate of the whole map: {estimate / 1e12:.4g} TFLOP = {estimate / forward:.2f} plain forwards = "
          f"{estimate / (3 * forward):.2f} forward+backward passes (target <= 3); one forward {forward / 1e12:.4g} TFLOP")
    if counted is not None:
        print(f"  torch's FlopCounterMode on the real pass, vision tower left out: {counted / 1e12:.4g} TFLOP (the count "
              f"above: {estimate / counted:.3f}x of it; the reduction's elementwise work is not in torch's count)")
    print(f"  attention probabilities kept for the backward pass: {kept / 2**30:.2f} GiB (float32)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=("tiny", "medium", "qwen3-vl-4b"), default="tiny")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None)
    parser.add_argument("--num-layers", type=int, default=None)
    parser.add_argument("--num-tokens", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--top", type=int, default=20, help="k of the top-k recall (default 20)")
    parser.add_argument("--flops-only", action="store_true", help="the 4B configuration's count, nothing run")
    parser.add_argument("--no-exact", action="store_true", help="time the estimate alone: no exact map to compare")
    args = parser.parse_args()
    args.naive_sample = args.repeat = args.window = 1  # bench_sweep's options that check_sizes reads, not used here
    args.also_threads = []
    check_sizes(args)
    if args.top < 1:  # checked before the sweep it would follow
        raise UsageError(f"--top {args.top}: must be at least 1")
    if args.flops_only:
        flops_only(args)
        return
    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(args.threads or idle_threads()[0])
    device = torch.device(args.device)
    loaded, prompt = build(args, device)
    analysis = Analysis(loaded, prompt)
    _, tf = analysis.baseline(args.num_tokens)
    layers = loaded.adapter.num_layers
    windows = windows_for(list(range(layers)), 1, layers)
    units = build_units(prompt, loaded.tokenizer, SimpleNamespace(groups=[], flows=[], mask_mode="both", unit="token"),
                        analysis.answer_start)
    knockouts = [unit.knockout() for unit in units]
    print(f"{loaded.name}: {layers} layers, {len(knockouts)} token units, {torch.get_num_threads()} threads, "
          f"{str(loaded.dtype).replace('torch.', '')} on {device}")
    cuda = device.type == "cuda"
    layer_changes(analysis, tf, knockouts[:2])  # warm-up
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    estimate = -layer_changes(analysis, tf, knockouts)  # (L, U): windows of one layer (its sums are on the CPU)
    estimated_s = time.perf_counter() - started
    peak = f"; peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if cuda else ""
    length = tf.input_ids.shape[1]
    if args.no_exact:
        print(f"estimate of every one of {estimate.numel():,} cells: {estimated_s:.2f} s{peak}")
        report(loaded.adapter.decoder.config, length, len(tf.answer_ids), len(knockouts), loaded.name,
               counted_flops(analysis, tf, knockouts))
        return
    started = time.perf_counter()
    exact = exact_map(loaded, analysis, tf, windows, knockouts, args.batch_size)
    exact_s = time.perf_counter() - started
    k = min(args.top, exact.numel())
    rho = spearman(estimate.flatten().tolist(), exact.flatten().tolist())
    print(f"exact sweep {exact.numel():,} cells: {exact_s:.2f} s; estimate of every cell: {estimated_s:.2f} s "
          f"({exact_s / estimated_s:.1f}x faster){peak}")
    print(f"Spearman (estimate vs exact, every cell): {rho:.3f}; top-{k} recall by |drop|: "
          f"{recall(estimate, exact, k, torch.abs):.2f}, by signed drop: {recall(estimate, exact, k, lambda x: x):.2f}")
    report(loaded.adapter.decoder.config, length, len(tf.answer_ids), len(knockouts), loaded.name,
           counted_flops(analysis, tf, knockouts))


if __name__ == "__main__":
    try:
        main()
    except UsageError as error:  # a size the model cannot take: one line, as bench_sweep.py says it
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
