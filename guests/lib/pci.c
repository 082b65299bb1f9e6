/* PCI configuration mechanism 1, BAR mapping and MSI-X. */
#include "pci.h"

#define CONFIG_ADDRESS 0xcf8
#define CONFIG_DATA    0xcfc

#define PTE_PRESENT  0x01
#define PTE_WRITE    0x02
#define PTE_USER     0x04
#define PTE_PWT      0x08
#define PTE_PCD      0x10
#define PTE_LARGE    0x80
#define PTE_ADDR     0x000ffffffffff000ULL
#define LARGE_PAGE   0x200000ULL
#define IDENTITY_MAP_END (4ULL << 30)   /* what entry.S maps */
#define CANONICAL_END    (1ULL << 47)   /* identity mapping needs a lower-half address */

#define MSIX_ENABLE        (1u << 31)   /* bits of the capability's first dword */
#define MSIX_FUNCTION_MASK (1u << 30)
#define MSI_ADDRESS        0xfee00000u

extern uint64_t pml4[512];

static void config_address(const struct pci_dev *d, uint8_t off)
{
	uint32_t address = 1u << 31 | d->bus << 16 | d->slot << 11 | d->fn << 8 | (off & 0xfc);

	__asm__ volatile("outl %0, %1" : : "a"(address), "Nd"(CONFIG_ADDRESS));
}

uint32_t pci_read32(const struct pci_dev *d, uint8_t off)
{
	uint32_t v;

	config_address(d, off);
	__asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(CONFIG_DATA));
	return v;
}

void pci_write32(const struct pci_dev *d, uint8_t off, uint32_t v)
{
	config_address(d, off);
	__asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(CONFIG_DATA));
}

uint16_t pci_read16(const struct pci_dev *d, uint8_t off)
{
	return pci_read32(d, off) >> (off & 2) * 8;
}

uint8_t pci_read8(const struct pci_dev *d, uint8_t off)
{
	return pci_read32(d, off) >> (off & 3) * 8;
}

/* The status register shares the dword; its bits are write-1-to-clear, so
 * write zeros there. */
void pci_command_set(const struct pci_dev *d, uint16_t set, uint16_t clear)
{
	pci_write32(d, PCI_COMMAND, (pci_read16(d, PCI_COMMAND) | set) & ~clear);
}

bool pci_next(struct pci_dev *d)
{
	unsigned at = d->vendor ? (d->slot << 3 | d->fn) + 1 : 0;      /* slot << 3 | function */

	for (; at < 256; at++) {
		struct pci_dev f = { .bus = 0, .slot = at >> 3, .fn = at & 7 };
		struct pci_dev f0 = { .bus = 0, .slot = at >> 3, .fn = 0 };
		uint32_t id;

		if (f.fn && !(pci_read8(&f0, PCI_HEADER_TYPE) & 0x80)) {
			at |= 7;                /* single-function device */
			continue;
		}
		id = pci_read32(&f, PCI_VENDOR_ID);
		if ((id & 0xffff) == 0xffff) {
			if (f.fn == 0)
				at |= 7;        /* empty slot */
			continue;
		}
		*d = f;
		d->vendor = id;
		d->device = id >> 16;
		return true;
	}
	return false;
}

uint8_t pci_next_cap(const struct pci_dev *d, uint8_t id, uint8_t after)
{
	uint8_t off;

	if (!(pci_read16(d, PCI_STATUS) & PCI_STATUS_CAP_LIST))
		return 0;
	off = after ? pci_read8(d, after + 1) : pci_read8(d, PCI_CAP_PTR);
	/* 48 dwords fit after the header: a longer chain is a loop. */
	for (int hops = 0; off >= 0x40 && hops < 48; hops++) {
		off &= 0xfc;
		if (pci_read8(d, off) == id)
			return off;
		off = pci_read8(d, off + 1);
	}
	return 0;
}

uint64_t pci_bar_address(const struct pci_dev *d, int bar)
{
	uint32_t lo;
	uint64_t address;

	if (bar < 0 || bar > 5)
		return 0;
	lo = pci_read32(d, PCI_BAR0 + 4 * bar);
	if (lo & 1)
		return 0;                               /* I/O space */
	address = lo & ~0xfULL;
	if ((lo & 6) == 4 && bar < 5)                   /* 64-bit: the next BAR holds the high half */
		address |= (uint64_t)pci_read32(d, PCI_BAR0 + 4 * bar + 4) << 32;
	return address;
}

static uint64_t *next_table(uint64_t *entry)
{
	if (!(*entry & PTE_PRESENT)) {
		uint64_t *table = phys_alloc(PAGE_SIZE);

		if (!table)
			return NULL;
		memset(table, 0, PAGE_SIZE);
		*entry = (uint64_t)table | PTE_PRESENT | PTE_WRITE | PTE_USER;
	}
	return (uint64_t *)(*entry & PTE_ADDR);
}

/* Identity-maps [start, end) in uncached 2 MiB pages, user-accessible like
 * the rest of the runtime's map so CPL3 code can reach device registers. */
static bool map_uncached(uint64_t start, uint64_t end)
{
	for (uint64_t a = start & ~(LARGE_PAGE - 1); a < end; a += LARGE_PAGE) {
		uint64_t *pdpt = next_table(&pml4[a >> 39 & 511]);
		uint64_t *pd = pdpt ? next_table(&pdpt[a >> 30 & 511]) : NULL;

		if (!pd)
			return false;
		pd[a >> 21 & 511] = a | PTE_PRESENT | PTE_WRITE | PTE_USER | PTE_PWT | PTE_PCD | PTE_LARGE;
	}
	__asm__ volatile("mov %%cr3, %%rax; mov %%rax, %%cr3" : : : "rax", "memory");
	return true;
}

void *pci_bar_map(const struct pci_dev *d, int bar, uint64_t offset, uint64_t len)
{
	uint64_t base = pci_bar_address(d, bar), start = base + offset, end = start + len;

	if (!base) {
		printf("pci: FAIL %02x:%02x.%u BAR%d is not an assigned memory BAR\n", d->bus, d->slot, d->fn, bar);
		return NULL;
	}
	if (end > IDENTITY_MAP_END) {
		if (end > CANONICAL_END || end < start || !map_uncached(start, end)) {
			printf("pci: FAIL cannot map BAR%d at 0x%lx\n", bar, base);
			return NULL;
		}
	}
	return (void *)start;
}

bool msix_init(const struct pci_dev *d, struct msix *m)
{
	uint32_t table;

	m->cap = pci_next_cap(d, PCI_CAP_MSIX, 0);
	if (!m->cap)
		return false;
	m->size = (pci_read16(d, m->cap + 2) & 0x7ff) + 1;
	table = pci_read32(d, m->cap + 4);
	m->table = pci_bar_map(d, table & 7, table & ~7u, m->size * 16);
	return m->table != NULL;
}

void msix_route(const struct msix *m, uint16_t entry, uint8_t vector)
{
	volatile uint32_t *e = m->table + 4 * entry;

	e[3] = 1;                                       /* masked while it changes */
	e[0] = MSI_ADDRESS | lapic_id() << 12;
	e[1] = 0;
	e[2] = vector;                                  /* fixed, edge */
	e[3] = 0;
}

void msix_enable(const struct pci_dev *d, const struct msix *m)
{
	pci_write32(d, m->cap, (pci_read32(d, m->cap) | MSIX_ENABLE) & ~MSIX_FUNCTION_MASK);
}
