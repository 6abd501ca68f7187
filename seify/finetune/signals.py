"""SIGINT and SIGTERM ask a run to save and leave at its next step; it then exits as the shell expects."""
from __future__ import annotations

import contextlib
import signal


def exit_code(stopped_by: str | None) -> int:
    """A run stopped by a signal exits as the shell expects of it: 128 + the signal's number."""
    return {"SIGINT": 130, "SIGTERM": 143}.get(stopped_by or "", 0)


class Stop:
    """SIGINT/SIGTERM ask the loop to save and leave at the next step."""

    def __init__(self):
        self.signum = None

    def __call__(self, signum, frame):
        self.signum = signum

    @contextlib.contextmanager
    def installed(self):
        previous = {s: signal.signal(s, self) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
