"""pykvm's PCI and virtio devices driven by a Python driver (tests/virtio_driver.py) through the
real I/O bus, real guest RAM, real files and sockets, and the devices' real I/O threads: data on
disk and on the wire, and a guest that breaks the rules getting NEEDS_RESET while the VMM lives."""

from __future__ import annotations

import socket
import struct
import threading

import pytest

from pykvm.devices import virtio as v
from pykvm.devices.net_backends import NetSpec
from pykvm.devices.virtio import blk
from pykvm.devices.virtio.blk import DiskSpec
from pykvm.machine import Machine, MachineConfig
from tests.conftest import requires_kvm
from tests.virtio_driver import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, PythonVirtioDriver

pytestmark = requires_kvm

BLK_SLOT, SECOND_SLOT = 1, 2


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * 4096)  # 1 MiB of a known pattern
    return path


def blk_machine(*disks: DiskSpec, **config) -> Machine:
    return Machine(MachineConfig(disks=disks, **config), serial_output=lambda data: None)


def blk_request(driver: PythonVirtioDriver, kind: int, sector: int, data: bytes = b"", read_length: int = 0,
                *, split: int = 1) -> tuple[int, bytes, int]:
    """One request, its data scattered over `split` descriptors; returns (status, read data, used len)."""
    memory = driver.memory
    header = driver.alloc(16)
    memory.write(header, struct.pack("<IIQ", kind, 0, sector))
    buffers = [(header, 16, False)]
    payload = data or bytes(read_length)
    step = -(-len(payload) // split) if payload else 0
    for start in range(0, len(payload), step or 1):
        piece = payload[start : start + step]
        addr = driver.alloc(len(piece), 1)
        memory.write(addr, piece)
        buffers.append((addr, len(piece), not data))
    status = driver.alloc(1, 1)
    memory.write(status, b"\xff")
    buffers.append((status, 1, True))
    driver.submit_chain(0, buffers)
    _, used_length = driver.wait_used(0)
    read_back = b"".join(memory.read(a, n) for a, n, w in buffers[1:-1]) if not data else b""
    return memory.read(status, 1)[0], read_back, used_length


def test_pci_enumeration_finds_host_bridge_and_virtio_blk(disk):
    with blk_machine(DiskSpec(str(disk))) as machine:
        bridge = PythonVirtioDriver.__new__(PythonVirtioDriver)
        driver = PythonVirtioDriver(machine, BLK_SLOT)
        assert driver.config_read(0) == 0x1001_1AF4  # transitional virtio-blk
        assert driver.config_read(0x2C) >> 16 == v.TYPE_BLOCK  # subsystem ID = device type
        bridge.bus = machine.vm.bus
        bridge.slot = 0
        assert PythonVirtioDriver.config_read(bridge, 0) == 0x1237_8086
        assert driver.config_read(0x3C, 1) in (5, 9, 10, 11)  # INTx line given by the "firmware"
        empty = PythonVirtioDriver.__new__(PythonVirtioDriver)
        empty.bus, empty.slot = machine.vm.bus, 5
        assert PythonVirtioDriver.config_read(empty, 0) == 0xFFFF_FFFF  # no device: all ones
        assert set(driver.caps) == {1, 2, 3, 4, 5}  # common, notify, ISR, device, PCI cfg


def test_bar_sizing_and_moving(disk):
    with blk_machine(DiskSpec(str(disk))) as machine:
        driver = PythonVirtioDriver(machine, BLK_SLOT)
        original = driver.bar(4)
        driver.config_write(0x20, 4, 0xFFFF_FFFF)
        driver.config_write(0x24, 4, 0xFFFF_FFFF)
        size_low, size_high = driver.config_read(0x20), driver.config_read(0x24)
        assert size_low & 0xF == 0xC  # 64-bit, prefetchable
        size = (~((size_high << 32) | (size_low & ~0xF)) & 0xFFFF_FFFF_FFFF_FFFF) + 1
        assert size == 0x4000
        moved = original + 0x10_0000
        driver.config_write(0x20, 4, moved & 0xFFFF_FFFF)
        driver.config_write(0x24, 4, moved >> 32)
        driver.caps = driver._find_caps()
        assert driver.caps[1] == moved  # the common cfg follows the BAR
        assert driver.common_read(0x12, 2) == 1  # num_queues, read at the new place
        assert machine.vm.bus.find_mmio(original) is None


def test_feature_negotiation_refuses_unknown_features(disk):
    with blk_machine(DiskSpec(str(disk))) as machine:
        driver = PythonVirtioDriver(machine, BLK_SLOT)
        offered = driver.device_features()
        assert offered & v.F_VERSION_1 and offered & blk.F_FLUSH
        with pytest.raises(AssertionError, match="refused"):
            driver.initialize(features=v.F_VERSION_1 | (1 << 50))
        with pytest.raises(AssertionError, match="refused"):
            driver.initialize(features=blk.F_FLUSH)  # a modern driver without VERSION_1


@pytest.mark.parametrize("split", [1, 3, 7])
def test_blk_write_read_round_trip_and_file_contents(disk, split):
    with blk_machine(DiskSpec(str(disk))) as machine:
        driver = PythonVirtioDriver(machine, BLK_SLOT)
        driver.initialize()
        assert driver.device_config(0, 8) == 2048  # capacity in sectors
        payload = bytes((i * 7) & 0xFF for i in range(4096))
        status, _, used = blk_request(driver, blk.T_OUT, 10, payload, split=split)
        assert (status, used) == (blk.S_OK, 1)
        status, _, _ = blk_request(driver, blk.T_FLUSH, 0)
        assert status == blk.S_OK
        status, data, used = blk_request(driver, blk.T_IN, 10, read_length=4096, split=split)
        assert (status, data, used) == (blk.S_OK, payload, 4097)
    contents = disk.read_bytes()
    assert contents[10 * 512 : 10 * 512 + 4096] == payload
    assert contents[:5120] == (bytes(range(256)) * 20)  # neighbours untouched


@pytest.mark.parametrize("ft", [False, True], ids=["alone", "ft-records-writes"])
def test_a_deep_queue_goes_to_the_io_thread_unless_ft_records_writes_and_a_shallow_one_stays_in_the_exit(disk, ft):
    """A notify that finds DEEP_QUEUE requests or more waiting is served by the device's I/O
    thread, which merges them while the guest runs on; fewer are served by the notifying thread
    (a vCPU, in its exit). While FT records the writes (its write observer), every notify is
    served in the exit. Either way each request completes, in order, its data on disk."""
    with blk_machine(DiskSpec(str(disk))) as machine:
        driver = PythonVirtioDriver(machine, BLK_SLOT)
        driver.initialize()
        function = machine.virtio[0]
        device = function.device
        served_by: list[str] = []
        notified = device.queue_notified

        def probe(index: int, **how) -> None:  # who serves requests (a look that finds none is no serving)
            if device.rings[index].pending():
                served_by.append(threading.current_thread().name)
            notified(index, **how)

        device.queue_notified = probe
        recorded: list[tuple[int, int]] = []
        if ft:
            device.write_observer = lambda offset, length: recorded.append((offset, length))
        ring, memory = driver.rings[0], driver.memory
        here = threading.current_thread().name
        for count, thread in ((blk.DEEP_QUEUE, here if ft else "virtio-blk"), (1, here)):
            served_by.clear()
            heads = []
            # Published and notified under the function lock: the I/O thread's own look at the
            # queue (from DRIVER_OK, or a late wake-up) comes after the notify has made its choice
            with function.lock:
                for i in range(count):
                    header, data, status = driver.alloc(16), driver.alloc(4096), driver.alloc(1, 1)
                    memory.write(header, struct.pack("<IIQ", blk.T_OUT, 0, 8 * (count + i)))
                    memory.write(data, bytes([count + i]) * 4096)
                    driver.write_descriptor(ring, 3 * i, header, 16, DESC_F_NEXT, 3 * i + 1)
                    driver.write_descriptor(ring, 3 * i + 1, data, 4096, DESC_F_NEXT, 3 * i + 2)
                    driver.write_descriptor(ring, 3 * i + 2, status, 1, DESC_F_WRITE)
                    memory.write_u16(ring.avail + 4 + 2 * ((ring.avail_idx + i) % ring.size), 3 * i)
                    heads.append(3 * i)
                ring.avail_idx = (ring.avail_idx + count) & 0xFFFF
                memory.write_u16(ring.avail + 2, ring.avail_idx)
                driver.bus.mmio_write(driver.caps[2], 2, 0)  # one notify for the lot
            assert [driver.wait_used(0) for _ in range(count)] == [(head, 1) for head in heads]
            with function.lock:  # the I/O thread is done with the ring: back to waiting for a kick
                assert served_by == [thread]
    contents = disk.read_bytes()
    for n in (1, blk.DEEP_QUEUE):
        for i in range(n):
            assert contents[8 * (n + i) * 512 : 8 * (n + i + 1) * 512] == bytes([n + i]) * 4096
    if ft:  # and FT was told of each write's own range
        assert sorted(recorded) == sorted((8 * (n + i) * 512, 4096) for n in (1, blk.DEEP_QUEUE) for i in range(n))


def test_blk_out_of_range_and_get_id(disk):
    with blk_machine(DiskSpec(str(disk))) as machine:
        driver = PythonVirtioDriver(machine, BLK_SLOT)
        driver.initialize()
        status, _, _ = blk_request(driver, blk.T_IN, 2047, read_length=1024)  # crosses the end
        assert status == blk.S_IOERR
        status, ident, _ = blk_request(driver, blk.T_GET_ID, 0, read_length=20)
        assert status == blk.S_OK and ident.rstrip(b"\0") == b"disk.img"
        status, _, _ = blk_request(driver, 0x77, 0, read_length=8)
        assert status == blk.S_UNSUPP


def test_blk_readonly_refuses_writes(disk):
    before = disk.read_bytes()
    with blk_machine(DiskSpec(str(disk), readonly=True)) as machine:
        driver = PythonVirtioDriver(machine, BLK_SLOT)
        assert driver.device_features() & blk.F_RO
        driver.initialize()
        status, _, _ = blk_request(driver, blk.T_OUT, 0, b"\x00" * 512)
        assert status == blk.S_IOERR
        status, data, _ = blk_request(driver, blk.T_IN, 0, read_length=512)
        assert status == blk.S_OK and data == before[:512]
    assert disk.read_bytes() == before


def test_blk_write_zeroes_and_discard(disk):
    with blk_machine(DiskSpec(str(disk))) as machine:
        driver = PythonVirtioDriver(machine, BLK_SLOT)
        features = driver.device_features()
        assert features & blk.F_WRITE_ZEROES and features & blk.F_DISCARD  # tmpfs/ext4 punch holes
        driver.initialize()
        segment = struct.pack("<QII", 8, 8, 0)
        assert blk_request(driver, blk.T_WRITE_ZEROES, 0, segment)[0] == blk.S_OK
        assert blk_request(driver, blk.T_DISCARD, 0, struct.pack("<QII", 100, 4, 0))[0] == blk.S_OK
        status, data, _ = blk_request(driver, blk.T_IN, 8, read_length=4096)
        assert status == blk.S_OK and data == bytes(4096)
    assert disk.read_bytes()[8 * 512 : 16 * 512] == bytes(4096)


def test_blk_io_error_reaches_the_guest(tmp_path):
    """A backing device that fails reads (a directory's fd cannot be read): VIRTIO_BLK_S_IOERR."""
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(4096))
    with blk_machine(DiskSpec(str(path))) as machine:
        driver = PythonVirtioDriver(machine, BLK_SLOT)
        driver.initialize()
        function = machine.virtio[0]
        import os
        os.dup2(os.open(str(tmp_path), os.O_RDONLY), function.device.disk.fd)  # reads now fail: EISDIR
        status, _, _ = blk_request(driver, blk.T_IN, 0, read_length=512)
        assert status == blk.S_IOERR
        assert driver.status & v.STATUS_NEEDS_RESET == 0  # an I/O error is not the driver's fault


