"""virtio over PCI (virtio 1.x, 4.1): modern capabilities in a 64-bit memory BAR, the
transitional legacy interface in an I/O BAR, MSI-X or INTx, and the device's I/O thread.

    BAR0  I/O, legacy registers then device config      (transitional devices only)
    BAR1  memory, MSI-X table at 0x000, PBA at 0x800
    BAR4  memory, 64-bit: common cfg 0x0000, ISR 0x1000, device cfg 0x2000, notify 0x3000

A queue notification is either an ioeventfd (KVM signals an eventfd per queue, the device's I/O
thread serves the queue) or, without one (or for another access width), an exit to Python that
serves the queue on the vCPU thread during the exit; `pykvm.machine.ioeventfd_for` picks per
device. The I/O thread also serves the backend's input (received frames). Interrupts go out as
MSI-X messages (KVM_SIGNAL_MSI) or on INTx with the ISR.
"""

from __future__ import annotations

import os
import select
import struct
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pykvm.devices import virtio as v
from pykvm.devices.pci import CAP_VENDOR, Bar, MsixTable, PciFunction, PciState
from pykvm.devices.virtio.virtqueue import QueueError, QueueState, SplitQueue
from pykvm.kvm import KvmError
from pykvm.state import StateError

if TYPE_CHECKING:
    from pykvm.vm import Vm

VIRTIO_VENDOR = 0x1AF4
MODERN_DEVICE_BASE = 0x1040
LEGACY_DEVICE_IDS = {v.TYPE_NET: 0x1000, v.TYPE_BLOCK: 0x1001}
CLASS_CODES = {v.TYPE_NET: 0x020000, v.TYPE_BLOCK: 0x010000}

LEGACY_BAR, MSIX_BAR, MODERN_BAR = 0, 1, 4
MODERN_BAR_SIZE = 0x4000
COMMON_CFG, ISR_CFG, DEVICE_CFG, NOTIFY_CFG = 0x0000, 0x1000, 0x2000, 0x3000
REGION_SIZE = 0x1000
NOTIFY_OFF_MULTIPLIER = 4
MSIX_PBA_OFFSET = 0x800

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

# Legacy registers (virtio 0.9.5 / 1.x 4.1.4.8)
L_HOST_FEATURES, L_GUEST_FEATURES, L_QUEUE_PFN, L_QUEUE_NUM = 0x00, 0x04, 0x08, 0x0C
L_QUEUE_SEL, L_QUEUE_NOTIFY, L_STATUS, L_ISR = 0x0E, 0x10, 0x12, 0x13
L_CONFIG_VECTOR, L_QUEUE_VECTOR = 0x14, 0x16
LEGACY_VRING_ALIGN = 4096

ISR_QUEUE, ISR_CONFIG = 0x1, 0x2
NO_VECTOR = 0xFFFF


@dataclass
class QueueRegisters:
    size: int
    enabled: bool
    desc: int
    avail: int
    used: int
    vector: int
    ring: QueueState | None  # the live ring's indices, once the driver is running


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
    queues: list[QueueRegisters]


