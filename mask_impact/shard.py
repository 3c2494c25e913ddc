"""This process's share of a sweep launched with ``accelerate launch`` (one process: all of it).

``accelerate launch --num_processes N mask_impact_vl.py ...`` starts N copies of the command, each with its
rank in the environment. accelerate's ``PartialState`` gives the rank, the process count and each process's
device, and sets up the process group. A sweep is a schedule of (row, unit) cells; the cells still to
compute are cut into N contiguous parts of equal estimated cost (cells differ in cost by up to layers ×
positions, so equal counts would leave the first process with most of the work). Each process computes
its part and appends every finished batch to its own partial file (resume.py); the main process (rank 0)
follows the other files for its progress bar, merges them, runs the generations and writes the results.

The processes talk once per run: the main process, holding the run's lock and having read what earlier
(killed) runs finished, broadcasts that, or the error that stops the run, before anyone writes. After that
no collective call is made, so a process that has finished its part may exit.

Without a launch (``WORLD_SIZE`` unset or 1) nothing here imports accelerate or torch.distributed.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from itertools import accumulate
from typing import Iterator

_ALONE: ContextVar[bool] = ContextVar("alone", default=False)


@contextmanager
def alone() -> Iterator[None]:
    """Within the block this process works as if it were not launched (``Shard.current()`` is one process): a
    study shared by rows runs each of its rows alone, with no collective call."""
    token = _ALONE.set(True)
    try:
        yield
    finally:
        _ALONE.reset(token)


def launched() -> bool:
    """Whether this process is one of several started by ``accelerate launch`` (or torchrun)."""
    return launched_from(os.environ)


def launch_shortfall(environ=None, parent_cmdline: str | None = None) -> str | None:
    """A note when ``accelerate launch`` was asked for several processes but started this one alone.

    Its ``--cpu`` launcher (and its default one without ``--multi_gpu``) runs a single copy of the command whatever
    ``--num_processes`` says; it sets ``MASTER_ADDR`` only when more than one process was asked for, and no
    ``WORLD_SIZE``. The count asked for is read from the launcher's own command line where the system shows it
    (Linux: ``/proc/PARENT/cmdline``). A launch that did start several processes is checked in ``Shard.current``."""
    environ = os.environ if environ is None else environ
    if "ACCELERATE_USE_CPU" not in environ or "MASTER_ADDR" not in environ or launched_from(environ):
        return None
    if parent_cmdline is None:
        try:
            with open(f"/proc/{os.getppid()}/cmdline", "rb") as file:
                parent_cmdline = file.read().decode(errors="replace").replace("\0", " ")
        except OSError:
            parent_cmdline = ""
    words = parent_cmdline.split()
    asked = next((words[i + 1] for i, word in enumerate(words[:-1]) if word in ("--num_processes",
                                                                                "--num-processes")), None)
    count = f"{asked} processes" if asked and asked.isdigit() else "several processes"
    return (f"accelerate launch was asked for {count} but started 1 (its --cpu and single-device launchers start "
            "one); this run uses one process: for N CPU processes, launch with --multi_gpu --num_processes N")


def launched_from(environ) -> bool:
    return int(environ.get("WORLD_SIZE", "1")) > 1


def is_main_process() -> bool:
    """Whether this process speaks for the run: the only one, or rank 0 of a launch."""
    return os.environ.get("RANK", "0") == "0"


@dataclass
class Shard:
    index: int = 0  # this process's rank
    count: int = 1  # processes in the launch
    device: str | None = None  # the device accelerate gives this process (None: not launched)

    @property
    def is_main(self) -> bool:
        return self.index == 0

    @classmethod
    def current(cls) -> Shard:
        """This process's place in the launch (the process group is set up on first use); one process within
        ``alone()``."""
        if not launched() or _ALONE.get():
            return cls()
        import torch
        from accelerate import PartialState

        from .config import UsageError

        state = PartialState(cpu=not torch.cuda.is_available())  # gloo between CPU processes, NCCL between GPUs
        expected = int(os.environ["WORLD_SIZE"])
        if state.num_processes != expected:  # each would compute the whole sweep and write the same files
            raise UsageError(f"accelerate set up {state.num_processes} of the {expected} launched processes; launch "
                             "with `accelerate launch --multi_gpu --num_processes N` (or torchrun)")
        device = state.device
        return cls(state.process_index, state.num_processes, "cpu" if device.type == "cpu" else str(device))

    def broadcast(self, message):
        """The main process's ``message`` (any picklable object), on every process."""
        if self.count == 1:
            return message
        import torch.distributed as dist

        box = [message if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def agree(self, decide):
        """``decide()`` run by the main process, its value (or the error it raised) on every process: checks of the
        output folder must not race with the main process's writing, and every process must go on alike."""
        if self.count == 1:
            return decide()
        from .config import UsageError

        if not self.is_main:
            kind, value = self.broadcast(None)
            if kind == "error":
                raise UsageError(value)
            return value
        try:
            value = decide()
        except (UsageError, OSError) as error:  # bad input, a failed write, a path the system refuses
            self.broadcast(("error", str(error)))
            raise
        self.broadcast(("ok", value))
        return value

    def part(self, cells: list, costs: list[float]) -> list:
        """This process's contiguous part of ``cells``, the parts of equal total cost (within one cell)."""
        if self.count == 1:
            return list(cells)
        ends = list(accumulate(costs))
        total = ends[-1] if ends else 0.0
        middles = [end - cost / 2 for end, cost in zip(ends, costs)]  # a cell goes to the part its middle falls in

        def cut(k: int) -> int:  # the first cell of part k
            return 0 if k == 0 else len(cells) if k == self.count else bisect_left(middles, total * k / self.count)

        return list(cells[cut(self.index): cut(self.index + 1)])


NOT_LAUNCHED = Shard()
