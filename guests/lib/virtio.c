/* virtio-pci (modern) transport, split virtqueues and their interrupts. */
#include "virtio.h"

#define VIRTIO_VENDOR          0x1af4
#define VIRTIO_TRANSITIONAL    0x1000   /* 0x1000..0x103f: device type in the subsystem ID */
#define VIRTIO_MODERN          0x1040   /* 0x1040 + device type */

/* Device status bits */
#define STATUS_ACKNOWLEDGE  0x01
#define STATUS_DRIVER       0x02
#define STATUS_DRIVER_OK    0x04
#define STATUS_FEATURES_OK  0x08
#define STATUS_NEEDS_RESET  0x40
#define STATUS_FAILED       0x80

/* virtio_pci_cap: a vendor capability locating one structure in a BAR */
#define CAP_CFG_TYPE   3
#define CAP_BAR        4
#define CAP_OFFSET     8
#define CAP_LENGTH     12
#define CAP_NOTIFY_MULTIPLIER 16
#define CFG_COMMON 1
#define CFG_NOTIFY 2
#define CFG_ISR    3
#define CFG_DEVICE 4

#define VRING_DESC_F_NEXT     1
#define VRING_DESC_F_WRITE    2
#define VRING_DESC_F_INDIRECT 4
#define VRING_AVAIL_F_NO_INTERRUPT 1
#define VRING_USED_F_NO_NOTIFY     1

#define ISR_QUEUE 0x01
#define NO_VECTOR 0xffff

#define VEC_VIRTIO   0x40       /* MSI-X vectors: above the PIC's and the LAPIC timer's */
#define VIRTIO_VECTORS 4
#define ELCR         0x4d0      /* 8259 edge/level control, one bit per IRQ (0x4d1: IRQs 8-15) */

#define barrier() __asm__ volatile("" : : : "memory")
/* x86 orders stores after stores and loads after loads; only a store
 * followed by a load of another location needs a fence. */
#define mb() __asm__ volatile("mfence" : : : "memory")

static struct virtq *vq_by_vector[VIRTIO_VECTORS];
static unsigned vectors_used;
static struct virtio_dev *intx_devs[4];
static unsigned intx_count;

static __attribute__((noreturn)) void device_broke(const struct virtq *vq, const char *what, uint32_t value)
{
	printf("virtio: FAIL %02x:%02x.%u queue %u: %s %u\n",
	       vq->dev->pci.bus, vq->dev->pci.slot, vq->dev->pci.fn, vq->index, what, value);
	guest_exit(VIRTIO_EXIT_DEVICE);
}

static __attribute__((noreturn)) void driver_bug(const char *what)
{
	printf("virtio: FAIL BUG %s\n", what);
	guest_exit(0x7f);
}

/* ---- interrupts ------------------------------------------------------ */

/* Handlers get no argument: one small function per vector. */
#define MSIX_HANDLER(n) static void msix_handler##n(void) { vq_by_vector[n]->irqs++; }
MSIX_HANDLER(0) MSIX_HANDLER(1) MSIX_HANDLER(2) MSIX_HANDLER(3)
static void (*const msix_handlers[VIRTIO_VECTORS])(void) = {
	msix_handler0, msix_handler1, msix_handler2, msix_handler3,
};

/* Lines may be shared: ask every device.  Reading ISR clears it and
 * deasserts the level-triggered line before the runtime's EOI. */
static void intx_handler(void)
{
	for (unsigned i = 0; i < intx_count; i++) {
		struct virtio_dev *dev = intx_devs[i];

		if (*dev->isr & ISR_QUEUE)
			for (unsigned q = 0; q < VIRTIO_MAX_QUEUES; q++)
				dev->queues[q].irqs++;
	}
}

