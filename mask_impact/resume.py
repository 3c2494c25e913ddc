"""Resume state: finished knockouts survive a killed run, and only the run that owns them writes them.

While a sweep runs, every finished batch of knockouts is appended (and flushed to disk) to
``OUTPUT_DIR/NAME.partial.jsonl``. Its first line is a header: a run id and a fingerprint of everything
that decides the numbers (``fingerprint_parts``: the model, its weights and its other files, the token
ids and image tensors the model is given, the settings, the versions), the baseline answer and the batch
size. ``--resume`` reads the finished batches back and computes only the rest, with the same batch
boundaries, so the final files equal those of an uninterrupted run. A header that does not match is an
error that names what differs. The same parts go into the result JSON (``meta.fingerprint``), so a
finished result can be checked against what a rerun would compute (``fingerprint_differences``).

Why a lock and a run id: two runs with the same ``--output`` would otherwise append to one file and a
resume would merge cells of both. A run holds an exclusive ``flock`` on ``OUTPUT_DIR/.NAME.lock`` from
before it touches the partial file until its results are in place; every record carries the header's
run id, and records of any other run are never merged.

Why records are validated: the file lives on disk between runs, where anything can happen to it. A
record of the wrong shape is dropped (its batch is computed again), never merged; a malformed header is
an error. A line cut short by a kill is cut off before the next append, so every append starts on a
fresh line and a second kill loses nothing the resumed run finished.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
import time
import uuid
from pathlib import Path

import torch
import transformers

from .version import __version__
from .config import RunConfig, UsageError
from .errors import mention, message_of
from .inputs import Prompt
from .metrics import METRICS, STEPS
from .models import WEIGHT_SUFFIXES
from .report import WriteError
from .shard import NOT_LAUNCHED, Shard

WHOLE_FILE_LIMIT = 2 << 30  # hash checkpoints up to this size completely; larger ones by header and samples
SAMPLE = 16 << 20
# weights in any format: left out of the folder's file digests (the loaded ones are in weights_digest)
WEIGHT_LIKE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")
# Every setting that decides a number in the partial file or the result (batch size does not: see batch_size).
RESULT_SETTINGS = ("mask_mode", "stage", "fill", "unit", "groups", "flows", "num_tokens", "layers", "window", "block_from", "vision_attention", "raw_prompt",
                   "engine", "generate_top")
ESTIMATE_SETTINGS = ("estimate", "estimate_sample", "estimate_seed")
TARGET_SETTINGS = ("target", "contrast")


def file_digest(path: Path, whole: bool) -> str:
    digest = hashlib.sha256()
    size = path.stat().st_size
    digest.update(f"{path.name}:{size}".encode())
    with path.open("rb") as file:
        if whole:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
        else:  # the safetensors header (names, shapes, offsets), then the first and last 16 MiB
            digest.update(file.read(SAMPLE))
            file.seek(max(0, size - SAMPLE))
            digest.update(file.read(SAMPLE))
    return digest.hexdigest()


def weights_digest(loaded) -> str:
    """The hub revision when the model came from the hub, else a digest of the checkpoint files.

    Computed once per loaded model, at its first run (a batch fingerprints every run, and hashing gigabytes
    each time would not do): the weights in memory do not change when the files do."""
    cached = getattr(loaded, "_weights_digest", None)
    if cached is not None:
        return cached
    revision = getattr(loaded.model.config, "_commit_hash", None)
    folder = Path(loaded.model.name_or_path)
    if not folder.is_dir():
        digest = f"revision:{revision}"
    else:
        files = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES)
        whole = sum(p.stat().st_size for p in files) <= WHOLE_FILE_LIMIT
        digest = "files:" + hashlib.sha256("".join(file_digest(p, whole) for p in files).encode()).hexdigest()
    loaded._weights_digest = digest
    return digest


def model_file_digests(loaded) -> dict[str, str]:
    """``files.NAME`` → digest of every non-weight file of a local model folder (config, generation config,
    tokenizer, chat template, processor configs, ...): they decide the tokens and the model as much as the
    weights do. Documentation (``*.md``, LICENSE) and hidden files are left out. A hub model is pinned by its
    revision (see ``weights_digest``)."""
    folder = Path(loaded.model.name_or_path)
    if not folder.is_dir():
        return {}
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                   and p.suffix not in WEIGHT_LIKE_SUFFIXES and p.suffix != ".md" and not p.name.startswith("LICENSE"))
    return {f"files.{p.name}": hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def tensor_digest(tensor: torch.Tensor) -> str:
    """dtype, shape and the exact bytes of a tensor."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    digest = hashlib.sha256(f"{flat.dtype}:{tuple(tensor.shape)}".encode())
    digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def fingerprint_parts(loaded, config: RunConfig, prompt: Prompt) -> dict:
    """Everything that decides a number of the result, each part digested so a mismatch can be named."""
    images = [hashlib.sha256(Path(path).read_bytes()).hexdigest() for path in config.images]
    inputs = {f"inputs.{key}": tensor_digest(value) for key, value in sorted(prompt.model_kwargs.items())
              if isinstance(value, torch.Tensor)}
    measured = config.as_measured(loaded)  # Gemma 3's --vision-attention changes nothing, so it decides nothing
    return {
        "tool_version": __version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "model": loaded.name,
        "weights": weights_digest(loaded),
        **model_file_digests(loaded),
        "device": loaded.device.type,
        "dtype": str(loaded.dtype),
        "prompt": hashlib.sha256(prompt.text.encode()).hexdigest(),
        "input_ids": tensor_digest(prompt.input_ids),
        "images": images,
        **inputs,
        **{f"settings.{name}": getattr(measured, name) for name in RESULT_SETTINGS},
        # which cells are exact (only in an --estimate run, so other fingerprints stay as they were)
        **({f"settings.{name}": getattr(config, name) for name in ESTIMATE_SETTINGS} if config.estimate else {}),
        # the answer scored (only in a --target run, so other fingerprints stay as they were)
        **({f"settings.{name}": getattr(config, name) for name in TARGET_SETTINGS} if config.target else {}),
    }


