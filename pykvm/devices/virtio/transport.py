"""virtio over PCI (virtio 1.x, 4.1): the PCI function a virtio device model sits behind.

    BAR0  I/O, legacy registers then device config   (transitional devices only; legacy.py)
    BAR1  memory, MSI-X table at 0x000, PBA at 0x800 (pykvm.devices.pci.MsixTable)
    BAR4  memory, 64-bit: common cfg, ISR, device cfg, notify (modern.py)

Here is what both register sets share: device status and feature negotiation, each queue's
registers, starting and stopping the model, interrupts (MSI-X messages, or INTx with the ISR),
the saved state, and the FT gate's release. A queue notification reaches the model either in the
notifying vCPU's exit (`notify`) or through an ioeventfd and the I/O thread (io_thread.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from pykvm.devices import virtio as v
from pykvm.devices.pci import MSIX_NO_VECTOR, Bar, MsixTable, PciFunction, PciState
from pykvm.devices.platform import Platform
from pykvm.devices.virtio.gate import OutputGate
from pykvm.devices.virtio.io_thread import IoeventfdTarget, Ioeventfds, IoThread
from pykvm.devices.virtio.legacy import L_QUEUE_NOTIFY, LEGACY_BAR, LegacyRegisters, legacy_bar_size
from pykvm.devices.virtio.modern import MODERN_BAR, MODERN_BAR_SIZE, ModernRegisters, add_capabilities, \
    notify_address
from pykvm.devices.virtio.virtqueue import QueueError, RingPosition, SplitQueue
from pykvm.state import StateError

VIRTIO_VENDOR = 0x1AF4
MODERN_DEVICE_BASE = 0x1040
LEGACY_DEVICE_IDS = {v.TYPE_NET: 0x1000, v.TYPE_BLOCK: 0x1001}
CLASS_CODES = {v.TYPE_NET: 0x020000, v.TYPE_BLOCK: 0x010000}

MSIX_BAR, MSIX_BAR_SIZE, MSIX_PBA_OFFSET = 1, 0x1000, 0x800
ISR_QUEUE, ISR_CONFIG = 0x1, 0x2
NO_VECTOR = MSIX_NO_VECTOR


@dataclass
class QueueState:
    """One queue as saved: its registers and, while the driver runs, where its ring stands."""

    size: int
    enabled: bool
    desc: int
    avail: int
    used: int
    vector: int
    ring: RingPosition | None


@dataclass
class VirtioPciState:
    pci: PciState
    status: int
    isr: int
    config_generation: int
    config_vector: int
    device_feature_select: int
    driver_feature_select: int
    driver_features: int
    queue_select: int
    queues: list[QueueState]


class QueueRegisters:
    """The registers through which the driver sets up one queue (size, ring addresses, enable,
    MSI-X vector). At DRIVER_OK they become the live ring (SplitQueue), which the model holds."""

    __slots__ = ("max_size", "size", "enabled", "desc", "avail", "used", "vector")

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.reset()

    def reset(self) -> None:
        self.size = self.max_size
        self.enabled = False
        self.desc = self.avail = self.used = 0
        self.vector = NO_VECTOR

    def save(self, ring: RingPosition | None) -> QueueState:
        return QueueState(self.size, self.enabled, self.desc, self.avail, self.used, self.vector, ring)

    def restore(self, saved: QueueState) -> None:
        self.size, self.enabled, self.vector = saved.size, saved.enabled, saved.vector
        self.desc, self.avail, self.used = saved.desc, saved.avail, saved.used


class VirtioPciFunction(PciFunction):
    state_type = VirtioPciState

    def __init__(self, device: v.VirtioDevice, platform: Platform, *, legacy: bool = True,
                 ioeventfd: bool = True) -> None:
        """`ioeventfd`: notifications through ioeventfds and the I/O thread (if the platform
        has them), rather than exits served on the notifying vCPU."""
        kind = device.device_type
        super().__init__(
            vendor=VIRTIO_VENDOR,
            device=LEGACY_DEVICE_IDS[kind] if legacy else MODERN_DEVICE_BASE + kind,
            class_code=CLASS_CODES[kind],
            revision=0 if legacy else 1,
            subsystem_vendor=VIRTIO_VENDOR,
            subsystem=kind,  # legacy drivers identify the device type by subsystem ID
        )
        self.device, self.platform, self.memory = device, platform, platform.memory
        self.offered = device.features | v.F_VERSION_1 | v.F_RING_EVENT_IDX | v.F_RING_INDIRECT_DESC
        self.queue_registers = [QueueRegisters(size) for size in device.queue_sizes]
        self.status, self.serving = 0, False  # serving: DRIVER_OK and not NEEDS_RESET (see _set_status)
        self.isr = 0
        self.config_generation = 0
        self.config_vector = NO_VECTOR
        self.device_feature_select = self.driver_feature_select = 0
        self.driver_features = 0
        self.queue_select = 0

        config_size = len(device.config_bytes())
        if legacy:
            self.add_bar(Bar(LEGACY_BAR, legacy_bar_size(config_size), LegacyRegisters(self), io=True))
        self.add_bar(Bar(MODERN_BAR, MODERN_BAR_SIZE, ModernRegisters(self), mem64=True, prefetchable=True))
        self.pci_cfg_window = add_capabilities(self, config_size)
        self.msix = MsixTable(self, len(self.queue_registers) + 1, MSIX_BAR, 0, MSIX_PBA_OFFSET,
                              send_msi=platform.signal_msi)
        self.add_bar(Bar(MSIX_BAR, MSIX_BAR_SIZE, self.msix))
        self.io_thread = IoThread(self, len(self.queue_registers))
        self.ioeventfds = Ioeventfds(platform, device.name, wanted=ioeventfd)

    @property
    def notify_path(self) -> str:
        """How queue notifications reach the device now: "ioeventfd" or "exit"."""
        return "ioeventfd" if self.ioeventfds.registered else "exit"

    def selected_queue(self) -> QueueRegisters | None:
        return self.queue_registers[self.queue_select] if self.queue_select < len(self.queue_registers) else None

    # -- the PCI configuration access window (VIRTIO_PCI_CAP_PCI_CFG) -------------------------------

    def config_read(self, offset: int, size: int) -> int:
        window = self.pci_cfg_window
        if window.covers(offset):
            shift = 8 * (offset - window.data)  # a narrower or later read gets its part of the data
            return (window.read() >> shift) & ((1 << (8 * size)) - 1)
        return super().config_read(offset, size)

    def config_written(self, offset: int, size: int) -> None:
        if self.pci_cfg_window.covers(offset):
            self.pci_cfg_window.written()
        super().config_written(offset, size)

    # -- status: starting and stopping the model (called with the lock held) ---------------------

    def _set_status(self, status: int) -> None:
        self.status = status
        self.serving = bool(status & v.STATUS_DRIVER_OK and not status & v.STATUS_NEEDS_RESET)

    def write_status(self, status: int) -> None:
        if status == 0:
            self._reset()
            return
        # A driver sets status bits and clears them only by a reset (virtio 1.x 2.1.1): a write
        # that would clear one leaves it set, so the rings live exactly while DRIVER_OK is set.
        # NEEDS_RESET is the device's to set.
        status = (status & ~v.STATUS_NEEDS_RESET) | self.status
        if status & v.STATUS_FEATURES_OK and not self.status & v.STATUS_FEATURES_OK:
            # Only modern drivers set FEATURES_OK, and a modern driver must accept VERSION_1.
            if self.driver_features & ~self.offered or not self.driver_features & v.F_VERSION_1:
                status &= ~v.STATUS_FEATURES_OK  # refused: the driver sees FEATURES_OK did not stick
        if status & v.STATUS_DRIVER_OK and not self.status & v.STATUS_DRIVER_OK:
            self._set_status(status)
            self._activate()
            return
        self._set_status(status)

    def _activate(self) -> None:
        """DRIVER_OK: the enabled queues' registers become rings."""
        event_idx = bool(self.driver_features & v.F_RING_EVENT_IDX)
        indirect = bool(self.driver_features & v.F_RING_INDIRECT_DESC)
        rings: list[SplitQueue | None] = []
        try:
            for i, q in enumerate(self.queue_registers):
                if q.size > q.max_size:
                    raise QueueError(f"queue {i}: size {q.size} above the maximum {q.max_size}")
                rings.append(SplitQueue(self.memory, q.size, q.desc, q.avail, q.used, event_idx=event_idx,
                                        indirect=indirect) if q.enabled else None)
        except QueueError as error:
            self.needs_reset(str(error))
            return
        self._start_serving(rings)

    def _start_serving(self, rings: list[SplitQueue | None]) -> None:
        """Hand the rings to the model and start taking notifications (after DRIVER_OK, or a
        restore of a running device). Each ring is looked at once: buffers made available before
        (or saved as not yet taken) are served."""
        self.device.activate(self.memory, rings, self.driver_features, self._queue_interrupt)
        self.ioeventfds.register(self._notify_targets())
        self.io_thread.start()
        for index, ring in enumerate(rings):
            if ring is not None:
                self.io_thread.kick(index)

    def _stop_serving(self) -> None:
        self.io_thread.stop()
        self.ioeventfds.unregister()
        self.device.reset()

    def _reset(self) -> None:
        self._stop_serving()
        for q in self.queue_registers:
            q.reset()
        self._set_status(0)
        self.isr = 0
        self.driver_features = 0
        self.config_vector = NO_VECTOR
        self.queue_select = 0
        self.set_intx(False)

    def needs_reset(self, reason: str) -> None:
        """The driver broke the rules: stop serving, tell it (virtio 1.x 2.1.2), keep the VMM up."""
        v.log.error("virtio-%s (slot %d): %s; device needs reset", self.device.name, self.slot, reason)
        self._set_status(self.status | v.STATUS_NEEDS_RESET)
        self.device.rings = [None] * len(self.queue_registers)
        self.config_generation = (self.config_generation + 1) & 0xFF
        self._interrupt(self.config_vector, ISR_CONFIG)

    # -- notifications -----------------------------------------------------------------------------

    def notify(self, index: int) -> None:
        """A notify that reached Python (ioeventfds not in use, or another access width), on the
        vCPU thread with the function lock held: serve the queue right here (why: see
        pykvm.machine.ioeventfd_for), unless the model hands this one to the I/O thread. The I/O
        thread still serves backend input; it is told when the model now wants other backend
        fds watched (rx buffers came)."""
        if not self.serving or index >= len(self.queue_registers):
            return  # nothing runs yet (DRIVER_OK kicks every queue) or any more (until a reset)
        device = self.device
        fds = device.backend_fds()
        watched = [device.wants_backend(fd) for fd in fds] if fds else None
        try:
            if device.hands_over(index):
                self.io_thread.kick(index)
                return
            device.queue_notified(index, guest_waits=True)
        except QueueError as error:
            self.needs_reset(str(error))
            return
        if fds and watched != [device.wants_backend(fd) for fd in fds]:
            self.io_thread.rearm()

    def _notify_targets(self) -> list[IoeventfdTarget]:
        """Each queue's notify register, in every BAR that is mapped: its eventfd stands for it."""
        targets = []
        modern = self.bars[MODERN_BAR]
        if modern.mapped_at is not None:
            for i, fd in enumerate(self.io_thread.queue_eventfds):
                targets.append(IoeventfdTarget(fd, notify_address(modern.mapped_at, i), 2, False, None))
        legacy = self.bars.get(LEGACY_BAR)
        if legacy is not None and legacy.mapped_at is not None:
            for i, fd in enumerate(self.io_thread.queue_eventfds):
                targets.append(IoeventfdTarget(fd, legacy.mapped_at + L_QUEUE_NOTIFY, 2, True, i))
        return targets

    def bar_moved(self, bar: Bar) -> None:
        if self.ioeventfds.registered:
            self.ioeventfds.unregister()
            self.ioeventfds.register(self._notify_targets())

    def rearm(self) -> None:
        """The device's set of backend fds changed: the I/O thread looks again."""
        self.io_thread.rearm()

    # -- interrupts ----------------------------------------------------------------------------------

    def _queue_interrupt(self, index: int) -> None:
        """The model's interrupt(queue_index); it runs with the lock held."""
        self._interrupt(self.queue_registers[index].vector, ISR_QUEUE)

    def _interrupt(self, vector: int, isr_bit: int) -> None:
        if self.msix.enabled:
            self.msix.notify(vector)
        else:
            self.isr |= isr_bit
            self.set_intx(True)

    def read_isr(self) -> int:
        isr, self.isr = self.isr, 0  # reading acknowledges (and lowers INTx)
        if isr:
            self.set_intx(False)
        return isr

    # -- the FT output gate (pykvm.devices.virtio.gate) -------------------------------------------

    def set_output_gate(self, gate: OutputGate | None) -> None:
        """Hold the device's outputs for `gate` from now on (None: let them go at once)."""
        self.device.hold_output = functools.partial(gate.hold, self) if gate is not None else None

    def release_held(self, queue_index: int) -> None:
        """The gate lets the oldest output held on `queue_index` go: serve it (after the last held
        one, the rest of the queue)."""
        with self.lock:
            self.device.release_held(queue_index)

    # -- state (machine quiesced: vCPUs paused and this function's lock held) ---------------------

    def save_state(self) -> VirtioPciState:
        rings, held = self.device.rings, self.device.held
        queues = []
        for i, q in enumerate(self.queue_registers):
            ring = rings[i] if i < len(rings) else None
            queues.append(q.save(held.give_back(i, ring.position()) if ring is not None else None))
        return VirtioPciState(self.save_pci_state(), self.status, self.isr, self.config_generation,
                              self.config_vector, self.device_feature_select, self.driver_feature_select,
                              self.driver_features, self.queue_select, queues)

    def restore_state(self, state: VirtioPciState) -> None:
        """Become the saved device: registers, rings (chains the guest made available but we had not
        taken are served right away), and a running I/O thread if the driver was running."""
        if len(state.queues) != len(self.queue_registers):
            raise StateError(f"virtio-{self.device.name} state has {len(state.queues)} queues, "
                             f"expected {len(self.queue_registers)}")
        vectors = [state.config_vector] + [q.vector for q in state.queues]
        if any(vector >= self.msix.vectors and vector != NO_VECTOR for vector in vectors):
            raise StateError(f"virtio-{self.device.name} state names MSI-X vectors {vectors}, "
                             f"the table has {self.msix.vectors}")
        with self.lock:
            self._stop_serving()
            self.restore_pci_state(state.pci)
            self._set_status(state.status)
            (self.isr, self.config_generation, self.config_vector, self.device_feature_select,
             self.driver_feature_select, self.driver_features, self.queue_select) = (
                state.isr, state.config_generation, state.config_vector, state.device_feature_select,
                state.driver_feature_select, state.driver_features, state.queue_select)
            rings: list[SplitQueue | None] = []
            for q, saved in zip(self.queue_registers, state.queues):
                q.restore(saved)
                try:
                    rings.append(SplitQueue.resume(self.memory, q.size, q.desc, q.avail, q.used, saved.ring)
                                 if saved.ring is not None else None)
                except QueueError as error:
                    raise StateError(f"virtio-{self.device.name}: {error}") from None
            if self.serving:
                self._start_serving(rings)

    def close(self) -> None:
        with self.lock:
            self.io_thread.stop()
            self.ioeventfds.unregister()
        self.device.close()
        self.io_thread.close()
