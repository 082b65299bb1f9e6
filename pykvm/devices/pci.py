"""PCI: configuration mechanism 1, a host bridge, functions with BARs, capabilities and MSI-X.

pykvm plays the firmware's part too: it assigns every BAR an address in the PCI windows below
and enables decoding before the guest starts, as SeaBIOS would, so guests (and Linux with
`pci=conf1`) find devices ready to use. A guest may still size and move BARs; a move re-maps the
region on the I/O bus.

Interrupts: a function raises MSI-X messages when the guest enabled MSI-X (KVM_SIGNAL_MSI), and
otherwise its INTx line, level-triggered on the GSI written in its Interrupt Line register.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from pykvm.bus import IoBus
from pykvm.state import StateError
from pykvm.kvm.constants import KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE

if TYPE_CHECKING:
    from pykvm.vm import Vm

CONFIG_ADDRESS_PORT = 0xCF8
CONFIG_DATA_PORT = 0xCFC
CONFIG_SIZE = 256

# Address windows for BARs, between the top of low RAM and the IOAPIC, and above the legacy ports.
MMIO_WINDOW = (0xE000_0000, 0xFEC0_0000)
IO_WINDOW = (0xC000, 0x10000)
# ISA IRQs free on a PC for PCI INTx (the ones QEMU's PIIX routes PIRQs to).
INTX_IRQS = (10, 11, 5, 9)

# Configuration space header (type 0)
VENDOR_ID, DEVICE_ID, COMMAND, STATUS = 0x00, 0x02, 0x04, 0x06
REVISION, CLASS_PROG = 0x08, 0x09
HEADER_TYPE = 0x0E
BAR0 = 0x10
SUBSYSTEM_VENDOR_ID, SUBSYSTEM_ID = 0x2C, 0x2E
CAPABILITIES_POINTER = 0x34
INTERRUPT_LINE, INTERRUPT_PIN = 0x3C, 0x3D

COMMAND_IO, COMMAND_MEMORY, COMMAND_BUS_MASTER = 0x1, 0x2, 0x4
COMMAND_INTX_DISABLE = 0x400
STATUS_INTERRUPT, STATUS_CAPABILITIES = 0x08, 0x10

BAR_IO, BAR_MEM64, BAR_PREFETCH = 0x1, 0x4, 0x8

CAP_MSIX = 0x11
CAP_VENDOR = 0x09

MSIX_ENABLE, MSIX_FUNCTION_MASK = 0x8000, 0x4000
MSIX_ENTRY_SIZE = 16
MSIX_VECTOR_MASKED = 0x1
MSIX_NO_VECTOR = 0xFFFF

_U16, _U32, _U64 = struct.Struct("<H"), struct.Struct("<I"), struct.Struct("<Q")


def _align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)


@dataclass
class PciState:
    config: bytes  # the 256-byte configuration space (BAR addresses, command, capabilities)
    intx_level: bool
    msix_table: bytes = b""
    msix_pending: list[bool] = field(default_factory=list)


@dataclass
class Bar:
    """One base address register and the region behind it."""

    index: int
    size: int  # a power of two
    io: bool = False
    mem64: bool = False
    prefetchable: bool = False
    address: int = 0
    mapped_at: int | None = field(default=None, repr=False)  # where it sits on the bus now

    @property
    def flags(self) -> int:
        if self.io:
            return BAR_IO
        return (BAR_MEM64 if self.mem64 else 0) | (BAR_PREFETCH if self.prefetchable else 0)


class PciFunction:
    """A PCI function: a 256-byte configuration space with its writable bits, BARs, capabilities.

    Subclasses give their regions' accesses through `bar_read(bar, offset, size)` and
    `bar_write(bar, offset, size, value)`, and learn of address changes through `bar_moved`.
    """

    def __init__(self, *, vendor: int, device: int, class_code: int, revision: int = 0,
                 subsystem_vendor: int = 0, subsystem: int = 0, interrupt_pin: int = 1) -> None:
        self.config = bytearray(CONFIG_SIZE)
        self.writable = bytearray(CONFIG_SIZE)  # per byte: which bits the guest may change
        self.bars: dict[int, Bar] = {}
        self._last_cap = self._cap_length = 0  # where the capability list ends
        self.lock = threading.RLock()
        self.bus_owner: PciBus | None = None
        self.slot = -1
        self.irq = 0  # GSI of INTx, given by the bus
        self._intx_level = False
        self._u16(VENDOR_ID, vendor)
        self._u16(DEVICE_ID, device)
        self.config[REVISION] = revision
        self.config[CLASS_PROG : CLASS_PROG + 3] = class_code.to_bytes(3, "little")
        self._u16(SUBSYSTEM_VENDOR_ID, subsystem_vendor)
        self._u16(SUBSYSTEM_ID, subsystem)
        self.config[INTERRUPT_PIN] = interrupt_pin
        self._writable(COMMAND, 2, COMMAND_IO | COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE)
        self.writable[INTERRUPT_LINE] = 0xFF

    # -- building the configuration space -------------------------------------------------------

    def _u16(self, offset: int, value: int) -> None:
        _U16.pack_into(self.config, offset, value)

    def _writable(self, offset: int, size: int, mask: int) -> None:
        self.writable[offset : offset + size] = mask.to_bytes(size, "little")

    def add_bar(self, bar: Bar) -> Bar:
        if bar.size & (bar.size - 1) or bar.size < (4 if bar.io else 16):
            raise ValueError(f"BAR size {bar.size:#x} is not a power of two of at least 16 (4 for I/O)")
        self.bars[bar.index] = bar
        offset = BAR0 + 4 * bar.index
        low_flag_bits = 2 if bar.io else 4
        mask = ~(bar.size - 1) & 0xFFFF_FFFF & ~((1 << low_flag_bits) - 1)
        self._writable(offset, 4, mask)
        _U32.pack_into(self.config, offset, bar.flags)
        if bar.mem64:
            self._writable(offset + 4, 4, (~(bar.size - 1) >> 32) & 0xFFFF_FFFF)
        return bar

    def add_capability(self, cap_id: int, body: bytes, writable: bytes | None = None) -> int:
        """Append a capability (id, next pointer, then `body`); returns its offset."""
        offset = _align_up(self._last_cap + self._cap_length, 4) if self._last_cap else 0x40
        if offset + 2 + len(body) > CONFIG_SIZE:
            raise ValueError("configuration space is full")
        self.config[offset] = cap_id
        self.config[offset + 1] = 0
        self.config[offset + 2 : offset + 2 + len(body)] = body
        if writable is not None:
            self.writable[offset + 2 : offset + 2 + len(writable)] = writable
        if self._last_cap:
            self.config[self._last_cap + 1] = offset
        else:
            self.config[CAPABILITIES_POINTER] = offset
            self._u16(STATUS, _U16.unpack_from(self.config, STATUS)[0] | STATUS_CAPABILITIES)
        self._last_cap, self._cap_length = offset, 2 + len(body)
        return offset

    # -- configuration accesses -------------------------------------------------------------------

    def config_read(self, offset: int, size: int) -> int:
        with self.lock:
            return int.from_bytes(self.config[offset : offset + size], "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        with self.lock:
            old_command = _U16.unpack_from(self.config, COMMAND)[0]
            old_bars = {index: self.bar_address(index) for index in self.bars}
            for i in range(size):
                mask = self.writable[offset + i]
                byte = (value >> (8 * i)) & 0xFF
                self.config[offset + i] = (self.config[offset + i] & ~mask) | (byte & mask)
            self.config_written(offset, size)
            command = _U16.unpack_from(self.config, COMMAND)[0]
            for index, bar in self.bars.items():
                if self.bar_address(index) != old_bars[index] or (command ^ old_command) & (COMMAND_IO | COMMAND_MEMORY):
                    self._remap(bar)
            if (command ^ old_command) & COMMAND_INTX_DISABLE:
                self._drive_intx()

    def config_written(self, offset: int, size: int) -> None:
        """Hook for capability registers (MSI-X control); called with the lock held."""

    def bar_address(self, index: int) -> int:
        bar = self.bars[index]
        low = _U32.unpack_from(self.config, BAR0 + 4 * index)[0]
        address = low & (0xFFFF_FFFC if bar.io else 0xFFFF_FFF0)
        if bar.mem64:
            address |= _U32.unpack_from(self.config, BAR0 + 4 * index + 4)[0] << 32
        return address

    def set_bar_address(self, index: int, address: int) -> None:
        bar = self.bars[index]
        _U32.pack_into(self.config, BAR0 + 4 * index, (address & 0xFFFF_FFFF) | bar.flags)
        if bar.mem64:
            _U32.pack_into(self.config, BAR0 + 4 * index + 4, address >> 32)
        self._remap(bar)

    def _remap(self, bar: Bar) -> None:
        """Put the BAR's region where config space says, if decoding is enabled; else nowhere."""
        if self.bus_owner is None:
            return
        io_bus = self.bus_owner.io_bus
        if bar.mapped_at is not None:
            if bar.io:
                io_bus.unregister_pio(bar.mapped_at, bar.size)
            else:
                io_bus.unregister_mmio(bar.mapped_at)
            bar.mapped_at = None
        command = _U16.unpack_from(self.config, COMMAND)[0]
        address = self.bar_address(bar.index)
        enabled = command & (COMMAND_IO if bar.io else COMMAND_MEMORY)
        # An address of 0 or all-ones (mid-sizing) is not a place to decode at.
        if not enabled or address == 0 or address + bar.size > (0x10000 if bar.io else 1 << 48):
            bar.address = address
            return
        region = _BarRegion(self, bar.index)
        try:
            if bar.io:
                io_bus.register_pio(address, bar.size, region)
            else:
                io_bus.register_mmio(address, bar.size, region)
        except ValueError:
            return  # overlaps another device: leave it unmapped, as a conflict would on hardware
        bar.address = bar.mapped_at = address
        self.bar_moved(bar)

    def bar_moved(self, bar: Bar) -> None:
        """Hook: the BAR now decodes at bar.address (ioeventfds follow it)."""

    def bar_read(self, index: int, offset: int, size: int) -> int:
        return 0

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        pass

    # -- state ---------------------------------------------------------------------------------------

    def save_pci_state(self) -> PciState:
        msix: MsixTable | None = getattr(self, "msix", None)
        return PciState(bytes(self.config), self._intx_level,
                        bytes(msix.table) if msix else b"", list(msix.pending) if msix else [])

    def restore_pci_state(self, state: PciState) -> None:
        """Config space, MSI-X, INTx; BARs are re-mapped where the saved config puts them."""
        msix: MsixTable | None = getattr(self, "msix", None)
        if len(state.config) != CONFIG_SIZE or (msix and len(state.msix_table) != len(msix.table)):
            raise StateError(f"PCI state of slot {self.slot} does not fit this device")
        if state.config[:4] != self.config[:4]:
            raise StateError(f"PCI state of slot {self.slot} is for another device (IDs {state.config[:4].hex()})")
        self.config[:] = state.config
        self._intx_level = state.intx_level
        if msix:
            msix.table[:] = state.msix_table
            msix.pending = list(state.msix_pending)
        for bar in self.bars.values():
            self._remap(bar)

    # -- interrupts ------------------------------------------------------------------------------

    def set_intx(self, level: bool) -> None:
        """Assert or deassert INTx (the caller tracks the cause, e.g. virtio's ISR)."""
        with self.lock:
            self._intx_level = level
            self._drive_intx()

    def _drive_intx(self) -> None:
        disabled = _U16.unpack_from(self.config, COMMAND)[0] & COMMAND_INTX_DISABLE
        level = self._intx_level and not disabled
        status = _U16.unpack_from(self.config, STATUS)[0]
        self._u16(STATUS, status | STATUS_INTERRUPT if self._intx_level else status & ~STATUS_INTERRUPT)
        if self.bus_owner is not None and self.config[INTERRUPT_PIN]:
            self.bus_owner.irq_line(self.irq, level)


