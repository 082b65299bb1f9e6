"""What the ACPI tables and the MP table both describe: where the tables go, where the interrupt
controllers are, and how PCI interrupts are routed.

PCI interrupt routing matches pykvm.devices.pci: the function in slot S raises INTx on
INTX_IRQS[(S - 1) % 4] for pin A; pins B-D rotate as on a PIIX (swizzle), which only matters for
functions with more than one pin.
"""

from __future__ import annotations

from pykvm.devices.pci import INTX_IRQS

ACPI_BASE = 0xE0000
MP_BASE = 0xF0000
BIOS_AREA_END = 0x100000

LAPIC_ADDRESS = 0xFEE0_0000
IOAPIC_ADDRESS = 0xFEC0_0000
IOAPIC_VERSION = 0x11  # KVM's in-kernel IOAPIC: 24 pins
PCI_SLOTS = 32


def pci_intx_irq(slot: int, pin: int) -> int:
    """The GSI a function in `slot` raises for INTx pin 0-3 (A-D)."""
    return INTX_IRQS[(slot - 1 + pin) % len(INTX_IRQS)]


def checksum(data: bytes | bytearray) -> int:
    """The byte that makes `data` (with this byte as 0) sum to 0 modulo 256: both specifications'
    rule for every table."""
    return -sum(data) & 0xFF


def align(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)