# -- malformed queues: NEEDS_RESET, VMM alive, other devices unaffected ---------------------------------


def _malformed(driver: PythonVirtioDriver, kind: str) -> None:
    ring, memory = driver.rings[0], driver.memory
    buf = driver.alloc(512)
    if kind == "loop":
        driver.write_descriptor(ring, 0, buf, 16, DESC_F_NEXT, 1)
        driver.write_descriptor(ring, 1, buf, 16, DESC_F_NEXT, 0)
    elif kind == "outside-ram":
        driver.write_descriptor(ring, 0, buf, 16, DESC_F_NEXT, 1)
        driver.write_descriptor(ring, 1, memory.size - 8, 512, DESC_F_WRITE)
    elif kind == "wrong-direction":
        driver.write_descriptor(ring, 0, buf, 16, DESC_F_WRITE | DESC_F_NEXT, 1)
        driver.write_descriptor(ring, 1, buf, 16, 0)
    elif kind == "zero-length":
        driver.write_descriptor(ring, 0, buf, 16, DESC_F_NEXT, 1)
        driver.write_descriptor(ring, 1, buf, 0, DESC_F_WRITE)
    elif kind == "next-beyond-queue":
        driver.write_descriptor(ring, 0, buf, 16, DESC_F_NEXT, ring.size + 3)
    elif kind == "head-beyond-queue":
        memory.write_u16(ring.avail + 4, ring.size)
        memory.write_u16(ring.avail + 2, 1)
        driver.bus.mmio_write(driver.caps[2], 2, 0)
        return
    elif kind == "avail-index-jump":
        memory.write_u16(ring.avail + 2, ring.size + 5)
        driver.bus.mmio_write(driver.caps[2], 2, 0)
        return
    elif kind == "indirect-without-feature":
        driver.write_descriptor(ring, 0, buf, 32, DESC_F_INDIRECT)
    elif kind == "missing-status":
        driver.write_descriptor(ring, 0, buf, 16, 0)
    driver.make_available(0, 0)


