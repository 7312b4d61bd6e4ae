"""Benchmark records: every measurement cairn keeps (`cairn bench --json`, the programs in
benchmarks/scripts/) is written here, in one shape:

    {"command": "cairn bench --rounds 3 --generate 0 --json ...",   # the command line that measured it
     "commit": "5e361de...",              # git HEAD of the code measured; "-dirty" appended when tracked
                                          # files differed from it (records and run directories aside)
     "date": "2026-12-02T01:01:23+00:00",
     "cpu": {"model": "AMD EPYC", "flags": ["avx2", "avx512f", "avx512_bf16"], "cores": 2},
     "threads": 2,                        # torch threads of the measuring process (null: the work ran
                                          # in processes the command started, with their own settings)
     "torch": "2.13.0+cpu", "python": "3.11.7",
     "load": {"start": 1.4, "end": 2.1},  # the machine's 1-minute load average at the start and the end
     "result": {...}}                     # what was measured, in the benchmark's own terms

`command` is the command line as it ran at `commit` (paths as the repository had them then).
`cpu.flags` are the features among cairn.util.host.SPEED_FLAGS (the ones that decide float32 and
bfloat16 matmul speed); `cores` the usable cores. A field the record does not know is null:
records converted from earlier shapes keep null where they did not say.

    recording = start()                   # at the start: the command, commit, date and load
    ...                                   # measure
    recording.write(path, result, threads=torch.get_num_threads())
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from cairn.util.files import write_text
from cairn.util.host import cpu_info, speed_flags, usable_cores

KEYS = ("command", "commit", "date", "cpu", "threads", "torch", "python", "load", "result")

# Paths whose changes do not make the measured code differ from its commit: what benchmarks write.
NOT_CODE = ("benchmarks/records", "benchmarks/runs")


def git_commit(where: Optional[Path] = None) -> Optional[str]:
    """HEAD of the git checkout that holds `where` (default: this cairn's source), with "-dirty"
    when a tracked file outside NOT_CODE differs from it; None outside a git checkout."""
    where = where or Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=30)
        if head.returncode:
            return None
        changed = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no", "--",
                                  ":/", *(f":(top,exclude){p}" for p in NOT_CODE)],
                                 capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):  # no git
        return None
    sha = head.stdout.strip()
    return f"{sha}-dirty" if changed.returncode or changed.stdout.strip() else sha


def load_average() -> Optional[float]:
    """The 1-minute load average, or None where the platform has none."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def torch_version() -> Optional[str]:
    """The torch in use (imported or, if not yet, installed), without importing it."""
    module = sys.modules.get("torch")
    if module is not None:
        return str(module.__version__)
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu() -> dict[str, Any]:
    model, flags = cpu_info()
    return {"model": model or None, "flags": speed_flags(flags), "cores": usable_cores()}


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@dataclass
class Recording:
    """What a record knows from the start of its measurement."""
    command: str
    commit: Optional[str] = field(default_factory=git_commit)
    date: str = field(default_factory=now)
    load_at_start: Optional[float] = field(default_factory=load_average)

    def record(self, result: dict[str, Any], threads: Optional[int]) -> dict[str, Any]:
        """The record of `result`, measured with `threads` torch threads (None: not in this process)."""
        return {"command": self.command, "commit": self.commit, "date": self.date, "cpu": cpu(),
                "threads": threads, "torch": torch_version(), "python": platform.python_version(),
                "load": {"start": self.load_at_start, "end": load_average()}, "result": result}

    def write(self, path: str | Path, result: dict[str, Any], threads: Optional[int]) -> dict[str, Any]:
        """Write the record of `result` to `path` (atomically) and return it."""
        rec = self.record(result, threads)
        write_text(Path(path), json.dumps(rec, indent=1) + "\n")
        return rec


def start(command: Optional[str] = None) -> Recording:
    """Begin a record. `command` defaults to this process's command line as `python SCRIPT ARGS`."""
    return Recording(command if command is not None else shlex.join(["python", *sys.argv]))


def read(path: str | Path) -> dict[str, Any]:
    """A record, checked to be in the one shape."""
    rec = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(rec, dict) or tuple(rec) != KEYS:
        raise ValueError(f"{path}: not a benchmark record (keys {', '.join(KEYS)})")
    return rec


def read_result(path: str | Path) -> dict[str, Any]:
    """What a record measured: its "result"."""
    result: dict[str, Any] = read(path)["result"]
    return result
