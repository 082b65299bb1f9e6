"""The virtio-blk model on guest RAM without KVM or a transport: a driver's side of the ring
written here, a real disk file, and the model called as a notify calls it. What is checked is
what a guest and the disk would show: the bytes in the file and in the read buffers, each
request's status and used entry, and which write ranges FT is told of."""

from __future__ import annotations

import os
import struct

import pytest

from pykvm.devices import virtio as v
from pykvm.devices.virtio import blk
from pykvm.devices.virtio.blk import Blk, DiskImage, DiskSpec, Run, Transfer
from pykvm.devices.virtio.virtqueue import DESC_F_NEXT, DESC_F_WRITE, SplitQueue
from pykvm.memory import GuestMemory

pytestmark = pytest.mark.nokvm

SIZE = 64
RING_AT, DATA_AT = 0x10000, 0x100000
CHUNK = 64 << 10  # each request's data
DISK_BYTES = 8 << 20


class Driver:
    """The guest's side of one request queue: request i uses descriptors 3i (header), 3i+1
    (data) and 3i+2 (status), and data at DATA_AT + i * CHUNK."""

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory
        self.queue = SplitQueue(memory, SIZE, RING_AT, RING_AT + 16 * SIZE, RING_AT + 0x1000)
        self.count = 0

    def request(self, kind: int, sector: int, data: bytes = b"") -> int:
        """Queue one read (CHUNK bytes) or write (`data`), without a notify; returns its number."""
        i = self.count
        header, buffer, status = RING_AT + 0x2000 + 16 * i, DATA_AT + i * CHUNK, RING_AT + 0x3000 + i
        self.memory.write(header, struct.pack("<IIQ", kind, 0, sector))
        self.memory.write(buffer, data or bytes(CHUNK))
        self.memory.write(status, b"\xff")
        table = RING_AT + 16 * 3 * i
        self.memory.write(table, struct.pack("<QIHH", header, 16, DESC_F_NEXT, 3 * i + 1))
        data_flags = DESC_F_NEXT | (0 if data else DESC_F_WRITE)
        self.memory.write(table + 16, struct.pack("<QIHH", buffer, len(data) or CHUNK, data_flags, 3 * i + 2))
        self.memory.write(table + 32, struct.pack("<QIHH", status, 1, DESC_F_WRITE, 0))
        avail = RING_AT + 16 * SIZE
        self.memory.write(avail + 4 + 2 * i, struct.pack("<H", 3 * i))
        self.memory.write(avail + 2, struct.pack("<H", i + 1))
        self.count += 1
        return i

    def used(self) -> list[tuple[int, int]]:
        """The used entries (request number, length) in the order the device returned them."""
        used = RING_AT + 0x1000
        count = struct.unpack("<H", self.memory.read(used + 2, 2))[0]
        entries = [struct.unpack("<II", self.memory.read(used + 4 + 8 * n, 8)) for n in range(count)]
        return [(head // 3, length) for head, length in entries]

    def status(self, i: int) -> int:
        return self.memory.read(RING_AT + 0x3000 + i, 1)[0]

    def data(self, i: int) -> bytes:
        return self.memory.read(DATA_AT + i * CHUNK, CHUNK)


@pytest.fixture
def disk(tmp_path):
    """(model, driver, disk path, the write ranges FT would be told of), the model running."""
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(DISK_BYTES))
    memory = GuestMemory(4 << 20)
    device = Blk(DiskImage(DiskSpec(str(path))))
    writes: list[tuple[int, int]] = []
    device.write_observer = lambda offset, length: writes.append((offset, length))
    driver = Driver(memory)
    device.activate(memory, [driver.queue], v.F_VERSION_1, lambda queue: None)
    yield device, driver, path, writes
    device.close()
    memory.close()


def pattern(seed: int) -> bytes:
    return bytes((seed + i * 7) & 0xFF for i in range(256)) * (CHUNK // 256)


SECTORS = CHUNK // blk.SECTOR


def test_writes_next_to_each_other_share_one_call_and_each_completes(disk):
    """Four writes of consecutive sectors, one elsewhere, then two reads of consecutive sectors:
    a pwritev for the four, one for the lone write, a preadv for the two reads; every request
    returned in ring order with its own status, and FT told of each write's own range."""
    device, driver, path, writes = disk
    for n in range(4):
        driver.request(blk.T_OUT, n * SECTORS, pattern(n))
    driver.request(blk.T_OUT, 64 * SECTORS, pattern(9))
    driver.request(blk.T_IN, 1 * SECTORS)
    driver.request(blk.T_IN, 2 * SECTORS)
    device.queue_notified(0, guest_waits=True)
    assert driver.used() == [(0, 1), (1, 1), (2, 1), (3, 1), (4, 1), (5, CHUNK + 1), (6, CHUNK + 1)]
    assert [driver.status(i) for i in range(7)] == [blk.S_OK] * 7
    assert (device.requests, device.merged) == (7, 6)  # the four writes and the two reads
    contents = path.read_bytes()
    assert [contents[n * CHUNK : (n + 1) * CHUNK] for n in range(4)] == [pattern(n) for n in range(4)]
    assert contents[64 * CHUNK : 65 * CHUNK] == pattern(9)
    assert (driver.data(5), driver.data(6)) == (pattern(1), pattern(2))
    assert writes == [(n * CHUNK, CHUNK) for n in range(4)] + [(64 * CHUNK, CHUNK)]


def test_a_read_after_writes_to_the_same_sectors_sees_them(disk):
    """A read is never merged into a run of writes: it is served after them, in ring order."""
    device, driver, _, _ = disk
    driver.request(blk.T_OUT, 0, pattern(1))
    driver.request(blk.T_OUT, SECTORS, pattern(2))
    driver.request(blk.T_IN, SECTORS)
    device.queue_notified(0)
    assert driver.data(2) == pattern(2)


def test_a_merged_write_that_fails_is_served_again_one_by_one(disk):
    """A failing call does not give one status to all: each request is tried on its own and
    reports its own I/O error, and FT is told of no write."""
    device, driver, path, writes = disk
    read_only = os.open(path, os.O_RDONLY)
    os.dup2(read_only, device.disk.fd)  # writes now fail (EBADF)
    os.close(read_only)
    for n in range(3):
        driver.request(blk.T_OUT, n * SECTORS, pattern(n))
    device.queue_notified(0)
    assert driver.used() == [(0, 1), (1, 1), (2, 1)]
    assert [driver.status(i) for i in range(3)] == [blk.S_IOERR] * 3
    assert device.merged == 0 and writes == []
    assert path.read_bytes() == bytes(DISK_BYTES)


def test_a_request_beyond_the_disk_ends_the_run_and_fails_alone(disk):
    device, driver, path, writes = disk
    driver.request(blk.T_OUT, 0, pattern(1))
    driver.request(blk.T_OUT, DISK_BYTES // blk.SECTOR - 1, pattern(2))  # crosses the end
    driver.request(blk.T_OUT, SECTORS, pattern(3))
    device.queue_notified(0)
    assert [driver.status(i) for i in range(3)] == [blk.S_OK, blk.S_IOERR, blk.S_OK]
    assert writes == [(0, CHUNK), (CHUNK, CHUNK)]
    assert path.read_bytes()[: 2 * CHUNK] == pattern(1) + pattern(3)


def test_runs_stay_short_while_the_guest_runs_on():
    """Served in the notifying vCPU's exit, a run grows to MERGED_BYTES (the guest waits for the
    whole drain anyway); served by the I/O thread, to MERGED_BYTES_GUEST_RUNNING, so that the
    guest gets completions while it runs. Never past MERGED_VIEWS buffers, and never across a
    gap on the disk or a change between reads and writes."""
    def write(n: int, views: int = 1) -> Transfer:
        return Transfer(None, blk.T_OUT, n * CHUNK, [memoryview(bytes(CHUNK // views))] * views, CHUNK, None)

    for most in (blk.MERGED_BYTES, blk.MERGED_BYTES_GUEST_RUNNING):
        run = Run(most)
        n = 0
        while run.joins(transfer := write(n)):
            run.add(transfer)
            n += 1
        assert run.length == most
    run = Run()
    run.add(write(0))
    assert not run.joins(write(2))  # a gap
    assert not run.joins(Transfer(None, blk.T_IN, CHUNK, [], CHUNK, None))
    run = Run()
    while run.joins(transfer := write(len(run.transfers), views=256)):
        run.add(transfer)
    assert len(run.views) == blk.MERGED_VIEWS