static bool intx_setup(struct virtio_dev *dev)
{
	uint8_t line = pci_read8(&dev->pci, PCI_INTERRUPT_LINE);
	uint16_t elcr = ELCR + line / 8;

	if (line >= 16 || intx_count == sizeof(intx_devs) / sizeof(intx_devs[0])) {
		printf("virtio: FAIL no usable INTx line (Interrupt Line %u)\n", line);
		return false;
	}
	intx_devs[intx_count++] = dev;
	outb(elcr, inb(elcr) | 1 << (line % 8));        /* PCI INTx is level-triggered */
	irq_register(VEC_PIC_BASE + line, intx_handler);
	pci_command_set(&dev->pci, 0, PCI_COMMAND_INTX_DISABLE);
	pic_unmask(line);
	return true;
}

static bool msix_setup(struct virtio_dev *dev)
{
	if (!msix_init(&dev->pci, &dev->msix)) {
		printf("virtio: FAIL no usable MSI-X capability\n");
		return false;
	}
	msix_enable(&dev->pci, &dev->msix);     /* every entry is still masked */
	dev->common->msix_config = NO_VECTOR;   /* configuration changes: not needed */
	return true;
}

/* Queue i uses MSI-X entry i + 1 (entry 0 is the usual one for
 * configuration changes) and a vector of its own. */
static bool msix_queue(struct virtq *vq)
{
	struct virtio_dev *dev = vq->dev;
	uint16_t entry = vq->index + 1;

	if (entry >= dev->msix.size || vectors_used == VIRTIO_VECTORS) {
		printf("virtio: FAIL no MSI-X entry or vector left for queue %u\n", vq->index);
		return false;
	}
	vq->vector = VEC_VIRTIO + vectors_used;
	vq_by_vector[vectors_used] = vq;
	irq_register(vq->vector, msix_handlers[vectors_used++]);
	msix_route(&dev->msix, entry, vq->vector);
	dev->common->queue_msix_vector = entry;
	if (dev->common->queue_msix_vector != entry) {
		printf("virtio: FAIL device refused MSI-X entry %u for queue %u\n", entry, vq->index);
		return false;
	}
	return true;
}

const char *virtio_irq_name(const struct virtio_dev *dev)
{
	return dev->irq == VIRTIO_IRQ_MSIX ? "msix" : dev->irq == VIRTIO_IRQ_INTX ? "intx" : "poll";
}

/* ---- the PCI transport ----------------------------------------------- */

static unsigned virtio_type(const struct pci_dev *d)
{
	if (d->vendor != VIRTIO_VENDOR)
		return 0;
	if (d->device >= VIRTIO_MODERN && d->device < VIRTIO_MODERN + 0x40)
		return d->device - VIRTIO_MODERN;
	if (d->device >= VIRTIO_TRANSITIONAL && d->device < VIRTIO_MODERN)
		return pci_read16(d, PCI_SUBSYSTEM_ID);
	return 0;
}

/* Maps the structures the vendor capabilities point at, taking the first
 * capability of each type as the spec advises. */
static bool find_structures(struct virtio_dev *dev)
{
	const struct pci_dev *d = &dev->pci;

	for (uint8_t cap = pci_next_cap(d, PCI_CAP_VENDOR, 0); cap; cap = pci_next_cap(d, PCI_CAP_VENDOR, cap)) {
		uint8_t type = pci_read8(d, cap + CAP_CFG_TYPE), bar = pci_read8(d, cap + CAP_BAR);
		uint32_t offset = pci_read32(d, cap + CAP_OFFSET), length = pci_read32(d, cap + CAP_LENGTH);

		if (type < CFG_COMMON || type > CFG_DEVICE || bar > 5)
			continue;               /* PCI config access window, or unknown */
		if (type == CFG_COMMON && !dev->common && length >= sizeof(*dev->common)) {
			dev->common = pci_bar_map(d, bar, offset, length);
		} else if (type == CFG_NOTIFY && !dev->notify_base) {
			dev->notify_multiplier = pci_read32(d, cap + CAP_NOTIFY_MULTIPLIER);
			dev->notify_len = length;
			dev->notify_base = pci_bar_map(d, bar, offset, length);
		} else if (type == CFG_ISR && !dev->isr && length >= 1) {
			dev->isr = pci_bar_map(d, bar, offset, length);
		} else if (type == CFG_DEVICE && !dev->config) {
			dev->config_len = length;
			dev->config = pci_bar_map(d, bar, offset, length);
		}
	}
	if (!dev->common || !dev->notify_base || !dev->isr) {
		printf("virtio: FAIL %02x:%02x.%u lacks a usable common, notify or ISR structure\n", d->bus, d->slot, d->fn);
		return false;
	}
	return true;
}

