"""The Linux loader's parts that need no boot: firmware tables, the ACPI PM device, initrd checks,
the zero page. (Booting the kernel is tests/test_linux.py.)"""

from __future__ import annotations

import gzip
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from pykvm.boot import firmware
from pykvm.boot.firmware import acpi, mptable
from pykvm.boot import formats as f
from pykvm.boot.linux_loader import check_initrd
from pykvm.devices.acpi_pm import PM1_CNT, PM_TMR, SLP_EN, AcpiPm
from pykvm.errors import ConfigError
from pykvm.guestbuild.linux_guest import initramfs
from pykvm.memory import GuestMemory

pytestmark = pytest.mark.nokvm


@pytest.fixture
def memory():
    ram = GuestMemory(64 << 20)
    yield ram
    ram.close()


def _table(memory: GuestMemory, address: int) -> bytes:
    length = struct.unpack("<I", memory.read(address + 4, 4))[0]
    return memory.read(address, length)


def test_acpi_tables_are_linked_and_checksummed(memory) -> None:
    rsdp_at = firmware.write_acpi_tables(memory, cpus=3)
    rsdp = acpi.Rsdp.parse(memory.read(rsdp_at, acpi.Rsdp.sizeof()))
    assert sum(memory.read(rsdp_at, 20)) % 256 == 0 and sum(memory.read(rsdp_at, 36)) % 256 == 0
    xsdt = _table(memory, rsdp.xsdt_address)
    assert xsdt[:4] == b"XSDT" and sum(xsdt) % 256 == 0
    tables = {}
    for (address,) in struct.iter_unpack("<Q", xsdt[36:]):
        table = _table(memory, address)
        assert sum(table) % 256 == 0, table[:4]
        tables[table[:4]] = table
    assert set(tables) == {b"FACP", b"APIC"}
    madt = tables[b"APIC"]
    assert madt.count(bytes([0, 8])) >= 3  # a processor-local-APIC entry per vCPU
    fadt = acpi.Fadt.parse(tables[b"FACP"])
    assert fadt.pm1a_cnt_blk == 0x604 and fadt.reset_reg.address == 0x64 and fadt.reset_value == 0xFE
    dsdt = _table(memory, fadt.x_dsdt)
    assert dsdt[:4] == b"DSDT" and sum(dsdt) % 256 == 0 and b"_S5_" in dsdt and b"_PRT" in dsdt
    assert memory.read(fadt.firmware_ctrl, 4) == b"FACS" and fadt.firmware_ctrl % 64 == 0


@pytest.mark.skipif(shutil.which("iasl") is None, reason="iasl (acpica-tools) is not installed")
def test_dsdt_disassembles_cleanly(tmp_path: Path) -> None:
    (tmp_path / "dsdt.dat").write_bytes(firmware.dsdt())
    result = subprocess.run(["iasl", "-d", "dsdt.dat"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    source = (tmp_path / "dsdt.dsl").read_text()
    assert 'EisaId ("PNP0A03")' in source and "Name (_S5, Package (0x04)" in source
    assert "Package (0x7C)" in source  # _PRT: 31 slots x 4 pins (by default)


def test_mp_table_is_checksummed_and_lists_every_cpu(memory) -> None:
    pointer_at = firmware.write_mp_table(memory, cpus=2)
    pointer = memory.read(pointer_at, 16)
    assert pointer[:4] == b"_MP_" and sum(pointer) % 256 == 0
    table_at = struct.unpack_from("<I", pointer, 4)[0]
    header = mptable.MpConfigHeader.parse(memory.read(table_at, mptable.MpConfigHeader.sizeof()))
    table = memory.read(table_at, header.base_table_length)
    assert sum(table) % 256 == 0
    body = table[mptable.MpConfigHeader.sizeof():]
    processors = [body[i:i + 20] for i in range(0, 40, 20)]
    assert [p[0] for p in processors] == [0, 0] and processors[0][3] & mptable.MP_CPU_BOOTSTRAP


def test_pci_intx_routing_matches_the_bus() -> None:
    from pykvm.devices.pci import INTX_IRQS

    assert [firmware.pci_intx_irq(slot, 0) for slot in range(1, 6)] == [*INTX_IRQS, INTX_IRQS[0]]


def test_acpi_soft_off_and_pm_timer() -> None:
    now = [10.0]
    powered_off = []
    pm = AcpiPm(on_power_off=lambda: powered_off.append(True), clock=lambda: now[0])
    first = pm.pio_read(PM_TMR, 4)
    now[0] += 0.001
    assert (pm.pio_read(PM_TMR, 4) - first) & 0xFFFFFF == pytest.approx(3580, abs=2)
    assert pm.pio_read(PM1_CNT, 2) & 1  # SCI_EN: always in ACPI mode
    pm.pio_write(PM1_CNT, 2, 5 << 10 | SLP_EN)  # S-state type 5 is not soft-off here (\_S5 says 0)
    assert not powered_off
    pm.pio_write(PM1_CNT, 2, 0 << 10 | SLP_EN)
    assert powered_off == [True]


def test_initrd_checks() -> None:
    good = initramfs()
    check_initrd(good)
    check_initrd(good + bytes(512) + gzip.compress(good))  # microcode-style concatenation
    with pytest.raises(ConfigError, match="truncated initrd"):
        check_initrd(good[: len(good) // 2])
    with pytest.raises(ConfigError, match="truncated initrd: the gzip stream ends early"):
        check_initrd(gzip.compress(good)[:-100])
    with pytest.raises(ConfigError, match="empty"):
        check_initrd(b"")


def test_zero_page_layout() -> None:
    assert f.BootParams.sizeof() == 4096
    assert f.SETUP_HEADER_OFFSET + f.SetupHeader.sizeof() == 0x26C  # protocol 2.15's header end


def test_config_fragment_options_parse() -> None:
    """The builder compares the fragment with the resulting .config both ways: set and not set."""
    from pykvm.guestbuild.linux_guest import _options, fragment

    parsed = _options("CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=16\n# a comment\n")
    assert parsed == {"CONFIG_A": "y", "CONFIG_B": None, "CONFIG_C": "16"}
    wanted = _options(fragment().read_text())
    assert wanted["CONFIG_VIRTIO_BLK"] == "y" and wanted["CONFIG_LEGACY_PTYS"] is None
