"""PCI configuration mechanism 1 as a guest's PCI probe sees it, without KVM: ports 0xCF8/0xCFC on a
FakePlatform's I/O bus, the host bridge, BAR sizing and moving, the capability list and INTx."""

from __future__ import annotations

import pytest

from pykvm.devices.pci import Bar, PciBus, PciFunction
from pykvm.testing.fake_platform import FakePlatform

pytestmark = pytest.mark.nokvm

CONFIG_ADDRESS, CONFIG_DATA = 0xCF8, 0xCFC
ENABLE = 0x8000_0000
COMMAND, STATUS, CLASS_REVISION, CAPABILITIES, INTERRUPT_LINE = 0x04, 0x06, 0x08, 0x34, 0x3C
COMMAND_IO, COMMAND_MEMORY, COMMAND_INTX_DISABLE = 0x1, 0x2, 0x400
STATUS_INTERRUPT, STATUS_CAPABILITIES = 0x08, 0x10
SCRATCH_SLOT = 1


class ReadBack:
    """A BAR region that reads back what was last written to it."""

    def __init__(self) -> None:
        self.value = 0

    def mmio_read(self, offset: int, size: int) -> int:
        return self.value

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        self.value = value

    pio_read, pio_write = mmio_read, mmio_write


class ScratchFunction(PciFunction):
    """A function with one read-back register per BAR, so a test can tell through the bus
    whether, and where, each BAR decodes. BAR0 is 4 KiB of memory, BAR1 32 I/O ports, BAR2 a
    64-bit prefetchable 16 KiB; two capabilities."""

    def __init__(self) -> None:
        super().__init__(vendor=0x1234, device=0x5678, class_code=0xFF0000, revision=3)
        self.regions = [ReadBack() for _ in range(3)]
        self.add_bar(Bar(0, 0x1000, self.regions[0]))
        self.add_bar(Bar(1, 0x20, self.regions[1], io=True))
        self.add_bar(Bar(2, 0x4000, self.regions[2], mem64=True, prefetchable=True))
        self.add_capability(0x09, b"\x06\xAA\xBB\xCC")  # vendor-specific, 6 bytes long
        self.add_capability(0x05, bytes(8))  # an MSI-shaped body (its logic is not under test)

    @property
    def registers(self) -> dict[int, int]:
        return {index: region.value for index, region in enumerate(self.regions)}


class Probe:
    """What a guest's PCI code does: mechanism-1 configuration reads and writes."""

    def __init__(self, platform: FakePlatform) -> None:
        self.bus = platform.bus

    def read(self, slot: int, offset: int, size: int = 4) -> int:
        self.bus.pio_write(CONFIG_ADDRESS, 4, ENABLE | slot << 11 | offset & 0xFC)
        return self.bus.pio_read(CONFIG_DATA + (offset & 3), size)

    def write(self, slot: int, offset: int, size: int, value: int) -> None:
        self.bus.pio_write(CONFIG_ADDRESS, 4, ENABLE | slot << 11 | offset & 0xFC)
        self.bus.pio_write(CONFIG_DATA + (offset & 3), size, value)

    def bar(self, slot: int, index: int) -> int:
        low = self.read(slot, 0x10 + 4 * index)
        if low & 1:
            return low & ~0x3
        address = low & ~0xF
        if low & 0x4:
            address |= self.read(slot, 0x14 + 4 * index) << 32
        return address


@pytest.fixture
def platform():
    with FakePlatform() as platform:
        yield platform


@pytest.fixture
def scratch(platform):
    pci = PciBus(platform.bus, platform.irq_line)
    function = ScratchFunction()
    assert pci.add(function) == SCRATCH_SLOT
    return function


@pytest.fixture
def probe(platform, scratch):
    return Probe(platform)


def test_host_bridge_answers_at_slot_0(probe):
    assert probe.read(0, 0) == 0x1237_8086  # Intel 440FX
    assert probe.read(0, CLASS_REVISION) >> 8 == 0x06_00_00  # host bridge
    assert probe.read(0, 2, 2) == 0x1237  # a word read at an offset within the dword
    assert probe.bus.pio_read(CONFIG_ADDRESS, 4) == ENABLE  # the latch reads back (slot 0, dword 0)


def test_empty_slots_and_disabled_cycles_read_all_ones(probe):
    assert probe.read(7, 0) == 0xFFFF_FFFF  # no device: vendor ID 0xFFFF
    probe.bus.pio_write(CONFIG_ADDRESS, 4, 0)  # enable bit clear: not a configuration cycle
    assert probe.bus.pio_read(CONFIG_DATA, 4) == 0xFFFF_FFFF


def test_a_function_is_enabled_with_its_bars_placed_as_firmware_would(probe, scratch):
    assert probe.read(SCRATCH_SLOT, 0) == 0x5678_1234
    assert probe.read(SCRATCH_SLOT, COMMAND, 2) & (COMMAND_IO | COMMAND_MEMORY) == COMMAND_IO | COMMAND_MEMORY
    memory_bar, io_bar, wide_bar = (probe.bar(SCRATCH_SLOT, i) for i in (0, 1, 2))
    assert memory_bar % 0x1000 == 0 and io_bar % 0x20 == 0 and wide_bar % 0x4000 == 0
    probe.bus.mmio_write(memory_bar, 4, 0xCAFE)
    probe.bus.pio_write(io_bar, 2, 0xBEEF)
    probe.bus.mmio_write(wide_bar, 4, 0xF00D)
    assert scratch.registers == {0: 0xCAFE, 1: 0xBEEF, 2: 0xF00D}


