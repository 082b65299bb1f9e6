"""PCI: configuration mechanism 1 and a host bridge (bus.py), functions with BARs, capabilities
and INTx (function.py), MSI-X (msix.py).

Interrupts: a function raises MSI-X messages when the guest enabled MSI-X (the platform's
signal_msi), and otherwise its INTx line, level-triggered on the GSI in its Interrupt Line.
"""

from pykvm.devices.pci.bus import (CONFIG_ADDRESS_PORT, CONFIG_DATA_PORT, INTX_IRQS, IO_WINDOW, MMIO_WINDOW,
                                   HostBridge, PciBus, PciBusState, attach_pci_bus)
from pykvm.devices.pci.function import CAP_MSIX, CAP_VENDOR, CONFIG_SIZE, Bar, PciFunction, PciState
from pykvm.devices.pci.msix import MSIX_NO_VECTOR, MsixTable

__all__ = [
    "CONFIG_ADDRESS_PORT", "CONFIG_DATA_PORT", "INTX_IRQS", "IO_WINDOW", "MMIO_WINDOW", "HostBridge", "PciBus",
    "PciBusState", "attach_pci_bus", "CAP_MSIX", "CAP_VENDOR", "CONFIG_SIZE", "Bar", "PciFunction", "PciState",
    "MSIX_NO_VECTOR", "MsixTable",
]
