/* virtio 1.x devices over PCI, driven through the modern interface only,
 * with split virtqueues.
 *
 * Setup (virtio_start, virtio_queue, virtio_ready) runs at CPL0; the queue
 * operations (vq_*) at CPL0 or CPL3.  Every pointer handed to a queue is a
 * physical address too: the runtime identity-maps RAM.
 *
 * Command-line switches read by virtio_start, for every device:
 *   irq=msix|intx|poll   MSI-X (default), the INTx line through the 8259, or
 *                        no interrupts at all (poll the used ring)
 *   event_idx=0          do not negotiate VIRTIO_F_RING_EVENT_IDX
 *   indirect=0           do not negotiate VIRTIO_F_RING_INDIRECT_DESC */
#ifndef VIRTIO_H
#define VIRTIO_H

#include "pci.h"

#define VIRTIO_ID_NET 1
#define VIRTIO_ID_BLK 2

#define VIRTIO_F_RING_INDIRECT_DESC (1ULL << 28)
#define VIRTIO_F_RING_EVENT_IDX     (1ULL << 29)
#define VIRTIO_F_VERSION_1          (1ULL << 32)

/* Exit status of a guest whose device broke the protocol. */
#define VIRTIO_EXIT_DEVICE 4

#define VQ_MAX_SIZE   256       /* entries per queue we set up, at most */
#define VQ_MAX_SG     16        /* buffers per chain */
#define VIRTIO_MAX_QUEUES 2

enum virtio_irq { VIRTIO_IRQ_MSIX, VIRTIO_IRQ_INTX, VIRTIO_IRQ_POLL };

struct vring_desc {
	uint64_t addr;
	uint32_t len;
	uint16_t flags, next;
};

struct vring_avail {
	uint16_t flags, idx;
	uint16_t ring[];        /* then used_event, with VIRTIO_F_RING_EVENT_IDX */
};

struct vring_used_elem {
	uint32_t id, len;
};

struct vring_used {
	uint16_t flags, idx;
	struct vring_used_elem ring[];  /* then avail_event */
};

/* One buffer of a chain.  The device reads the first ones and writes the
 * rest: every device_writes buffer must follow every other. */
struct vq_buf {
	void *addr;
	uint32_t len;
	bool device_writes;
};

struct virtio_dev;

struct virtq {
	struct virtio_dev *dev;
	uint16_t index, size;
	struct vring_desc *desc;
	volatile struct vring_avail *avail;
	volatile struct vring_used *used;
	volatile uint16_t *notify;
	struct vring_desc (*indirect)[VQ_MAX_SG];      /* a table per head; NULL without INDIRECT_DESC */
	struct vq_chain {                               /* what is in flight, by head */
		void *token;
		uint32_t writable;              /* bytes the device may write */
		uint16_t descs;                 /* ring descriptors it holds */
	} *chains;
	uint16_t free_head, num_free;                   /* free descriptors, linked through next */
	uint16_t avail_idx;                             /* entries added, published or not */
	uint16_t kicked_idx;                            /* avail->idx at the last kick */
	uint16_t last_used;                             /* used entries taken */
	uint8_t vector;                                 /* LAPIC vector under MSI-X */
	volatile uint32_t irqs;                         /* interrupts seen for this queue */
};

/* The modern common configuration structure (virtio 1.x, 4.1.4.3). */
struct virtio_pci_common_cfg {
	uint32_t device_feature_select, device_feature;
	uint32_t driver_feature_select, driver_feature;
	uint16_t msix_config, num_queues;
	uint8_t device_status, config_generation;
	uint16_t queue_select, queue_size, queue_msix_vector, queue_enable, queue_notify_off;
	uint32_t queue_desc_lo, queue_desc_hi;          /* 64-bit fields, written as two dwords */
	uint32_t queue_driver_lo, queue_driver_hi;
	uint32_t queue_device_lo, queue_device_hi;
};

struct virtio_dev {
	struct pci_dev pci;
	volatile struct virtio_pci_common_cfg *common;
	volatile uint8_t *isr;
	volatile uint8_t *config;                       /* device-specific configuration */
	uint32_t config_len;
	volatile uint8_t *notify_base;
	uint32_t notify_len, notify_multiplier;
	uint64_t offered, features;                     /* features: the negotiated ones */
	enum virtio_irq irq;
	bool idle_halt;                                 /* idle=halt: an endless wait halts, idle=poll: it spins */
	struct msix msix;
	struct virtq queues[VIRTIO_MAX_QUEUES];
};

/* Finds the first virtio device of this type (VIRTIO_ID_*) on bus 0, resets
 * it and negotiates VERSION_1 plus the features in `wanted` the device
 * offers (EVENT_IDX and INDIRECT_DESC are added unless switched off), then
 * sets up its interrupts.  False, with the reason printed, on failure. */
bool virtio_start(struct virtio_dev *dev, unsigned type, uint64_t wanted);
/* Sets up queue i with min(device's maximum, VQ_MAX_SIZE) entries. */
struct virtq *virtio_queue(struct virtio_dev *dev, uint16_t i);
/* Sets DRIVER_OK; false if the device does not accept it. */
bool virtio_ready(struct virtio_dev *dev);
/* False, with the reason printed, if the device has flagged DEVICE_NEEDS_RESET. */
bool virtio_healthy(struct virtio_dev *dev);

static inline bool virtio_has(const struct virtio_dev *dev, uint64_t feature)
{
	return (dev->features & feature) == feature;
}

const char *virtio_irq_name(const struct virtio_dev *dev);

/* Device-specific configuration, at natural widths; 64-bit fields as two
 * dwords under the config generation. */
uint8_t virtio_cfg8(struct virtio_dev *dev, uint32_t off);
uint16_t virtio_cfg16(struct virtio_dev *dev, uint32_t off);
uint32_t virtio_cfg32(struct virtio_dev *dev, uint32_t off);
uint64_t virtio_cfg64(struct virtio_dev *dev, uint32_t off);

/* Queues a chain of n buffers (not visible to the device before vq_kick);
 * false if the ring has no room.  token (not NULL) comes back from vq_pop. */
bool vq_add(struct virtq *vq, const struct vq_buf *bufs, unsigned n, void *token);
/* Publishes what vq_add queued and notifies the device unless it said not to. */
void vq_kick(struct virtq *vq);
/* The token of the next used chain and the bytes the device wrote into it,
 * or NULL if there is none yet. */
void *vq_pop(struct virtq *vq, uint32_t *len);
/* Returns once vq_pop has something: waits for an interrupt, or polls. */
void vq_wait(struct virtq *vq);
/* The same, giving up after about `cycles` TSC cycles: false then. */
bool vq_wait_for(struct virtq *vq, uint64_t cycles);
/* Chains added and not yet popped. */
static inline uint16_t vq_in_flight(const struct virtq *vq)
{
	return vq->avail_idx - vq->last_used;
}

#endif
