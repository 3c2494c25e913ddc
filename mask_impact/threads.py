"""CPU threads for torch's intra-op work: torch's own count by default, or a count that holds up on a shared host.

torch's intra-op threads meet at the end of every op; when another process deschedules one of them, the others
wait. On 2 CPUs under a load of 6, 1 thread ran the medium benchmark's sweep in 0.49 of the time 2 threads took
(measured side by side, ``benchmarks/bench_sweep.py --also-threads 1``). ``--threads auto`` therefore takes the
CPUs the other processes leave idle; ``--threads N`` takes N. The count changes how long a sweep takes; what it
computes agrees within float rounding (tests/test_cli.py).
"""

from __future__ import annotations

import os


def idle_threads() -> tuple[int, str]:
    """The CPUs other processes leave idle (the 1-minute load average, read now), at most torch's own count,
    at least 1; and a line saying how that was found."""
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = os.getloadavg()[0]
    threads = max(1, min(torch.get_num_threads(), round(cpus - load)))
    return threads, f"{cpus} CPUs, load average {load:.1f} -> {threads} threads"


def set_threads(spec: str | int | None) -> str | None:
    """Apply ``--threads`` (None: leave torch's count; ``auto``: idle CPUs; N); returns what was chosen, or None."""
    if spec is None:
        return None
    import torch

    if str(spec) == "auto":
        threads, why = idle_threads()
    else:
        threads, why = int(spec), f"{spec} threads"
    torch.set_num_threads(threads)
    return why