def differing_parts(saved: dict, current: dict) -> list[str]:
    return [key for key in sorted(set(saved) | set(current)) if saved.get(key) != current.get(key)]


def fingerprint_differences(json_path: Path, parts: dict) -> list[str]:
    """What differs between a finished result's ``meta.fingerprint`` and ``parts`` (empty: it matches).
    A result that cannot be read, or has no fingerprint, differs in ``fingerprint``."""
    try:
        saved = json.loads(Path(json_path).read_text(encoding="utf-8"))["meta"]["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return ["fingerprint"]
    if not isinstance(saved, dict):
        return ["fingerprint"]
    return differing_parts(saved, parts)


def partial_differences(partial: Path, parts: dict) -> list[str]:
    """What differs between a killed run's partial file (its header; any process's file) and ``parts``: empty when
    it matches or holds nothing yet. A header that cannot be read differs in ``fingerprint``."""
    for path in (partial, *rank_files(partial)):
        try:
            lines, _ = read_lines(path)
        except OSError:
            continue
        if not lines:
            continue
        header = _parse(lines[0])
        if header_problem(header):
            return ["fingerprint"]
        return differing_parts(header["parts"], parts)
    return []


# --- the lock -------------------------------------------------------------------------------------------------

def lock_path(partial: Path) -> Path:
    return partial.with_name(f".{partial.name.removesuffix('.partial.jsonl')}.lock")


def _locked_by(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip() or "?"
    except OSError:
        return "?"


def _busy(partial: Path, lock: Path) -> UsageError:
    name = partial.name.removesuffix(".partial.jsonl")
    return UsageError(f"another run is writing {name} (pid {_locked_by(lock)}) in {partial.parent}; wait for it "
                      f"to finish, or choose another {mention('output')}")


class RunLock:
    """An exclusive, non-blocking ``flock`` on ``.NAME.lock``, holding the pid of its owner.

    The file is removed on release; a run that opened it just before the removal sees that its file is no
    longer the one at the path and tries again, so two runs can never both believe they hold the lock.
    """

    def __init__(self, partial: Path):
        self.partial, self.path = partial, lock_path(partial)
        self.fd: int | None = None

    def acquire(self) -> None:
        give_up = time.monotonic() + 0.2
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as error:
                raise WriteError(error, self.path) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() > give_up:  # not just a moment's check_unlocked of another run
                    raise _busy(self.partial, self.path) from None
                time.sleep(0.02)
                continue
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        try:  # only for the message another run gets; the lock itself is the flock
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError:
            pass

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:  # a lock file left behind is harmless: the lock is the flock, gone with the descriptor
            pass
        os.close(self.fd)
        self.fd = None


def check_unlocked(partial: Path) -> None:
    """Fail early (before the model loads) when another run holds NAME's lock; takes nothing."""
    lock = lock_path(partial)
    if not lock.exists():
        return
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _busy(partial, lock) from None
    finally:
        os.close(fd)


# --- records ----------------------------------------------------------------------------------------------------

def _index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _scalar(value) -> bool:
    return value is None or isinstance(value, (bool, int, float))


def header_problem(header) -> str | None:
    """Why a header line is not one this version writes, or None."""
    if not isinstance(header, dict):
        return "not a JSON object"
    if not isinstance(header.get("run"), str) or not header["run"]:
        return "no run id"
    if not isinstance(header.get("parts"), dict):
        return "no fingerprint"
    baseline = header.get("baseline")
    if not isinstance(baseline, list) or not baseline or not all(_index(t) for t in baseline):
        return "no baseline answer"
    if not _index(header.get("batch_size")) or header["batch_size"] < 1:
        return "no batch size"
    return None


def valid_record(record, run: str) -> bool:
    """A finished batch of this run: indices, a non-empty list of unit indices, every metric with one value each."""
    if not isinstance(record, dict) or record.get("run") != run:
        return False
    units, metrics = record.get("units"), record.get("metrics")
    if not (_index(record.get("window")) and _index(record.get("start")) and _index(record.get("batch_size"))
            and record["batch_size"] >= 1):
        return False
    if not isinstance(units, list) or not units or not all(_index(u) for u in units) or len(set(units)) < len(units):
        return False
    if not isinstance(metrics, dict) or set(metrics) != set(METRICS):
        return False
    steps = record.get("steps")
    if not isinstance(steps, dict) or set(steps) != set(STEPS) or not all(
            isinstance(rows, list) and len(rows) == len(units) and all(
                isinstance(row, list) and row and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                       for v in row) for row in rows) for rows in steps.values()):
        return False
    return all(isinstance(values, list) and len(values) == len(units) and all(_scalar(v) for v in values)
               for values in metrics.values())


def read_lines(path: Path) -> tuple[list[bytes], int]:
    """The complete lines of a file and the length of its cut-off tail (a last line without ``\\n``)."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    return lines[:-1], len(lines[-1])


def rank_file(path: Path, rank: int) -> Path:
    """The partial file of process ``rank`` of a launched run (rank 0 writes ``path`` itself)."""
    return path if rank == 0 else path.with_name(f"{path.name.removesuffix('.jsonl')}.rank{rank}.jsonl")


def rank_files(path: Path) -> list[Path]:
    """The other processes' partial files of ``path`` that exist, from this run or a killed one."""
    prefix = f"{path.name.removesuffix('.jsonl')}.rank"
    try:
        names = [p for p in path.parent.iterdir() if p.name.startswith(prefix) and p.name.endswith(".jsonl")
                 and p.name[len(prefix): -len(".jsonl")].isdigit()]
    except FileNotFoundError:
        return []
    return sorted(names)


def unfinished(path: Path) -> bool:
    """Whether a killed run left finished knockouts for ``--resume`` (in any process's file)."""
    return path.exists() or bool(rank_files(path))


class PartialStore:
    """Appends finished batches to the partial file; reads them back on ``--resume``.

    Use as ``with store.open(resume):`` around the whole run (sweep and result writing): the main process
    holds the run's lock, and a failed write (disk full, ...) becomes one line that says what was kept.
    A finished knockout is a *cell* (row, unit); ``saved`` holds every cell finished so far, however the runs
    that made them were split into batches or processes, so a run resumes with any number of processes.
    In a launched run (shard.py) each process appends to its own file; the main one reads the others'
    (``follow``) and, on ``--resume``, first gathers every file's cells into its own (``_gather``).
    """

    def __init__(self, path: Path, parts: dict, shard: Shard = NOT_LAUNCHED):
        self.parts, self.shard = parts, shard
        self.path = rank_file(path, shard.index)
        self.saved: dict[tuple[int, int], dict] = {}  # (row, unit) → metric → value
        self.header: dict | None = None
        self.run = uuid.uuid4().hex[:16]
        self.lock = RunLock(path)
        self.followed: dict[Path, tuple[int, dict | None]] = {}  # another process's file → (bytes read, header)

    def open(self, resume: bool) -> PartialStore:
        """Take the lock, start over or read what earlier runs finished; in a launch, the main process does that
        and the others take what it found (or stop on the error it stopped on) before anyone writes."""
        found = self.shard.agree(lambda: self._open(resume))
        if not self.shard.is_main:
            self.saved = found["saved"]
            if found["batch_size"]:
                self.header = {"batch_size": found["batch_size"]}  # read by batch_size(); this file gets its own
            self.path.unlink(missing_ok=True)
        return self

    def _open(self, resume: bool) -> dict:
        self.lock.acquire()
        try:
            if not resume:
                for path in (self.path, *rank_files(self.path)):
                    path.unlink(missing_ok=True)
            elif unfinished(self.path):
                self._read()
                self._gather()
        except BaseException:
            self.lock.release()
            raise
        return {"saved": self.saved, "batch_size": self.header and self.header["batch_size"]}

    def __enter__(self) -> PartialStore:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.lock.release()
        if isinstance(error, WriteError):
            advice = "free space" if error.disk_full else "fix that"
            raise UsageError(f"{message_of(error)}; {self.kept()} finished knockouts are kept in {self.path}; "
                             f"{advice} and rerun with {mention('resume')}") from None

    def kept(self) -> int:
        return len(self.saved)

    def _read(self) -> None:
        header, cells = self._read_file(self.path) if self.path.exists() else (None, {})
        if header is not None:
            self.header, self.run = header, header["run"]
        self.saved.update(cells)

    def _read_file(self, path: Path) -> tuple[dict | None, dict]:
        """A partial file's header and finished cells (a line cut short by a kill is cut off first)."""
        lines, cut = read_lines(path)
        if cut:  # the kill cut the last line short: drop it, so the next append starts on a fresh line
            with path.open("r+b") as file:
                file.truncate(path.stat().st_size - cut)
        if not lines:
            return None, {}
        header = _parse(lines[0])
        problem = header_problem(header)
        if problem:
            raise UsageError(f"{path} has no valid header ({problem}); rerun without {mention('resume')} and with "
                             f"{mention('overwrite')} to start over")
        differs = differing_parts(header["parts"], self.parts)
        if differs:
            raise UsageError(f"{path} does not match this run ({', '.join(differs)} differ); rerun without "
                             f"{mention('resume')} (and with {mention('overwrite')}) to start over")
        if self.header is not None and header["baseline"] != self.header["baseline"]:
            raise UsageError(f"{path}: the baseline answer differs from the one in {self.path} (non-deterministic "
                             f"hardware?); rerun with {mention('overwrite')} to start over")
        cells = {}
        for line in lines[1:]:
            record = _parse(line)
            if valid_record(record, header["run"]):
                cells.update(_cells(record))
        return header, cells

    def _gather(self) -> None:
        """Every process's finished cells into this one file, written whole before the others are removed."""
        others = rank_files(self.path)
        if not others:
            return
        for path in others:
            header, cells = self._read_file(path)
            if header is not None and self.header is None:
                self.header = dict(header, run=self.run, pid=os.getpid())
            self.saved.update(cells)
        if self.header is not None:
            self.header["run"] = self.run
            temporary = self.path.with_name(f".{self.path.name}.gather")
            lines = [self.header, *(_record(self.run, w, units, values, self.header["batch_size"], steps)
                                    for w, units, values, steps in _rows(self.saved))]
            try:
                temporary.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
                os.replace(temporary, self.path)
            except OSError as error:
                temporary.unlink(missing_ok=True)
                raise WriteError(error, self.path) from None
        for path in others:
            path.unlink(missing_ok=True)

    def follow(self) -> dict[tuple[int, int], dict]:
        """The cells the other processes of this launch finished since the last call (main process only)."""
        new = {}
        for path in rank_files(self.path):
            done, header = self.followed.get(path, (0, None))
            try:
                with path.open("rb") as file:
                    file.seek(done)
                    data = file.read()
            except FileNotFoundError:
                continue
            complete = data[: data.rfind(b"\n") + 1]
            for line in complete.split(b"\n")[:-1]:
                record = _parse(line)
                if header is None:
                    problem = header_problem(record)
                    if problem or differing_parts(record["parts"], self.parts) or (
                            self.header is not None and record["baseline"] != self.header["baseline"]):
                        why = problem or "another fingerprint or baseline"
                        raise UsageError(f"{path} does not belong to this run ({why}); rerun with "
                                         f"{mention('overwrite')} to start over")
                    header = record
                elif valid_record(record, header["run"]):
                    new.update(_cells(record))
            self.followed[path] = (done + len(complete), header)
        self.saved.update(new)
        return new

    def check_baseline(self, token_ids: list[int]) -> None:
        if self.header is not None and "baseline" in self.header and self.header["baseline"] != token_ids:
            raise UsageError(f"{self.path}: the baseline answer differs from the one the partial run had "
                             f"(non-deterministic hardware?); rerun with {mention('overwrite')} to start over")

    def batch_size(self, default: int) -> int:
        """The batch size the partial run was made with, so the remaining batches fall where they would have.

        Batch boundaries do not change what a knockout measures, only how the float sums are grouped; keeping
        them makes a resumed one-process result equal, bit for bit, to an uninterrupted run. A different
        ``--batch-size`` is therefore not an error: it is set aside, with a note.
        """
        if not self.header:
            return default
        size = self.header["batch_size"]
        if size != default and self.shard.is_main:
            print(f"note: resuming {self.path.name} with the batch size it was made with ({size}, not {default}), "
                  "so the result equals an uninterrupted run", file=sys.stderr)
        return size

    def start(self, token_ids: list[int], batch_size: int) -> None:
        if self.header is None or not self.shard.is_main:
            self.header = {"run": self.run, "pid": os.getpid(), "parts": self.parts, "baseline": token_ids,
                           "batch_size": batch_size}
            self._append(self.header, mode="w")
        if self.saved and self.shard.is_main:
            print(f"note: resuming {self.path.name}: {len(self.saved)} finished knockouts kept", file=sys.stderr)

    def record(self, window: int, units: list[int], values: dict, batch_size: int, steps: dict) -> None:
        record = _record(self.run, window, units, values, batch_size, steps)
        self._append(record)
        self.saved.update(_cells(record))

    def _append(self, record: dict, mode: str = "a") -> None:
        """One whole line, flushed to disk; on failure the file is cut back to what it was."""
        line = memoryview((json.dumps(record) + "\n").encode())
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if mode == "w" else os.O_APPEND)
        try:
            fd = os.open(self.path, flags, 0o666)
        except OSError as error:
            raise WriteError(error, self.path) from None
        try:
            size = os.lseek(fd, 0, os.SEEK_END)
            while line:
                line = line[os.write(fd, line):]
            os.fsync(fd)
        except OSError as error:
            _truncate(fd, size)
            raise WriteError(error, self.path) from None
        finally:
            os.close(fd)

    def remove(self) -> None:
        for path in (self.path, *rank_files(self.path)):
            path.unlink(missing_ok=True)


