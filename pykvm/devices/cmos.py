"""CMOS RAM and the MC146818 real-time clock behind ports 0x70 (index) / 0x71 (data).

The clock reads the host's wall clock (UTC) plus an offset the guest may change by setting the
time. Like the real chip it spends the last 244 µs of every second with the update-in-progress
bit (register A, bit 7) set, because guests, Linux among them, wait for that edge to read a
consistent time. The NVRAM carries what PC firmware leaves there and QEMU provides (memory sizes,
CPU count), so the same guest reads the same facts on both.
"""

from __future__ import annotations

import calendar
import threading
import time
from dataclasses import dataclass
from typing import Callable

from pykvm.state import StateError

SECONDS, MINUTES, HOURS = 0x00, 0x02, 0x04
DAY_OF_WEEK, DAY_OF_MONTH, MONTH, YEAR = 0x06, 0x07, 0x08, 0x09
REG_A, REG_B, REG_C, REG_D = 0x0A, 0x0B, 0x0C, 0x0D
CENTURY = 0x32
TIME_REGISTERS = (SECONDS, MINUTES, HOURS, DAY_OF_WEEK, DAY_OF_MONTH, MONTH, YEAR, CENTURY)

REG_A_UIP = 0x80
REG_A_DEFAULT = 0x26  # 32.768 kHz time base, 1024 Hz periodic rate
REG_B_SET, REG_B_UIE, REG_B_BINARY, REG_B_24H = 0x80, 0x10, 0x04, 0x02
REG_C_UF = 0x10
REG_D_VRT = 0x80  # battery good

UPDATE_CYCLE = 244e-6  # seconds the UIP bit stays set before each second's update
NMI_DISABLE = 0x80


