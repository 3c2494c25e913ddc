"""A sweep split between processes: cells/s with 1, 2, ... processes, and the planned split of a 4B sweep.

    python benchmarks/bench_processes.py --processes 1,2                 # the demo VL model, CPU processes
    python benchmarks/bench_processes.py --plan 8                        # the 4B config, 1024×1024, 8 GPUs
    python benchmarks/bench_processes.py --plan 8 --single-gpu-seconds 140
    python benchmarks/bench_sweep.py --processes 1,2                     # the same, from the sweep benchmark

Each measurement runs the command line itself (``accelerate launch --multi_gpu --num_processes N`` for N > 1,
torchrun underneath: gloo between CPU processes, NCCL between GPUs) on the same prompt, image and settings, and
reads the sweep's own time from the result (``meta.elapsed_s``: baseline, sweep and generations in the main
process, which waits for the others; not the model load or the launch). Process counts are interleaved over
``--repeat`` rounds; min and median are printed, and the speed-up of each count over one process.

``--plan N`` needs no model: it cuts the schedule of a full token sweep of the 4B config (36 windows × the
1024×1024 image's 1,024 vision tokens and the text) into N parts exactly as a launch does (``Shard.part`` with
the sweep's own ``cell_cost``) and prints each part's cells and matmul TFLOP (the sweep's own ``sweep_flops``), the time at the GPU's dense peak, and,
given a measured single-GPU time (``--single-gpu-seconds``), the expected wall time: that time × the largest
part's share of the work.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mask_impact.shard import Shard  # noqa: E402
from mask_impact.sweep import cell_cost, sweep_flops  # noqa: E402

# the 4B model's architecture (its config.json, no weights), carried in the repository
CONFIG_4B = ROOT / "benchmarks" / "configs" / "qwen3-vl-4b-instruct.json"
PEAK_TFLOPS = 989.0  # H100/H200 dense bf16, per the data sheet
SWEEP = ["--demo", "--mask-mode", "both", "--num-tokens", "5", "--generate-top", "0", "--no-html", "--no-progress"]


def measure(counts: list[int], repeat: int, threads: int, extra: list[str]) -> dict[int, list[float]]:
    """Sweep seconds per process count, counts interleaved round by round, every process with ``threads`` threads
    (the launcher sets OMP_NUM_THREADS=1 in its processes; one process left at its default would measure threads,
    not processes)."""
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    if launcher is None and any(n > 1 for n in counts):
        sys.exit("error: accelerate's launcher is not installed; pip install accelerate")
    seconds: dict[int, list[float]] = {n: [] for n in counts}
    cells = 0
    with tempfile.TemporaryDirectory() as folder:
        for round_ in range(repeat):
            for n in counts[round_ % len(counts):] + counts[: round_ % len(counts)]:  # a different count first
                name = f"p{n}r{round_}"
                command = [sys.executable] if n == 1 else [launcher, "launch", "--multi_gpu", "--num_processes",
                                                             str(n), "--num_machines", "1", "--mixed_precision",
                                                             "no", "--dynamo_backend", "no"]
                command += [str(ROOT / "mask_impact_vl.py"), *SWEEP, *extra, "--output", name, "--output-dir", folder]
                done = subprocess.run(command, capture_output=True, text=True,
                                      env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
                if done.returncode != 0:
                    sys.exit(f"error: {n} processes failed: {done.stderr.strip().splitlines()[-1:]}")
                data = json.loads((Path(folder) / f"{name}.json").read_text())
                cells = len(data["windows"]) * len(data["units"])
                seconds[n].append(data["meta"]["elapsed_s"])
    print(f"sweep of {cells} cells (demo VL, {' '.join(SWEEP + extra)}), {threads} thread(s) per process, "
          f"{repeat} interleaved rounds:")
    one = statistics.median(seconds[counts[0]])
    for n in counts:
        best, middle = min(seconds[n]), statistics.median(seconds[n])
        print(f"  {n} process{'es' if n > 1 else ''}: min {best:.3f} s, median {middle:.3f} s, "
              f"{cells / middle:,.0f} cells/s (median), speed-up over {counts[0]}: {one / middle:.2f}×")
    return seconds


def plan(processes: int, single_gpu_seconds: float | None, image_tokens: int = 1024, text_tokens: int = 20,
         answer: int = 5) -> None:
    """The 4B sweep's cells cut into ``processes`` parts of equal cost, as a launch cuts them."""
    config = SimpleNamespace(**json.loads(CONFIG_4B.read_text())["text_config"])
    layers = config.num_hidden_layers
    length = text_tokens + image_tokens + answer - 1
    answer_start = length - answer  # the first answer position (the prompt's last)
    # the model and engine as far as the sweep's own counts read them: the decoder config, its depth, the length,
    # and a token unit's first affected position (itself)
    loaded = SimpleNamespace(adapter=SimpleNamespace(decoder=SimpleNamespace(config=config), num_layers=layers))
    engine = SimpleNamespace(tf=SimpleNamespace(input_ids=torch.empty(1, length)), first_affected=lambda p: p)
    firsts = list(range(answer_start + 1))  # one token unit per prompt position (mask-mode both)
    cells = [(a, p) for a in range(layers) for p in firsts]
    windows = [(a, a) for a in range(layers)]
    cost = cell_cost(loaded, engine, windows, firsts, decoder=True)  # what a launch weighs its parts by

    def flops(cell) -> float:  # what the fast engine computes for the cell (sweep.sweep_flops)
        a, p = cell
        return sum(sweep_flops(loaded, [windows[a]], [p], length, engine.first_affected, answer_start, answer))

    costs = [cost(a, i) for a, i in cells]  # a token unit's index is its position
    total = sum(flops(cell) for cell in cells)
    print(f"planned split of a full token sweep, 4B config ({layers} layers), 1024×1024 image: {len(cells):,} cells "
          f"over {length} positions, {total / 1e12:,.0f} TFLOP, on {processes} processes")
    largest = 0.0
    for k in range(processes):
        part = Shard(k, processes).part(cells, costs)
        work = sum(flops(cell) for cell in part)
        largest = max(largest, work)
        span = f"windows {part[0][0]}-{part[-1][0]}" if part else "idle"
        print(f"  process {k}: {len(part):6,} cells ({span}), {work / 1e12:8,.1f} TFLOP, "
              f"{work / (PEAK_TFLOPS * 1e12):6.1f} s at {PEAK_TFLOPS:g} TFLOP/s")
    print(f"  largest part: {largest / total:.3f} of the work (ideal {1 / processes:.3f}); wall time at the peak: "
          f"{largest / (PEAK_TFLOPS * 1e12):.1f} s")
    if single_gpu_seconds:
        print(f"  expected wall time from the measured single-GPU time {single_gpu_seconds:g} s: "
              f"{single_gpu_seconds * largest / total:.1f} s")
    else:
        print("  expected wall time: give --single-gpu-seconds (the 4B full sweep measured on one GPU)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", default=None, help="process counts to measure, e.g. 1,2")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads-per-process", type=int, default=1)
    parser.add_argument("--plan", type=int, default=None, metavar="N", help="print the 4B sweep's split over N GPUs")
    parser.add_argument("--single-gpu-seconds", type=float, default=None)
    args, extra = parser.parse_known_args(argv)
    if args.processes:
        counts = [int(n) for n in args.processes.split(",")]
        if not counts or min(counts) < 1:
            sys.exit("error: --processes takes counts of at least 1, e.g. 1,2")
        measure(counts, args.repeat, args.threads_per_process, extra)
    if args.plan:
        plan(args.plan, args.single_gpu_seconds)
    if not (args.processes or args.plan):
        parser.error("give --processes 1,2 and/or --plan N")


if __name__ == "__main__":
    main()
