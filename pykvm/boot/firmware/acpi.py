"""ACPI tables (ACPI 6.x, chapter 5): RSDP, XSDT, MADT, FADT, FACS and a DSDT.

    RSDP -> XSDT -> MADT (a LAPIC per vCPU, the IOAPIC, LINT1 = NMI)
                 -> FADT (PM1 event/control blocks and PM timer at 0x600, reset register,
                          -> FACS, -> DSDT: \\_SB.PCI0 (PNP0A03, _CRS windows, _PRT) and \\_S5)

The FADT points the guest at pykvm's ACPI PM block (pykvm.devices.acpi_pm) for power-off and the
PM timer, and at the i8042 for reset; the DSDT's few objects are encoded by `aml`.
"""

from __future__ import annotations

from construct import Bytes, Const, Int8ul, Int16ul, Int32ul, Int64ul, Struct

from pykvm.boot.firmware import aml
from pykvm.boot.firmware.layout import (
    ACPI_BASE,
    BIOS_AREA_END,
    IOAPIC_ADDRESS,
    LAPIC_ADDRESS,
    MP_BASE,
    PCI_SLOTS,
    align,
    checksum,
    pci_intx_irq,
)
from pykvm.devices.acpi_pm import PM_BASE, PM1_CNT, PM1_EVT, PM_TMR, SLP_TYP_SOFT_OFF
from pykvm.devices.pci import IO_WINDOW, MMIO_WINDOW
from pykvm.memory import GuestMemory

SCI_IRQ = 9
I8042_COMMAND_PORT, I8042_PULSE_RESET = 0x64, 0xFE
CMOS_CENTURY = 0x32

OEM_ID = b"PYKVM "
OEM_TABLE_ID = b"PYKVMPC "

Rsdp = Struct(
    "signature" / Const(b"RSD PTR "),
    "checksum" / Int8ul,  # of the first 20 bytes (the ACPI 1.0 part)
    "oem_id" / Bytes(6),
    "revision" / Int8ul,  # 2: XSDT present
    "rsdt_address" / Int32ul,
    "length" / Int32ul,
    "xsdt_address" / Int64ul,
    "extended_checksum" / Int8ul,  # of all 36 bytes
    "reserved" / Bytes(3),
)

SdtHeader = Struct(
    "signature" / Bytes(4),
    "length" / Int32ul,
    "revision" / Int8ul,
    "checksum" / Int8ul,
    "oem_id" / Bytes(6),
    "oem_table_id" / Bytes(8),
    "oem_revision" / Int32ul,
    "creator_id" / Bytes(4),
    "creator_revision" / Int32ul,
)

# Generic Address Structure: where a register is (address space 1 = system I/O).
Gas = Struct(
    "space_id" / Int8ul,
    "bit_width" / Int8ul,
    "bit_offset" / Int8ul,
    "access_size" / Int8ul,  # 1 byte, 2 word, 3 dword
    "address" / Int64ul,
)
GAS_SYSTEM_IO = 1

