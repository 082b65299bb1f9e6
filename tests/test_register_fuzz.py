"""A guest cannot crash its VMM or break its own restore through device registers (issue 15).

Random access sequences (hypothesis) at every device of a FakePc, each followed by a state round
trip; the two reproductions of the issue as regression tests; and a check that FakePc is the
device set a Machine builds, so what the fuzzer covers is what a guest meets.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pykvm.devices.pci import CONFIG_ADDRESS_PORT, CONFIG_DATA_PORT
from pykvm.testing.fake_pc import FakePc
from pykvm.testing.register_fuzz import MAX_ACCESSES, MMIO_SIZES, PCI_SLOTS, PIO_SIZES, Access, Region, \
    broken_invariant, register_surface, run_case
from tests.conftest import requires_kvm

BLK_SLOT, MSIX_BAR, ENTRY = 1, 1, 16
ENABLE = 0x8000_0000


@pytest.fixture(scope="module")
def disk(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("fuzz") / "disk.img"
    path.write_bytes(bytes(1 << 20))
    return str(path)


@pytest.fixture(scope="module")
def surface(disk) -> list[Region]:
    with FakePc(disk) as pc:
        return register_surface(pc)


@st.composite
def accesses_to(draw, region: Region) -> Access:
    size = draw(st.sampled_from(PIO_SIZES if region.pio else MMIO_SIZES))
    if region.name == "pci-config" and draw(st.booleans()):  # select a register of a function
        slot, register = draw(st.integers(0, PCI_SLOTS - 1)), draw(st.integers(0, 255))
        return Access(True, True, CONFIG_ADDRESS_PORT, 4, ENABLE | slot << 11 | register)
    offset = draw(st.integers(-size, region.length))
    if not draw(st.booleans()):
        return Access(region.pio, False, region.start + offset, size)
    ones = (1 << (8 * size)) - 1
    value = draw(st.one_of(st.integers(0, 0x20), st.just(ones), st.integers(0, ones)))
    return Access(region.pio, True, region.start + offset, size, value)


@pytest.mark.nokvm
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(data=st.data())
def test_random_register_accesses_neither_crash_nor_break_the_restore(disk, surface, data):
    sequence = data.draw(st.lists(st.sampled_from(surface).flatmap(accesses_to), min_size=1, max_size=MAX_ACCESSES))
    result = run_case(disk, sequence)
    assert result.crash is None, result.crash


# -- the reproductions of issue 15 -------------------------------------------------------------------


@pytest.mark.nokvm
def test_msix_table_keeps_its_size_under_writes_past_its_end_or_unaligned(disk):
    """An 8-byte write at the last dword grew the table (32 bytes became 36) and the next restore
    failed. The table takes aligned dword and qword writes only, and keeps its size."""
    with FakePc(disk) as pc:
        blk = pc.pci.functions[BLK_SLOT]
        table_size = len(blk.msix.table)
        table = blk.bars[MSIX_BAR].address
        bus = pc.platform.bus
        bus.mmio_write(table + table_size - 4, 8, 0x1122_3344_5566_7788)  # runs past the end
        bus.mmio_write(table + 2, 4, 0xDEAD_BEEF)  # unaligned
        bus.mmio_write(table + 4, 8, 0xDEAD_BEEF)  # a qword not on a qword boundary
        assert len(blk.msix.table) == table_size
        assert bus.mmio_read(table, 8) == 0 and bus.mmio_read(table + table_size - 4, 4) == 1  # still masked
        bus.mmio_write(table + ENTRY, 8, 0xFEE0_0000)  # a driver's write: taken
        assert bus.mmio_read(table + ENTRY, 4) == 0xFEE0_0000
        saved = pc.save_state()
        with FakePc(disk) as fresh:
            fresh.restore_state(saved)
            assert fresh.save_state() == saved


@pytest.mark.nokvm
def test_config_data_access_past_the_end_of_configuration_space_stops_there(disk):
    """A 4-byte write to port 0xCFF at register 0xFC raised IndexError (an "internal error" that
    stopped the VM). Only its first byte is in configuration space: the rest is written nowhere
    and reads as ones."""
    with FakePc(disk) as pc:
        bus = pc.platform.bus
        blk = pc.pci.functions[BLK_SLOT]
        bus.pio_write(CONFIG_ADDRESS_PORT, 4, ENABLE | BLK_SLOT << 11 | 0xFC)
        before = bytes(blk.config)
        for port in range(CONFIG_DATA_PORT, CONFIG_DATA_PORT + 4):
            bus.pio_write(port, 4, 0xFFFF_FFFF)
        assert bytes(blk.config) == before  # the last dword is read-only
        assert bus.pio_read(CONFIG_DATA_PORT + 3, 4) == 0xFFFF_FF00 | before[0xFF]
        assert bus.pio_read(CONFIG_DATA_PORT + 2, 4) == 0xFFFF_0000 | before[0xFF] << 8 | before[0xFE]


# -- the fuzzer's own checks can fail ------------------------------------------------------------------


@pytest.mark.nokvm
def test_a_grown_msix_table_is_reported(disk):
    with FakePc(disk) as pc:
        assert broken_invariant(pc) is None
        pc.pci.functions[BLK_SLOT].msix.table += bytes(4)
        assert "MSI-X table of 36 bytes" in broken_invariant(pc)


@pytest.mark.nokvm
def test_a_state_that_does_not_restore_is_a_crash(disk, monkeypatch):
    monkeypatch.setattr(FakePc, "save_state", lambda pc: {"serial": b"{}"})
    assert "restoring the saved state raised" in run_case(disk, [Access(True, False, 0x3F8, 1)]).crash


@pytest.mark.nokvm
def test_the_guest_asking_to_stop_is_no_crash(disk):
    result = run_case(disk, [Access(True, True, 0xF4, 1, 3), Access(True, True, 0x64, 1, 0xFE)])
    assert result.crash is None and result.stop_requests == 2


# -- FakePc is the machine's device set ------------------------------------------------------------------


@requires_kvm
def test_fake_pc_has_the_devices_and_addresses_of_a_machine(disk):
    from pykvm.devices.virtio.blk import DiskSpec
    from pykvm.machine import Machine, MachineConfig
    config = MachineConfig(disks=(DiskSpec(disk),), nets=_config_nets())
    with Machine(config, serial_output=lambda data: None, attach_networks=False) as machine, FakePc(disk) as pc:
        assert set(pc.devices()) == set(machine.devices())
        claimed = [i for i, entry in enumerate(machine.vm.bus.ports) if entry is not None]
        assert claimed == [i for i, entry in enumerate(pc.platform.bus.ports) if entry is not None]
        assert [(start, end) for start, end, _ in machine.vm.bus._mmio] == \
               [(start, end) for start, end, _ in pc.platform.bus._mmio]


def _config_nets():
    from pykvm.devices.net_backends import NetSpec

    return (NetSpec("socket", "/nonexistent/never-opened.sock"),)
