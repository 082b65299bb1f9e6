"""The tables PC firmware leaves in memory for an operating system, one module per specification.

pykvm has no BIOS, so the Linux loader writes what one would have: enough for a kernel to find
every vCPU, the IOAPIC, the PCI host bridge with its interrupt routing, and a way to power off.

    acpi      RSDP -> XSDT -> MADT (a LAPIC per vCPU, the IOAPIC, LINT1 = NMI)
                           -> FADT (PM1 event/control blocks and PM timer at 0x600, reset register,
                                    -> FACS, -> DSDT: \\_SB.PCI0 (PNP0A03, _CRS windows, _PRT), \\_S5)
    aml       the few AML objects the DSDT is made of
    mptable   MP floating pointer -> configuration table (processors, PCI and ISA buses, the
              IOAPIC, ISA and PCI interrupt assignments), for kernels booted with acpi=off
    layout    what both describe: where the tables go, the interrupt controllers, PCI routing

Both kinds live in the BIOS area [0xE0000, 0x100000), which the e820 map reports as reserved,
where kernels look for them when nothing tells them (the Linux loader also puts the RSDP address
in boot_params). Layouts are declared with construct.
"""

from pykvm.boot.firmware.acpi import dsdt, write_acpi_tables
from pykvm.boot.firmware.layout import PCI_SLOTS, pci_intx_irq
from pykvm.boot.firmware.mptable import write_mp_table

__all__ = ["PCI_SLOTS", "dsdt", "pci_intx_irq", "write_acpi_tables", "write_mp_table"]