static uint64_t read_features(volatile struct virtio_pci_common_cfg *c)
{
	c->device_feature_select = 1;
	uint64_t hi = c->device_feature;
	c->device_feature_select = 0;
	return hi << 32 | c->device_feature;
}

static void write_features(volatile struct virtio_pci_common_cfg *c, uint64_t features)
{
	c->driver_feature_select = 0;
	c->driver_feature = features;
	c->driver_feature_select = 1;
	c->driver_feature = features >> 32;
}

static bool parse_irq_mode(struct virtio_dev *dev)
{
	char buf[8];
	const char *mode = cmdline_str("irq", "msix", buf, sizeof(buf));

	if (!strcmp(mode, "msix"))
		dev->irq = VIRTIO_IRQ_MSIX;
	else if (!strcmp(mode, "intx"))
		dev->irq = VIRTIO_IRQ_INTX;
	else if (!strcmp(mode, "poll"))
		dev->irq = VIRTIO_IRQ_POLL;
	else {
		printf("virtio: FAIL irq=%s: expected msix, intx or poll\n", mode);
		return false;
	}
	/* As Linux's idle=: halt gives the CPU back while a queue has nothing
	 * (the host's other work gets it, and the interrupt wakes us); poll
	 * spins, which answers a few microseconds sooner and takes a CPU. */
	mode = cmdline_str("idle", "poll", buf, sizeof(buf));
	dev->idle_halt = !strcmp(mode, "halt");
	if (!dev->idle_halt && strcmp(mode, "poll")) {
		printf("virtio: FAIL idle=%s: expected poll or halt\n", mode);
		return false;
	}
	return true;
}

bool virtio_start(struct virtio_dev *dev, unsigned type, uint64_t wanted)
{
	volatile struct virtio_pci_common_cfg *c;
	struct pci_dev d = { 0 };
	bool found;

	memset(dev, 0, sizeof(*dev));
	while ((found = pci_next(&d)) && virtio_type(&d) != type)
		;
	if (!found) {
		printf("virtio: FAIL no virtio device of type %u on bus 0\n", type);
		return false;
	}
	dev->pci = d;
	if (!parse_irq_mode(dev) || !find_structures(dev))
		return false;
	pci_command_set(&d, PCI_COMMAND_MEMORY | PCI_COMMAND_BUS_MASTER, 0);

	c = dev->common;
	c->device_status = 0;                           /* reset; done when it reads back 0 */
	while (c->device_status)
		cpu_relax();
	c->device_status = STATUS_ACKNOWLEDGE;
	c->device_status = STATUS_ACKNOWLEDGE | STATUS_DRIVER;

	wanted |= VIRTIO_F_VERSION_1;
	if (cmdline_u64("event_idx", 1))
		wanted |= VIRTIO_F_RING_EVENT_IDX;
	if (cmdline_u64("indirect", 1))
		wanted |= VIRTIO_F_RING_INDIRECT_DESC;
	dev->offered = read_features(c);
	dev->features = dev->offered & wanted;
	if (!virtio_has(dev, VIRTIO_F_VERSION_1)) {
		printf("virtio: FAIL device does not offer VERSION_1 (features 0x%lx)\n", dev->offered);
		c->device_status = STATUS_FAILED;
		return false;
	}
	write_features(c, dev->features);
	c->device_status = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
	if (!(c->device_status & STATUS_FEATURES_OK)) {
		printf("virtio: FAIL device did not accept features 0x%lx (FEATURES_OK did not stick)\n", dev->features);
		c->device_status = STATUS_FAILED;
		return false;
	}

	if (dev->irq == VIRTIO_IRQ_MSIX)
		return msix_setup(dev);
	if (dev->irq == VIRTIO_IRQ_INTX)
		return intx_setup(dev);
	pci_command_set(&d, PCI_COMMAND_INTX_DISABLE, 0);
	return true;
}