Fadt = Struct(  # revision 6, 276 bytes
    "header" / SdtHeader,
    "firmware_ctrl" / Int32ul,
    "dsdt" / Int32ul,
    "reserved0" / Int8ul,
    "preferred_pm_profile" / Int8ul,
    "sci_int" / Int16ul,
    "smi_cmd" / Int32ul,  # 0: the platform is always in ACPI mode, no SMI handshake
    "acpi_enable" / Int8ul,
    "acpi_disable" / Int8ul,
    "s4bios_req" / Int8ul,
    "pstate_cnt" / Int8ul,
    "pm1a_evt_blk" / Int32ul,
    "pm1b_evt_blk" / Int32ul,
    "pm1a_cnt_blk" / Int32ul,
    "pm1b_cnt_blk" / Int32ul,
    "pm2_cnt_blk" / Int32ul,
    "pm_tmr_blk" / Int32ul,
    "gpe0_blk" / Int32ul,
    "gpe1_blk" / Int32ul,
    "pm1_evt_len" / Int8ul,
    "pm1_cnt_len" / Int8ul,
    "pm2_cnt_len" / Int8ul,
    "pm_tmr_len" / Int8ul,
    "gpe0_blk_len" / Int8ul,
    "gpe1_blk_len" / Int8ul,
    "gpe1_base" / Int8ul,
    "cst_cnt" / Int8ul,
    "p_lvl2_lat" / Int16ul,
    "p_lvl3_lat" / Int16ul,
    "flush_size" / Int16ul,
    "flush_stride" / Int16ul,
    "duty_offset" / Int8ul,
    "duty_width" / Int8ul,
    "day_alrm" / Int8ul,
    "mon_alrm" / Int8ul,
    "century" / Int8ul,  # CMOS index of the century register
    "iapc_boot_arch" / Int16ul,
    "reserved1" / Int8ul,
    "flags" / Int32ul,
    "reset_reg" / Gas,
    "reset_value" / Int8ul,
    "arm_boot_arch" / Int16ul,
    "fadt_minor_version" / Int8ul,
    "x_firmware_ctrl" / Int64ul,
    "x_dsdt" / Int64ul,
    "x_pm1a_evt_blk" / Gas,
    "x_pm1b_evt_blk" / Gas,
    "x_pm1a_cnt_blk" / Gas,
    "x_pm1b_cnt_blk" / Gas,
    "x_pm2_cnt_blk" / Gas,
    "x_pm_tmr_blk" / Gas,
    "x_gpe0_blk" / Gas,
    "x_gpe1_blk" / Gas,
    "sleep_control_reg" / Gas,
    "sleep_status_reg" / Gas,
    "hypervisor_vendor_id" / Bytes(8),
)

FADT_WBINVD = 1 << 0
FADT_PROC_C1 = 1 << 2
FADT_PWR_BUTTON = 1 << 4  # set: no fixed-feature power button
FADT_SLP_BUTTON = 1 << 5  # set: no fixed-feature sleep button
FADT_RESET_REG_SUP = 1 << 10
BOOT_ARCH_LEGACY_DEVICES, BOOT_ARCH_8042 = 1 << 0, 1 << 1

Facs = Struct(
    "signature" / Const(b"FACS"),
    "length" / Const(64, Int32ul),
    "hardware_signature" / Int32ul,
    "firmware_waking_vector" / Int32ul,
    "global_lock" / Int32ul,
    "flags" / Int32ul,
    "x_firmware_waking_vector" / Int64ul,
    "version" / Int8ul,
    "reserved" / Bytes(31),
)

MadtLocalApic = Struct("type" / Const(0, Int8ul), "length" / Const(8, Int8ul), "processor_id" / Int8ul,
                       "apic_id" / Int8ul, "flags" / Int32ul)
MadtIoApic = Struct("type" / Const(1, Int8ul), "length" / Const(12, Int8ul), "ioapic_id" / Int8ul,
                    "reserved" / Const(0, Int8ul), "address" / Int32ul, "gsi_base" / Int32ul)
MadtLocalApicNmi = Struct("type" / Const(4, Int8ul), "length" / Const(6, Int8ul), "processor_id" / Int8ul,
                          "flags" / Int16ul, "lint" / Int8ul)
MADT_PCAT_COMPAT = 1  # the 8259 PICs are present too (Linux masks them when it uses the IOAPIC)
LAPIC_ENABLED = 1
ALL_PROCESSORS = 0xFF


def _sdt(signature: bytes, revision: int, body: bytes) -> bytes:
    """A system description table: header, body, checksum over both."""
    header = dict(signature=signature, length=SdtHeader.sizeof() + len(body), revision=revision, checksum=0,
                  oem_id=OEM_ID, oem_table_id=OEM_TABLE_ID, oem_revision=1, creator_id=b"PYKV",
                  creator_revision=1)
    table = bytearray(SdtHeader.build(header) + body)
    table[9] = checksum(table)
    return bytes(table)


