"""The PC device set of `pykvm.machine.Machine` on a FakePlatform, without KVM.

The same devices at the same ports, under the same names in `devices()`, as a Machine built
with one virtio-blk disk and one virtio-net NIC: COM1, CMOS, i8042, debug exit, ACPI PM, the
PCI bus with its host bridge, then the blk and net functions. What only a Vm can do is recorded
instead: the platform records interrupts, and `stop_requests` the guest's requests to end the
run (a debug-exit write, an i8042 reset, an ACPI power-off). The NIC has no backend (as a
standby's before takeover): frames it transmits go nowhere.

    with FakePc(disk_path) as pc:
        pc.platform.bus.pio_write(0xF4, 1, 3)
        assert pc.stop_requests == [(3, "guest exited with status 3")]
        fresh_state = pc.save_state()
"""

from __future__ import annotations

from typing import Any, Callable

from pykvm.devices.acpi_pm import PM_BASE, PM_PORTS, AcpiPm
from pykvm.devices.cmos import Cmos
from pykvm.devices.debug_exit import DEFAULT_PORT as DEBUG_EXIT_PORT
from pykvm.devices.debug_exit import DebugExit
from pykvm.devices.i8042 import I8042
from pykvm.devices.pci import attach_pci_bus
from pykvm.devices.serial import Serial16550
from pykvm.devices.virtio.blk import Blk, DiskImage, DiskSpec
from pykvm.devices.net_backends import LinkMemory
from pykvm.devices.virtio.net import DEFAULT_MAC, Net, parse_mac
from pykvm.devices.virtio.transport import VirtioPciFunction
from pykvm.machine import (CMOS_PORT, COM1_IRQ, COM1_PORT, I8042_COMMAND_PORT, I8042_DATA_PORT, MachineConfig,
                           ioeventfd_for)
from pykvm.state import StateError, Stateful, decode, encode
from pykvm.testing.fake_platform import FakePlatform

FAKE_MEMORY = 16 << 20
FIXED_TIME = 1_700_000_000.0  # the clocks of CMOS and the PM timer stand still: states compare exactly


class FakePc:
    """The devices of a one-disk, one-NIC Machine on a FakePlatform of its own."""

    def __init__(self, disk_path: str, *, legacy_virtio: bool = True, memory_size: int = FAKE_MEMORY,
                 clock: Callable[[], float] = lambda: FIXED_TIME) -> None:
        self.platform = platform = FakePlatform(memory_size)
        self.stop_requests: list[tuple[int, str]] = []
        self.virtio: list[VirtioPciFunction] = []
        try:
            self.serial = Serial16550(lambda data: None, irq=lambda level: platform.irq_line(COM1_IRQ, level))
            self.cmos = Cmos(memory_size=memory_size, cpus=1, clock=clock)
            self.i8042 = I8042(on_reset=lambda: self._stop(0, "guest reset"), irq=platform.irq_line)
            self.debug_exit = DebugExit(on_exit=lambda status: self._stop(status, f"guest exited with status {status}"))
            self.acpi_pm = AcpiPm(on_power_off=lambda: self._stop(0, "guest powered off"), clock=clock)
            bus = platform.bus
            bus.register_pio(COM1_PORT, 8, self.serial)
            bus.register_pio(CMOS_PORT, 2, self.cmos)
            bus.register_pio(I8042_DATA_PORT, 1, self.i8042, base=I8042_DATA_PORT)
            bus.register_pio(I8042_COMMAND_PORT, 1, self.i8042, base=I8042_DATA_PORT)
            bus.register_pio(DEBUG_EXIT_PORT, 1, self.debug_exit)
            bus.register_pio(PM_BASE, PM_PORTS, self.acpi_pm)
            self.pci = attach_pci_bus(platform)
            config = MachineConfig(legacy_virtio=legacy_virtio)
            for device in (Blk(DiskImage(DiskSpec(disk_path))), Net(None, parse_mac(DEFAULT_MAC))):
                function = VirtioPciFunction(device, platform, legacy=legacy_virtio,
                                             ioeventfd=ioeventfd_for(config, type(device)))
                self.virtio.append(function)
                self.pci.add(function)
            self.links = LinkMemory(lambda: [f.device.backend for f in self.virtio if isinstance(f.device, Net)])
        except BaseException:
            self.close()
            raise

    def _stop(self, status: int, reason: str) -> None:
        self.stop_requests.append((status, reason))

    def devices(self) -> dict[str, Stateful]:
        """By the names Machine.devices() gives them."""
        parts: dict[str, Stateful] = {
            "serial": self.serial, "cmos": self.cmos, "i8042": self.i8042, "debug-exit": self.debug_exit,
            "acpi-pm": self.acpi_pm, "pci-bus": self.pci, "net-links": self.links,
        }
        for function in self.virtio:
            parts[f"pci.{function.slot}.virtio-{function.device.name}"] = function
        return parts

    def save_state(self) -> dict[str, bytes]:
        """Every device's state, encoded as a snapshot or a migration carries it. Devices are
        quiesced as Machine.quiesced() does: each function's lock held (no I/O thread runs)."""
        parts = self.devices()
        for function in self.virtio:
            function.lock.acquire()
        try:
            return {name: encode(part.save_state()) for name, part in parts.items()}
        finally:
            for function in self.virtio:
                function.lock.release()

    def restore_state(self, saved: dict[str, bytes]) -> None:
        """As Machine.restore_state: every device from its encoded state (raises StateError)."""
        parts = self.devices()
        if set(saved) != set(parts):
            raise StateError(f"saved devices {sorted(saved)} do not match {sorted(parts)}")
        for name, part in parts.items():
            part.restore_state(decode(part.state_type, saved[name]))

    def close(self) -> None:
        for function in self.virtio:
            function.close()
        self.platform.close()

    def __enter__(self) -> FakePc:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