bool virtio_ready(struct virtio_dev *dev)
{
	volatile struct virtio_pci_common_cfg *c = dev->common;

	c->device_status = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
	if ((c->device_status & (STATUS_FEATURES_OK | STATUS_DRIVER_OK)) != (STATUS_FEATURES_OK | STATUS_DRIVER_OK)) {
		printf("virtio: FAIL device did not accept DRIVER_OK (status 0x%x)\n", c->device_status);
		return false;
	}
	return virtio_healthy(dev);
}

bool virtio_healthy(struct virtio_dev *dev)
{
	uint8_t status = dev->common->device_status;

	if (status & STATUS_NEEDS_RESET) {
		printf("virtio: FAIL %02x:%02x.%u set DEVICE_NEEDS_RESET (status 0x%x)\n",
		       dev->pci.bus, dev->pci.slot, dev->pci.fn, status);
		return false;
	}
	return true;
}

static void check_config(struct virtio_dev *dev, uint32_t off, uint32_t width)
{
	if (!dev->config || off % width || off + width > dev->config_len)
		driver_bug("device configuration access out of bounds");
}

uint8_t virtio_cfg8(struct virtio_dev *dev, uint32_t off)
{
	check_config(dev, off, 1);
	return dev->config[off];
}

uint16_t virtio_cfg16(struct virtio_dev *dev, uint32_t off)
{
	check_config(dev, off, 2);
	return *(volatile uint16_t *)(dev->config + off);
}

uint32_t virtio_cfg32(struct virtio_dev *dev, uint32_t off)
{
	check_config(dev, off, 4);
	return *(volatile uint32_t *)(dev->config + off);
}

/* The halves could come from two different versions of the field: retry
 * until the generation did not change around the reads. */
uint64_t virtio_cfg64(struct virtio_dev *dev, uint32_t off)
{
	uint8_t generation;
	uint64_t v;

	check_config(dev, off, 8);
	do {
		generation = dev->common->config_generation;
		v = *(volatile uint32_t *)(dev->config + off);
		v |= (uint64_t)*(volatile uint32_t *)(dev->config + off + 4) << 32;
	} while (generation != dev->common->config_generation);
	return v;
}

/* ---- split virtqueues ------------------------------------------------ */

static volatile uint16_t *used_event(struct virtq *vq)
{
	return &vq->avail->ring[vq->size];
}

static volatile uint16_t *avail_event(struct virtq *vq)
{
	return (volatile uint16_t *)&vq->used->ring[vq->size];
}

/* Interrupts off: the flag, or with EVENT_IDX an event index just behind
 * what we took, which the device cannot pass before we take more. */
static void vq_irq_off(struct virtq *vq)
{
	if (virtio_has(vq->dev, VIRTIO_F_RING_EVENT_IDX))
		*used_event(vq) = vq->last_used - 1;
	else
		vq->avail->flags = VRING_AVAIL_F_NO_INTERRUPT;
}

/* Interrupts on for the next used entry.  The fence makes the device see
 * this before we look at the used ring again. */
static void vq_irq_on(struct virtq *vq)
{
	if (virtio_has(vq->dev, VIRTIO_F_RING_EVENT_IDX))
		*used_event(vq) = vq->last_used;
	else
		vq->avail->flags = 0;
	mb();
}

static void *alloc_zeroed(uint64_t bytes)
{
	void *p = phys_alloc(bytes);

	if (!p)
		driver_bug("out of memory for a virtqueue");
	return memset(p, 0, bytes);
}