class _BarRegion:
    """Adapter putting one BAR of a function on the I/O bus."""

    __slots__ = ("function", "index")

    def __init__(self, function: PciFunction, index: int) -> None:
        self.function, self.index = function, index

    def pio_read(self, offset: int, size: int) -> int:
        return self.function.bar_read(self.index, offset, size)

    def pio_write(self, offset: int, size: int, value: int) -> None:
        self.function.bar_write(self.index, offset, size, value)

    mmio_read = pio_read
    mmio_write = pio_write


class MsixTable:
    """The MSI-X table and pending-bit array of a function, and the capability that describes them.

    Vectors are delivered with KVM_SIGNAL_MSI through `send_msi(address, data)`. A masked vector
    (or a function mask) records a pending bit instead, delivered when unmasked.
    """

    def __init__(self, function: PciFunction, vectors: int, bar: int, table_offset: int, pba_offset: int) -> None:
        self.function = function
        self.vectors = vectors
        self.table = bytearray(vectors * MSIX_ENTRY_SIZE)
        for v in range(vectors):
            _U32.pack_into(self.table, v * MSIX_ENTRY_SIZE + 12, MSIX_VECTOR_MASKED)
        self.pending = [False] * vectors
        self.bar, self.table_offset, self.pba_offset = bar, table_offset, pba_offset
        body = struct.pack("<HII", vectors - 1, table_offset | bar, pba_offset | bar)
        self.cap = function.add_capability(CAP_MSIX, body, writable=struct.pack("<H", MSIX_ENABLE | MSIX_FUNCTION_MASK))
        self.send_msi: Callable[[int, int], None] | None = None

    @property
    def control(self) -> int:
        return _U16.unpack_from(self.function.config, self.cap + 2)[0]

    @property
    def enabled(self) -> bool:
        return bool(self.control & MSIX_ENABLE)

    def _masked(self, vector: int) -> bool:
        entry = _U32.unpack_from(self.table, vector * MSIX_ENTRY_SIZE + 12)[0]
        return bool(entry & MSIX_VECTOR_MASKED or self.control & MSIX_FUNCTION_MASK)

    def notify(self, vector: int) -> None:
        """Raise `vector` (caller holds the function lock)."""
        if vector >= self.vectors:
            return  # NO_VECTOR (0xffff) or out of range: no interrupt, as the spec says
        if self._masked(vector):
            self.pending[vector] = True
            return
        self._deliver(vector)

    def _deliver(self, vector: int) -> None:
        address, data = struct.unpack_from("<QI", self.table, vector * MSIX_ENTRY_SIZE)
        self.pending[vector] = False
        if self.send_msi is not None:
            self.send_msi(address, data)

    def deliver_unmasked_pending(self) -> None:
        for vector, pending in enumerate(self.pending):
            if pending and not self._masked(vector):
                self._deliver(vector)

    def read(self, offset: int, size: int) -> int:
        if self.table_offset <= offset < self.table_offset + len(self.table):
            at = offset - self.table_offset
            return int.from_bytes(self.table[at : at + size], "little")
        if self.pba_offset <= offset < self.pba_offset + 8 * ((self.vectors + 63) // 64):
            bits = sum(1 << v for v, p in enumerate(self.pending) if p)
            shift = 8 * (offset - self.pba_offset)
            return (bits >> shift) & ((1 << (8 * size)) - 1)
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if self.table_offset <= offset < self.table_offset + len(self.table) and size in (4, 8):
            at = offset - self.table_offset
            self.table[at : at + size] = value.to_bytes(size, "little")
            self.deliver_unmasked_pending()


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
                address = _align_up(self._next_io, bar.size)
                self._next_io = address + bar.size
                limit = IO_WINDOW[1]
            else:
                address = _align_up(self._next_mmio, bar.size)
                self._next_mmio = address + bar.size
                limit = MMIO_WINDOW[1]
            if address + bar.size > limit:
                raise ValueError("PCI address window exhausted")
            function.set_bar_address(bar.index, address)
        command = _U16.unpack_from(function.config, COMMAND)[0] | COMMAND_IO | COMMAND_MEMORY
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
    def __init__(self, bus: PciBus) -> None:
        self.bus = bus

    def pio_read(self, offset: int, size: int) -> int:
        function, register = self.bus._target()
        if function is None:
            return (1 << (8 * size)) - 1  # no device: all ones, so vendor ID reads 0xFFFF
        return function.config_read(register + offset, size)

    def pio_write(self, offset: int, size: int, value: int) -> None:
        function, register = self.bus._target()
        if function is not None:
            function.config_write(register + offset, size, value)


def attach_pci_bus(vm: Vm) -> PciBus:
    """A PCI bus on the VM's I/O bus, INTx on the in-kernel irqchip, and the PCI IRQs marked
    level-triggered in the PICs' ELCR registers, as PC firmware leaves them."""
    for chip in (KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE):
        state = vm.fd.get_irqchip(chip)
        base = 0 if chip == KVM_IRQCHIP_PIC_MASTER else 8
        state.chip.pic.elcr |= sum(1 << (irq - base) for irq in INTX_IRQS if base <= irq < base + 8)
        vm.fd.set_irqchip(state)
    return PciBus(vm.bus, vm.irq_line)
