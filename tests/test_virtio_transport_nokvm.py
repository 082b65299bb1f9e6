"""The virtio-pci transport on a FakePlatform, without KVM: a virtio-blk request through the modern
registers (its completion an MSI-X message) and through the legacy ones (INTx and the ISR), and
the ioeventfds the function asks for. Every access goes through the I/O bus, as a vCPU exit's.

With ioeventfds refused, a queue notify is served in the exit, on the writing thread: the request
is complete when the notify write returns, so nothing here waits.
"""

from __future__ import annotations

import struct
from types import SimpleNamespace

import pytest

from pykvm.devices import virtio as v
from pykvm.devices.pci import PciBus
from pykvm.devices.virtio.blk import Blk, DiskImage, DiskSpec
from pykvm.devices.virtio.transport import VirtioPciFunction
from pykvm.testing.fake_platform import FakePlatform
from tests.virtio_driver import DESC_F_NEXT, DESC_F_WRITE, PythonVirtioDriver

pytestmark = pytest.mark.nokvm

SLOT = 1
T_IN, T_OUT = 0, 1
SECTOR = 512
MSIX_CAP, MSIX_ENABLE = 0x11, 0x8000
MSIX_BAR = 1
QUEUE_SELECT, QUEUE_MSIX_VECTOR = 0x16, 0x1A
MSI_ADDRESS, MSI_DATA = 0xFEE0_0000, 0x4041  # to LAPIC 0, vector 0x41
# Legacy registers, from the I/O BAR (virtio 1.x 4.1.4.8)
L_HOST_FEATURES, L_GUEST_FEATURES, L_QUEUE_PFN, L_QUEUE_NUM = 0x00, 0x04, 0x08, 0x0C
L_QUEUE_SEL, L_QUEUE_NOTIFY, L_STATUS, L_ISR, L_CONFIG = 0x0E, 0x10, 0x12, 0x13, 0x14
L_RING_AT = 0x30_0000


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * 2048)  # 512 KiB of a known pattern
    return path


def plugged_blk(platform: FakePlatform, disk) -> VirtioPciFunction:
    pci = PciBus(platform.bus, platform.irq_line)
    function = VirtioPciFunction(Blk(DiskImage(DiskSpec(str(disk)))), platform)
    assert pci.add(function) == SLOT
    return function


@pytest.fixture
def exits_only(disk):
    """A blk function on a platform that refuses ioeventfds: notifies are served in the exit."""
    with FakePlatform(ioeventfds=False) as platform:
        function = plugged_blk(platform, disk)
        yield platform, function
        function.close()


def driver_for(platform: FakePlatform) -> PythonVirtioDriver:
    # The driver acts on `machine.vm.bus` and `machine.vm.memory`: a platform has both.
    return PythonVirtioDriver(SimpleNamespace(vm=platform), SLOT)


def blk_request(driver: PythonVirtioDriver, kind: int, sector: int, data: bytes) -> tuple[int, bytes]:
    """A request on queue 0 (header, data, status), notified; returns the status byte and the data
    buffer, both as the device left them by the time the notify returned."""
    memory = driver.memory
    header, buffer, status = driver.alloc(16), driver.alloc(len(data)), driver.alloc(1)
    memory.write(header, struct.pack("<IIQ", kind, 0, sector))
    memory.write(buffer, data)
    memory.write(status, b"\xff")
    driver.submit_chain(0, [(header, 16, False), (buffer, len(data), kind == T_IN), (status, 1, True)])
    ring = driver.rings[0]
    assert memory.read_u16(ring.used + 2) == ring.used_seen + 1, "not served during the notify"
    ring.used_seen += 1
    return memory.read(status, 1)[0], memory.read(buffer, len(data))


def enable_msix(driver: PythonVirtioDriver, vectors: dict[int, tuple[int, int]]) -> None:
    """MSI-X on, with `vectors` (entry -> address, data) programmed and unmasked in the table."""
    pointer = driver.config_read(0x34, 1)
    while driver.config_read(pointer, 1) != MSIX_CAP:
        pointer = driver.config_read(pointer + 1, 1)
    table = driver.bar(MSIX_BAR) + (driver.config_read(pointer + 4) & ~0x7)
    for entry, (address, data) in vectors.items():
        for offset, value in ((0, address & 0xFFFF_FFFF), (4, address >> 32), (8, data), (12, 0)):
            driver.bus.mmio_write(table + 16 * entry + offset, 4, value)
    driver.config_write(pointer + 2, 2, driver.config_read(pointer + 2, 2) | MSIX_ENABLE)


