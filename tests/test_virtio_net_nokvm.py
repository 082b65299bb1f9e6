"""The virtio-net model on guest RAM without KVM or a transport: a driver's side of the rings
written here, a real Unix datagram socket as the wire, and the model called as its I/O thread
calls it. What is checked is what a guest would see: which frames land in which buffers, and
when its interrupts come, counted in used entries."""

from __future__ import annotations

import socket
import struct

import pytest

from pykvm.devices import virtio as v
from pykvm.devices.net_backends import SocketBackend
from pykvm.devices.virtio.net import F_MRG_RXBUF, HEADER_SIZE, RX, TX, Net
from pykvm.devices.virtio.virtqueue import DESC_F_NEXT, DESC_F_WRITE, SplitQueue
from pykvm.memory import GuestMemory

pytestmark = pytest.mark.nokvm

SIZE = 16
RINGS_AT = {RX: 0x10000, TX: 0x20000}  # descriptor table; avail after it, used at +0x1000
BUFFERS_AT = {RX: 0x100000, TX: 0x200000}
BUFFER = 2048


class Driver:
    """The guest's side of both rings, with event index: interrupts on for the next used entry."""

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory
        self.avail_idx = {RX: 0, TX: 0}
        self.queues = [SplitQueue(memory, SIZE, base, base + 16 * SIZE, base + 0x1000, event_idx=True)
                       for base in (RINGS_AT[RX], RINGS_AT[TX])]

    def used_idx(self, queue: int) -> int:
        return struct.unpack("<H", self.memory.read(RINGS_AT[queue] + 0x1000 + 2, 2))[0]

    def notify_wanted(self, queue: int) -> bool:
        """Whether the driver must notify the device of the next buffer it adds (2.7.10)."""
        if self.queues[queue].event_idx:
            avail_event = struct.unpack("<H", self.memory.read(RINGS_AT[queue] + 0x1000 + 4 + 8 * SIZE, 2))[0]
            return avail_event == self.avail_idx[queue]  # need_event(avail_event, idx + 1, idx)
        return not struct.unpack("<H", self.memory.read(RINGS_AT[queue] + 0x1000, 2))[0] & 1  # NO_NOTIFY

    def used(self, queue: int, entry: int) -> tuple[int, int]:
        return struct.unpack("<II", self.memory.read(RINGS_AT[queue] + 0x1000 + 4 + 8 * entry, 8))

    def _make_available(self, queue: int, head: int) -> None:
        avail = RINGS_AT[queue] + 16 * SIZE
        idx = self.avail_idx[queue]
        self.memory.write(avail + 4 + 2 * (idx % SIZE), struct.pack("<H", head))
        self.avail_idx[queue] = idx + 1
        self.memory.write(avail + 2, struct.pack("<H", idx + 1))

    def post_rx(self, count: int) -> None:
        for i in range(count):
            self.memory.write(RINGS_AT[RX] + 16 * i, struct.pack("<QIHH", BUFFERS_AT[RX] + i * BUFFER, BUFFER,
                                                                 DESC_F_WRITE, 0))
            self._make_available(RX, i)

    def send(self, frame: bytes) -> None:
        """Queue a frame (header, then the frame) on the tx ring, without a notify."""
        head = 2 * self.avail_idx[TX]
        header, body = BUFFERS_AT[TX] + head * BUFFER, BUFFERS_AT[TX] + (head + 1) * BUFFER
        self.memory.write(header, bytes(HEADER_SIZE))
        self.memory.write(body, frame)
        self.memory.write(RINGS_AT[TX] + 16 * head, struct.pack("<QIHH", header, HEADER_SIZE, DESC_F_NEXT, head + 1))
        self.memory.write(RINGS_AT[TX] + 16 * (head + 1), struct.pack("<QIHH", body, len(frame), 0, 0))
        self._make_available(TX, head)

    def received(self, entry: int) -> bytes:
        head, length = self.used(RX, entry)
        data = self.memory.read(BUFFERS_AT[RX] + head * BUFFER, length)
        assert struct.unpack_from("<H", data, HEADER_SIZE - 2)[0] == 1  # num_buffers
        return data[HEADER_SIZE:]


@pytest.fixture
def wire(tmp_path):
    """(net model, driver, the peer's socket, the model's socket path), the model running."""
    vm_path, peer_path = str(tmp_path / "vm.sock"), str(tmp_path / "peer.sock")
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    peer.bind(peer_path)
    peer.setblocking(False)
    memory = GuestMemory(4 << 20)
    net = Net(SocketBackend(vm_path, peer_path), bytes.fromhex("525400123456"))
    driver = Driver(memory)
    yield net, driver, peer, vm_path
    net.close()
    peer.close()
    memory.close()


def frames(count: int) -> list[bytes]:
    return [bytes.fromhex("525400123456525400000002") + struct.pack("!HI", 0x0800, i) + bytes(60)
            for i in range(count)]


def test_the_guest_is_interrupted_at_its_first_frame_not_after_the_batch(wire):
    net, driver, peer, vm_path = wire
    interrupts: list[tuple[int, int]] = []  # (queue, rx used index when raised)
    net.activate(driver.memory, driver.queues, v.F_VERSION_1 | v.F_RING_EVENT_IDX | F_MRG_RXBUF,
                 lambda queue: interrupts.append((queue, driver.used_idx(RX))))
    driver.post_rx(8)
    waiting = frames(3)
    for frame in waiting:
        peer.sendto(frame, vm_path)
    net.backend_ready(net.backend.fileno())
    assert interrupts == [(RX, 1)]  # not (RX, 3): the guest starts on frame 0 while 1 and 2 land
    assert [driver.received(i) for i in range(3)] == waiting


def test_a_reply_queued_while_frames_arrive_goes_out_before_the_next_frame_lands(wire):
    net, driver, peer, vm_path = wire
    sent_at: list[int] = []  # rx used index when each frame reached the wire

    def guest_interrupt(queue: int) -> None:
        if queue == RX:  # the guest answers the first frame at once, and notifies nobody
            driver.send(b"reply to " + driver.received(0)[:20])

    net.activate(driver.memory, driver.queues, v.F_VERSION_1 | v.F_RING_EVENT_IDX | F_MRG_RXBUF, guest_interrupt)
    backend_send = net.backend.send
    net.backend.send = lambda views: (sent_at.append(driver.used_idx(RX)), backend_send(views))
    driver.post_rx(8)
    waiting = frames(3)
    for frame in waiting:
        peer.sendto(frame, vm_path)
    net.backend_ready(net.backend.fileno())
    assert peer.recv(2048) == b"reply to " + waiting[0][:20]
    assert sent_at == [1]  # between the first frame and the second
    assert driver.used_idx(TX) == 1
    assert [driver.received(i) for i in range(3)] == waiting
