"""`--tracker csv`: every metrics record as a row of `RUN/metrics.csv`, for spreadsheets and pandas.

One wide table: `kind`, `step`, `epoch`, then each key in the order records first bring it; a cell
is empty where a record lacks the key (a train row has no `val_loss`). A record with a key not yet
in the header rewrites the file with the wider header, so every row always has every column.
Numbers are written as Python prints them, which reads back to the same float.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Optional

from cairn.trackers.base import TrackedRun
from cairn.util import files

FILE = "metrics.csv"
FIRST = ["kind", "step", "epoch"]


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class CsvTracker:
    def __init__(self) -> None:
        self.path: Optional[Path] = None
        self.header: list[str] = []

    def start(self, run: TrackedRun) -> dict:
        self.path = run.path / FILE
        rows = self._read()
        # a resumed run redoes the steps after its checkpoint and its test: their rows go, as in metrics.jsonl
        kept = [r for r in rows if _step(r) <= run.step and r.get("kind") != "test"]
        if rows or self.path.exists():
            self._rewrite(kept)
        return {}

    def log(self, record: dict) -> None:
        assert self.path is not None, "start() first"
        new = [k for k in record if k not in self.header]
        row = {k: _cell(v) for k, v in record.items()}
        if new or not self.path.exists():
            rows = self._read()
            self.header = [k for k in FIRST if k not in self.header] + self.header + \
                          [k for k in new if k not in FIRST]
            self._rewrite(rows + [row])
            return
        with open(self.path, "a", encoding="utf-8", newline="") as f:
            csv.DictWriter(f, self.header, restval="", lineterminator="\n").writerow(row)

    def finish(self, ok: bool) -> None:
        pass  # every row is on disk when log returns

    def _read(self) -> list[dict[str, str]]:
        assert self.path is not None
        if not self.path.is_file():
            return []
        with open(self.path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            rows = [dict(r) for r in reader]
            self.header = list(reader.fieldnames or [])
        return rows

    def _rewrite(self, rows: list[dict[str, str]]) -> None:
        assert self.path is not None
        if not self.header:
            self.header = list(FIRST)
        out = io.StringIO()
        writer = csv.DictWriter(out, self.header, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        files.write_text(self.path, out.getvalue())


def _step(row: dict[str, str]) -> float:
    try:
        return float(row.get("step") or 0)
    except ValueError:
        return 0.0
