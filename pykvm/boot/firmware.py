"""The tables PC firmware leaves in memory for an operating system: ACPI and the MP table.

pykvm has no BIOS, so the Linux loader writes what one would have: enough for a kernel to find
every vCPU, the IOAPIC, the PCI host bridge with its interrupt routing, and a way to power off.

    ACPI   RSDP -> XSDT -> MADT (a LAPIC per vCPU, the IOAPIC, LINT1 = NMI)
                        -> FADT (PM1 event/control blocks and PM timer at 0x600, reset register,
                                 -> FACS, -> DSDT: \\_SB.PCI0 (PNP0A03, _CRS windows, _PRT) and \\_S5)
    MP     floating pointer -> configuration table (processors, PCI and ISA buses, the IOAPIC,
           ISA and PCI interrupt assignments), for kernels booted with acpi=off

Both live in the BIOS area [0xE0000, 0x100000), which the e820 map reports as reserved, where
kernels look for them when nothing tells them (the Linux loader also puts the RSDP address in
boot_params). Layouts are declared with construct; the DSDT's few objects are AML encoded here.

PCI interrupt routing matches pykvm.devices.pci: the function in slot S raises INTx on
INTX_IRQS[(S - 1) % 4] for pin A; pins B-D rotate as on a PIIX (swizzle), which only matters for
functions with more than one pin.
"""

from __future__ import annotations

from construct import Array, Bytes, Const, Int8ul, Int16ul, Int32ul, Int64ul, Struct

from pykvm.devices.acpi_pm import PM_BASE, PM1_CNT, PM1_EVT, PM_TMR, SLP_TYP_SOFT_OFF
from pykvm.devices.pci import INTX_IRQS, IO_WINDOW, MMIO_WINDOW
from pykvm.memory import GuestMemory

ACPI_BASE = 0xE0000
MP_BASE = 0xF0000
BIOS_AREA_END = 0x100000

LAPIC_ADDRESS = 0xFEE0_0000
IOAPIC_ADDRESS = 0xFEC0_0000
IOAPIC_VERSION = 0x11  # KVM's in-kernel IOAPIC: 24 pins
IOAPIC_PINS = 24
SCI_IRQ = 9
I8042_COMMAND_PORT, I8042_PULSE_RESET = 0x64, 0xFE
CMOS_CENTURY = 0x32
PCI_SLOTS = 32

OEM_ID = b"PYKVM "
OEM_TABLE_ID = b"PYKVMPC "

# -- ACPI (ACPI 6.x specification, chapter 5) -------------------------------------------------------

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


def _checksum(data: bytes | bytearray) -> int:
    """The byte that makes `data` (with this byte as 0) sum to 0 modulo 256."""
    return -sum(data) & 0xFF


def _sdt(signature: bytes, revision: int, body: bytes) -> bytes:
    """A system description table: header, body, checksum over both."""
    header = dict(signature=signature, length=SdtHeader.sizeof() + len(body), revision=revision, checksum=0,
                  oem_id=OEM_ID, oem_table_id=OEM_TABLE_ID, oem_revision=1, creator_id=b"PYKV",
                  creator_revision=1)
    table = bytearray(SdtHeader.build(header) + body)
    table[9] = _checksum(table)
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


# -- AML, just what the DSDT needs (ACPI 6.x, chapter 20) ----------------------------------------------


def _pkg_length(content: int) -> bytes:
    """PkgLength: the length of the package including the encoding's own bytes."""
    if content + 1 < 0x40:
        return bytes([content + 1])
    for extra in (1, 2, 3):
        total = content + 1 + extra
        if total < 1 << (4 + 8 * extra):
            return bytes([(extra << 6) | (total & 0xF)]) + (total >> 4).to_bytes(extra, "little")
    raise ValueError("AML package too long")


def _name_seg(name: str) -> bytes:
    return name.ljust(4, "_").encode()


