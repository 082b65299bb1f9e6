"""A device platform without KVM, for testing device logic on any Linux host.

`FakePlatform` satisfies `pykvm.devices.platform.Platform` with the real parts that need no
`/dev/kvm` (the I/O bus that vCPU exits dispatch through, guest RAM in mmap) and records, instead
of performing, what only KVM can do: interrupt line levels, MSI messages, ioeventfd
registrations. A test drives a device through `platform.bus` as a vCPU exit would and checks
what a guest would see, and what the device asked of the machine.

    with FakePlatform() as platform:
        serial = Serial16550(output, irq=lambda level: platform.irq_line(4, level))
        platform.bus.register_pio(0x3F8, 8, serial)
        platform.bus.pio_write(0x3F9, 1, 0x02)   # IER: THR empty interrupt
        assert platform.irq_levels[4]
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from pykvm.bus import IoBus
from pykvm.devices.platform import IoeventfdUnavailable
from pykvm.memory import GuestMemory

DEFAULT_MEMORY = 16 << 20


@dataclass(frozen=True)
class Ioeventfd:
    """One registration, as the device asked for it."""

    fd: int
    address: int
    length: int
    pio: bool
    datamatch: int | None


class FakePlatform:
    """A Platform whose interrupts and ioeventfds are records (lists a test reads).

    `ioeventfds=False` makes register_ioeventfd raise IoeventfdUnavailable, as KVM does when it
    cannot route a notification, so devices take their fallback (notifies served in the exit).
    Devices may call in from their own threads: the records are guarded by one lock.
    """

    def __init__(self, memory_size: int = DEFAULT_MEMORY, *, ioeventfds: bool = True) -> None:
        self.bus = IoBus()
        self.memory = GuestMemory(memory_size)
        self.ioeventfds_available = ioeventfds
        self.irq_levels: dict[int, bool] = {}  # GSI -> its level now (lines never driven are absent)
        self.irq_changes: list[tuple[int, bool]] = []  # every irq_line call, in order
        self.msi_messages: list[tuple[int, int]] = []  # (address, data) of every MSI delivered
        self.ioeventfds: list[Ioeventfd] = []  # registered now
        self._lock = threading.Lock()

    # -- Platform ---------------------------------------------------------------------------------

    def irq_line(self, gsi: int, level: bool) -> None:
        with self._lock:
            self.irq_levels[gsi] = level
            self.irq_changes.append((gsi, level))

    def signal_msi(self, address: int, data: int) -> None:
        with self._lock:
            self.msi_messages.append((address, data))

    def register_ioeventfd(self, fd: int, address: int, length: int, *, pio: bool,
                           datamatch: int | None = None) -> None:
        if not self.ioeventfds_available:
            raise IoeventfdUnavailable(f"ioeventfds are switched off on this fake platform ({address:#x})")
        with self._lock:
            self.ioeventfds.append(Ioeventfd(fd, address, length, pio, datamatch))

    def unregister_ioeventfd(self, fd: int, address: int, length: int, *, pio: bool,
                             datamatch: int | None = None) -> None:
        with self._lock:
            # KVM refuses to deassign what was never assigned; a device doing so has a bug.
            self.ioeventfds.remove(Ioeventfd(fd, address, length, pio, datamatch))

    # -- lifetime ---------------------------------------------------------------------------------

    def close(self) -> None:
        self.memory.close()

    def __enter__(self) -> FakePlatform:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
