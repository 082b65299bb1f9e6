"""An isa-debug-exit style port: a guest writes a status byte and the VMM exits with it.

QEMU's device turns a write of v into exit status (v << 1) | 1; ours passes v through unchanged,
so a guest's `exit(3)` is the VMM's status 3."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

DEFAULT_PORT = 0xF4


@dataclass
class DebugExitState:
    """The port keeps nothing: a write acts at once."""


class DebugExit:
    state_type = DebugExitState
    def __init__(self, on_exit: Callable[[int], None]) -> None:
        self._on_exit = on_exit

    def save_state(self) -> DebugExitState:
        return DebugExitState()

    def restore_state(self, state: DebugExitState) -> None:
        pass

    def pio_read(self, offset: int, size: int) -> int:
        return 0

    def pio_write(self, offset: int, size: int, value: int) -> None:
        self._on_exit(value & 0xFF)