class _Queue:
    """The transport's registers for one queue, and its live SplitQueue once enabled."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.reset()
        self.eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def reset(self) -> None:
        self.size = self.max_size
        self.enabled = False
        self.desc = self.avail = self.used = 0
        self.vector = NO_VECTOR
        self.ring: SplitQueue | None = None


class VirtioPciFunction(PciFunction):
    state_type = VirtioPciState
    def __init__(self, device: v.VirtioDevice, vm: Vm, *, legacy: bool = True, ioeventfd: bool = True) -> None:
        kind = device.device_type
        super().__init__(
            vendor=VIRTIO_VENDOR,
            device=LEGACY_DEVICE_IDS[kind] if legacy else MODERN_DEVICE_BASE + kind,
            class_code=CLASS_CODES[kind],
            revision=0 if legacy else 1,
            subsystem_vendor=VIRTIO_VENDOR,
            subsystem=kind,  # legacy drivers identify the device type by subsystem ID
        )
        self.device, self.vm, self.memory = device, vm, vm.memory
        self.legacy, self.use_ioeventfd = legacy, ioeventfd
        self.offered = device.features | v.F_VERSION_1 | v.F_RING_EVENT_IDX | v.F_RING_INDIRECT_DESC
        self.queues = [_Queue(size) for size in device.queue_sizes]
        self.status = 0
        self.isr = 0
        self.config_generation = 0
        self.config_vector = NO_VECTOR
        self.device_feature_select = self.driver_feature_select = 0
        self.driver_features = 0
        self.queue_select = 0
        self._ioeventfds: list[tuple[int, int, int, bool, int | None]] = []
        device.interrupt = self._queue_interrupt

        if legacy:
            self.add_bar(Bar(LEGACY_BAR, _pow2(max(0x20, L_CONFIG_VECTOR + 4 + len(device.config_bytes()))), io=True))
        self.add_bar(Bar(MSIX_BAR, 0x1000))
        self.add_bar(Bar(MODERN_BAR, MODERN_BAR_SIZE, mem64=True, prefetchable=True))
        self._add_virtio_cap(CAP_COMMON, COMMON_CFG, COMMON_CFG_SIZE)
        self._add_virtio_cap(CAP_ISR, ISR_CFG, 1)
        self._add_virtio_cap(CAP_DEVICE, DEVICE_CFG, max(len(device.config_bytes()), 4))
        self._add_virtio_cap(CAP_NOTIFY, NOTIFY_CFG, NOTIFY_OFF_MULTIPLIER * len(self.queues),
                             extra=struct.pack("<I", NOTIFY_OFF_MULTIPLIER))
        self._pci_cfg_cap = self._add_virtio_cap(CAP_PCI_CFG, 0, 0, extra=bytes(4), writable_window=True)
        self.msix = MsixTable(self, len(self.queues) + 1, MSIX_BAR, 0, MSIX_PBA_OFFSET)
        self.msix.send_msi = self._send_msi
        self._io = _IoThread(self)

    def _add_virtio_cap(self, cfg_type: int, offset: int, length: int, *, extra: bytes = b"",
                        writable_window: bool = False) -> int:
        """A virtio_pci_cap (cap_len, cfg_type, bar, id, padding, offset, length) + `extra`."""
        body = struct.pack("<BBBB2xII", 16 + len(extra), cfg_type, MODERN_BAR, 0, offset, length) + extra
        writable = None
        if writable_window:  # VIRTIO_PCI_CAP_PCI_CFG: bar, offset, length and the data window
            writable = bytes([0, 0, 0xFF, 0, 0, 0]) + b"\xff" * 12
        return self.add_capability(CAP_VENDOR, body, writable)

    # -- BAR accesses -----------------------------------------------------------------------------

    def bar_read(self, index: int, offset: int, size: int) -> int:
        with self.lock:
            if index == MODERN_BAR:
                return self._modern_read(offset, size)
            if index == MSIX_BAR:
                return self.msix.read(offset, size)
            return self._legacy_read(offset, size)

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        with self.lock:
            if index == MODERN_BAR:
                self._modern_write(offset, size, value)
            elif index == MSIX_BAR:
                self.msix.write(offset, size, value)
            else:
                self._legacy_write(offset, size, value)

    def _modern_read(self, offset: int, size: int) -> int:
        region, at = offset & ~(REGION_SIZE - 1), offset & (REGION_SIZE - 1)
        if region == COMMON_CFG:
            return self._common_read(at, size)
        if region == ISR_CFG:
            return self._read_isr()
        if region == DEVICE_CFG:
            return _slice(self.device.config_bytes(), at, size)
        return 0

    def _modern_write(self, offset: int, size: int, value: int) -> None:
        region, at = offset & ~(REGION_SIZE - 1), offset & (REGION_SIZE - 1)
        if region == COMMON_CFG:
            self._common_write(at, size, value)
        elif region == DEVICE_CFG:
            self.device.config_write(at, value.to_bytes(size, "little"))
        elif region == NOTIFY_CFG:
            self._kick(at // NOTIFY_OFF_MULTIPLIER)

    def _selected(self) -> _Queue | None:
        return self.queues[self.queue_select] if self.queue_select < len(self.queues) else None

    def _common_read(self, at: int, size: int) -> int:
        q = self._selected()
        if at == DEVICE_FEATURE_SELECT:
            return self.device_feature_select
        if at == DEVICE_FEATURE:
            return (self.offered >> (32 * self.device_feature_select)) & 0xFFFF_FFFF if self.device_feature_select < 2 else 0
        if at == DRIVER_FEATURE_SELECT:
            return self.driver_feature_select
        if at == DRIVER_FEATURE:
            return (self.driver_features >> (32 * self.driver_feature_select)) & 0xFFFF_FFFF if self.driver_feature_select < 2 else 0
        if at == CONFIG_MSIX_VECTOR:
            return self.config_vector
        if at == NUM_QUEUES:
            return len(self.queues)
        if at == DEVICE_STATUS:
            return self.status
        if at == CONFIG_GENERATION:
            return self.config_generation
        if at == QUEUE_SELECT:
            return self.queue_select
        if q is None:
            return 0
        if at == QUEUE_SIZE:
            return q.size
        if at == QUEUE_MSIX_VECTOR:
            return q.vector
        if at == QUEUE_ENABLE:
            return int(q.enabled)
        if at == QUEUE_NOTIFY_OFF:
            return self.queue_select
        for base, value in ((QUEUE_DESC, q.desc), (QUEUE_DRIVER, q.avail), (QUEUE_DEVICE, q.used)):
            if base <= at < base + 8:
                return (value >> (8 * (at - base))) & ((1 << (8 * size)) - 1)
        return 0

    def _common_write(self, at: int, size: int, value: int) -> None:
        q = self._selected()
        if at == DEVICE_FEATURE_SELECT:
            self.device_feature_select = value
        elif at == DRIVER_FEATURE_SELECT:
            self.driver_feature_select = value
        elif at == DRIVER_FEATURE:
            if self.driver_feature_select < 2 and not self.status & v.STATUS_FEATURES_OK:
                shift = 32 * self.driver_feature_select
                self.driver_features = (self.driver_features & ~(0xFFFF_FFFF << shift)) | (value << shift)
        elif at == CONFIG_MSIX_VECTOR:
            self.config_vector = value if value < self.msix.vectors else NO_VECTOR
        elif at == DEVICE_STATUS:
            self._write_status(value & 0xFF)
        elif at == QUEUE_SELECT:
            self.queue_select = value
        elif q is None or self.status & v.STATUS_DRIVER_OK and at != QUEUE_MSIX_VECTOR:
            return  # queue registers are frozen once the driver is running
        elif at == QUEUE_SIZE:
            q.size = value
        elif at == QUEUE_MSIX_VECTOR:
            q.vector = value if value < self.msix.vectors else NO_VECTOR
        elif at == QUEUE_ENABLE:
            if value == 1:
                q.enabled = True
        else:
            for base, name in ((QUEUE_DESC, "desc"), (QUEUE_DRIVER, "avail"), (QUEUE_DEVICE, "used")):
                if base <= at < base + 8:
                    shift, mask = 8 * (at - base), (1 << (8 * size)) - 1
                    setattr(q, name, (getattr(q, name) & ~(mask << shift)) | (value << shift))

    def _write_status(self, status: int) -> None:
        if status == 0:
            self._reset()
            return
        if status & v.STATUS_FEATURES_OK and not self.status & v.STATUS_FEATURES_OK:
            # Only modern drivers set FEATURES_OK, and a modern driver must accept VERSION_1.
            if self.driver_features & ~self.offered or not self.driver_features & v.F_VERSION_1:
                status &= ~v.STATUS_FEATURES_OK  # refused: the driver sees FEATURES_OK did not stick
        if status & v.STATUS_DRIVER_OK and not self.status & v.STATUS_DRIVER_OK:
            self.status = status
            self._activate()
            return
        self.status = status | (self.status & v.STATUS_NEEDS_RESET)

    def _activate(self) -> None:
        event_idx = bool(self.driver_features & v.F_RING_EVENT_IDX)
        indirect = bool(self.driver_features & v.F_RING_INDIRECT_DESC)
        rings: list[SplitQueue | None] = []
        try:
            for i, q in enumerate(self.queues):
                if q.size > q.max_size:
                    raise QueueError(f"queue {i}: size {q.size} above the maximum {q.max_size}")
                q.ring = SplitQueue(self.memory, q.size, q.desc, q.avail, q.used, event_idx=event_idx,
                                    indirect=indirect) if q.enabled else None
                rings.append(q.ring)
        except QueueError as error:
            self.needs_reset(str(error))
            return
        self.device.activate(self.memory, rings, self.driver_features)
        self._register_ioeventfds()
        self._io.start()
        for i, q in enumerate(self.queues):
            if q.ring is not None:
                os.eventfd_write(q.eventfd, 1)  # serve buffers made available before DRIVER_OK

    def _reset(self) -> None:
        self._io.stop()
        self._unregister_ioeventfds()
        self.device.reset()
        for q in self.queues:
            q.reset()
        self.status = self.isr = 0
        self.driver_features = 0
        self.config_vector = NO_VECTOR
        self.queue_select = 0
        self.set_intx(False)

    def needs_reset(self, reason: str) -> None:
        """The driver broke the rules: stop serving, tell it (virtio 1.x 2.1.2), keep the VMM up."""
        v.log.error("virtio-%s (slot %d): %s; device needs reset", self.device.name, self.slot, reason)
        self.status |= v.STATUS_NEEDS_RESET
        for q in self.queues:
            q.ring = None
        self.device.queues = [None] * len(self.queues)
        self.config_generation = (self.config_generation + 1) & 0xFF
        self._interrupt(self.config_vector, ISR_CONFIG)

    # -- state (machine quiesced: vCPUs paused and this function's lock held) ---------------------

    def save_state(self) -> VirtioPciState:
        queues = [QueueRegisters(q.size, q.enabled, q.desc, q.avail, q.used, q.vector, self._ring_state(i))
                  for i, q in enumerate(self.queues)]
        return VirtioPciState(self.save_pci_state(), self.status, self.isr, self.config_generation,
                              self.config_vector, self.device_feature_select, self.driver_feature_select,
                              self.driver_features, self.queue_select, queues)

    def _ring_state(self, index: int) -> QueueState | None:
        """The ring's indices, with chains taken but not completed (an output the FT gate holds)
        given back, so that whoever restores this state serves them again."""
        ring = self.queues[index].ring
        if ring is None:
            return None
        state = ring.state()
        state.next_avail = (state.next_avail - self.device.in_flight(index)) & 0xFFFF
        return state

    def restore_state(self, state: VirtioPciState) -> None:
        """Become the saved device: registers, rings (chains the guest made available but we had not
        taken are served right away), and a running I/O thread if the driver was running."""
        if len(state.queues) != len(self.queues):
            raise StateError(f"virtio-{self.device.name} state has {len(state.queues)} queues, expected {len(self.queues)}")
        with self.lock:
            self._io.stop()
            self._unregister_ioeventfds()
            self.device.reset()
            self.restore_pci_state(state.pci)
            (self.status, self.isr, self.config_generation, self.config_vector, self.device_feature_select,
             self.driver_feature_select, self.driver_features, self.queue_select) = (
                state.status, state.isr, state.config_generation, state.config_vector, state.device_feature_select,
                state.driver_feature_select, state.driver_features, state.queue_select)
            for q, saved in zip(self.queues, state.queues):
                q.size, q.enabled, q.desc, q.avail, q.used, q.vector = (
                    saved.size, saved.enabled, saved.desc, saved.avail, saved.used, saved.vector)
                try:
                    q.ring = SplitQueue.from_state(self.memory, saved.ring) if saved.ring is not None else None
                except QueueError as error:
                    raise StateError(f"virtio-{self.device.name}: {error}") from None
            if self.status & v.STATUS_DRIVER_OK and not self.status & v.STATUS_NEEDS_RESET:
                self.device.activate(self.memory, [q.ring for q in self.queues], self.driver_features)
                self._register_ioeventfds()
                self._io.start()
                for q in self.queues:
                    if q.ring is not None:
                        os.eventfd_write(q.eventfd, 1)

    # -- legacy interface -------------------------------------------------------------------------

    def _legacy_config_offset(self) -> int:
        return L_CONFIG_VECTOR + 4 if self.msix.enabled else L_CONFIG_VECTOR

    def _legacy_read(self, offset: int, size: int) -> int:
        q = self._selected()
        config_at = self._legacy_config_offset()
        if offset >= config_at:
            return _slice(self.device.config_bytes(), offset - config_at, size)
        if offset == L_HOST_FEATURES:
            return self.offered & 0xFFFF_FFFF
        if offset == L_GUEST_FEATURES:
            return self.driver_features & 0xFFFF_FFFF
        if offset == L_QUEUE_PFN:
            return q.desc // LEGACY_VRING_ALIGN if q is not None and q.enabled else 0
        if offset == L_QUEUE_NUM:
            return q.max_size if q is not None else 0
        if offset == L_QUEUE_SEL:
            return self.queue_select
        if offset == L_STATUS:
            return self.status
        if offset == L_ISR:
            return self._read_isr()
        if offset == L_CONFIG_VECTOR:
            return self.config_vector
        if offset == L_QUEUE_VECTOR:
            return q.vector if q is not None else NO_VECTOR
        return 0

    def _legacy_write(self, offset: int, size: int, value: int) -> None:
        q = self._selected()
        config_at = self._legacy_config_offset()
        if offset >= config_at:
            self.device.config_write(offset - config_at, value.to_bytes(size, "little"))
        elif offset == L_GUEST_FEATURES:
            self.driver_features = value & self.offered & 0xFFFF_FFFF
        elif offset == L_QUEUE_PFN and q is not None:
            if value == 0:
                q.reset()
            else:  # legacy rings: one contiguous area, the used ring on the next 4 KiB boundary
                q.size = q.max_size
                q.desc = value * LEGACY_VRING_ALIGN
                q.avail = q.desc + 16 * q.size
                q.used = -(-(q.avail + 6 + 2 * q.size) // LEGACY_VRING_ALIGN) * LEGACY_VRING_ALIGN
                q.enabled = True
        elif offset == L_QUEUE_SEL:
            self.queue_select = value
        elif offset == L_QUEUE_NOTIFY:
            self._kick(value)
        elif offset == L_STATUS:
            self._write_status(value & 0xFF)
        elif offset == L_CONFIG_VECTOR:
            self.config_vector = value if value < self.msix.vectors else NO_VECTOR
        elif offset == L_QUEUE_VECTOR and q is not None:
            q.vector = value if value < self.msix.vectors else NO_VECTOR

    # -- PCI configuration access window (VIRTIO_PCI_CAP_PCI_CFG) ---------------------------------

    def config_read(self, offset: int, size: int) -> int:
        window = self._pci_cfg_cap + 16
        if window <= offset < window + 4:
            bar, at, length = self._pci_cfg_target()
            return self.bar_read(bar, at, length) if bar in self.bars else 0
        return super().config_read(offset, size)

    def config_written(self, offset: int, size: int) -> None:
        window = self._pci_cfg_cap + 16
        if window <= offset < window + 4:
            bar, at, length = self._pci_cfg_target()
            if bar in self.bars:
                value = int.from_bytes(self.config[window : window + length], "little")
                self.bar_write(bar, at, length, value)
        if offset <= self.msix.cap + 3 and offset + size > self.msix.cap + 2:
            self.msix.deliver_unmasked_pending()

    def _pci_cfg_target(self) -> tuple[int, int, int]:
        cap = self._pci_cfg_cap
        bar, at, length = self.config[cap + 4], *struct.unpack_from("<II", self.config, cap + 8)
        return bar, at, length if length in (1, 2, 4) else 4

    # -- notifications and interrupts -------------------------------------------------------------

    def _kick(self, index: int) -> None:
        """A notify that reached Python (ioeventfds off, or another access width), on the vCPU
        thread with the function lock held: serve the queue right here. Handing it to the I/O
        thread would cost a wake-up and a context switch per notify, and on a busy host the I/O
        thread then waits for a CPU while the vCPU spins on the one it has; here the work runs on
        the vCPU's own CPU time. The I/O thread still serves ioeventfd notifies and backend input;
        it is told when the model now wants other backend fds watched (rx buffers came)."""
        if index >= len(self.queues) or not self.status & v.STATUS_DRIVER_OK or self.status & v.STATUS_NEEDS_RESET:
            return  # nothing runs yet (DRIVER_OK kicks every queue) or any more (until a reset)
        device = self.device
        fds = device.backend_fds()
        watched = [device.wants_backend(fd) for fd in fds]
        try:
            device.queue_notified(index)
        except QueueError as error:
            self.needs_reset(str(error))
            return
        if fds and watched != [device.wants_backend(fd) for fd in fds]:
            self._io.rearm()

    def _register_ioeventfds(self) -> None:
        if not self.use_ioeventfd:
            return
        targets = []
        modern = self.bars[MODERN_BAR]
        if modern.mapped_at is not None:
            for i, q in enumerate(self.queues):
                targets.append((q.eventfd, modern.mapped_at + NOTIFY_CFG + NOTIFY_OFF_MULTIPLIER * i, 2, False, None))
        legacy = self.bars.get(LEGACY_BAR)
        if legacy is not None and legacy.mapped_at is not None:
            for i, q in enumerate(self.queues):
                targets.append((q.eventfd, legacy.mapped_at + L_QUEUE_NOTIFY, 2, True, i))
        for fd, addr, length, pio, datamatch in targets:
            try:
                self.vm.fd.register_ioeventfd(fd, addr, length, pio=pio, datamatch=datamatch)
            except KvmError as error:  # fall back to notifies through Python, which work the same
                v.log.warning("virtio-%s: ioeventfd at %#x unavailable (%s)", self.device.name, addr, error)
                continue
            self._ioeventfds.append((fd, addr, length, pio, datamatch))

    def _unregister_ioeventfds(self) -> None:
        for fd, addr, length, pio, datamatch in self._ioeventfds:
            self.vm.fd.unregister_ioeventfd(fd, addr, length, pio=pio, datamatch=datamatch)
        self._ioeventfds = []

    def rearm(self) -> None:
        """The device's set of backend fds changed: the I/O thread looks again."""
        self._io.rearm()

    def bar_moved(self, bar: Bar) -> None:
        if self._ioeventfds:
            self._unregister_ioeventfds()
            self._register_ioeventfds()

    def _queue_interrupt(self, index: int) -> None:
        with self.lock:
            self._interrupt(self.queues[index].vector, ISR_QUEUE)

    def _interrupt(self, vector: int, isr_bit: int) -> None:
        if self.msix.enabled:
            self.msix.notify(vector)
        else:
            self.isr |= isr_bit
            self.set_intx(True)

    def _read_isr(self) -> int:
        isr, self.isr = self.isr, 0  # reading acknowledges (and lowers INTx)
        if isr:
            self.set_intx(False)
        return isr

    def _send_msi(self, address: int, data: int) -> None:
        self.vm.fd.signal_msi(address, data)

    def close(self) -> None:
        with self.lock:
            self._io.stop()
            self._unregister_ioeventfds()
        self.device.close()
        for q in self.queues:
            os.close(q.eventfd)


