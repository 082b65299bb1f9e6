"""The PC board: a Vm with the legacy devices a PC guest expects at their usual places.

    port 0x3F8-0x3FF  COM1, 16550A UART, ISA IRQ 4
    port 0x70-0x71    CMOS RAM and RTC
    port 0x60, 0x64   i8042 (its reset line ends the run with status 0)
    port 0xF4         debug exit (a write of v ends the run with status v)
    port 0x600-0x60B  ACPI PM1 event/control blocks and PM timer (soft-off ends the run with 0)
    port 0xCF8-0xCFF  PCI configuration mechanism 1: host bridge in slot 0, then one virtio
                      function per --disk and per --net, in that order
    in-kernel         PIC, IOAPIC, LAPICs, PIT (ports 0x20/0xA0, 0x40-0x43, 0x61)
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pykvm.boot import LoadedImage, load_image
from pykvm.devices.acpi_pm import PM_BASE, PM_PORTS, AcpiPm
from pykvm.devices.cmos import Cmos
from pykvm.devices.debug_exit import DEFAULT_PORT as DEBUG_EXIT_PORT
from pykvm.devices.debug_exit import DebugExit
from pykvm.devices.i8042 import I8042
from pykvm.devices.net_backends import LinkMemory, NetSpec
from pykvm.devices.pci import INTX_IRQS, attach_pci_bus
from pykvm.devices.serial import Serial16550
from pykvm.devices.virtio.blk import Blk, DiskImage, DiskSpec
from pykvm.devices.virtio.net import DEFAULT_MAC, Net, parse_mac
from pykvm.devices.virtio.transport import VirtioPciFunction
from pykvm.kvm import Kvm
from pykvm.memory import GuestMemory
from pykvm.errors import ConfigError
from pykvm.state import Stateful, StateError, from_plain
from pykvm.run_control import Pause, StopReason
from pykvm.vm import Vm, VmPlatform, VmState

COM1_PORT, COM1_IRQ = 0x3F8, 4
CMOS_PORT = 0x70
I8042_DATA_PORT, I8042_COMMAND_PORT = 0x60, 0x64

MIB = 1024 * 1024
DEFAULT_MEMORY = 64 * MIB
# APIC IDs are one byte in the MP table's and the MADT's processor entries (and the CMOS holds the
# count less one in a byte), and KVM's xAPIC reserves ID 0xFF for broadcast: vCPUs 0..254.
MAX_CPUS = 255
PCI_DEVICE_SLOTS = 31  # PCI bus 0's 32 slots less the host bridge's: disks and NICs together


@dataclass(frozen=True)
class MachineConfig:
    memory: int = DEFAULT_MEMORY
    cpus: int = 1
    disks: tuple[DiskSpec, ...] = field(default=())
    nets: tuple[NetSpec, ...] = field(default=())
    legacy_virtio: bool = True  # transitional devices (legacy I/O BAR too); False: modern only
    # Queue notifications: True: a KVM ioeventfd that wakes the device's I/O thread; False: an exit
    # to Python that serves the queue on the vCPU thread; None: per device, see ioeventfd_for()
    ioeventfd: bool | None = None


@dataclass
class MachineState:
    """The whole machine but its RAM: KVM's state and each device's, by device name."""

    vm: VmState
    devices: dict[str, Any]  # name -> that device's state dataclass (plain data once decoded)


class Machine:
    def __init__(self, config: MachineConfig, *, serial_output: Callable[[bytes], None], kvm: Kvm | None = None,
                 memory: GuestMemory | None = None, attach_networks: bool = True) -> None:
        """`attach_networks=False` builds the NICs without opening their backends (an FT standby
        must not take the primary's TAP or socket until it takes over): see attach_networks()."""
        self.config = config
        if not 1 <= config.cpus <= MAX_CPUS:
            raise ConfigError(f"{config.cpus} vCPUs: this machine has 1 to {MAX_CPUS} (one-byte APIC IDs, "
                              "0xFF is broadcast)")
        if len(config.disks) + len(config.nets) > PCI_DEVICE_SLOTS:
            raise ConfigError(f"{len(config.disks)} disks and {len(config.nets)} NICs: PCI bus 0 has room for "
                              f"{PCI_DEVICE_SLOTS}")
        self.vm = vm = Vm(config.memory, config.cpus, kvm=kvm, memory=memory)
        try:
            self.serial = Serial16550(serial_output, irq=lambda level: vm.irq_line(COM1_IRQ, level))
            self.cmos = Cmos(memory_size=config.memory, cpus=config.cpus)
            self.i8042 = I8042(on_reset=lambda: vm.stop(0, "guest reset"), irq=vm.irq_line)
            self.debug_exit = DebugExit(on_exit=lambda status: vm.stop(status, f"guest exited with status {status}"))
            vm.bus.register_pio(COM1_PORT, 8, self.serial)
            vm.bus.register_pio(CMOS_PORT, 2, self.cmos)
            vm.bus.register_pio(I8042_DATA_PORT, 1, self.i8042, base=I8042_DATA_PORT)
            vm.bus.register_pio(I8042_COMMAND_PORT, 1, self.i8042, base=I8042_DATA_PORT)
            vm.bus.register_pio(DEBUG_EXIT_PORT, 1, self.debug_exit)
            self.acpi_pm = AcpiPm(on_power_off=lambda: vm.stop(0, "guest powered off"))
            vm.bus.register_pio(PM_BASE, PM_PORTS, self.acpi_pm)
            vm.set_level_triggered(INTX_IRQS)
            self.platform = VmPlatform(vm)
            self.pci = attach_pci_bus(self.platform)
            self.virtio: list[VirtioPciFunction] = []
            for spec in config.disks:
                self._add_virtio(Blk(DiskImage(spec)))
            for index, spec in enumerate(config.nets):
                mac = parse_mac(spec.mac) if spec.mac else default_mac(index)
                self._add_virtio(Net(spec.open() if attach_networks else None, mac))
            self.links = LinkMemory(lambda: [function.device.backend for function in self.nics()])
        except BaseException:
            self.close()
            raise

    def _add_virtio(self, device) -> VirtioPciFunction:
        function = VirtioPciFunction(device, self.platform, legacy=self.config.legacy_virtio,
                                     ioeventfd=ioeventfd_for(self.config, type(device)))
        self.virtio.append(function)
        self.pci.add(function)
        return function

    def attach_networks(self, *, announce: bool = True, wait: float = 0.0, take_over: bool = False) -> None:
        """Open the NIC backends of a machine built with attach_networks=False. `wait`: how long
        to keep trying while another process still holds a backend (a migration source lets go of
        its socket or TAP just after the target has the guest). `take_over`: socket paths are
        taken from a holder that is still alive (an FT takeover from a hung primary)."""
        deadline = time.monotonic() + wait
        for index, (function, spec) in enumerate(zip(self.nics(), self.config.nets)):
            while function.device.backend is None:
                try:
                    function.device.attach_backend(self.links.opened(index, spec.open(take_over=take_over)))
                except ConfigError as error:
                    if not error.in_use or time.monotonic() >= deadline:
                        raise
                    time.sleep(0.005)  # the holder is exiting; there is no event to wait on
                    continue
                function.rearm()
            if announce:  # to the link's recent senders too, which came with the guest's state
                function.device.announce()

    def nics(self) -> list[VirtioPciFunction]:
        return [f for f in self.virtio if isinstance(f.device, Net)]

    def detach_networks(self) -> None:
        """Close the NIC backends (a migrated-away source hands the socket or TAP to the target)."""
        for function in self.nics():
            with function.lock:
                backend, function.device.backend = function.device.backend, None
                if backend is not None:
                    backend.close()
                function.rearm()

    # -- state ------------------------------------------------------------------------------------

    def devices(self) -> dict[str, Stateful]:
        """Every device with state, by a name stable across runs of the same configuration."""
        parts: dict[str, Stateful] = {
            "serial": self.serial, "cmos": self.cmos, "i8042": self.i8042, "debug-exit": self.debug_exit,
            "acpi-pm": self.acpi_pm,
            "pci-bus": self.pci, "net-links": self.links,
        }
        for function in self.virtio:
            parts[f"pci.{function.slot}.virtio-{function.device.name}"] = function
        return parts

    @contextlib.contextmanager
    def quiesced(self, owner: str = "quiesce") -> Iterator[Pause]:
        """vCPUs paused (a pause of `owner`'s own, which the block gets) and every device's I/O
        thread held between requests: nothing changes RAM or device state until the block ends.
        However the block ends (a failed sync, a full disk) this pause is released; the guest runs
        if no other is held."""
        with self.vm.paused(owner) as hold, self._devices_held():
            yield hold

    def run_quiesced(self, owner: str, work: Callable[[], Any]) -> tuple[Any, Pause]:
        """`work()` with the machine quiesced as in quiesced(), run by the vCPU that parks last,
        which then goes straight back into the guest (Vm.run_paused): for work after which the
        guest runs on at once. Its result, and the pause."""
        def held() -> Any:
            with self._devices_held():
                return work()

        return self.vm.run_paused(owner, held)

    def _devices_held(self) -> contextlib.ExitStack:
        """Every device's function lock, taken: their I/O threads wait between requests."""
        with contextlib.ExitStack() as held:  # released again if taking one fails
            for function in self.virtio:
                held.enter_context(function.lock)
            return held.pop_all()

    def save_state(self) -> MachineState:
        """Call inside quiesced()."""
        return MachineState(self.vm.save_state(), {name: part.save_state() for name, part in self.devices().items()})

    def restore_state(self, state: MachineState) -> None:
        """Into a machine built from the same configuration, before it runs."""
        parts = self.devices()
        if set(state.devices) != set(parts):
            raise StateError(f"saved devices {sorted(state.devices)} do not match this machine's {sorted(parts)}")
        self.vm.restore_state(state.vm)
        for name, part in parts.items():
            saved = state.devices[name]
            part.restore_state(saved if isinstance(saved, part.state_type) else from_plain(part.state_type, saved))

    def load(self, image: str | Path | bytes, *, cmdline: str = "", load_addr: int | None = None) -> LoadedImage:
        return load_image(self.vm, image, cmdline=cmdline, load_addr=load_addr)

    def load_linux(self, kernel: str | Path | bytes, *, initrd: str | Path | bytes | None = None,
                   cmdline: str = "") -> LoadedImage:
        """A bzImage or vmlinux through the Linux boot protocol (pykvm.boot.linux_loader)."""
        from pykvm.boot.linux_loader import load_linux

        return load_linux(self.vm, kernel, initrd=initrd, cmdline=cmdline, pci_slots=len(self.pci.functions))

    def run(self) -> StopReason:
        return self.vm.run()

    def close(self) -> None:
        for function in getattr(self, "virtio", []):
            function.close()
        self.vm.close()

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ioeventfd_for(config: MachineConfig, device_type: type) -> bool:
    """How a device's queue notifications arrive; the one place that says why.

    With an ioeventfd, KVM completes the notify write in the kernel and signals an eventfd: the
    vCPU goes straight back to the guest and the device's I/O thread wakes and serves the queue.
    Without one, the notify exits to Python and the queue is served right there, on the vCPU
    thread (VirtioPciFunction.notify). Each batch through an ioeventfd costs a thread wake-up and
    a context switch, and on a busy host the woken thread waits for a CPU while the vCPU, whose
    driver polls for completions, spins on the one it has; served in the exit, the work runs on
    the vCPU's own CPU time. But a transmitted frame wakes a peer whose answer the guest then
    waits for: through the ioeventfd the vCPU runs on meanwhile.

    So by default (config.ioeventfd None), as measured (bench/blk.py, bench/net.py):
    virtio-blk is served in the exit (page-cache I/O is short), but a notify that finds a deep
    queue hands it to the I/O thread (Blk.hands_over; not while FT records the disk's writes),
    and virtio-net goes through an ioeventfd. (Since the I/O thread polls before it sleeps, blk
    through the ioeventfd does 4-6x QEMU at depth 1 against 1.6x in the exit, but kv under
    pipelined FT then runs a third slower: ARCHITECTURE's trade-off table.)"""
    if config.ioeventfd is not None:
        return config.ioeventfd
    return not issubclass(device_type, Blk)


def default_mac(index: int) -> bytes:
    """52:54:00:12:34:56 for the first NIC (QEMU's default), then :57, :58, ..."""
    mac = bytearray(parse_mac(DEFAULT_MAC))
    mac[5] = (mac[5] + index) & 0xFF
    return bytes(mac)
