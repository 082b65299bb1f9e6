"""virtio 1.x devices: the device models (blk, net) apart from their transport (PCI) and their
backends (files, TAP, sockets), and the virtqueue (pykvm.devices.virtio.virtqueue) apart from all three.

A device model implements VirtioDevice: what it offers (type, features, queues, config space)
and what it does when a queue is notified or its backend has data. The transport owns the
registers, feature negotiation, status, interrupts and the I/O thread that calls the model.
"""

from __future__ import annotations

import logging
from typing import Callable, Protocol

from pykvm.devices.virtio.virtqueue import DescriptorChain, SplitQueue
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


class OutputGate(Protocol):
    """Where a device's output waits before it leaves the machine (installed by pykvm.ft; the
    devices know only this protocol). `hold(device, queue)` says: queue `queue` of `device` has an
    output chain held; call `device.release_held(queue)` once the state that precedes it is safe."""

    def hold(self, device: VirtioDevice, queue: int) -> None: ...


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
        self.output_gate: OutputGate | None = None
        self.held: dict[int, DescriptorChain] = {}  # queue -> the output chain the gate holds

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
        self.held.clear()

    # -- serving requests ---------------------------------------------------------------------------

    def serve_chain(self, index: int, chain: DescriptorChain) -> int:
        """Carry out one request; returns the bytes written into the driver's buffers."""
        raise NotImplementedError

    def is_output(self, index: int, chain: DescriptorChain) -> bool:
        """Whether serving `chain` sends something out of the machine (a disk write, a frame)."""
        return False

    def serve_queue(self, index: int) -> None:
        """Drain queue `index` in order: serve each chain, return it, and interrupt as soon as the
        driver asked to be (with event index: once the entry it waits for is used), so that it
        takes that completion and queues more while the rest are served. Under an output gate, an
        output chain is held instead and the queue waits for release_held, so nothing after it
        overtakes it."""
        queue = self.queues[index] if index < len(self.queues) else None
        if queue is None or index in self.held:
            return
        while index not in self.held:
            queue.set_notification(False)  # draining anyway: no notifies meanwhile
            while (chain := queue.pop()) is not None:
                if self.output_gate is not None and self.is_output(index, chain):
                    self.held[index] = chain
                    self.output_gate.hold(self, index)
                    break
                self._serve_and_return(index, queue, chain)
            queue.set_notification(True)
            if index in self.held or not queue.pending():  # nothing slipped in before notifies were back on
                break

    def release_held(self, index: int) -> None:
        """The gate lets the held output of queue `index` go: serve it, then carry on."""
        chain = self.held.pop(index, None)
        queue = self.queues[index] if index < len(self.queues) else None
        if chain is None or queue is None:
            return  # the driver reset the device meanwhile
        self._serve_and_return(index, queue, chain)
        self.serve_queue(index)

    def _serve_and_return(self, index: int, queue: SplitQueue, chain: DescriptorChain) -> None:
        """Serve a chain, mark what it wrote dirty (after writing), return it, interrupt if asked."""
        written = self.serve_chain(index, chain)
        chain.written(self.memory)
        queue.add_used(chain.head, written)
        if queue.needs_interrupt():
            self.interrupt(index)

    def in_flight(self, index: int) -> int:
        """Chains taken from queue `index` but not yet returned (saved state gives them back to
        the ring, so a restored device serves them again)."""
        return 1 if index in self.held else 0

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