MALFORMATIONS = ["loop", "outside-ram", "wrong-direction", "zero-length", "next-beyond-queue",
                 "head-beyond-queue", "avail-index-jump", "indirect-without-feature", "missing-status"]


@pytest.mark.parametrize("kind", MALFORMATIONS)
def test_malformed_queue_needs_reset_and_others_keep_working(tmp_path, kind, caplog):
    first, second = tmp_path / "a.img", tmp_path / "b.img"
    first.write_bytes(bytes(65536))
    second.write_bytes(bytes(65536))
    with blk_machine(DiskSpec(str(first)), DiskSpec(str(second))) as machine:
        bad = PythonVirtioDriver(machine, BLK_SLOT)
        good = PythonVirtioDriver(machine, SECOND_SLOT)
        good._next_free = 0x400000
        bad.initialize()
        good.initialize()
        _malformed(bad, kind)
        assert bad.wait_status(v.STATUS_NEEDS_RESET) & v.STATUS_NEEDS_RESET
        assert bad.common_read(0x15, 1) != 0  # config generation moved with the change
        # the other disk still serves; the broken one works again after a reset
        assert blk_request(good, blk.T_OUT, 0, b"ok" * 256)[0] == blk.S_OK
        bad.initialize()
        assert blk_request(bad, blk.T_OUT, 0, b"ok" * 256)[0] == blk.S_OK
    assert second.read_bytes()[:512] == b"ok" * 256
    assert first.read_bytes()[:512] == b"ok" * 256
    assert any("needs reset" in record.getMessage() for record in caplog.records)


