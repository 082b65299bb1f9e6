"""The i8042 keyboard controller (ports 0x60 data, 0x64 status/command): enough of it for a
guest to probe it and, above all, to reset the machine through its output port, which is how
PC guests reboot (and how our test guests power off: the VMM ends the run on reset)."""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass
from typing import Callable

from pykvm.state import StateError

DATA, STATUS_COMMAND = 0, 4  # offsets from port 0x60

STATUS_OBF = 0x01  # output buffer full
STATUS_SYS = 0x04  # self test passed
STATUS_CMD = 0x08  # last write went to the command port
STATUS_UNLOCKED = 0x10
STATUS_AUX_DATA = 0x20  # the byte in the output buffer comes from the aux (mouse) port

CTR_KBD_INT, CTR_AUX_INT, CTR_SYS = 0x01, 0x02, 0x04
CTR_KBD_DISABLED, CTR_AUX_DISABLED, CTR_XLATE = 0x10, 0x20, 0x40

OUTPUT_PORT_RESET = 0x01  # low = assert the CPU reset line
KBD_IRQ, AUX_IRQ = 1, 12

# Controller commands (written to 0x64)
READ_CTR, WRITE_CTR = 0x20, 0x60
DISABLE_AUX, ENABLE_AUX, TEST_AUX = 0xA7, 0xA8, 0xA9
SELF_TEST, TEST_KBD, DISABLE_KBD, ENABLE_KBD = 0xAA, 0xAB, 0xAD, 0xAE
READ_OUTPUT_PORT, WRITE_OUTPUT_PORT = 0xD0, 0xD1
WRITE_KBD_BUFFER, WRITE_AUX_BUFFER, WRITE_AUX = 0xD2, 0xD3, 0xD4
PULSE_RESET = 0xFE

# Keyboard device commands (written to 0x60) and replies
KBD_ACK, KBD_SELF_TEST_OK = 0xFA, 0xAA
KBD_RESET, KBD_IDENTIFY = 0xFF, 0xF2
KBD_ID = (0xAB, 0x83)  # MF2 keyboard


AUX_BYTE = 0x100  # in saved output bytes: this one came from the aux port


@dataclass
class I8042State:
    ctr: int
    status: int
    output_port: int
    pending_command: int
    output: list[int]  # bytes waiting for the guest, AUX_BYTE set for aux-port bytes
    irq_levels: list[bool]  # keyboard, aux


class I8042:
    state_type = I8042State
    def __init__(self, on_reset: Callable[[], None], irq: Callable[[int, bool], None]) -> None:
        self._on_reset = on_reset
        self._irq = irq
        self._lock = threading.Lock()
        self._out: collections.deque[tuple[int, bool]] = collections.deque()  # (byte, from aux)
        self.ctr = CTR_KBD_INT | CTR_SYS | CTR_XLATE
        self.status = STATUS_SYS | STATUS_UNLOCKED
        self.output_port = OUTPUT_PORT_RESET | 0x02  # reset deasserted, A20 enabled
        self.pending_command = 0  # a controller command waiting for its data byte
        self._irq_levels = {KBD_IRQ: False, AUX_IRQ: False}

    def save_state(self) -> I8042State:
        with self._lock:
            return I8042State(self.ctr, self.status, self.output_port, self.pending_command,
                              [byte | (AUX_BYTE if aux else 0) for byte, aux in self._out],
                              [self._irq_levels[KBD_IRQ], self._irq_levels[AUX_IRQ]])

    def restore_state(self, state: I8042State) -> None:
        if len(state.irq_levels) != 2:
            raise StateError(f"i8042 state has {len(state.irq_levels)} interrupt levels, expected 2")
        with self._lock:
            self.ctr, self.status, self.output_port = state.ctr, state.status, state.output_port
            self.pending_command = state.pending_command
            self._out = collections.deque((value & 0xFF, bool(value & AUX_BYTE)) for value in state.output)
            self._irq_levels = {KBD_IRQ: state.irq_levels[0], AUX_IRQ: state.irq_levels[1]}

    def pio_read(self, offset: int, size: int) -> int:
        with self._lock:
            if offset == STATUS_COMMAND:
                status = self.status & ~(STATUS_OBF | STATUS_AUX_DATA)
                if self._out:
                    status |= STATUS_OBF | (STATUS_AUX_DATA if self._out[0][1] else 0)
                return status
            if not self._out:
                return 0
            byte, _ = self._out.popleft()
            self._update_irqs()
            return byte

    def pio_write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        reset = False
        with self._lock:
            if offset == STATUS_COMMAND:
                self.status |= STATUS_CMD
                reset = self._command(value)
            else:
                self.status &= ~STATUS_CMD
                reset = self._data(value)
            self._update_irqs()
        if reset:
            self._on_reset()

    def _command(self, command: int) -> bool:
        """Run a controller command; True if it resets the machine."""
        if command == READ_CTR:
            self._push(self.ctr)
        elif command in (WRITE_CTR, WRITE_OUTPUT_PORT, WRITE_KBD_BUFFER, WRITE_AUX_BUFFER, WRITE_AUX):
            self.pending_command = command
        elif command == DISABLE_AUX:
            self.ctr |= CTR_AUX_DISABLED
        elif command == ENABLE_AUX:
            self.ctr &= ~CTR_AUX_DISABLED
        elif command == TEST_AUX:
            self._push(0x00)
        elif command == SELF_TEST:
            self._push(0x55)
        elif command == TEST_KBD:
            self._push(0x00)
        elif command == DISABLE_KBD:
            self.ctr |= CTR_KBD_DISABLED
        elif command == ENABLE_KBD:
            self.ctr &= ~CTR_KBD_DISABLED
        elif command == READ_OUTPUT_PORT:
            self._push(self.output_port)
        elif command >= 0xF0:
            # Pulse output-port lines: bit 0 low in the command pulses the reset line.
            return not command & OUTPUT_PORT_RESET
        return False

    def _data(self, value: int) -> bool:
        command, self.pending_command = self.pending_command, 0
        if command == WRITE_CTR:
            self.ctr = value
        elif command == WRITE_OUTPUT_PORT:
            self.output_port = value
            return not value & OUTPUT_PORT_RESET
        elif command == WRITE_KBD_BUFFER:
            self._push(value)
        elif command == WRITE_AUX_BUFFER:
            self._push(value, aux=True)
        elif command == WRITE_AUX:
            pass  # no mouse is attached: the byte goes nowhere, as with an empty PS/2 port
        else:
            self._keyboard_command(value)
        return False

    def _keyboard_command(self, value: int) -> None:
        self._push(KBD_ACK)
        if value == KBD_RESET:
            self._push(KBD_SELF_TEST_OK)
        elif value == KBD_IDENTIFY:
            for byte in KBD_ID:
                self._push(byte)

    def _push(self, byte: int, aux: bool = False) -> None:
        self._out.append((byte, aux))

    def _update_irqs(self) -> None:
        head_aux = self._out[0][1] if self._out else None
        levels = {
            KBD_IRQ: head_aux is False and bool(self.ctr & CTR_KBD_INT),
            AUX_IRQ: head_aux is True and bool(self.ctr & CTR_AUX_INT),
        }
        for line, level in levels.items():
            if level != self._irq_levels[line]:
                self._irq_levels[line] = level
                self._irq(line, level)