def _aml_integer(value: int) -> bytes:
    if value == 0:
        return b"\x00"  # ZeroOp
    if value == 1:
        return b"\x01"  # OneOp
    for prefix, size in ((0x0A, 1), (0x0B, 2), (0x0C, 4), (0x0E, 8)):
        if value < 1 << (8 * size):
            return bytes([prefix]) + value.to_bytes(size, "little")
    raise ValueError(value)


def _aml_package(elements: list[bytes]) -> bytes:
    content = bytes([len(elements)]) + b"".join(elements)
    return b"\x12" + _pkg_length(len(content)) + content  # PackageOp


def _aml_buffer(data: bytes) -> bytes:
    content = _aml_integer(len(data)) + data
    return b"\x11" + _pkg_length(len(content)) + content  # BufferOp


def _aml_name(name: str, value: bytes) -> bytes:
    return b"\x08" + _name_seg(name) + value  # NameOp


def _aml_device(name: str, body: bytes) -> bytes:
    content = _name_seg(name) + body
    return b"\x5b\x82" + _pkg_length(len(content)) + content  # DeviceOp


def _aml_scope(path: bytes, body: bytes) -> bytes:
    content = path + body
    return b"\x10" + _pkg_length(len(content)) + content  # ScopeOp


def _eisa_id(text: str) -> int:
    """A compressed EISA ID ("PNP0A03") as the 32-bit integer AML stores."""
    letters = [ord(c) - 0x40 for c in text[:3]]
    value = (letters[0] << 26) | (letters[1] << 21) | (letters[2] << 16) | int(text[3:], 16)
    return int.from_bytes(value.to_bytes(4, "big"), "little")


def _word_address(resource_type: int, type_flags: int, low: int, high: int) -> bytes:
    """A Word Address Space descriptor (bus numbers or I/O) the bridge produces."""
    return bytes([0x88]) + Int16ul.build(13) + bytes([resource_type, 0x0C, type_flags]) + b"".join(
        Int16ul.build(v) for v in (0, low, high, 0, high - low + 1))


def _dword_memory(low: int, high: int) -> bytes:
    """A DWord Memory descriptor: a read-write, non-cacheable window the bridge produces."""
    return bytes([0x87]) + Int16ul.build(23) + bytes([0, 0x0C, 0x01]) + b"".join(
        Int32ul.build(v) for v in (0, low, high, 0, high - low + 1))


def _pci_crs() -> bytes:
    resources = (
        _word_address(2, 0, 0x00, 0xFF)  # bus numbers 0-255
        + bytes([0x47, 0x01]) + Int16ul.build(0xCF8) + Int16ul.build(0xCF8) + bytes([1, 8])  # config ports
        + _word_address(1, 0x03, 0x0000, 0x0CF7)  # I/O below and above the configuration ports
        + _word_address(1, 0x03, 0x0D00, IO_WINDOW[1] - 1)
        + _dword_memory(MMIO_WINDOW[0], MMIO_WINDOW[1] - 1)
        + bytes([0x79, 0x00])  # end tag (checksum 0: "treat as correct")
    )
    return _aml_buffer(resources)


def pci_intx_irq(slot: int, pin: int) -> int:
    """The GSI a function in `slot` raises for INTx pin 0-3 (A-D)."""
    return INTX_IRQS[(slot - 1 + pin) % len(INTX_IRQS)]


def _pci_prt(slots: int) -> bytes:
    entries = [
        _aml_package([_aml_integer((slot << 16) | 0xFFFF), _aml_integer(pin), _aml_integer(0),
                      _aml_integer(pci_intx_irq(slot, pin))])
        for slot in range(1, slots) for pin in range(4)
    ]
    return _aml_package(entries)


