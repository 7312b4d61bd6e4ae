"""A run directory and the files in it; only rank 0 writes them.

  config.toml      the resolved config (what `--resume` reads back)
  run.json         what the run is: cairn version, tokenizer, parameters, device, plan, data
  metrics.jsonl    one JSON record per report, evaluation and test
  stories.md       the stories generated at the end
  tokenizer/       the run's copy of an own tokenizer
  checkpoints/     see checkpointing.py

One process writes a run at a time: `RunLock` holds an advisory lock (flock) on the directory for
the whole run, released by the OS if the process dies, and `.writer` says who holds it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Callable, Optional

from cairn.util import files
from cairn.util.errors import CairnError, option
from cairn.util.failures import describe

WRITER = ".writer"

CONFIG = "config.toml"
METRICS = "metrics.jsonl"


class MetricsLog:
    """metrics.jsonl, appended one record at a time (and handed to a sink such as TensorBoard)."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.enabled = enabled
        self.sink: Optional[Callable[[dict], None]] = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.sink is not None:
            self.sink(record)

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after `step` (and a torn last line): a resumed run redoes them."""
        if not self.enabled or not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and record.get("step", 0) <= step and record.get("kind") != "test":
                keep.append(line)
        files.write_text(self.path, "".join(k + "\n" for k in keep))


class RunDir:
    def __init__(self, path: Path, writer: bool = True):
        self.path = Path(path)
        self.writer = writer  # rank 0; the other ranks read, never write
        self.checkpoints = self.path / "checkpoints"
        self.metrics = MetricsLog(self.path / METRICS, enabled=writer)

    def holds_run(self) -> bool:
        return (self.path / CONFIG).exists() or self.checkpoints.exists()

    def progress(self) -> list[str]:
        """What of a run's progress the directory holds: checkpoints, metrics."""
        found = []
        if self.checkpoints.is_dir():
            n = sum(1 for p in self.checkpoints.iterdir() if p.is_dir() and not p.name.startswith("."))
            if n:
                found.append(f"{n} checkpoint{'s' if n > 1 else ''}")
        metrics = self.path / METRICS
        if metrics.is_file() and metrics.stat().st_size:
            found.append("metrics")
        return found

    def move_aside(self) -> Path:
        """Move everything of the run into a new sibling directory (never delete it); the
        directory itself, and its lock, stay."""
        aside = self.path.with_name(f"{self.path.name}.before-restart-{time.strftime('%Y%m%d-%H%M%S')}")
        aside.mkdir()
        for p in self.path.iterdir():
            if p.name != WRITER:
                os.rename(p, aside / p.name)
        return aside

    def check_new(self) -> None:
        """A new run never writes into another run's directory."""
        if self.holds_run():
            raise CairnError(f"{self.path} already holds a run: resume it with {option('resume')} {self.path}, "
                             f"or choose another {option('out')}")

    def write(self, name: str, text: str) -> None:
        if self.writer:
            self.path.mkdir(parents=True, exist_ok=True)
            files.write_text(self.path / name, text)

    def write_json(self, name: str, obj: dict) -> None:
        self.write(name, json.dumps(obj, indent=1, default=str))


class RunLock:
    """The one-writer lock of a run directory (made if missing, removed again if it stays empty)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd: Optional[int] = None
        self.created = False

    def acquire(self) -> None:
        self.created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise CairnError(f"cannot create or open the run directory {self.path}: {describe(e) or e}; "
                             f"choose another {option('out')}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise CairnError(f"{self.path} is being written by another cairn process ({self._holder()}): let it "
                             "finish or stop it first; two writers would mix their checkpoints and metrics") from None
        self.fd = fd
        try:
            files.write_text(self.path / WRITER, f"pid {os.getpid()} on {socket.gethostname()}, "
                                                 f"since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        except OSError as e:
            self.release()
            raise CairnError(f"cannot write into the run directory {self.path}: {describe(e) or e}; "
                             f"use a writable {option('out')} (or make this one writable)") from None

    def _holder(self) -> str:
        try:
            return (self.path / WRITER).read_text(encoding="utf-8").strip() or "holder unknown"
        except OSError:
            return "holder unknown"

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            (self.path / WRITER).unlink(missing_ok=True)
            if self.created and not any(self.path.iterdir()):
                self.path.rmdir()  # a run that failed before writing anything leaves nothing
        except OSError:
            pass
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
