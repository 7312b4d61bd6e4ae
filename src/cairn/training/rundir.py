"""A run directory and the files in it; only rank 0 writes them.

  config.toml      the resolved config (what `--resume` reads back)
  run.json         what the run is: cairn version, tokenizer, parameters, device, plan, data
  metrics.jsonl    one JSON record per report, evaluation and test
  stories.md       the stories generated at the end
  tokenizer/       the run's copy of an own tokenizer
  checkpoints/     see checkpointer.py
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

from .. import files
from ..errors import CairnError

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

    def check_new(self) -> None:
        """A new run never writes into another run's directory."""
        if self.holds_run():
            raise CairnError(f"{self.path} already holds a run: resume it with --resume {self.path}, "
                             "or choose another --out")

    def write(self, name: str, text: str) -> None:
        if self.writer:
            self.path.mkdir(parents=True, exist_ok=True)
            files.write_text(self.path / name, text)

    def write_json(self, name: str, obj: dict) -> None:
        self.write(name, json.dumps(obj, indent=1, default=str))
