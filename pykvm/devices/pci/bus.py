"""PCI bus 0 behind configuration mechanism 1, with an i440FX host bridge in slot 0.

pykvm plays the firmware's part too: it assigns every BAR an address in the PCI windows below
and enables decoding before the guest starts, as SeaBIOS would, so guests (and Linux with
`pci=conf1`) find devices ready to use. A guest may still size and move BARs; a move re-maps the
region on the I/O bus.

INTx: the function in slot S raises the ISA IRQ INTX_IRQS[(S - 1) % 4], level-triggered (the
machine marks them so in the PICs' ELCR, as PC firmware does), written to its Interrupt Line.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

from pykvm.bus import IoBus
from pykvm.devices.pci.function import COMMAND, COMMAND_IO, COMMAND_MEMORY, CONFIG_SIZE, INTERRUPT_LINE, \
    INTERRUPT_PIN, U16, PciFunction, PciState, align_up
from pykvm.devices.platform import Platform

CONFIG_ADDRESS_PORT = 0xCF8
CONFIG_DATA_PORT = 0xCFC

# Address windows for BARs, between the top of low RAM and the IOAPIC, and above the legacy ports.
MMIO_WINDOW = (0xE000_0000, 0xFEC0_0000)
IO_WINDOW = (0xC000, 0x10000)
# ISA IRQs free on a PC for PCI INTx (the ones QEMU's PIIX routes PIRQs to).
INTX_IRQS = (10, 11, 5, 9)


class HostBridge(PciFunction):
    """Device 0: an i440FX host bridge, as on QEMU's `pc` machine."""

    def __init__(self) -> None:
        super().__init__(vendor=0x8086, device=0x1237, class_code=0x060000, revision=2, interrupt_pin=0)


@dataclass
class PciBusState:
    address: int  # the configuration address latch (port 0xCF8)
    host_bridge: PciState


class PciBus:
    """Bus 0 behind configuration mechanism 1 (ports 0xCF8 address, 0xCFC-0xCFF data).
    Its own state is the address latch and the host bridge; other functions save their own."""

    state_type = PciBusState

    def __init__(self, io_bus: IoBus, irq_line: Callable[[int, bool], None]) -> None:
        self.io_bus = io_bus
        self.irq_line = irq_line
        self.functions: dict[int, PciFunction] = {}  # slot -> function (function 0 only)
        self.address = 0
        self._lock = threading.Lock()
        self._next_mmio = MMIO_WINDOW[0]
        self._next_io = IO_WINDOW[0]
        io_bus.register_pio(CONFIG_ADDRESS_PORT, 4, _ConfigAddress(self))
        io_bus.register_pio(CONFIG_DATA_PORT, 4, _ConfigData(self))
        self.add(HostBridge())

    def add(self, function: PciFunction) -> int:
        """Plug a function into the next free slot, give it an IRQ and BAR addresses, enable it."""
        slot = len(self.functions)
        if slot >= 32:
            raise ValueError("PCI bus 0 is full (32 slots)")
        self.functions[slot] = function
        function.bus_owner, function.slot = self, slot
        function.irq = INTX_IRQS[(slot - 1) % len(INTX_IRQS)] if function.config[INTERRUPT_PIN] else 0
        function.config[INTERRUPT_LINE] = function.irq
        for bar in sorted(function.bars.values(), key=lambda b: -b.size):
            if bar.io:
                address = align_up(self._next_io, bar.size)
                self._next_io = address + bar.size
                limit = IO_WINDOW[1]
            else:
                address = align_up(self._next_mmio, bar.size)
                self._next_mmio = address + bar.size
                limit = MMIO_WINDOW[1]
            if address + bar.size > limit:
                raise ValueError("PCI address window exhausted")
            function.set_bar_address(bar.index, address)
        command = U16.unpack_from(function.config, COMMAND)[0] | COMMAND_IO | COMMAND_MEMORY
        function.config_write(COMMAND, 2, command)
        return slot

    def save_state(self) -> PciBusState:
        return PciBusState(self.address, self.functions[0].save_pci_state())

    def restore_state(self, state: PciBusState) -> None:
        self.address = state.address
        self.functions[0].restore_pci_state(state.host_bridge)

    def _target(self) -> tuple[PciFunction | None, int]:
        address = self.address
        if not address & 0x8000_0000:
            return None, 0
        bus, slot, func = (address >> 16) & 0xFF, (address >> 11) & 0x1F, (address >> 8) & 0x7
        if bus != 0 or func != 0:
            return None, 0
        return self.functions.get(slot), address & 0xFC


class _ConfigAddress:
    def __init__(self, bus: PciBus) -> None:
        self.bus = bus

    def pio_read(self, offset: int, size: int) -> int:
        return (self.bus.address >> (8 * offset)) & ((1 << (8 * size)) - 1)

    def pio_write(self, offset: int, size: int, value: int) -> None:
        if offset == 0 and size == 4:
            self.bus.address = value
        # narrower writes to 0xCF8 are other chipset registers (e.g. 0xCF9 reset control): ignored


class _ConfigData:
    """Ports 0xCFC-0xCFF: configuration space from the addressed dword on. An access that would
    run past the end of configuration space stops there (as QEMU's PCI host clips it): the rest
    reads as ones and is written nowhere."""

    def __init__(self, bus: PciBus) -> None:
        self.bus = bus

    def pio_read(self, offset: int, size: int) -> int:
        function, register = self.bus._target()
        if function is None:
            return (1 << (8 * size)) - 1  # no device: all ones, so vendor ID reads 0xFFFF
        inside = min(size, CONFIG_SIZE - register - offset)
        beyond = ((1 << (8 * size)) - 1) & ~((1 << (8 * inside)) - 1)
        return function.config_read(register + offset, inside) | beyond

    def pio_write(self, offset: int, size: int, value: int) -> None:
        function, register = self.bus._target()
        if function is not None:
            inside = min(size, CONFIG_SIZE - register - offset)
            function.config_write(register + offset, inside, value & ((1 << (8 * inside)) - 1))


def attach_pci_bus(platform: Platform) -> PciBus:
    """A PCI bus on the platform's I/O bus, INTx on its interrupt lines. The machine marks
    INTX_IRQS level-triggered (Vm.set_level_triggered), as PC firmware leaves them."""
    return PciBus(platform.bus, platform.irq_line)