def dsdt(pci_slots: int = PCI_SLOTS) -> bytes:
    """`pci_slots`: slots 0 to pci_slots - 1 get routing entries. The kernel parses the whole DSDT at
    boot, and where its code is emulated each entry costs, so the loader passes the slots in use."""
    pci0 = _aml_device("PCI0", (
        _aml_name("_HID", _aml_integer(_eisa_id("PNP0A03")))
        + _aml_name("_ADR", _aml_integer(0))
        + _aml_name("_UID", _aml_integer(0))
        + _aml_name("_CRS", _pci_crs())
        + _aml_name("_PRT", _pci_prt(pci_slots))
    ))
    # \_S5: the SLP_TYP values for soft-off, written to PM1a/PM1b control with SLP_EN.
    s5 = _aml_name("_S5", _aml_package([_aml_integer(SLP_TYP_SOFT_OFF)] * 2 + [_aml_integer(0)] * 2))
    return _sdt(b"DSDT", 2, _aml_scope(b"\\" + _name_seg("_SB"), pci0) + s5)


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)


def write_acpi_tables(memory: GuestMemory, cpus: int, *, pci_slots: int = PCI_SLOTS, base: int = ACPI_BASE) -> int:
    """Write RSDP, XSDT, MADT, FADT, FACS and DSDT from `base`; returns the RSDP's address."""
    facs_at = _align(base + Rsdp.sizeof(), 64)  # the FACS must be 64-byte aligned
    at = facs_at + Facs.sizeof()
    tables: dict[str, tuple[int, bytes]] = {}
    dsdt_table = dsdt(pci_slots)
    tables["DSDT"] = (at, dsdt_table)
    at = _align(at + len(dsdt_table), 16)
    fadt_table = _fadt(tables["DSDT"][0], facs_at)
    tables["FACP"] = (at, fadt_table)
    at = _align(at + len(fadt_table), 16)
    madt_table = _madt(cpus)
    tables["APIC"] = (at, madt_table)
    at = _align(at + len(madt_table), 16)
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
    rsdp[8] = _checksum(rsdp[:20])
    rsdp[32] = _checksum(rsdp)
    memory.write(base, bytes(rsdp))
    return base


# -- MP table (Intel MultiProcessor Specification 1.4, chapter 4) ----------------------------------------

MpFloatingPointer = Struct(
    "signature" / Const(b"_MP_"),
    "physical_address" / Int32ul,  # of the configuration table
    "length" / Const(1, Int8ul),  # in 16-byte units
    "spec_rev" / Const(4, Int8ul),
    "checksum" / Int8ul,
    "features" / Array(5, Int8ul),  # feature byte 1 = 0: a configuration table is present
)

MpConfigHeader = Struct(
    "signature" / Const(b"PCMP"),
    "base_table_length" / Int16ul,
    "spec_rev" / Const(4, Int8ul),
    "checksum" / Int8ul,
    "oem_id" / Bytes(8),
    "product_id" / Bytes(12),
    "oem_table_pointer" / Int32ul,
    "oem_table_size" / Int16ul,
    "entry_count" / Int16ul,
    "lapic_address" / Int32ul,
    "extended_table_length" / Int16ul,
    "extended_table_checksum" / Int8ul,
    "reserved" / Int8ul,
)

MpProcessor = Struct("type" / Const(0, Int8ul), "lapic_id" / Int8ul, "lapic_version" / Int8ul,
                     "cpu_flags" / Int8ul, "signature" / Int32ul, "feature_flags" / Int32ul,
                     "reserved" / Bytes(8))
MpBus = Struct("type" / Const(1, Int8ul), "bus_id" / Int8ul, "bus_type" / Bytes(6))
MpIoApic = Struct("type" / Const(2, Int8ul), "ioapic_id" / Int8ul, "version" / Int8ul, "flags" / Int8ul,
                  "address" / Int32ul)
MpInterrupt = Struct("type" / Int8ul, "interrupt_type" / Int8ul, "flags" / Int16ul, "source_bus" / Int8ul,
                     "source_irq" / Int8ul, "destination_id" / Int8ul, "destination_pin" / Int8ul)
