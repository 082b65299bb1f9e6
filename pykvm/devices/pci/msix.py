"""MSI-X (PCI 3.0, 6.8.2): a function's vector table and pending-bit array, the region of a BAR
that holds them, and the capability that describes them."""

from __future__ import annotations

import logging
import struct
from typing import TYPE_CHECKING, Callable

from pykvm.devices.pci.function import CAP_MSIX, U16, U32

if TYPE_CHECKING:
    from pykvm.devices.pci.function import PciFunction

MSIX_ENABLE, MSIX_FUNCTION_MASK = 0x8000, 0x4000
MSIX_ENTRY_SIZE = 16
MSIX_VECTOR_MASKED = 0x1
MSIX_NO_VECTOR = 0xFFFF

log = logging.getLogger("pykvm.pci")


class MsixTable:
    """The MSI-X table and pending-bit array of a function, and the capability that describes them.

    A vector is delivered as one message through `send_msi(address, data)` (the platform's MSI
    delivery). A masked vector (or a function mask) records a pending bit instead, delivered when
    unmasked. As a BAR region (Bar.region) it answers the guest's table and PBA accesses.
    """

    def __init__(self, function: PciFunction, vectors: int, bar: int, table_offset: int, pba_offset: int,
                 send_msi: Callable[[int, int], None]) -> None:
        self.function = function
        self.vectors = vectors
        self.send_msi = send_msi
        self.table = bytearray(vectors * MSIX_ENTRY_SIZE)
        for v in range(vectors):
            U32.pack_into(self.table, v * MSIX_ENTRY_SIZE + 12, MSIX_VECTOR_MASKED)
        self.pending = [False] * vectors
        self.bar, self.table_offset, self.pba_offset = bar, table_offset, pba_offset
        body = struct.pack("<HII", vectors - 1, table_offset | bar, pba_offset | bar)
        self.cap = function.add_capability(CAP_MSIX, body, writable=struct.pack("<H", MSIX_ENABLE | MSIX_FUNCTION_MASK))

    @property
    def control(self) -> int:
        return U16.unpack_from(self.function.config, self.cap + 2)[0]

    @property
    def enabled(self) -> bool:
        return bool(self.control & MSIX_ENABLE)

    def vector_or_none(self, vector: int) -> int:
        """`vector` if the table has it, else MSIX_NO_VECTOR: what a register naming a vector
        keeps when the driver writes it (the driver reads the value back to check)."""
        return vector if vector < self.vectors else MSIX_NO_VECTOR

    def _masked(self, vector: int) -> bool:
        entry = U32.unpack_from(self.table, vector * MSIX_ENTRY_SIZE + 12)[0]
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
        self.send_msi(address, data)

    def deliver_unmasked_pending(self) -> None:
        for vector, pending in enumerate(self.pending):
            if pending and not self._masked(vector):
                self._deliver(vector)

    # -- the BAR region -----------------------------------------------------------------------------

    def mmio_read(self, offset: int, size: int) -> int:
        with self.function.lock:
            if self.table_offset <= offset < self.table_offset + len(self.table):
                at = offset - self.table_offset
                return int.from_bytes(self.table[at : at + size], "little")  # past the end: zeros
            if self.pba_offset <= offset < self.pba_offset + 8 * ((self.vectors + 63) // 64):
                bits = sum(1 << v for v, p in enumerate(self.pending) if p)
                shift = 8 * (offset - self.pba_offset)
                return (bits >> shift) & ((1 << (8 * size)) - 1)
            return 0

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        """Software writes the table a whole aligned DWORD or QWORD at a time (PCI 3.0, 6.8.2);
        any other write is ignored, as is one that would run past the table. The PBA is read-only."""
        with self.function.lock:
            at = offset - self.table_offset
            if size not in (4, 8) or at % size or not 0 <= at <= len(self.table) - size:
                log.debug("slot %d: MSI-X write of %d bytes at %#x ignored", self.function.slot, size, offset)
                return
            self.table[at : at + size] = value.to_bytes(size, "little")
            self.deliver_unmasked_pending()