struct virtq *virtio_queue(struct virtio_dev *dev, uint16_t i)
{
	volatile struct virtio_pci_common_cfg *c = dev->common;
	struct virtq *vq;
	uint16_t size, notify_off;
	uint64_t desc, avail, used;

	if (i >= VIRTIO_MAX_QUEUES || i >= c->num_queues) {
		printf("virtio: FAIL device has no queue %u\n", i);
		return NULL;
	}
	vq = &dev->queues[i];
	c->queue_select = i;
	size = c->queue_size;
	if (!size) {
		printf("virtio: FAIL queue %u is not available\n", i);
		return NULL;
	}
	if (size > VQ_MAX_SIZE)
		size = VQ_MAX_SIZE;
	while (size & (size - 1))
		size &= size - 1;       /* split rings need a power of two */
	*vq = (struct virtq){ .dev = dev, .index = i, .size = size, .num_free = size };
	vq->desc = alloc_zeroed(size * sizeof(struct vring_desc));
	vq->avail = alloc_zeroed(sizeof(struct vring_avail) + (size + 1) * sizeof(uint16_t));
	vq->used = alloc_zeroed(sizeof(struct vring_used) + size * sizeof(struct vring_used_elem) + sizeof(uint16_t));
	vq->chains = alloc_zeroed(size * sizeof(*vq->chains));
	if (virtio_has(dev, VIRTIO_F_RING_INDIRECT_DESC))
		vq->indirect = alloc_zeroed(size * sizeof(*vq->indirect));
	for (uint16_t d = 0; d + 1 < size; d++)
		vq->desc[d].next = d + 1;
	vq_irq_off(vq);

	desc = (uint64_t)vq->desc;
	avail = (uint64_t)vq->avail;
	used = (uint64_t)vq->used;
	c->queue_size = size;
	c->queue_desc_lo = desc;
	c->queue_desc_hi = desc >> 32;
	c->queue_driver_lo = avail;
	c->queue_driver_hi = avail >> 32;
	c->queue_device_lo = used;
	c->queue_device_hi = used >> 32;
	if (dev->irq == VIRTIO_IRQ_MSIX && !msix_queue(vq))
		return NULL;

	notify_off = c->queue_notify_off;
	if ((uint64_t)notify_off * dev->notify_multiplier + 2 > dev->notify_len) {
		printf("virtio: FAIL queue %u notify offset %u is outside the notify structure\n", i, notify_off);
		return NULL;
	}
	vq->notify = (volatile uint16_t *)(dev->notify_base + notify_off * dev->notify_multiplier);
	c->queue_enable = 1;
	return vq;
}

bool vq_add(struct virtq *vq, const struct vq_buf *bufs, unsigned n, void *token)
{
	bool indirect = vq->indirect && n > 1;
	unsigned descs = indirect ? 1 : n;
	uint16_t head = vq->free_head, d = head, last = head;
	struct vring_desc *table = vq->desc;
	uint32_t writable = 0;

	if (!n || n > VQ_MAX_SG || !token)
		driver_bug("vq_add: bad chain");
	if (vq->num_free < descs)
		return false;
	if (indirect) {
		table = vq->indirect[head];
		d = 0;
	}
	for (unsigned i = 0; i < n; i++) {
		if (i && bufs[i - 1].device_writes && !bufs[i].device_writes)
			driver_bug("vq_add: a device-readable buffer after a writable one");
		table[d].addr = (uint64_t)bufs[i].addr;
		table[d].len = bufs[i].len;
		table[d].flags = (bufs[i].device_writes ? VRING_DESC_F_WRITE : 0) | (i + 1 < n ? VRING_DESC_F_NEXT : 0);
		if (bufs[i].device_writes)
			writable += bufs[i].len;
		last = d;
		/* Direct chains follow the free list, already linked through next. */
		d = indirect ? (table[d].next = d + 1) : table[d].next;
	}
	if (indirect) {
		vq->desc[head] = (struct vring_desc){
			.addr = (uint64_t)table, .len = n * sizeof(struct vring_desc),
			.flags = VRING_DESC_F_INDIRECT, .next = vq->desc[head].next,
		};
		last = head;
	}
	vq->free_head = vq->desc[last].next;
	vq->num_free -= descs;
	vq->chains[head] = (struct vq_chain){ .token = token, .writable = writable, .descs = descs };
	vq->avail->ring[vq->avail_idx % vq->size] = head;
	vq->avail_idx++;
	return true;
}