def test_blk_request_through_the_modern_registers_completes_with_an_msix_message(exits_only, disk):
    platform, function = exits_only
    driver = driver_for(platform)
    enable_msix(driver, {1: (MSI_ADDRESS, MSI_DATA)})
    driver.initialize()
    driver.common_write(QUEUE_SELECT, 2, 0)
    driver.common_write(QUEUE_MSIX_VECTOR, 2, 1)
    assert driver.common_read(QUEUE_MSIX_VECTOR, 2) == 1  # the device took the vector
    assert driver.device_config(0, 8) == 1024  # capacity, in sectors

    written = bytes((i * 7) & 0xFF for i in range(SECTOR))
    assert blk_request(driver, T_OUT, 3, written)[0] == 0
    assert disk.read_bytes()[3 * SECTOR : 4 * SECTOR] == written  # on the host's file
    assert platform.msi_messages == [(MSI_ADDRESS, MSI_DATA)]
    assert blk_request(driver, T_IN, 3, bytes(SECTOR)) == (0, written)  # back into guest RAM
    assert platform.msi_messages == [(MSI_ADDRESS, MSI_DATA)] * 2
    assert not any(level for _, level in platform.irq_changes)  # with MSI-X on, INTx is never raised
    assert platform.ioeventfds == []  # refused: the function fell back to exits


def test_blk_request_through_the_legacy_registers_raises_intx_until_the_isr_is_read(exits_only, disk):
    platform, function = exits_only
    driver = driver_for(platform)
    bus, io = platform.bus, driver.bar(0)
    line = driver.config_read(0x3C, 1)
    bus.pio_write(io + L_STATUS, 1, 0)
    bus.pio_write(io + L_STATUS, 1, v.STATUS_ACKNOWLEDGE | v.STATUS_DRIVER)
    assert bus.pio_read(io + L_HOST_FEATURES, 4) & 0xFFFF_FFFF
    bus.pio_write(io + L_GUEST_FEATURES, 4, 0)
    bus.pio_write(io + L_QUEUE_SEL, 2, 0)
    size = bus.pio_read(io + L_QUEUE_NUM, 2)
    assert size == 256
    # A legacy ring is one area: descriptors, then the available ring, then (next page) used.
    desc, avail = L_RING_AT, L_RING_AT + 16 * size
    used = -(-(avail + 6 + 2 * size) // 4096) * 4096
    bus.pio_write(io + L_QUEUE_PFN, 4, L_RING_AT // 4096)
    bus.pio_write(io + L_STATUS, 1, v.STATUS_ACKNOWLEDGE | v.STATUS_DRIVER | v.STATUS_DRIVER_OK)
    assert bus.pio_read(io + L_CONFIG, 4) == 1024  # capacity, low half: config follows the registers

    memory = platform.memory
    header, status = 0x40_0000, 0x40_0100
    memory.write(header, struct.pack("<IIQ", T_IN, 0, 1))
    memory.write(status, b"\xff")
    for index, (address, length, flags) in enumerate([(header, 16, DESC_F_NEXT),
                                                      (0x40_1000, SECTOR, DESC_F_WRITE | DESC_F_NEXT),
                                                      (status, 1, DESC_F_WRITE)]):
        memory.write(desc + 16 * index, struct.pack("<QIHH", address, length, flags, index + 1))
    memory.write(avail, struct.pack("<HHH", 0, 1, 0))  # flags, idx 1, ring[0] = head 0
    assert not platform.irq_levels.get(line, False)
    bus.pio_write(io + L_QUEUE_NOTIFY, 2, 0)

    assert memory.read_u16(used + 2) == 1 and memory.read(status, 1) == b"\x00"
    assert memory.read(0x40_1000, SECTOR) == disk.read_bytes()[SECTOR : 2 * SECTOR]
    assert platform.irq_levels[line]
    assert bus.pio_read(io + L_ISR, 1) == 1  # a used buffer; reading acknowledges...
    assert not platform.irq_levels[line]  # ...and lowers the line
    assert bus.pio_read(io + L_ISR, 1) == 0


def test_ioeventfds_are_registered_at_driver_ok_follow_a_bar_move_and_go_at_reset(disk):
    with FakePlatform(ioeventfds=True) as platform:
        function = plugged_blk(platform, disk)
        try:
            driver = driver_for(platform)
            assert platform.ioeventfds == []  # nothing before the driver runs
            driver.initialize()
            notify, legacy_notify = driver.caps[2], driver.bar(0) + L_QUEUE_NOTIFY
            registered = {(r.address, r.length, r.pio, r.datamatch) for r in platform.ioeventfds}
            assert registered == {(notify, 2, False, None), (legacy_notify, 2, True, 0)}  # queue 0's
            assert len({r.fd for r in platform.ioeventfds}) == 1  # one eventfd per queue, both paths

            driver.config_write(0x20, 4, (driver.bar(4) + 0x10_0000) & 0xFFFF_FFFF)  # move BAR4
            moved = {(r.address, r.pio) for r in platform.ioeventfds}
            assert moved == {(notify + 0x10_0000, False), (legacy_notify, True)}

            driver.caps = driver._find_caps()  # the common cfg moved with its BAR
            driver.common_write(0x14, 1, 0)  # reset
            assert platform.ioeventfds == []
        finally:
            function.close()


def test_a_refused_ioeventfd_leaves_notifies_working(exits_only):
    platform, function = exits_only
    driver = driver_for(platform)
    driver.initialize()
    assert platform.ioeventfds == [] and driver.status & v.STATUS_DRIVER_OK
    assert blk_request(driver, T_OUT, 0, bytes(SECTOR))[0] == 0
