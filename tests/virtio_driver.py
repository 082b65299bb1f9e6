"""A virtio-pci driver written in Python, acting on a Machine's I/O bus and guest RAM exactly as a
guest driver would (config mechanism 1, capabilities, common cfg, rings in guest memory). It lets
tests drive pykvm's devices into states a well-behaved guest never reaches (malformed chains,
rings outside RAM), with no vCPU running.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass

from pykvm.devices.pci import CONFIG_ADDRESS_PORT, CONFIG_DATA_PORT
from pykvm.devices.virtio import F_VERSION_1, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK
from pykvm.machine import Machine

DESC_F_NEXT, DESC_F_WRITE, DESC_F_INDIRECT = 1, 2, 4
RING_BASE = 0x200000  # rings and buffers live from 2 MiB on


@dataclass
class Ring:
    size: int
    desc: int
    avail: int
    used: int
    avail_idx: int = 0
    used_seen: int = 0


class PythonVirtioDriver:
    def __init__(self, machine: Machine, slot: int) -> None:
        self.machine, self.slot = machine, slot
        self.bus, self.memory = machine.vm.bus, machine.vm.memory
        self.caps = self._find_caps()
        self.rings: dict[int, Ring] = {}
        self._next_free = RING_BASE

    # -- PCI ------------------------------------------------------------------------------------------

    def config_read(self, offset: int, size: int = 4) -> int:
        self.bus.pio_write(CONFIG_ADDRESS_PORT, 4, 0x8000_0000 | (self.slot << 11) | (offset & 0xFC))
        return self.bus.pio_read(CONFIG_DATA_PORT + (offset & 3), size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        self.bus.pio_write(CONFIG_ADDRESS_PORT, 4, 0x8000_0000 | (self.slot << 11) | (offset & 0xFC))
        self.bus.pio_write(CONFIG_DATA_PORT + (offset & 3), size, value)

    def bar(self, index: int) -> int:
        low = self.config_read(0x10 + 4 * index)
        address = low & ~0xF
        if low & 0x4:
            address |= self.config_read(0x14 + 4 * index) << 32
        return address

    def _find_caps(self) -> dict[int, int]:
        """cfg_type -> absolute address of that virtio structure."""
        caps, pointer = {}, self.config_read(0x34, 1)
        while pointer:
            if self.config_read(pointer, 1) == 0x09:
                cfg_type = self.config_read(pointer + 3, 1)
                bar = self.config_read(pointer + 4, 1)
                offset = self.config_read(pointer + 8)
                caps.setdefault(cfg_type, self.bar(bar) + offset)
                if cfg_type == 2:
                    self.notify_multiplier = self.config_read(pointer + 16)
            pointer = self.config_read(pointer + 1, 1)
        return caps

    # -- common configuration -------------------------------------------------------------------------

    def common_read(self, offset: int, size: int) -> int:
        return self.bus.mmio_read(self.caps[1] + offset, size)

    def common_write(self, offset: int, size: int, value: int) -> None:
        self.bus.mmio_write(self.caps[1] + offset, size, value)

    def device_config(self, offset: int, size: int) -> int:
        return self.bus.mmio_read(self.caps[4] + offset, size)

    @property
    def status(self) -> int:
        return self.common_read(0x14, 1)

    def device_features(self) -> int:
        features = 0
        for word in (0, 1):
            self.common_write(0x00, 4, word)
            features |= self.common_read(0x04, 4) << (32 * word)
        return features

    def initialize(self, features: int = F_VERSION_1, queue_sizes: dict[int, int] | None = None) -> None:
        self.common_write(0x14, 1, 0)
        self.common_write(0x14, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER)
        for word in (0, 1):
            self.common_write(0x08, 4, word)
            self.common_write(0x0C, 4, (features >> (32 * word)) & 0xFFFF_FFFF)
        self.common_write(0x14, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
        assert self.status & STATUS_FEATURES_OK, "device refused the features"
        for index, size in (queue_sizes or {0: 16}).items():
            self.setup_queue(index, size)
        self.common_write(0x14, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK)

    def alloc(self, length: int, align: int = 16) -> int:
        address = -(-self._next_free // align) * align
        self._next_free = address + length
        return address

    def setup_queue(self, index: int, size: int, *, desc: int | None = None) -> Ring:
        ring = Ring(size, desc if desc is not None else self.alloc(16 * size),
                    self.alloc(6 + 2 * size, 2), self.alloc(6 + 8 * size, 4))
        self.common_write(0x16, 2, index)
        self.common_write(0x18, 2, size)
        for offset, value in ((0x20, ring.desc), (0x28, ring.avail), (0x30, ring.used)):
            self.common_write(offset, 4, value & 0xFFFF_FFFF)
            self.common_write(offset + 4, 4, value >> 32)
        self.common_write(0x1C, 2, 1)
        self.rings[index] = ring
        return ring

    # -- requests ---------------------------------------------------------------------------------------

    def write_descriptor(self, ring: Ring, index: int, addr: int, length: int, flags: int, next_index: int = 0,
                         table: int | None = None) -> None:
        base = ring.desc if table is None else table
        self.memory.write(base + 16 * index, struct.pack("<QIHH", addr, length, flags, next_index))

    def submit_chain(self, queue: int, buffers: list[tuple[int, int, bool]], *, notify: bool = True) -> int:
        """Put a chain of (addr, len, device_writable) on the ring from descriptor 0 up; returns
        the head. (One chain in flight per queue in these tests keeps descriptors simple.)"""
        ring = self.rings[queue]
        for i, (addr, length, writable) in enumerate(buffers):
            last = i == len(buffers) - 1
            flags = (DESC_F_WRITE if writable else 0) | (0 if last else DESC_F_NEXT)
            self.write_descriptor(ring, i, addr, length, flags, i + 1)
        self.make_available(queue, 0, notify=notify)
        return 0

    def make_available(self, queue: int, head: int, *, notify: bool = True) -> None:
        ring = self.rings[queue]
        self.memory.write_u16(ring.avail + 4 + 2 * (ring.avail_idx % ring.size), head)
        ring.avail_idx = (ring.avail_idx + 1) & 0xFFFF
        self.memory.write_u16(ring.avail + 2, ring.avail_idx)
        if notify:
            self.bus.mmio_write(self.caps[2] + self.notify_multiplier * queue, 2, queue)

    def wait_used(self, queue: int, timeout: float = 5.0) -> tuple[int, int]:
        """The next used element (id, len), waiting for the device's I/O thread to produce it."""
        ring = self.rings[queue]
        deadline = time.monotonic() + timeout
        while self.memory.read_u16(ring.used + 2) == ring.used_seen:
            if time.monotonic() > deadline:
                raise TimeoutError(f"queue {queue}: no used buffer within {timeout} s (status {self.status:#x})")
            time.sleep(0.0005)
        entry = ring.used + 4 + 8 * (ring.used_seen % ring.size)
        ring.used_seen = (ring.used_seen + 1) & 0xFFFF
        return struct.unpack("<II", self.memory.read(entry, 8))

    def wait_status(self, bits: int, timeout: float = 5.0) -> int:
        deadline = time.monotonic() + timeout
        while not self.status & bits:
            if time.monotonic() > deadline:
                raise TimeoutError(f"device status {self.status:#x} never showed {bits:#x}")
            time.sleep(0.0005)
        return self.status
