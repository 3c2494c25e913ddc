"""How long the command line takes to answer before any work: ``--help``, a mistyped option, ``--version``, next to
``python -c "import torch"`` on the same machine, measured side by side.

    python benchmarks/bench_startup.py              # 7 rounds
    python benchmarks/bench_startup.py --repeat 15

Each round runs every command once, in turn (so a change of the machine's load falls on all of them alike); min and
median wall times are printed, and each command's median as a share of ``import torch``'s. The command line parses
and checks its options before it imports torch or transformers, so these should be a small fraction (target: under
0.3×). Prints the machine's load average too: figures from a busy machine say little.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = {
    "mask-impact-vl --help": [str(ROOT / "mask_impact_vl.py"), "--help"],
    "mask-impact-vl --unitt word": [str(ROOT / "mask_impact_vl.py"), "--unitt", "word"],
    "mask-impact --version": [str(ROOT / "mask_impact_analysis.py"), "--version"],
    "python -c 'import torch'": ["-c", "import torch"],
}
REFERENCE = "python -c 'import torch'"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7, help="rounds (default 7)")
    args = parser.parse_args()
    if args.repeat < 1:
        print("error: --repeat must be at least 1", file=sys.stderr)
        return 2
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.repeat):
        for name, argv in COMMANDS.items():
            started = time.perf_counter()
            subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, check=False)
            times[name].append(time.perf_counter() - started)
    reference = statistics.median(times[REFERENCE])
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}, {os.cpu_count()} CPUs, "
          f"{args.repeat} rounds")
    print(f"{'command':32} {'min s':>7} {'median s':>9} {'× import torch':>15}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:32} {min(values):7.3f} {median:9.3f} {median / reference:15.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