/* vring_need_event: did the device's event index fall in (old, new]? */
static bool need_event(uint16_t event, uint16_t new, uint16_t old)
{
	return (uint16_t)(new - event - 1) < (uint16_t)(new - old);
}

void vq_kick(struct virtq *vq)
{
	uint16_t old = vq->kicked_idx, new = vq->avail_idx;
	bool notify;

	if (new == old)
		return;
	barrier();                      /* ring entries before the index */
	vq->avail->idx = new;
	vq->kicked_idx = new;
	mb();                           /* the index out before reading the device's wishes */
	if (virtio_has(vq->dev, VIRTIO_F_RING_EVENT_IDX))
		notify = need_event(*avail_event(vq), new, old);
	else
		notify = !(vq->used->flags & VRING_USED_F_NO_NOTIFY);
	if (notify)
		*vq->notify = vq->index;
}

void *vq_pop(struct virtq *vq, uint32_t *len)
{
	uint16_t used_idx = vq->used->idx, head;
	struct vring_used_elem e;
	struct vq_chain *chain;
	void *token;

	if (used_idx == vq->last_used)
		return NULL;
	if ((uint16_t)(used_idx - vq->last_used) > (uint16_t)(vq->kicked_idx - vq->last_used))
		device_broke(vq, "used index ran ahead of the published chains: used->idx", used_idx);
	barrier();                      /* the entry after the index */
	e = vq->used->ring[vq->last_used % vq->size];
	if (e.id >= vq->size || !vq->chains[e.id].token)
		device_broke(vq, "used entry names no chain in flight: id", e.id);
	chain = &vq->chains[e.id];
	if (e.len > chain->writable)
		device_broke(vq, "used length exceeds the writable bytes of its chain:", e.len);
	*len = e.len;
	token = chain->token;

	head = e.id;
	for (uint16_t i = 1; i < chain->descs; i++)
		head = vq->desc[head].next;
	vq->desc[head].next = vq->free_head;
	vq->free_head = e.id;
	vq->num_free += chain->descs;
	*chain = (struct vq_chain){ 0 };
	vq->last_used++;
	return token;
}

/* Time is the TSC's elapsed count since the start, compared unsigned: a TSC
 * that jumps (a VM paused, or resumed on another host) ends a wait early
 * rather than never. */
bool vq_wait_for(struct virtq *vq, uint64_t cycles)
{
	uint64_t start = rdtsc();

	while (vq->used->idx == vq->last_used) {
		uint32_t seen = vq->irqs;

		if (rdtsc() - start >= cycles)
			return false;
		if (vq->dev->irq == VIRTIO_IRQ_POLL) {
			cpu_relax();
			continue;
		}
		vq_irq_on(vq);
		/* Recheck after the fence: an entry that came before the device
		 * could see irq_on raised no interrupt.  Otherwise only the
		 * interrupt (or the time) ends the wait, so a lost one shows as
		 * a hang. */
		if (vq->used->idx == vq->last_used)
			while (vq->irqs == seen && rdtsc() - start < cycles) {
				if (vq->dev->idle_halt && cycles == UINT64_MAX)
					wait_for_interrupt(&vq->irqs, seen);  /* no timer to end a halt early */
				else
					cpu_relax();
			}
		vq_irq_off(vq);
	}
	return true;
}

void vq_wait(struct virtq *vq)
{
	vq_wait_for(vq, UINT64_MAX);
}
