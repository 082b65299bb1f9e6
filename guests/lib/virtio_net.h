/* virtio-net: one receive and one transmit queue, Ethernet frames in and out.
 *
 * Command-line switch: mrg=0 does not negotiate VIRTIO_NET_F_MRG_RXBUF. */
#ifndef VIRTIO_NET_H
#define VIRTIO_NET_H

#include "virtio.h"

#define VIRTIO_NET_F_MAC       (1ULL << 5)
#define VIRTIO_NET_F_MRG_RXBUF (1ULL << 15)

#define ETH_ALEN      6
#define ETH_FRAME_MAX 1514      /* without the FCS: 14-byte header, 1500-byte MTU */
#define TX_SLOTS      16

/* Precedes every frame in both directions (virtio 1.x: num_buffers is
 * always there, and only meaningful with MRG_RXBUF). */
struct virtio_net_hdr {
	uint8_t flags, gso_type;
	uint16_t hdr_len, gso_size, csum_start, csum_offset;
	uint16_t num_buffers;
};

struct netdev {
	struct virtio_dev vdev;
	struct virtq *rx, *tx;
	uint8_t mac[ETH_ALEN];
	uint32_t rx_buf_size;                   /* bytes per receive buffer, header included */
	uint8_t *rx_bufs;                       /* rx->size of them */
	struct tx_slot {
		struct virtio_net_hdr hdr;
		uint8_t frame[ETH_FRAME_MAX];
	} *tx_slots;
	struct tx_slot *tx_free[TX_SLOTS];
	unsigned tx_nfree;
	uint8_t frame[ETH_FRAME_MAX];           /* the last frame received */
	uint64_t rx_frames, rx_dropped, tx_frames;
};

/* Takes the first virtio-net device to DRIVER_OK and posts its receive
 * buffers (CPL0).  Requires VIRTIO_NET_F_MAC.  False, printed, on failure. */
bool netdev_open(struct netdev *n);

static inline bool netdev_mergeable(const struct netdev *n)
{
	return virtio_has(&n->vdev, VIRTIO_NET_F_MRG_RXBUF);
}

/* Waits for the next frame and returns its length; the frame is in
 * n->frame until the next call. */
uint32_t netdev_receive(struct netdev *n);
/* The same, waiting at most about `cycles` TSC cycles; 0 if no frame came. */
uint32_t netdev_receive_for(struct netdev *n, uint64_t cycles);
/* Queues a copy of the frame; waits for room if every slot is in flight. */
void netdev_send(struct netdev *n, const void *frame, uint32_t len);
/* Waits until the device has taken every queued frame. */
void netdev_drain(struct netdev *n);

#endif
