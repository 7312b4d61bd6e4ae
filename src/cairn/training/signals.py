"""Stopping on request: the first Ctrl-C or SIGTERM finishes the step and saves; a second Ctrl-C stops at once."""

from __future__ import annotations

import signal
import sys
from types import FrameType
from typing import Any, Optional


class StopRequest:
    def __init__(self, quiet: bool = False):
        self.requested = False
        self.quiet = quiet  # ranks other than 0 do not repeat the message
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        if not self.quiet:
            print(f"\n{signal.Signals(signum).name} received: finishing this step and saving a checkpoint "
                  "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
