"""A PCI function: its 256-byte configuration space (type 0 header, capabilities), its BARs and
the regions behind them, INTx, and its saved state."""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pykvm.state import StateError

if TYPE_CHECKING:
    from pykvm.devices.pci.bus import PciBus
    from pykvm.devices.pci.msix import MsixTable

CONFIG_SIZE = 256

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

U16, U32 = struct.Struct("<H"), struct.Struct("<I")


def align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)


@dataclass
class PciState:
    config: bytes  # the 256-byte configuration space (BAR addresses, command, capabilities)
    intx_level: bool
    msix_table: bytes = b""
    msix_pending: list[bool] = field(default_factory=list)


@dataclass
class Bar:
    """One base address register and the region behind it.

    `region` is what the I/O bus calls for accesses inside the BAR, with offsets relative to its
    start: `pio_read/pio_write` for an I/O BAR, `mmio_read/mmio_write` for a memory BAR. It takes
    the function's lock itself, and has a `function` attribute naming its owner."""

    index: int
    size: int  # a power of two
    region: Any = field(default=None, repr=False)
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

    Each BAR carries the region the bus dispatches to (Bar.region); subclasses learn of address
    changes through `bar_moved` and of capability register writes through `config_written`.
    """

    msix: MsixTable | None = None  # set by functions with an MSI-X capability

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
        U16.pack_into(self.config, offset, value)

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
        U32.pack_into(self.config, offset, bar.flags)
        if bar.mem64:
            self._writable(offset + 4, 4, (~(bar.size - 1) >> 32) & 0xFFFF_FFFF)
        return bar

    def add_capability(self, cap_id: int, body: bytes, writable: bytes | None = None) -> int:
        """Append a capability (id, next pointer, then `body`); returns its offset."""
        offset = align_up(self._last_cap + self._cap_length, 4) if self._last_cap else 0x40
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
            self._u16(STATUS, U16.unpack_from(self.config, STATUS)[0] | STATUS_CAPABILITIES)
        self._last_cap, self._cap_length = offset, 2 + len(body)
        return offset

    # -- configuration accesses -------------------------------------------------------------------

    def config_read(self, offset: int, size: int) -> int:
        with self.lock:
            return int.from_bytes(self.config[offset : offset + size], "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        with self.lock:
            old_command = U16.unpack_from(self.config, COMMAND)[0]
            old_bars = {index: self.bar_address(index) for index in self.bars}
            for i in range(size):
                mask = self.writable[offset + i]
                byte = (value >> (8 * i)) & 0xFF
                self.config[offset + i] = (self.config[offset + i] & ~mask) | (byte & mask)
            self.config_written(offset, size)
            command = U16.unpack_from(self.config, COMMAND)[0]
            for index, bar in self.bars.items():
                if self.bar_address(index) != old_bars[index] or (command ^ old_command) & (COMMAND_IO | COMMAND_MEMORY):
                    self._remap(bar)
            if (command ^ old_command) & COMMAND_INTX_DISABLE:
                self._drive_intx()

    def config_written(self, offset: int, size: int) -> None:
        """Hook for capability registers; called with the lock held. MSI-X control is handled
        here: unmasking delivers what became pending meanwhile."""
        msix = self.msix
        if msix is not None and offset <= msix.cap + 3 and offset + size > msix.cap + 2:
            msix.deliver_unmasked_pending()

    def bar_address(self, index: int) -> int:
        bar = self.bars[index]
        low = U32.unpack_from(self.config, BAR0 + 4 * index)[0]
        address = low & (0xFFFF_FFFC if bar.io else 0xFFFF_FFF0)
        if bar.mem64:
            address |= U32.unpack_from(self.config, BAR0 + 4 * index + 4)[0] << 32
        return address

    def set_bar_address(self, index: int, address: int) -> None:
        bar = self.bars[index]
        U32.pack_into(self.config, BAR0 + 4 * index, (address & 0xFFFF_FFFF) | bar.flags)
        if bar.mem64:
            U32.pack_into(self.config, BAR0 + 4 * index + 4, address >> 32)
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
        command = U16.unpack_from(self.config, COMMAND)[0]
        address = self.bar_address(bar.index)
        enabled = command & (COMMAND_IO if bar.io else COMMAND_MEMORY)
        # An address of 0 or all-ones (mid-sizing) is not a place to decode at.
        if not enabled or address == 0 or address + bar.size > (0x10000 if bar.io else 1 << 48):
            bar.address = address
            return
        try:
            if bar.io:
                io_bus.register_pio(address, bar.size, bar.region)
            else:
                io_bus.register_mmio(address, bar.size, bar.region)
        except ValueError:
            return  # overlaps another device: leave it unmapped, as a conflict would on hardware
        bar.address = bar.mapped_at = address
        self.bar_moved(bar)

    def bar_moved(self, bar: Bar) -> None:
        """Hook: the BAR now decodes at bar.address (ioeventfds follow it)."""

    def bar_read(self, index: int, offset: int, size: int) -> int:
        """Read BAR `index` at `offset` as the bus would (for windows onto BARs, e.g. virtio's
        PCI_CFG capability)."""
        bar = self.bars[index]
        return bar.region.pio_read(offset, size) if bar.io else bar.region.mmio_read(offset, size)

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        bar = self.bars[index]
        if bar.io:
            bar.region.pio_write(offset, size, value)
        else:
            bar.region.mmio_write(offset, size, value)

    # -- state ---------------------------------------------------------------------------------------

    def save_pci_state(self) -> PciState:
        msix = self.msix
        return PciState(bytes(self.config), self._intx_level,
                        bytes(msix.table) if msix else b"", list(msix.pending) if msix else [])

    def restore_pci_state(self, state: PciState) -> None:
        """Config space, MSI-X, INTx; BARs are re-mapped where the saved config puts them."""
        msix = self.msix
        if len(state.config) != CONFIG_SIZE or (msix and (len(state.msix_table), len(state.msix_pending))
                                                 != (len(msix.table), msix.vectors)):
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
        disabled = U16.unpack_from(self.config, COMMAND)[0] & COMMAND_INTX_DISABLE
        level = self._intx_level and not disabled
        status = U16.unpack_from(self.config, STATUS)[0]
        self._u16(STATUS, status | STATUS_INTERRUPT if self._intx_level else status & ~STATUS_INTERRUPT)
        if self.bus_owner is not None and self.config[INTERRUPT_PIN]:
            self.bus_owner.irq_line(self.irq, level)
