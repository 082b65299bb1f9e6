"""ACPI fixed-hardware power management registers at I/O port 0x600 (where QEMU's PIIX4 puts them):
the PM1a event block (status, enable), the PM1a control block, and the PM timer.

What a guest does with them: an ACPI kernel powers off by writing SLP_TYP (the value of \\_S5 in
the DSDT) with SLP_EN to PM1a control, which ends the run with status 0; it reads the PM timer
(3.579545 MHz, 24 bits) to calibrate its clocks. SCI_EN reads as set: the platform is always in
ACPI mode (the FADT has no SMI command port). No event ever sets a status bit, so the SCI
(IRQ 9) is never raised.

    0x600  PM1a_STS (16 bit, write 1 to clear)     0x602  PM1a_EN (16 bit)
    0x604  PM1a_CNT (16 bit)                        0x608  PM_TMR (32 bit read, 24 bits count)
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

PM_BASE = 0x600
PM_PORTS = 12
PM1_EVT, PM1_EN, PM1_CNT, PM_TMR = 0x0, 0x2, 0x4, 0x8

SCI_EN = 1 << 0
SLP_TYP_SHIFT, SLP_TYP_MASK = 10, 0x7 << 10
SLP_EN = 1 << 13
SLP_TYP_SOFT_OFF = 0  # what \_S5 says (as on QEMU's PIIX4)
PM_TIMER_HZ = 3_579_545
PM_TIMER_MASK = 0xFF_FFFF


@dataclass
class AcpiPmState:
    status: int
    enable: int
    control: int


class AcpiPm:
    state_type = AcpiPmState

    def __init__(self, on_power_off: Callable[[], None], clock: Callable[[], float] = time.monotonic) -> None:
        self._on_power_off = on_power_off
        self._clock = clock
        self._lock = threading.Lock()
        self.status = 0
        self.enable = 0
        self.control = SCI_EN

    def pio_read(self, offset: int, size: int) -> int:
        with self._lock:
            if PM_TMR <= offset < PM_TMR + 4:
                ticks = int(self._clock() * PM_TIMER_HZ) & PM_TIMER_MASK
                return (ticks >> (8 * (offset - PM_TMR))) & ((1 << (8 * size)) - 1)
            registers = self.status | (self.enable << 16) | (self.control << 32)
            return (registers >> (8 * offset)) & ((1 << (8 * size)) - 1)

    def pio_write(self, offset: int, size: int, value: int) -> None:
        power_off = False
        with self._lock:
            for i in range(size):
                byte, at = (value >> (8 * i)) & 0xFF, offset + i
                if at < PM1_EN:
                    self.status &= ~(byte << (8 * at))  # write-one-to-clear
                elif at < PM1_CNT:
                    shift = 8 * (at - PM1_EN)
                    self.enable = (self.enable & ~(0xFF << shift)) | (byte << shift)
                elif at < PM1_CNT + 2:
                    shift = 8 * (at - PM1_CNT)
                    self.control = ((self.control & ~(0xFF << shift)) | (byte << shift)) | SCI_EN
            if self.control & SLP_EN:
                self.control &= ~SLP_EN  # SLP_EN is write-only: it reads as 0
                power_off = (self.control & SLP_TYP_MASK) >> SLP_TYP_SHIFT == SLP_TYP_SOFT_OFF
        if power_off:
            self._on_power_off()

    def save_state(self) -> AcpiPmState:
        with self._lock:
            return AcpiPmState(self.status, self.enable, self.control)

    def restore_state(self, state: AcpiPmState) -> None:
        with self._lock:
            self.status, self.enable, self.control = state.status, state.enable, state.control