def test_ring_outside_ram_needs_reset(disk):
    with blk_machine(DiskSpec(str(disk))) as machine:
        driver = PythonVirtioDriver(machine, BLK_SLOT)
        driver.initialize(queue_sizes={})
        driver.common_write(0x14, 1, 0)
        driver.common_write(0x14, 1, 0x3)
        for word in (0, 1):
            driver.common_write(0x08, 4, word)
            driver.common_write(0x0C, 4, (v.F_VERSION_1 >> (32 * word)) & 0xFFFF_FFFF)
        driver.common_write(0x14, 1, 0xB)
        driver.setup_queue(0, 16, desc=machine.vm.memory.size - 64)  # 256 bytes of table, 64 in RAM
        driver.common_write(0x14, 1, 0xF)
        assert driver.status & v.STATUS_NEEDS_RESET


# -- virtio-net on the socket backend ------------------------------------------------------------------


def test_net_frames_cross_the_socket_backend(tmp_path):
    vm_path, peer_path = str(tmp_path / "vm.sock"), str(tmp_path / "peer.sock")
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    peer.bind(peer_path)
    peer.settimeout(5)
    spec = NetSpec("socket", vm_path, peer=peer_path, mac="52:54:00:aa:bb:cc")
    with Machine(MachineConfig(nets=(spec,)), serial_output=lambda data: None) as machine:
        driver = PythonVirtioDriver(machine, BLK_SLOT)
        assert driver.config_read(0) == 0x1000_1AF4
        assert bytes(driver.device_config(i, 1) for i in range(6)) == bytes.fromhex("525400aabbcc")
        driver.initialize(features=v.F_VERSION_1 | (1 << 15), queue_sizes={0: 16, 1: 16})  # + MRG_RXBUF
        memory = driver.memory
        # transmit: header + frame in two descriptors
        frame = bytes.fromhex("ffffffffffff525400aabbcc0806") + b"payload" * 10
        header, body = driver.alloc(12), driver.alloc(len(frame))
        memory.write(header, bytes(12))
        memory.write(body, frame)
        driver.submit_chain(1, [(header, 12, False), (body, len(frame), False)])
        assert driver.wait_used(1)[0] == 0
        assert peer.recv(65536) == frame
        # receive: post one 2 KiB buffer, send a frame from the peer
        rx = driver.alloc(2048)
        driver.submit_chain(0, [(rx, 2048, True)])
        incoming = bytes.fromhex("525400aabbcc0200000000010800") + bytes(range(100))
        peer.sendto(incoming, vm_path)
        head, length = driver.wait_used(0)
        assert length == 12 + len(incoming)
        assert memory.read(rx + 12, len(incoming)) == incoming
        assert struct.unpack_from("<H", memory.read(rx + 10, 2))[0] == 1  # num_buffers
    peer.close()