class _IoThread:
    """The device's worker: waits on the queue eventfds and the backend's fds, calls the model.

    It calls the model with the function lock held, as a vCPU serving a notify in its exit does
    (VirtioPciFunction._kick), so a model never runs concurrently with itself or with register
    accesses from a vCPU.
    """

    def __init__(self, function: VirtioPciFunction) -> None:
        self.function = function
        self.thread: threading.Thread | None = None
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._stopping = False

    def start(self) -> None:
        if self.thread is not None:
            return
        self._stopping = False
        self.thread = threading.Thread(target=self._loop, name=f"virtio-{self.function.device.name}", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Stop and join (callable with the function lock held: the loop never waits for it
        while it is stopping)."""
        thread = self.thread
        if thread is None:
            return
        self._stopping = True
        os.eventfd_write(self._wake, 1)
        if thread is not threading.current_thread():
            _join_releasing(thread, self.function.lock)
        self.thread = None

    def rearm(self) -> None:
        """The set of fds to watch may have changed (e.g. rx buffers arrived)."""
        os.eventfd_write(self._wake, 1)

    def _loop(self) -> None:
        function = self.function
        device = function.device
        queue_fds = {q.eventfd: i for i, q in enumerate(function.queues)}
        poller = select.epoll()
        try:
            poller.register(self._wake, select.EPOLLIN)
            for fd in queue_fds:
                poller.register(fd, select.EPOLLIN)
            watched: set[int] = set()
            while not self._stopping:
                with function.lock:
                    wanted = {fd for fd in device.backend_fds() if device.wants_backend(fd)}
                for fd in watched - wanted:
                    try:
                        poller.unregister(fd)
                    except OSError:
                        pass  # the backend was closed (detached): epoll already forgot it
                for fd in wanted - watched:
                    poller.register(fd, select.EPOLLIN)
                watched = wanted
                for fd, _ in poller.poll():
                    if self._stopping:
                        return
                    if fd == self._wake:
                        _drain(fd)
                        continue
                    with function.lock:
                        if not function.status & v.STATUS_DRIVER_OK or function.status & v.STATUS_NEEDS_RESET:
                            if fd in queue_fds:
                                _drain(fd)
                            continue
                        try:
                            if fd in queue_fds:
                                _drain(fd)
                                device.queue_notified(queue_fds[fd])
                            else:
                                device.backend_ready(fd)
                        except QueueError as error:
                            function.needs_reset(str(error))
        finally:
            poller.close()


def _join_releasing(thread: threading.Thread, lock: threading.RLock) -> None:
    """Join `thread` even if the caller holds `lock` (which the thread may be waiting for)."""
    depth = 0
    while lock._is_owned():  # type: ignore[attr-defined]
        lock.release()
        depth += 1
    try:
        thread.join()
    finally:
        for _ in range(depth):
            lock.acquire()


def _drain(fd: int) -> None:
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass


def _slice(data: bytes, offset: int, size: int) -> int:
    return int.from_bytes(data[offset : offset + size].ljust(size, b"\0"), "little")


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()
