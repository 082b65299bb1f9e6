"""The legacy virtio-pci interface (virtio 0.9.5; 1.x 4.1.4.8) of a transitional device: the
registers in the I/O BAR, then the device config, and the legacy ring layout.

    BAR0  features, queue PFN/size/select/notify, status, ISR, [MSI-X vectors], device config
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pykvm.devices import virtio as v
from pykvm.devices.pci import MSIX_NO_VECTOR
from pykvm.devices.virtio.modern import read_bytes

if TYPE_CHECKING:
    from pykvm.devices.virtio.transport import QueueRegisters, VirtioPciFunction

LEGACY_BAR = 0
L_HOST_FEATURES, L_GUEST_FEATURES, L_QUEUE_PFN, L_QUEUE_NUM = 0x00, 0x04, 0x08, 0x0C
L_QUEUE_SEL, L_QUEUE_NOTIFY, L_STATUS, L_ISR = 0x0E, 0x10, 0x12, 0x13
L_CONFIG_VECTOR, L_QUEUE_VECTOR = 0x14, 0x16  # present while MSI-X is enabled
LEGACY_VRING_ALIGN = 4096


def legacy_bar_size(device_config_size: int) -> int:
    """The registers with the MSI-X vectors, then the device config, rounded to a power of two."""
    return 1 << (max(0x20, L_CONFIG_VECTOR + 4 + device_config_size) - 1).bit_length()


def place_legacy_ring(q: QueueRegisters, pfn: int) -> None:
    """A legacy ring: one contiguous area at page `pfn`, of the queue's maximum size: descriptors,
    then the available ring, then the used ring on the next 4 KiB boundary."""
    q.size = q.max_size
    q.desc = pfn * LEGACY_VRING_ALIGN
    q.avail = q.desc + 16 * q.size
    q.used = -(-(q.avail + 6 + 2 * q.size) // LEGACY_VRING_ALIGN) * LEGACY_VRING_ALIGN
    q.enabled = True


class LegacyRegisters:
    """BAR0 as the bus sees it (Bar.region): each access under the function's lock."""

    def __init__(self, function: VirtioPciFunction) -> None:
        self.function = function

    def _config_offset(self) -> int:
        """Where the device config starts: after the MSI-X vector registers while MSI-X is on."""
        return L_CONFIG_VECTOR + 4 if self.function.msix.enabled else L_CONFIG_VECTOR

    def pio_read(self, offset: int, size: int) -> int:
        with self.function.lock:  # a narrower read than the register's gets its low bytes
            return self._read(offset, size) & ((1 << (8 * size)) - 1)

    def _read(self, offset: int, size: int) -> int:
        function = self.function
        q = function.selected_queue()
        config_at = self._config_offset()
        if offset >= config_at:
            return read_bytes(function.device.config_bytes(), offset - config_at, size)
        if offset == L_HOST_FEATURES:
            return function.offered & 0xFFFF_FFFF
        if offset == L_GUEST_FEATURES:
            return function.driver_features & 0xFFFF_FFFF
        if offset == L_QUEUE_PFN:
            return q.desc // LEGACY_VRING_ALIGN if q is not None and q.enabled else 0
        if offset == L_QUEUE_NUM:
            return q.max_size if q is not None else 0
        if offset == L_QUEUE_SEL:
            return function.queue_select
        if offset == L_STATUS:
            return function.status
        if offset == L_ISR:
            return function.read_isr()
        if offset == L_CONFIG_VECTOR:
            return function.config_vector
        if offset == L_QUEUE_VECTOR:
            return q.vector if q is not None else MSIX_NO_VECTOR
        return 0

    def pio_write(self, offset: int, size: int, value: int) -> None:
        function = self.function
        with function.lock:
            if offset == L_QUEUE_NOTIFY:  # first: the one register written per request
                function.notify(value)
                return
            q = function.selected_queue()
            config_at = self._config_offset()
            if offset >= config_at:
                function.device.config_write(offset - config_at, value.to_bytes(size, "little"))
            elif offset in (L_GUEST_FEATURES, L_QUEUE_PFN) and function.status & v.STATUS_DRIVER_OK:
                return  # frozen while the driver runs, as the modern registers are: the rings stay put
            elif offset == L_GUEST_FEATURES:
                function.driver_features = value & function.offered & 0xFFFF_FFFF
            elif offset == L_QUEUE_PFN and q is not None:
                if value == 0:
                    q.reset()
                else:
                    place_legacy_ring(q, value)
            elif offset == L_QUEUE_SEL:
                function.queue_select = value
            elif offset == L_STATUS:
                function.write_status(value & 0xFF)
            elif offset == L_CONFIG_VECTOR:
                function.config_vector = function.msix.vector_or_none(value)
            elif offset == L_QUEUE_VECTOR and q is not None:
                q.vector = function.msix.vector_or_none(value)
