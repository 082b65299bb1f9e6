"""virtio 1.x devices: the device models (blk, net) apart from their transport (PCI) and their
backends (files, TAP, sockets), and the virtqueue (pykvm.devices.virtqueue) apart from all three.

A device model implements VirtioDevice: what it offers (type, features, queues, config space)
and what it does when a queue is notified or its backend has data. The transport owns the
registers, feature negotiation, status, interrupts and the I/O thread that calls the model.
"""

from __future__ import annotations

import logging
from typing import Callable

from pykvm.devices.virtqueue import SplitQueue
from pykvm.memory import GuestMemory

log = logging.getLogger("pykvm.virtio")

# Device status (virtio 1.x, 2.1)
STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK = 0x01, 0x02, 0x04
STATUS_FEATURES_OK, STATUS_NEEDS_RESET, STATUS_FAILED = 0x08, 0x40, 0x80

# Reserved feature bits (virtio 1.x, 6)
F_RING_INDIRECT_DESC = 1 << 28
F_RING_EVENT_IDX = 1 << 29
F_VERSION_1 = 1 << 32

TYPE_NET, TYPE_BLOCK = 1, 2


class VirtioDevice:
    """What a device model provides to its transport. Methods are called with the transport's
    lock held, from the vCPU thread (config, activate, reset) or the device's I/O thread
    (queue_notified, backend_ready)."""

    device_type: int
    name: str
    queue_sizes: tuple[int, ...]  # the maximum size of each queue
    features: int  # device-specific feature bits offered (the transport adds the reserved ones)

    def __init__(self) -> None:
        self.memory: GuestMemory | None = None
        self.queues: list[SplitQueue | None] = []
        self.driver_features = 0
        # Set by the transport: interrupt(queue_index) raises the queue's interrupt.
        self.interrupt: Callable[[int], None] = lambda index: None

    # -- configuration space ---------------------------------------------------------------------

    def config_bytes(self) -> bytes:
        """The device configuration space as the driver reads it now."""
        return b""

    def config_write(self, offset: int, data: bytes) -> None:
        """The driver wrote the configuration space (most fields are read-only: ignore)."""

    # -- life cycle -------------------------------------------------------------------------------

    def activate(self, memory: GuestMemory, queues: list[SplitQueue | None], driver_features: int) -> None:
        """DRIVER_OK: the queues are set up; start serving."""
        self.memory, self.queues, self.driver_features = memory, queues, driver_features

    def reset(self) -> None:
        """The driver reset the device: forget queues and negotiated state."""
        self.memory, self.queues, self.driver_features = None, [], 0

    # -- work ---------------------------------------------------------------------------------------

    def queue_notified(self, index: int) -> None:
        """The driver made buffers available on queue `index`."""

    def backend_fds(self) -> list[int]:
        """File descriptors the I/O thread should watch for this device (e.g. a TAP's)."""
        return []

    def backend_ready(self, fd: int) -> None:
        """`fd` from backend_fds() is readable."""

    def wants_backend(self, fd: int) -> bool:
        """Whether to watch `fd` now (a net device without rx buffers stops reading its TAP)."""
        return True

    def close(self) -> None:
        """Release backend resources (the VMM is exiting)."""