def _madt(cpus: int) -> bytes:
    body = Int32ul.build(LAPIC_ADDRESS) + Int32ul.build(MADT_PCAT_COMPAT)
    for cpu in range(cpus):
        body += MadtLocalApic.build(dict(processor_id=cpu, apic_id=cpu, flags=LAPIC_ENABLED))
    # ID 0, as KVM's IOAPIC reports in its ID register (and as QEMU's tables say).
    body += MadtIoApic.build(dict(ioapic_id=0, address=IOAPIC_ADDRESS, gsi_base=0))
    # No interrupt source overrides: KVM's default routing sends ISA IRQ n to IOAPIC pin n.
    body += MadtLocalApicNmi.build(dict(processor_id=ALL_PROCESSORS, flags=0, lint=1))
    return _sdt(b"APIC", 4, body)


def _io_gas(port: int, length: int) -> dict:
    return dict(space_id=GAS_SYSTEM_IO, bit_width=8 * length, bit_offset=0,
                access_size={1: 1, 2: 2, 4: 3}[length], address=port)


_NO_GAS = dict(space_id=0, bit_width=0, bit_offset=0, access_size=0, address=0)


def _fadt(dsdt: int, facs: int) -> bytes:
    body = Fadt.build(dict(
        header=dict(signature=b"FACP", length=0, revision=6, checksum=0, oem_id=OEM_ID,
                    oem_table_id=OEM_TABLE_ID, oem_revision=1, creator_id=b"PYKV", creator_revision=1),
        firmware_ctrl=facs, dsdt=dsdt, reserved0=0, preferred_pm_profile=0, sci_int=SCI_IRQ, smi_cmd=0,
        acpi_enable=0, acpi_disable=0, s4bios_req=0, pstate_cnt=0,
        pm1a_evt_blk=PM_BASE + PM1_EVT, pm1b_evt_blk=0, pm1a_cnt_blk=PM_BASE + PM1_CNT, pm1b_cnt_blk=0,
        pm2_cnt_blk=0, pm_tmr_blk=PM_BASE + PM_TMR, gpe0_blk=0, gpe1_blk=0,
        pm1_evt_len=4, pm1_cnt_len=2, pm2_cnt_len=0, pm_tmr_len=4, gpe0_blk_len=0, gpe1_blk_len=0,
        gpe1_base=0, cst_cnt=0,
        p_lvl2_lat=101, p_lvl3_lat=1001,  # > 100 and > 1000: C2 and C3 not supported
        flush_size=0, flush_stride=0, duty_offset=0, duty_width=0, day_alrm=0, mon_alrm=0,
        century=CMOS_CENTURY, iapc_boot_arch=BOOT_ARCH_LEGACY_DEVICES | BOOT_ARCH_8042, reserved1=0,
        flags=FADT_WBINVD | FADT_PROC_C1 | FADT_PWR_BUTTON | FADT_SLP_BUTTON | FADT_RESET_REG_SUP,
        # The reset register is the i8042's command port: writing 0xFE pulses the CPU reset line,
        # which is the reset pykvm implements (and what `reboot=k` uses).
        reset_reg=_io_gas(I8042_COMMAND_PORT, 1), reset_value=I8042_PULSE_RESET,
        arm_boot_arch=0, fadt_minor_version=0, x_firmware_ctrl=0, x_dsdt=dsdt,
        x_pm1a_evt_blk=_io_gas(PM_BASE + PM1_EVT, 4), x_pm1b_evt_blk=_NO_GAS,
        x_pm1a_cnt_blk=_io_gas(PM_BASE + PM1_CNT, 2), x_pm1b_cnt_blk=_NO_GAS, x_pm2_cnt_blk=_NO_GAS,
        x_pm_tmr_blk=_io_gas(PM_BASE + PM_TMR, 4), x_gpe0_blk=_NO_GAS, x_gpe1_blk=_NO_GAS,
        sleep_control_reg=_NO_GAS, sleep_status_reg=_NO_GAS, hypervisor_vendor_id=b"PYKVM\0\0\0",
    ))
    return _sdt(b"FACP", 6, body[SdtHeader.sizeof():])


# -- DSDT ------------------------------------------------------------------------------------------


