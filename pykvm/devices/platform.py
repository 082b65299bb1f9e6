"""What a device may ask of the machine it sits in: the narrow platform interface.

Devices never see the `Vm` or `pykvm.kvm`. They are given a Platform: the I/O bus their regions
live on, guest memory, an interrupt line, MSI delivery and ioeventfd registration. The machine
builds the KVM-backed one (`pykvm.vm.VmPlatform`); device tests use
`pykvm.testing.fake_platform.FakePlatform`, which records what the devices asked for and runs on
a host without `/dev/kvm`.
"""

from __future__ import annotations

from typing import Protocol

from pykvm.bus import IoBus
from pykvm.memory import GuestMemory


class IoeventfdUnavailable(Exception):
    """The platform cannot route this notification to an eventfd; the device falls back to exits."""


class Platform(Protocol):
    bus: IoBus
    memory: GuestMemory

    def irq_line(self, gsi: int, level: bool) -> None:
        """Drive interrupt line `gsi` (a level; an edge is a raise then a lower)."""

    def signal_msi(self, address: int, data: int) -> None:
        """Deliver one MSI message (an MSI-X table entry's address and data)."""

    def register_ioeventfd(self, fd: int, address: int, length: int, *, pio: bool,
                           datamatch: int | None = None) -> None:
        """Signal eventfd `fd` on a guest write of `length` bytes at `address` (a port when `pio`),
        only when the value equals `datamatch` if given. Raises IoeventfdUnavailable (the device
        then takes its notifications as exits: VirtioPciFunction.notify_path)."""

    def unregister_ioeventfd(self, fd: int, address: int, length: int, *, pio: bool,
                             datamatch: int | None = None) -> None:
        """Undo register_ioeventfd with the same arguments."""
