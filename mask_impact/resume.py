"""Resume state: finished knockouts survive a killed run.

While a sweep runs, every finished batch of knockouts is appended (and flushed to disk) to
``OUTPUT_DIR/NAME.partial.jsonl``. Its first line is a header with a fingerprint of everything that
determines the numbers: the model and a digest of its weights (the hub revision, or the checkpoint
files), the prompt, the image bytes, the settings, the baseline answer and the batch size. ``--resume``
reads the finished batches back and computes only the rest, with the same batch boundaries, so the
final files equal those of an uninterrupted run. A header that does not match is an error that names
what differs. A line cut short by the kill is ignored (that batch is simply computed again).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from . import __version__
from .config import RunConfig, UsageError

WHOLE_FILE_LIMIT = 2 << 30  # hash checkpoints up to this size completely; larger ones by header and samples
SAMPLE = 16 << 20


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
    """The hub revision when the model came from the hub, else a digest of the checkpoint files."""
    revision = getattr(loaded.model.config, "_commit_hash", None)
    folder = Path(loaded.model.name_or_path)
    if not folder.is_dir():
        return f"revision:{revision}"
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))
    whole = sum(p.stat().st_size for p in files) <= WHOLE_FILE_LIMIT
    return "files:" + hashlib.sha256("".join(file_digest(p, whole) for p in files).encode()).hexdigest()


RESULT_SETTINGS = ("mask_mode", "num_tokens", "layers", "window", "block_from", "vision_attention", "raw_prompt",
                   "engine")


def fingerprint_parts(loaded, config: RunConfig, prompt_text: str) -> dict:
    images = [hashlib.sha256(Path(path).read_bytes()).hexdigest() for path in config.images]
    settings = {name: getattr(config, name) for name in RESULT_SETTINGS}
    return {
        "tool_version": __version__,
        "model": loaded.name,
        "weights": weights_digest(loaded),
        "device": loaded.device.type,
        "dtype": str(loaded.dtype),
        "prompt": hashlib.sha256(prompt_text.encode()).hexdigest(),
        "images": images,
        **{f"settings.{name}": value for name, value in settings.items()},
    }


class PartialStore:
    """Appends finished batches to the partial file; reads them back on ``--resume``."""

    def __init__(self, path: Path, parts: dict):
        self.path, self.parts = path, parts
        self.saved: dict[tuple[int, int], dict] = {}  # (window index, start index) → record
        self.header: dict | None = None

    def open(self, resume: bool) -> None:
        if self.path.exists() and not resume:
            self.path.unlink()
        if resume and self.path.exists():
            self._read()

    def _read(self) -> None:
        lines = self.path.read_text(encoding="utf-8").splitlines()
        records = []
        for line in lines:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # cut short by the kill; everything after it is lost anyway
        if not records or "parts" not in records[0]:
            return
        header = records[0]
        differs = [key for key in sorted(set(header["parts"]) | set(self.parts))
                   if header["parts"].get(key) != self.parts.get(key)]
        if differs:
            raise UsageError(f"{self.path} was made with a different {', '.join(differs)}; rerun without "
                             "--resume (and with --overwrite) to start over")
        self.header = header
        self.saved = {(r["window"], r["start"]): r for r in records[1:]}

    def check_baseline(self, token_ids: list[int]) -> None:
        if self.header is not None and self.header["baseline"] != token_ids:
            raise UsageError(f"{self.path}: the baseline answer differs from the one the partial run had "
                             "(non-deterministic hardware?); rerun with --overwrite to start over")

    def batch_size(self, default: int) -> int:
        """The batch size the partial run used last, so the remaining batches fall where they would have."""
        if self.saved:
            return list(self.saved.values())[-1]["batch_size"]
        return self.header["batch_size"] if self.header else default

    def start(self, token_ids: list[int], batch_size: int) -> None:
        if self.header is None:
            self.header = {"parts": self.parts, "baseline": token_ids, "batch_size": batch_size}
            self._append(self.header, mode="w")

    def record(self, window: int, start: int, positions: list[int], values: dict, batch_size: int) -> None:
        record = {"window": window, "start": start, "positions": positions, "metrics": values,
                  "batch_size": batch_size}
        self.saved[(window, start)] = record
        self._append(record)

    def _append(self, record: dict, mode: str = "a") -> None:
        with self.path.open(mode, encoding="utf-8") as file:
            file.write(json.dumps(record) + "\n")
            file.flush()
            os.fsync(file.fileno())

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
