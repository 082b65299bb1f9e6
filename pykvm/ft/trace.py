"""`--trace-ft`: each phase of each sync as it happens, one line each, for teaching. On the primary:
paused, harvested, sent, acknowledged, released, resumed; on the standby: staged, committed, and
the steps of a takeover. Off, a phase costs one attribute test (callers format only when on)."""

from __future__ import annotations

from typing import Callable


class FtTrace:
    def __init__(self, log: Callable[[str], None] | None = None) -> None:
        self.on = log is not None
        self._log = log

    def sync(self, number: int, text: str) -> None:
        if self._log is not None:
            self._log(f"ft trace: sync {number}: {text}")

    def takeover(self, text: str) -> None:
        if self._log is not None:
            self._log(f"ft trace: takeover: {text}")


OFF = FtTrace()