def _record(run: str, window: int, units: list[int], values: dict, batch_size: int, steps: dict) -> dict:
    return {"run": run, "window": window, "start": units[0], "units": units, "metrics": values, "steps": steps,
            "batch_size": batch_size}


def _cells(record: dict) -> dict[tuple[int, int], dict]:
    """A valid record's cells: (row, unit) → metric → value (per-step metrics as ``steps.NAME`` → values)."""
    return {(record["window"], unit): {**{name: values[k] for name, values in record["metrics"].items()},
                                       **{f"steps.{name}": rows[k] for name, rows in record["steps"].items()}}
            for k, unit in enumerate(record["units"])}


def _rows(cells: dict[tuple[int, int], dict]):
    """``cells`` as (row, units, metric → values, per-step metric → values), one per row, units in order."""
    for w in sorted({w for w, _ in cells}):
        units = sorted(i for row, i in cells if row == w)
        yield (w, units, {name: [cells[(w, i)][name] for i in units] for name in METRICS},
               {name: [cells[(w, i)][f"steps.{name}"] for i in units] for name in STEPS})


def _parse(line: bytes):
    try:
        return json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None


def _truncate(fd: int, size: int) -> None:
    try:
        os.ftruncate(fd, size)
    except OSError:  # the reader drops a cut-off last line anyway
        pass
