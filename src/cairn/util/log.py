"""cairn's messages go through the standard `logging` module, under the "cairn" logger.

The command line (and `cairn.train` when the caller set up no logging) prints them as plain lines;
while a progress bar is drawn they go through tqdm so the bar is not torn. Under torchrun only
rank 0 speaks: the other ranks keep warnings and errors only.
"""

from __future__ import annotations

import logging
import sys
from typing import Optional, TextIO

ROOT = "cairn"


class _Lines(logging.Handler):
    """The message alone, one line each, through tqdm when a progress bar may be on screen."""

    def __init__(self, stream: Optional[TextIO] = None, progress: bool = False):
        super().__init__()
        self.stream, self.progress = stream, progress

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = self.stream or sys.stdout  # looked up late: tests and callers swap sys.stdout
            msg = self.format(record)
            if self.progress:
                from tqdm import tqdm

                tqdm.write(msg, file=stream)
            else:
                stream.write(msg + "\n")
                stream.flush()
        except Exception:  # noqa: BLE001 - logging must never take the run down
            self.handleError(record)


def setup(stream: Optional[TextIO] = None, progress: bool = False, quiet: bool = False) -> None:
    """Print cairn's messages as plain lines on `stream` (default: standard output); `quiet`
    keeps warnings and errors only."""
    logger = logging.getLogger(ROOT)
    for h in list(logger.handlers):
        if isinstance(h, _Lines):
            logger.removeHandler(h)
    logger.addHandler(_Lines(stream, progress))
    logger.setLevel(logging.WARNING if quiet else logging.INFO)


def ensure_setup() -> None:
    """For library calls: cairn's messages are INFO unless the caller chose a level, and are
    printed unless the caller configured logging itself (then they go to its handlers)."""
    logger = logging.getLogger(ROOT)
    if not logger.handlers and not logging.getLogger().handlers:
        setup()
    elif logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)


def only_main_speaks(rank: int) -> None:
    """Ranks other than 0 keep only warnings and errors: one run, one voice."""
    if rank != 0:
        logging.getLogger(ROOT).setLevel(logging.WARNING)