def _pci_crs() -> bytes:
    """What the host bridge decodes: every bus number, the configuration ports, I/O around them
    and the BAR windows pykvm.devices.pci assigns from."""
    return aml.buffer(
        aml.word_address(2, 0, 0x00, 0xFF)  # bus numbers 0-255
        + aml.io_port(0xCF8, 8)  # the configuration ports
        + aml.word_address(1, 0x03, 0x0000, 0x0CF7)  # I/O below and above the configuration ports
        + aml.word_address(1, 0x03, 0x0D00, IO_WINDOW[1] - 1)
        + aml.dword_memory(MMIO_WINDOW[0], MMIO_WINDOW[1] - 1)
        + aml.END_TAG
    )


def _pci_prt(slots: int) -> bytes:
    entries = [
        aml.package([aml.integer((slot << 16) | 0xFFFF), aml.integer(pin), aml.integer(0),
                     aml.integer(pci_intx_irq(slot, pin))])
        for slot in range(1, slots) for pin in range(4)
    ]
    return aml.package(entries)


def dsdt(pci_slots: int = PCI_SLOTS) -> bytes:
    """`pci_slots`: slots 0 to pci_slots - 1 get routing entries. The kernel parses the whole DSDT at
    boot, and where its code is emulated each entry costs, so the loader passes the slots in use."""
    pci0 = aml.device("PCI0", (
        aml.name("_HID", aml.integer(aml.eisa_id("PNP0A03")))
        + aml.name("_ADR", aml.integer(0))
        + aml.name("_UID", aml.integer(0))
        + aml.name("_CRS", _pci_crs())
        + aml.name("_PRT", _pci_prt(pci_slots))
    ))
    # \_S5: the SLP_TYP values for soft-off, written to PM1a/PM1b control with SLP_EN.
    s5 = aml.name("_S5", aml.package([aml.integer(SLP_TYP_SOFT_OFF)] * 2 + [aml.integer(0)] * 2))
    return _sdt(b"DSDT", 2, aml.scope(b"\\" + aml.name_seg("_SB"), pci0) + s5)


def write_acpi_tables(memory: GuestMemory, cpus: int, *, pci_slots: int = PCI_SLOTS, base: int = ACPI_BASE) -> int:
    """Write RSDP, XSDT, MADT, FADT, FACS and DSDT from `base`; returns the RSDP's address."""
    facs_at = align(base + Rsdp.sizeof(), 64)  # the FACS must be 64-byte aligned
    at = facs_at + Facs.sizeof()
    tables: dict[str, tuple[int, bytes]] = {}
    dsdt_table = dsdt(pci_slots)
    tables["DSDT"] = (at, dsdt_table)
    at = align(at + len(dsdt_table), 16)
    fadt_table = _fadt(tables["DSDT"][0], facs_at)
    tables["FACP"] = (at, fadt_table)
    at = align(at + len(fadt_table), 16)
    madt_table = _madt(cpus)
    tables["APIC"] = (at, madt_table)
    at = align(at + len(madt_table), 16)
    xsdt_at = at
    xsdt = _sdt(b"XSDT", 1, b"".join(Int64ul.build(tables[name][0]) for name in ("FACP", "APIC")))
    at += len(xsdt)
    if at > BIOS_AREA_END or (base < MP_BASE and at > MP_BASE):
        raise ValueError("ACPI tables overflow their area")
    memory.write(facs_at, Facs.build(dict(hardware_signature=0, firmware_waking_vector=0, global_lock=0,
                                          flags=0, x_firmware_waking_vector=0, version=2, reserved=bytes(31))))
    for address, table in tables.values():
        memory.write(address, table)
    memory.write(xsdt_at, xsdt)
    rsdp = bytearray(Rsdp.build(dict(checksum=0, oem_id=OEM_ID, revision=2, rsdt_address=0, length=Rsdp.sizeof(),
                                     xsdt_address=xsdt_at, extended_checksum=0, reserved=bytes(3))))
    rsdp[8] = checksum(rsdp[:20])
    rsdp[32] = checksum(rsdp)
    memory.write(base, bytes(rsdp))
    return base
