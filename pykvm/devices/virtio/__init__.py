"""virtio 1.x devices: the device models (blk, net) apart from their transport (PCI) and their
backends (files, TAP, sockets), and the virtqueue (pykvm.devices.virtio.virtqueue) apart from all three.

A device model implements VirtioDevice: what it offers (type, features, queues, config space)
and what it does when a queue is notified or its backend has data. The transport
(pykvm.devices.virtio.transport) owns the registers, feature negotiation, status, interrupts
and the I/O thread that calls the model; the FT output gate's side is in gate.py.
"""

from __future__ import annotations

import logging
from typing import Callable

from pykvm.devices.virtio.gate import HeldOutputs
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


def _no_interrupt(index: int) -> None:
    """The interrupt of a device that is not running."""


class VirtioDevice:
    """What a device model provides to its transport. Methods are called with the transport's
    lock held, from the vCPU thread (config, activate, reset, a notify served in its exit) or the
    device's I/O thread (queue_notified, backend_ready)."""

    device_type: int
    name: str
    queue_sizes: tuple[int, ...]  # the maximum size of each queue
    features: int  # device-specific feature bits offered (the transport adds the reserved ones)
    # Queues whose rings the I/O thread looks at itself while it polls, so that their notifies
    # can stay off meanwhile (see IoThread): those the guest fills while the device works on.
    polled_queues: tuple[int, ...] = ()

    def __init__(self) -> None:
        self.memory: GuestMemory | None = None
        self.rings: list[SplitQueue | None] = []  # the live rings, by queue index, while running
        self.driver_features = 0
        self.interrupt: Callable[[int], None] = _no_interrupt  # interrupt(queue_index), while running
        # While an FT gate is installed: hold_output(queue_index) tells it an output chain is held
        self.hold_output: Callable[[int], None] | None = None
        self.held = HeldOutputs()
        # polled_queues while the I/O thread is awake and will look at their rings before it
        # sleeps; serve_queue then leaves their notifies off (a notify is an exit, dear in a VM)
        self.polled: tuple[int, ...] = ()

    # -- configuration space ---------------------------------------------------------------------

    def config_bytes(self) -> bytes:
        """The device configuration space as the driver reads it now."""
        return b""

    def config_write(self, offset: int, data: bytes) -> None:
        """The driver wrote the configuration space (most fields are read-only: ignore)."""

    # -- life cycle -------------------------------------------------------------------------------

    def activate(self, memory: GuestMemory, rings: list[SplitQueue | None], driver_features: int,
                 interrupt: Callable[[int], None]) -> None:
        """DRIVER_OK: the rings are set up (None for a queue the driver left disabled); start
        serving. `interrupt(queue_index)` raises a queue's interrupt (call it with the transport's
        lock held, as every model method runs)."""
        self.memory, self.rings, self.driver_features, self.interrupt = memory, rings, driver_features, interrupt

    def reset(self) -> None:
        """The driver reset the device: forget rings and negotiated state."""
        self.memory, self.rings, self.driver_features, self.interrupt = None, [], 0, _no_interrupt
        self.held.clear()
        self.polled = ()

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
        takes that completion and queues more while the rest are served. Under an output gate,
        output chains are held instead (each told to the gate), and the first chain that is not
        an output goes back to the ring and waits until release_held has served every held one,
        so nothing overtakes a held output (pykvm.devices.virtio.gate)."""
        ring = self.rings[index] if index < len(self.rings) else None
        if ring is None:
            return
        held = self.held
        while True:
            ring.set_notification(False)  # draining anyway: no notifies meanwhile
            while (chain := ring.pop()) is not None:
                if self.hold_output is not None and self.is_output(index, chain):
                    held.setdefault(index, []).append(chain)
                    self.hold_output(index)
                elif index in held:  # behind held outputs: the last release serves it
                    ring.undo_pop()
                    self.serve_taken(index, ring)
                    return
                else:
                    self.take_chain(index, ring, chain)
            self.serve_taken(index, ring)
            if index in self.polled:
                break  # notifies stay off: the polling I/O thread finds what comes next
            ring.set_notification(True)
            if not ring.pending():  # nothing slipped in before notifies were back on
                break

    def release_held(self, index: int) -> None:
        """The gate lets the oldest output held on queue `index` go: serve it; after the last
        held one, carry on with the queue."""
        chains = self.held.get(index)
        ring = self.rings[index] if index < len(self.rings) else None
        if not chains or ring is None:
            return  # the driver reset the device meanwhile
        chain = chains.pop(0)
        if not chains:
            del self.held[index]
        self._serve_and_return(index, ring, chain)
        if index not in self.held:
            self.serve_queue(index)

    def take_chain(self, index: int, ring: SplitQueue, chain: DescriptorChain) -> None:
        """serve_queue's step for each chain it drains: serve it now (a model that serves several
        requests at once keeps it, and serves what it kept, in order, before it serves another
        chain or when serve_taken is called)."""
        self._serve_and_return(index, ring, chain)

    def serve_taken(self, index: int, ring: SplitQueue) -> None:
        """Serve the chains take_chain kept (serve_queue calls it once the ring is drained)."""

    def _serve_and_return(self, index: int, ring: SplitQueue, chain: DescriptorChain) -> None:
        """Serve a chain, mark what it wrote dirty (after writing), return it, interrupt if asked."""
        written = self.serve_chain(index, chain)
        chain.written(self.memory)
        ring.add_used(chain.head, written)
        if ring.needs_interrupt():
            self.interrupt(index)

    # -- work ---------------------------------------------------------------------------------------

    def queue_notified(self, index: int, *, guest_waits: bool = False) -> None:
        """The driver made buffers available on queue `index` (a model that serves every queue
        in order calls serve_queue). `guest_waits`: served in the notifying vCPU's exit, so the
        guest waits for the whole drain (no completion reaches it sooner); otherwise the I/O
        thread serves while the guest runs on."""

    def queues_waiting(self, indices: tuple[int, ...]) -> list[int]:
        """Which of queues `indices` have chains to serve. The polling I/O thread calls this
        without the lock, between its looks at its fds: a ring that a reset takes away meanwhile
        is skipped, and a broken index counts as waiting, to be served (and refused, the device
        to NEEDS_RESET) under the lock. A queue holding outputs for an FT gate has nothing to
        serve: what the driver adds behind them is served at their release."""
        rings, waiting = self.rings, []
        for index in indices:
            ring = rings[index] if index < len(rings) else None
            try:
                if ring is not None and index not in self.held and ring.pending():
                    waiting.append(index)
            except QueueError:
                waiting.append(index)
        return waiting

    def hands_over(self, index: int) -> bool:
        """Whether a notify of queue `index` that reached Python (served in the vCPU's exit by
        default) should go to the I/O thread this time instead: the model's choice, per notify."""
        return False

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
