"""A study shared by rows: rows/s with one process and with two (``accelerate launch``), side by side.

    python benchmarks/bench_study.py                    # the demo study, 200 rows, on this machine's CPUs
    python benchmarks/bench_study.py --rows 80 --repeat 3

Each measurement runs the command line itself on the demo study (``--demo --dataset demo-shapes``, the three flows
of Zhang et al., 3-layer windows): one process with ``--threads 1`` and with ``--threads 2``, and
``accelerate launch --multi_gpu --num_processes 2`` with ``--threads 1`` per process (gloo between CPU processes).
A study's rows/s is its rows over the time its rows took, as the study records it (``study.json``'s
``elapsed_s``: from the first row's start to the last row's end in any process, measured by the main process; not
the imports, the model load or the launch, which do not grow with the rows). The configurations are interleaved
over ``--repeat`` rounds; the median is printed, and the ratios to one process.
Each study runs in its own temporary folder (so nothing is resumed); the two-process study's aggregates are
checked equal to the one-process study's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STUDY = ["--demo", "--dataset", "demo-shapes", "--flow", "image->last", "--flow", "question->last", "--flow",
         "image->question", "--window", "3", "--no-html", "--no-progress"]


def launcher() -> list[str]:
    found = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if found is None:
        sys.exit("accelerate's launcher is not installed next to this Python")
    return [found, "launch", "--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend",
            "no", "--num_processes", "2"]


def study(command: list[str], rows: int) -> dict:
    """The study.json of ``rows`` rows (the demo dataset draws as many pictures as ``--limit`` asks)."""
    with tempfile.TemporaryDirectory() as folder:
        done = subprocess.run([*command, "--limit", str(rows), "--output-dir", folder, "--output", "s"],
                              capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"failed: {' '.join(command)}\n{done.stderr[-2000:]}")
        return json.loads((Path(folder) / "s" / "study.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    script = [str(ROOT / "mask_impact_vl.py"), *STUDY]
    configurations = {
        "1 process, 1 thread": [sys.executable, *script, "--threads", "1"],
        "1 process, 2 threads": [sys.executable, *script, "--threads", "2"],
        "2 processes, 1 thread each": [*launcher(), *script, "--threads", "1"],
    }
    rates: dict[str, list[float]] = {name: [] for name in configurations}
    studies = {}
    for _ in range(args.repeat):
        for name, command in configurations.items():
            data = study(command, args.rows)
            rates[name].append(data["rows"]["measured"] / data["elapsed_s"])
            studies[name] = data["aggregates"]
    same = studies["2 processes, 1 thread each"] == studies["1 process, 1 thread"]
    print(f"demo study, {args.rows} rows, 3 flows x 3 windows per row, {args.repeat} rounds (median rows/s over the "
          "rows' time, study.json elapsed_s)")
    base = statistics.median(rates["1 process, 1 thread"])
    for name, values in rates.items():
        rate = statistics.median(values)
        print(f"  {name:28s} {rate:6.2f} rows/s   {rate / base:4.2f}x   (rounds: "
              f"{', '.join(f'{v:.2f}' for v in values)})")
    print(f"  two-process aggregates == one-process aggregates: {same}")


if __name__ == "__main__":
    main()
