"""The modern virtio-pci interface (virtio 1.x, 4.1.4): the structures in the 64-bit memory BAR
that the vendor capabilities point to, and the PCI-configuration access window.

    BAR4  common cfg 0x0000, ISR 0x1000, device cfg 0x2000, notify 0x3000 (4 bytes per queue)
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from pykvm.devices import virtio as v
from pykvm.devices.pci import CAP_VENDOR

if TYPE_CHECKING:
    from pykvm.devices.virtio.transport import VirtioPciFunction

MODERN_BAR = 4
MODERN_BAR_SIZE = 0x4000
COMMON_CFG, ISR_CFG, DEVICE_CFG, NOTIFY_CFG = 0x0000, 0x1000, 0x2000, 0x3000
REGION_SIZE = 0x1000
NOTIFY_OFF_MULTIPLIER = 4

# virtio_pci_cap cfg_type
CAP_COMMON, CAP_NOTIFY, CAP_ISR, CAP_DEVICE, CAP_PCI_CFG = 1, 2, 3, 4, 5

# Common configuration structure (virtio 1.x, 4.1.4.3)
DEVICE_FEATURE_SELECT, DEVICE_FEATURE = 0x00, 0x04
DRIVER_FEATURE_SELECT, DRIVER_FEATURE = 0x08, 0x0C
CONFIG_MSIX_VECTOR, NUM_QUEUES = 0x10, 0x12
DEVICE_STATUS, CONFIG_GENERATION = 0x14, 0x15
QUEUE_SELECT, QUEUE_SIZE, QUEUE_MSIX_VECTOR, QUEUE_ENABLE, QUEUE_NOTIFY_OFF = 0x16, 0x18, 0x1A, 0x1C, 0x1E
QUEUE_DESC, QUEUE_DRIVER, QUEUE_DEVICE = 0x20, 0x28, 0x30
COMMON_CFG_SIZE = 0x38
_RING_ADDRESSES = ((QUEUE_DESC, "desc"), (QUEUE_DRIVER, "avail"), (QUEUE_DEVICE, "used"))


def notify_address(bar_address: int, queue_index: int) -> int:
    return bar_address + NOTIFY_CFG + NOTIFY_OFF_MULTIPLIER * queue_index


class ModernRegisters:
    """BAR4 as the bus sees it (Bar.region): each access under the function's lock."""

    def __init__(self, function: VirtioPciFunction) -> None:
        self.function = function

    def mmio_read(self, offset: int, size: int) -> int:
        function = self.function
        with function.lock:
            region, at = offset & ~(REGION_SIZE - 1), offset & (REGION_SIZE - 1)
            if region == COMMON_CFG:  # a narrower read than the register's gets its low bytes
                return self._common_read(at, size) & ((1 << (8 * size)) - 1)
            if region == ISR_CFG:
                return function.read_isr()
            if region == DEVICE_CFG:
                return read_bytes(function.device.config_bytes(), at, size)
            return 0

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        function = self.function
        with function.lock:
            if offset >= NOTIFY_CFG:  # first: the one register written per request
                function.notify((offset - NOTIFY_CFG) // NOTIFY_OFF_MULTIPLIER)
            elif offset < COMMON_CFG + REGION_SIZE:
                self._common_write(offset - COMMON_CFG, size, value)
            elif offset >= DEVICE_CFG:
                function.device.config_write(offset - DEVICE_CFG, value.to_bytes(size, "little"))

    def _common_read(self, at: int, size: int) -> int:
        function = self.function
        if at == DEVICE_FEATURE_SELECT:
            return function.device_feature_select
        if at == DEVICE_FEATURE:
            return _feature_word(function.offered, function.device_feature_select)
        if at == DRIVER_FEATURE_SELECT:
            return function.driver_feature_select
        if at == DRIVER_FEATURE:
            return _feature_word(function.driver_features, function.driver_feature_select)
        if at == CONFIG_MSIX_VECTOR:
            return function.config_vector
        if at == NUM_QUEUES:
            return len(function.queue_registers)
        if at == DEVICE_STATUS:
            return function.status
        if at == CONFIG_GENERATION:
            return function.config_generation
        if at == QUEUE_SELECT:
            return function.queue_select
        q = function.selected_queue()
        if q is None:
            return 0
        if at == QUEUE_SIZE:
            return q.size
        if at == QUEUE_MSIX_VECTOR:
            return q.vector
        if at == QUEUE_ENABLE:
            return int(q.enabled)
        if at == QUEUE_NOTIFY_OFF:
            return function.queue_select
        for base, name in _RING_ADDRESSES:
            if base <= at < base + 8:
                return (getattr(q, name) >> (8 * (at - base))) & ((1 << (8 * size)) - 1)
        return 0

    def _common_write(self, at: int, size: int, value: int) -> None:
        function = self.function
        q = function.selected_queue()
        if at == DEVICE_FEATURE_SELECT:
            function.device_feature_select = value
        elif at == DRIVER_FEATURE_SELECT:
            function.driver_feature_select = value
        elif at == DRIVER_FEATURE:
            # Settled at FEATURES_OK, or at DRIVER_OK for a driver that never sets FEATURES_OK.
            settled = function.status & (v.STATUS_FEATURES_OK | v.STATUS_DRIVER_OK)
            if function.driver_feature_select < 2 and not settled:
                shift = 32 * function.driver_feature_select
                function.driver_features = ((function.driver_features & ~(0xFFFF_FFFF << shift))
                                            | ((value & 0xFFFF_FFFF) << shift))
        elif at == CONFIG_MSIX_VECTOR:
            function.config_vector = function.msix.vector_or_none(value)
        elif at == DEVICE_STATUS:
            function.write_status(value & 0xFF)
        elif at == QUEUE_SELECT:
            function.queue_select = value
        elif q is None or function.status & v.STATUS_DRIVER_OK and at != QUEUE_MSIX_VECTOR:
            return  # queue registers are frozen once the driver is running
        elif at == QUEUE_SIZE:
            q.size = value
        elif at == QUEUE_MSIX_VECTOR:
            q.vector = function.msix.vector_or_none(value)
        elif at == QUEUE_ENABLE:
            if value == 1:
                q.enabled = True
        else:
            for base, name in _RING_ADDRESSES:
                if base <= at < base + 8:
                    shift, mask = 8 * (at - base), (1 << (8 * size)) - 1
                    setattr(q, name, (getattr(q, name) & ~(mask << shift)) | (value << shift))


def add_capabilities(function: VirtioPciFunction, device_config_size: int) -> PciCfgWindow:
    """The vendor capabilities that point a driver at BAR4's structures, and the PCI_CFG
    access window (which the spec requires, for drivers that cannot map BARs)."""
    _add_virtio_cap(function, CAP_COMMON, COMMON_CFG, COMMON_CFG_SIZE)
    _add_virtio_cap(function, CAP_ISR, ISR_CFG, 1)
    _add_virtio_cap(function, CAP_DEVICE, DEVICE_CFG, max(device_config_size, 4))
    _add_virtio_cap(function, CAP_NOTIFY, NOTIFY_CFG, NOTIFY_OFF_MULTIPLIER * len(function.queue_registers),
                    extra=struct.pack("<I", NOTIFY_OFF_MULTIPLIER))
    # VIRTIO_PCI_CAP_PCI_CFG: the driver may write bar, offset, length and the data window
    writable = bytes([0, 0, 0xFF, 0, 0, 0]) + b"\xff" * 12
    return PciCfgWindow(function, _add_virtio_cap(function, CAP_PCI_CFG, 0, 0, extra=bytes(4), writable=writable))


def _add_virtio_cap(function: VirtioPciFunction, cfg_type: int, offset: int, length: int, *, extra: bytes = b"",
                    writable: bytes | None = None) -> int:
    """A virtio_pci_cap (cap_len, cfg_type, bar, id, padding, offset, length) + `extra`."""
    body = struct.pack("<BBBB2xII", 16 + len(extra), cfg_type, MODERN_BAR, 0, offset, length) + extra
    return function.add_capability(CAP_VENDOR, body, writable)


class PciCfgWindow:
    """VIRTIO_PCI_CAP_PCI_CFG: a 4-byte window in config space onto any BAR, at the bar, offset
    and length the driver wrote into the capability."""

    def __init__(self, function: VirtioPciFunction, cap: int) -> None:
        self.function, self.cap, self.data = function, cap, cap + 16

    def covers(self, offset: int) -> bool:
        return self.data <= offset < self.data + 4

    def read(self) -> int:
        bar, at, length = self._target()
        return self.function.bar_read(bar, at, length) if bar in self.function.bars else 0

    def written(self) -> None:
        bar, at, length = self._target()
        if bar in self.function.bars:
            value = int.from_bytes(self.function.config[self.data : self.data + length], "little")
            self.function.bar_write(bar, at, length, value)

    def _target(self) -> tuple[int, int, int]:
        config, cap = self.function.config, self.cap
        bar, at, length = config[cap + 4], *struct.unpack_from("<II", config, cap + 8)
        return bar, at, length if length in (1, 2, 4) else 4


def _feature_word(features: int, select: int) -> int:
    return (features >> (32 * select)) & 0xFFFF_FFFF if select < 2 else 0


def read_bytes(data: bytes, offset: int, size: int) -> int:
    """`size` bytes of `data` from `offset` as a little-endian value (zeros past its end)."""
    return int.from_bytes(data[offset : offset + size].ljust(size, b"\0"), "little")