def _bcd(value: int) -> int:
    return ((value // 10) << 4) | (value % 10)


def _from_bcd(value: int) -> int:
    return (value >> 4) * 10 + (value & 0x0F)


@dataclass
class CmosState:
    index: int
    nmi_disabled: bool
    nvram: bytes
    offset: float  # guest time minus host wall-clock time
    held_time: int | None
    last_update_seen: int


class Cmos:
    state_type = CmosState
    def __init__(self, *, memory_size: int, cpus: int, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self.index = 0
        self.nmi_disabled = False
        self.nvram = bytearray(128)
        self.nvram[REG_A] = REG_A_DEFAULT
        self.nvram[REG_B] = REG_B_24H
        self.nvram[REG_D] = REG_D_VRT
        self.offset = 0.0  # guest time minus host time, in seconds
        self._held_time: int | None = None  # guest time frozen while REG_B.SET is on
        self._last_update_seen = int(clock())
        self._fill_platform_info(memory_size, cpus)

    def _fill_platform_info(self, memory_size: int, cpus: int) -> None:
        """Memory sizes and CPU count at the offsets QEMU's PC firmware interface uses."""
        kib = 1024
        base = 640
        extended = min(max(memory_size // kib - 1024, 0), 0xFFFF)  # KiB above 1 MiB, capped
        above_16m = min(max(memory_size - 16 * 1024 * kib, 0) // (64 * kib), 0xFFFF)
        above_4g = max(memory_size - 0xC000_0000, 0) // (64 * kib)
        nv = self.nvram
        nv[0x15], nv[0x16] = base & 0xFF, base >> 8
        nv[0x17], nv[0x18] = extended & 0xFF, extended >> 8
        nv[0x30], nv[0x31] = extended & 0xFF, extended >> 8
        nv[0x34], nv[0x35] = above_16m & 0xFF, above_16m >> 8
        nv[0x5B], nv[0x5C], nv[0x5D] = above_4g & 0xFF, (above_4g >> 8) & 0xFF, (above_4g >> 16) & 0xFF
        nv[0x5F] = cpus - 1
        checksum = sum(nv[0x10:0x2E])
        nv[0x2E], nv[0x2F] = checksum >> 8, checksum & 0xFF

    # -- state -------------------------------------------------------------------------------------

    def save_state(self) -> CmosState:
        with self._lock:
            return CmosState(self.index, self.nmi_disabled, bytes(self.nvram), self.offset, self._held_time,
                             self._last_update_seen)

    def restore_state(self, state: CmosState) -> None:
        if len(state.nvram) != len(self.nvram) or not 0 <= state.index < len(self.nvram):
            raise StateError(f"CMOS state has {len(state.nvram)} bytes of NVRAM and index {state.index}, "
                             f"expected {len(self.nvram)} bytes and an index into them")
        with self._lock:
            self.index, self.nmi_disabled, self.offset = state.index, state.nmi_disabled, state.offset
            self.nvram[:] = state.nvram
            self._held_time, self._last_update_seen = state.held_time, state.last_update_seen

    # -- ports -----------------------------------------------------------------------------------

    def pio_read(self, offset: int, size: int) -> int:
        if offset == 0:
            return 0xFF  # the index register is write-only
        with self._lock:
            return self._read(self.index)

    def pio_write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            if offset == 0:
                self.nmi_disabled = bool(value & NMI_DISABLE)
                self.index = value & 0x7F
            else:
                self._write(self.index, value & 0xFF)

    # -- registers ---------------------------------------------------------------------------------

    def _guest_time(self) -> tuple[int, float]:
        now = self._clock() + self.offset
        return int(now), now - int(now)

    def _read(self, index: int) -> int:
        if index == REG_A:
            _, fraction = self._guest_time()
            uip = REG_A_UIP if fraction >= 1.0 - UPDATE_CYCLE and self._held_time is None else 0
            return self.nvram[REG_A] | uip
        if index == REG_C:
            # Update-ended flag: set when a second boundary passed since the last read.
            seconds, _ = self._guest_time()
            flags = REG_C_UF if seconds != self._last_update_seen else 0
            self._last_update_seen = seconds
            return flags
        if index in TIME_REGISTERS:
            seconds = self._held_time if self._held_time is not None else self._guest_time()[0]
            return self._encode(index, time.gmtime(seconds))
        return self.nvram[index]

    def _encode(self, index: int, t: time.struct_time) -> int:
        reg_b = self.nvram[REG_B]
        if index == SECONDS:
            value = t.tm_sec
        elif index == MINUTES:
            value = t.tm_min
        elif index == HOURS:
            value = t.tm_hour
            if not reg_b & REG_B_24H:
                pm = value >= 12
                value = value % 12 or 12
                return (value if reg_b & REG_B_BINARY else _bcd(value)) | (0x80 if pm else 0)
        elif index == DAY_OF_WEEK:
            value = (t.tm_wday + 1) % 7 + 1  # 1 = Sunday
        elif index == DAY_OF_MONTH:
            value = t.tm_mday
        elif index == MONTH:
            value = t.tm_mon
        elif index == YEAR:
            value = t.tm_year % 100
        else:  # CENTURY
            value = t.tm_year // 100
        return value if reg_b & REG_B_BINARY else _bcd(value)

    def _write(self, index: int, value: int) -> None:
        if index == REG_B:
            was_set = self.nvram[REG_B] & REG_B_SET
            self.nvram[REG_B] = value
            if value & REG_B_SET and not was_set:
                self._held_time = self._guest_time()[0]  # updates stop while the guest sets time
            elif was_set and not value & REG_B_SET and self._held_time is not None:
                self.offset = self._held_time - self._clock()
                self._held_time = None
            return
        if index in (REG_C, REG_D):
            return  # read-only
        if index == REG_A:
            self.nvram[REG_A] = value & 0x7F  # UIP is read-only
            return
        if index in TIME_REGISTERS:
            self._set_time_field(index, value)
            return
        self.nvram[index] = value

    def _set_time_field(self, index: int, value: int) -> None:
        held = self._held_time if self._held_time is not None else self._guest_time()[0]
        t = time.gmtime(held)
        fields = {SECONDS: t.tm_sec, MINUTES: t.tm_min, HOURS: t.tm_hour, DAY_OF_MONTH: t.tm_mday,
                  MONTH: t.tm_mon, YEAR: t.tm_year % 100, CENTURY: t.tm_year // 100}
        if index == DAY_OF_WEEK:
            return  # derived from the date
        reg_b = self.nvram[REG_B]
        pm = False
        if index == HOURS and not reg_b & REG_B_24H:
            pm, value = bool(value & 0x80), value & 0x7F
        decoded = value if reg_b & REG_B_BINARY else _from_bcd(value)
        if index == HOURS and not reg_b & REG_B_24H:
            decoded = decoded % 12 + (12 if pm else 0)
        fields[index] = decoded
        year = fields[CENTURY] * 100 + fields[YEAR]
        try:
            new = calendar.timegm((year, fields[MONTH], fields[DAY_OF_MONTH],
                                   fields[HOURS], fields[MINUTES], fields[SECONDS], 0, 0, 0))
        except (ValueError, OverflowError):
            return  # an impossible date: keep the old time, as the chip would keep counting
        if self._held_time is not None:
            self._held_time = new
        else:
            self.offset = new - self._clock()