MP_IO_INTERRUPT, MP_LOCAL_INTERRUPT = 3, 4
MP_INT, MP_NMI, MP_EXTINT = 0, 1, 3
MP_CPU_ENABLED, MP_CPU_BOOTSTRAP = 1, 2
MP_IOAPIC_ENABLED = 1
MP_LEVEL_ACTIVE_HIGH = 0b1101  # trigger level (bits 3:2 = 11), polarity active high (bits 1:0 = 01)
MP_CONFORMING = 0  # the bus's default: edge, active high for ISA
PCI_BUS, ISA_BUS = 0, 1
LAPIC_VERSION = 0x14


def write_mp_table(memory: GuestMemory, cpus: int, *, pci_slots: int = PCI_SLOTS, base: int = MP_BASE) -> int:
    """Write the MP floating pointer at `base` and the configuration table after it."""
    ioapic_id = cpus  # after the LAPIC IDs, as SeaBIOS numbers it
    entries = [MpProcessor.build(dict(lapic_id=cpu, lapic_version=LAPIC_VERSION,
                                      cpu_flags=MP_CPU_ENABLED | (MP_CPU_BOOTSTRAP if cpu == 0 else 0),
                                      signature=0x600, feature_flags=0x201, reserved=bytes(8)))
               for cpu in range(cpus)]
    entries.append(MpBus.build(dict(bus_id=PCI_BUS, bus_type=b"PCI   ")))
    entries.append(MpBus.build(dict(bus_id=ISA_BUS, bus_type=b"ISA   ")))
    entries.append(MpIoApic.build(dict(ioapic_id=ioapic_id, version=IOAPIC_VERSION, flags=MP_IOAPIC_ENABLED,
                                       address=IOAPIC_ADDRESS)))
    # ISA IRQ n on IOAPIC pin n (KVM's default routing); 2 is the PICs' cascade.
    for irq in range(16):
        if irq != 2:
            entries.append(MpInterrupt.build(dict(type=MP_IO_INTERRUPT, interrupt_type=MP_INT, flags=MP_CONFORMING,
                                                  source_bus=ISA_BUS, source_irq=irq, destination_id=ioapic_id,
                                                  destination_pin=irq)))
    for slot in range(1, pci_slots):
        for pin in range(4):
            entries.append(MpInterrupt.build(dict(
                type=MP_IO_INTERRUPT, interrupt_type=MP_INT, flags=MP_LEVEL_ACTIVE_HIGH, source_bus=PCI_BUS,
                source_irq=(slot << 2) | pin, destination_id=ioapic_id, destination_pin=pci_intx_irq(slot, pin))))
    for lint, kind in ((0, MP_EXTINT), (1, MP_NMI)):
        entries.append(MpInterrupt.build(dict(type=MP_LOCAL_INTERRUPT, interrupt_type=kind, flags=MP_CONFORMING,
                                              source_bus=ISA_BUS, source_irq=0, destination_id=0xFF,
                                              destination_pin=lint)))
    body = b"".join(entries)
    table_at = base + MpFloatingPointer.sizeof()
    header = bytearray(MpConfigHeader.build(dict(
        base_table_length=MpConfigHeader.sizeof() + len(body), checksum=0, oem_id=b"PYKVM   ",
        product_id=b"PC          ", oem_table_pointer=0, oem_table_size=0, entry_count=len(entries),
        lapic_address=LAPIC_ADDRESS, extended_table_length=0, extended_table_checksum=0, reserved=0)))
    header[7] = _checksum(header + body)
    if table_at + len(header) + len(body) > BIOS_AREA_END:
        raise ValueError("MP table overflows the BIOS area")
    memory.write(table_at, bytes(header) + body)
    pointer = bytearray(MpFloatingPointer.build(dict(physical_address=table_at, checksum=0, features=[0] * 5)))
    pointer[10] = _checksum(pointer)
    memory.write(base, bytes(pointer))
    return base
