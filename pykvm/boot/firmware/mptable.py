"""The MP table (Intel MultiProcessor Specification 1.4, chapter 4), for kernels booted with
acpi=off: a floating pointer, then a configuration table listing the processors, the PCI and ISA
buses, the IOAPIC, and where every ISA IRQ and PCI INTx pin arrives on it."""

from __future__ import annotations

from construct import Array, Bytes, Const, Int8ul, Int16ul, Int32ul, Struct

from pykvm.boot.firmware.layout import (
    BIOS_AREA_END,
    IOAPIC_ADDRESS,
    IOAPIC_VERSION,
    LAPIC_ADDRESS,
    MP_BASE,
    PCI_SLOTS,
    checksum,
    pci_intx_irq,
)
from pykvm.memory import GuestMemory

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
    header[7] = checksum(header + body)
    if table_at + len(header) + len(body) > BIOS_AREA_END:
        raise ValueError("MP table overflows the BIOS area")
    memory.write(table_at, bytes(header) + body)
    pointer = bytearray(MpFloatingPointer.build(dict(physical_address=table_at, checksum=0, features=[0] * 5)))
    pointer[10] = checksum(pointer)
    memory.write(base, bytes(pointer))
    return base
