"""The I/O bus: routes port-I/O and MMIO exits to devices by address range.

A device claims a range and receives accesses as (offset within its range, size, value). Port
lookups index a flat 64 Ki table (one list index per exit, no search); MMIO ranges are few and
kept sorted for bisection. Unclaimed ports read as all-ones and ignore writes, as on a PC.
"""

from __future__ import annotations

import bisect
from typing import Protocol


class PioDevice(Protocol):
    def pio_read(self, offset: int, size: int) -> int: ...
    def pio_write(self, offset: int, size: int, value: int) -> None: ...


class MmioDevice(Protocol):
    def mmio_read(self, offset: int, size: int) -> int: ...
    def mmio_write(self, offset: int, size: int, value: int) -> None: ...


class BusConflict(ValueError):
    """Two devices claimed overlapping ranges."""


class IoBus:
    def __init__(self) -> None:
        # port -> (device, base port of its range); None where nothing is mapped
        self.ports: list[tuple[PioDevice, int] | None] = [None] * 0x10000
        self._mmio_starts: list[int] = []
        self._mmio: list[tuple[int, int, MmioDevice]] = []  # (start, end, device), sorted

    def register_pio(self, start: int, length: int, device: PioDevice, *, base: int | None = None) -> None:
        """Claim ports [start, start+length). Offsets are counted from `base` (default: start), so
        a device with scattered ports (the i8042 at 0x60 and 0x64) registers each with one base."""
        if start < 0 or length <= 0 or start + length > 0x10000:
            raise ValueError(f"bad port range {start:#x}+{length}")
        for port in range(start, start + length):
            if self.ports[port] is not None:
                raise BusConflict(f"port {port:#x} is already claimed by {self.ports[port][0]!r}")
        for port in range(start, start + length):
            self.ports[port] = (device, start if base is None else base)

    def unregister_pio(self, base: int, length: int) -> None:
        for port in range(base, base + length):
            self.ports[port] = None

    def register_mmio(self, start: int, length: int, device: MmioDevice) -> None:
        end = start + length
        i = bisect.bisect_right(self._mmio_starts, start)
        if (i > 0 and self._mmio[i - 1][1] > start) or (i < len(self._mmio) and self._mmio[i][0] < end):
            raise BusConflict(f"MMIO range [{start:#x}, {end:#x}) overlaps another device")
        self._mmio.insert(i, (start, end, device))
        self._mmio_starts.insert(i, start)

    def unregister_mmio(self, start: int) -> None:
        i = self._mmio_starts.index(start)
        del self._mmio[i], self._mmio_starts[i]

    # -- dispatch (called from vCPU threads) ------------------------------------------------------

    def pio_read(self, port: int, size: int) -> int:
        entry = self.ports[port]
        if entry is None:
            return (1 << (8 * size)) - 1
        device, base = entry
        return device.pio_read(port - base, size)

    def pio_write(self, port: int, size: int, value: int) -> None:
        entry = self.ports[port]
        if entry is not None:
            device, base = entry
            device.pio_write(port - base, size, value)

    def find_mmio(self, addr: int) -> tuple[int, MmioDevice] | None:
        i = bisect.bisect_right(self._mmio_starts, addr) - 1
        if i >= 0:
            start, end, device = self._mmio[i]
            if addr < end:
                return start, device
        return None

    def mmio_read(self, addr: int, size: int) -> int:
        found = self.find_mmio(addr)
        if found is None:
            return (1 << (8 * size)) - 1
        start, device = found
        return device.mmio_read(addr - start, size)

    def mmio_write(self, addr: int, size: int, value: int) -> None:
        found = self.find_mmio(addr)
        if found is not None:
            start, device = found
            device.mmio_write(addr - start, size, value)
