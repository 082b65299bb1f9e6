"""The FT output gate as the devices see it (devices/virtio/gate.py), driven by a Python driver
through the real bus, guest RAM, files and sockets: a queue holds every output chain the driver
queued (so one sync can release many: group commit), nothing overtakes them, each release lets
exactly the oldest go, and the saved ring position gives every held chain back."""

from __future__ import annotations

import socket
import struct
import threading

from pykvm.devices import virtio as v
from pykvm.devices.net_backends import NetSpec
from pykvm.devices.virtio import blk
from pykvm.devices.virtio.blk import DiskSpec
from pykvm.machine import Machine, MachineConfig
from tests.conftest import requires_kvm
from tests.virtio_driver import DESC_F_NEXT, DESC_F_WRITE, PythonVirtioDriver

pytestmark = requires_kvm
SLOT, TX = 1, 1


class RecordingGate:
    """A gate that only counts: releases are the test's to make."""

    def __init__(self) -> None:
        self.holds: list[int] = []
        self.held = threading.Semaphore(0)

    def hold(self, function, queue_index: int) -> None:
        self.holds.append(queue_index)
        self.held.release()

    def wait(self, count: int) -> None:
        for _ in range(count):
            assert self.held.acquire(timeout=5), f"only {len(self.holds)} holds"


def _chain(driver: PythonVirtioDriver, queue: int, first: int, buffers: list[tuple[int, int, bool]]) -> None:
    """A chain at descriptors first, first+1, ... made available (and notified)."""
    ring = driver.rings[queue]
    for i, (addr, length, writable) in enumerate(buffers):
        last = i == len(buffers) - 1
        flags = (DESC_F_WRITE if writable else 0) | (0 if last else DESC_F_NEXT)
        driver.write_descriptor(ring, first + i, addr, length, flags, first + i + 1)
    driver.make_available(queue, first)


def _next_avail(function, queue: int) -> int:
    with function.lock:
        return function.save_state().queues[queue].ring.next_avail


def test_every_queued_frame_is_held_and_each_release_lets_the_oldest_go(tmp_path):
    vm_path, peer_path = str(tmp_path / "vm.sock"), str(tmp_path / "peer.sock")
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    peer.bind(peer_path)
    peer.setblocking(False)
    spec = NetSpec("socket", vm_path, peer=peer_path, mac="52:54:00:aa:bb:cc")
    with Machine(MachineConfig(nets=(spec,)), serial_output=lambda data: None) as machine:
        function = machine.virtio[0]
        gate = RecordingGate()
        function.set_output_gate(gate)
        driver = PythonVirtioDriver(machine, SLOT)
        driver.initialize(features=v.F_VERSION_1, queue_sizes={0: 16, 1: 16})
        frames = [bytes.fromhex("ffffffffffff525400aabbcc0800") + bytes([n]) * 50 for n in range(3)]
        for n, frame in enumerate(frames):
            header, body = driver.alloc(12), driver.alloc(len(frame))
            driver.memory.write(header, bytes(12))
            driver.memory.write(body, frame)
            _chain(driver, TX, 2 * n, [(header, 12, False), (body, len(frame), False)])
        gate.wait(3)
        assert gate.holds == [TX] * 3
        assert _next_avail(function, TX) == 0  # all three given back to the ring in the saved state
        assert _received(peer) == []
        function.release_held(TX)
        assert driver.wait_used(TX) == (0, 0)
        assert _received(peer) == frames[:1]
        assert _next_avail(function, TX) == 1  # the one served is done; two still given back
        function.release_held(TX)
        function.release_held(TX)
        assert [driver.wait_used(TX)[0] for _ in range(2)] == [2, 4]
        assert _received(peer) == frames[1:]
        assert _next_avail(function, TX) == 3 and not function.device.held
    peer.close()


def test_a_read_behind_a_held_write_waits_for_it(tmp_path):
    """Shared-disk gating: a write is held; the read queued after it (not an output) is not
    served before it, and once the write is released the read sees its data."""
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(1 << 20))
    with Machine(MachineConfig(disks=(DiskSpec(str(path)),)), serial_output=lambda data: None) as machine:
        function = machine.virtio[0]
        gate = RecordingGate()
        function.set_output_gate(gate)
        driver = PythonVirtioDriver(machine, SLOT)
        driver.initialize()
        memory = driver.memory
        write_header, data, write_status = driver.alloc(16), driver.alloc(512), driver.alloc(1)
        memory.write(write_header, struct.pack("<IIQ", blk.T_OUT, 0, 3))
        memory.write(data, b"W" * 512)
        _chain(driver, 0, 0, [(write_header, 16, False), (data, 512, False), (write_status, 1, True)])
        gate.wait(1)
        read_header, into, read_status = driver.alloc(16), driver.alloc(512), driver.alloc(1)
        memory.write(read_header, struct.pack("<IIQ", blk.T_IN, 0, 3))
        _chain(driver, 0, 3, [(read_header, 16, False), (into, 512, True), (read_status, 1, True)])
        with function.lock:  # the notify was served (or is being): the read waits all the same
            assert function.device.rings[0].pending() == 1
        assert memory.read_u16(driver.rings[0].used + 2) == 0 and path.read_bytes()[3 * 512 : 4 * 512] == bytes(512)
        assert _next_avail(function, 0) == 0
        function.release_held(0)
        assert [driver.wait_used(0)[0] for _ in range(2)] == [0, 3]
        assert memory.read(into, 512) == b"W" * 512 and path.read_bytes()[3 * 512 : 4 * 512] == b"W" * 512
        assert gate.holds == [0]


def _received(peer: socket.socket) -> list[bytes]:
    frames = []
    while True:
        try:
            frames.append(peer.recv(65536))
        except BlockingIOError:
            return frames