def test_bar_sizing_by_writing_all_ones(probe):
    original = [probe.read(SCRATCH_SLOT, 0x10 + 4 * i) for i in range(4)]
    for i in range(4):
        probe.write(SCRATCH_SLOT, 0x10 + 4 * i, 4, 0xFFFF_FFFF)
    sized = [probe.read(SCRATCH_SLOT, 0x10 + 4 * i) for i in range(4)]
    assert sized[0] == 0xFFFF_F000  # 4 KiB, 32-bit memory
    assert sized[1] == 0xFFFF_FFE1  # 32 ports, I/O
    assert sized[2] == 0xFFFF_C00C and sized[3] == 0xFFFF_FFFF  # 16 KiB, 64-bit, prefetchable
    size = (~(sized[3] << 32 | sized[2] & ~0xF) & 0xFFFF_FFFF_FFFF_FFFF) + 1
    assert size == 0x4000
    for i, value in enumerate(original):
        probe.write(SCRATCH_SLOT, 0x10 + 4 * i, 4, value)
    assert [probe.read(SCRATCH_SLOT, 0x10 + 4 * i) for i in range(4)] == original
    probe.bus.mmio_write(probe.bar(SCRATCH_SLOT, 0), 4, 7)
    assert probe.bus.mmio_read(probe.bar(SCRATCH_SLOT, 0), 4) == 7  # decoding again where it was


def test_moving_a_bar_remaps_its_region_on_the_bus(probe, scratch):
    old_memory, old_io = probe.bar(SCRATCH_SLOT, 0), probe.bar(SCRATCH_SLOT, 1)
    new_memory, new_io = old_memory + 0x10_0000, old_io + 0x100
    probe.write(SCRATCH_SLOT, 0x10, 4, new_memory)
    probe.write(SCRATCH_SLOT, 0x14, 4, new_io)
    assert (probe.bar(SCRATCH_SLOT, 0), probe.bar(SCRATCH_SLOT, 1)) == (new_memory, new_io)
    probe.bus.mmio_write(new_memory, 4, 0x1111)
    probe.bus.pio_write(new_io, 4, 0x2222)
    assert scratch.registers[0] == 0x1111 and scratch.registers[1] == 0x2222
    assert probe.bus.find_mmio(old_memory) is None  # nothing answers at the old places
    assert probe.bus.mmio_read(old_memory, 4) == 0xFFFF_FFFF and probe.bus.pio_read(old_io, 4) == 0xFFFF_FFFF


def test_the_command_register_switches_decoding(probe, scratch):
    memory_bar = probe.bar(SCRATCH_SLOT, 0)
    command = probe.read(SCRATCH_SLOT, COMMAND, 2)
    probe.write(SCRATCH_SLOT, COMMAND, 2, command & ~COMMAND_MEMORY)
    assert probe.bus.find_mmio(memory_bar) is None
    probe.write(SCRATCH_SLOT, COMMAND, 2, command)
    probe.bus.mmio_write(memory_bar, 4, 0x3333)
    assert scratch.registers[0] == 0x3333


def test_walking_the_capability_list(probe):
    assert probe.read(SCRATCH_SLOT, STATUS, 2) & STATUS_CAPABILITIES
    found, pointer = [], probe.read(SCRATCH_SLOT, CAPABILITIES, 1)
    while pointer:
        assert pointer >= 0x40 and pointer % 4 == 0  # after the header, dword-aligned
        found.append((probe.read(SCRATCH_SLOT, pointer, 1), pointer))
        pointer = probe.read(SCRATCH_SLOT, pointer + 1, 1)
    assert [cap_id for cap_id, _ in found] == [0x09, 0x05]
    vendor = found[0][1]
    assert probe.read(SCRATCH_SLOT, vendor + 2, 4) == 0xCCBB_AA06  # the body as given


def test_configuration_space_keeps_read_only_bits(probe):
    probe.write(SCRATCH_SLOT, 0, 4, 0)  # vendor and device ID are read-only
    assert probe.read(SCRATCH_SLOT, 0) == 0x5678_1234
    probe.write(SCRATCH_SLOT, INTERRUPT_LINE, 1, 0x0B)  # the interrupt line is the OS's to note
    assert probe.read(SCRATCH_SLOT, INTERRUPT_LINE, 1) == 0x0B


def test_intx_drives_the_line_in_the_interrupt_line_register(platform, probe, scratch):
    line = probe.read(SCRATCH_SLOT, INTERRUPT_LINE, 1)
    assert line in (5, 9, 10, 11)  # an ISA IRQ free on a PC, given by the "firmware"
    scratch.set_intx(True)
    assert platform.irq_levels[line] and probe.read(SCRATCH_SLOT, STATUS, 2) & STATUS_INTERRUPT
    command = probe.read(SCRATCH_SLOT, COMMAND, 2)
    probe.write(SCRATCH_SLOT, COMMAND, 2, command | COMMAND_INTX_DISABLE)
    assert not platform.irq_levels[line]  # masked at the function...
    assert probe.read(SCRATCH_SLOT, STATUS, 2) & STATUS_INTERRUPT  # ...still pending in its status
    probe.write(SCRATCH_SLOT, COMMAND, 2, command)
    assert platform.irq_levels[line]
    scratch.set_intx(False)
    assert not platform.irq_levels[line] and not probe.read(SCRATCH_SLOT, STATUS, 2) & STATUS_INTERRUPT
