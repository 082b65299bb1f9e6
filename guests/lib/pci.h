/* PCI on bus 0 through configuration mechanism 1 (ports 0xCF8/0xCFC), and
 * MSI-X.  Setup code: call at CPL0 (it does port I/O and may edit the page
 * tables).  The firmware or VMM has assigned the BARs; nothing here moves one. */
#ifndef PCI_H
#define PCI_H

#include "runtime.h"

#define PCI_VENDOR_ID      0x00
#define PCI_COMMAND        0x04
#define PCI_STATUS         0x06
#define PCI_HEADER_TYPE    0x0e
#define PCI_BAR0           0x10
#define PCI_SUBSYSTEM_ID   0x2e
#define PCI_CAP_PTR        0x34
#define PCI_INTERRUPT_LINE 0x3c

#define PCI_COMMAND_MEMORY        0x0002
#define PCI_COMMAND_BUS_MASTER    0x0004
#define PCI_COMMAND_INTX_DISABLE  0x0400
#define PCI_STATUS_CAP_LIST       0x0010

#define PCI_CAP_VENDOR 0x09
#define PCI_CAP_MSIX   0x11

struct pci_dev {
	uint8_t bus, slot, fn;
	uint16_t vendor, device;
};

uint32_t pci_read32(const struct pci_dev *d, uint8_t off);
void pci_write32(const struct pci_dev *d, uint8_t off, uint32_t v);
/* Narrower fields, read out of the aligned dword that holds them. */
uint16_t pci_read16(const struct pci_dev *d, uint8_t off);
uint8_t pci_read8(const struct pci_dev *d, uint8_t off);
/* Read-modify-write of the 16-bit command register. */
void pci_command_set(const struct pci_dev *d, uint16_t set, uint16_t clear);

/* Steps *d to the next function on bus 0 in slot/function order, starting
 * from a zeroed *d; false after the last. */
bool pci_next(struct pci_dev *d);

/* Offset of the first capability with this id after the one at `after`
 * (0: from the start of the list), or 0 if there is none. */
uint8_t pci_next_cap(const struct pci_dev *d, uint8_t id, uint8_t after);

/* Physical address of memory BAR `bar` (64-bit BARs included), 0 if it is
 * an I/O BAR or unassigned. */
uint64_t pci_bar_address(const struct pci_dev *d, int bar);

/* A pointer to [offset, offset + len) of memory BAR `bar`, identity-mapped
 * (uncached) if it lies beyond the runtime's map of the first 4 GiB; NULL,
 * with the reason printed, if the BAR is unusable. */
void *pci_bar_map(const struct pci_dev *d, int bar, uint64_t offset, uint64_t len);

/* MSI-X: the table of a function, its entries pointed at this CPU's LAPIC. */
struct msix {
	volatile uint32_t *table;       /* 4 dwords per entry */
	uint16_t size;                  /* entries */
	uint8_t cap;                    /* capability offset */
};
bool msix_init(const struct pci_dev *d, struct msix *m);
/* Entry -> LAPIC vector, fixed delivery to this CPU, unmasked. */
void msix_route(const struct msix *m, uint16_t entry, uint8_t vector);
void msix_enable(const struct pci_dev *d, const struct msix *m);

#endif
