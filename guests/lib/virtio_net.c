/* virtio-net: receive buffers (merged or whole-frame) and transmit slots. */
#include "virtio_net.h"

#define RX_QUEUE 0
#define TX_QUEUE 1
#define CFG_MAC  0

/* Small buffers when frames may span several, so that most do. */
#define RX_BUF_MERGEABLE 512
#define RX_BUF_WHOLE     2048   /* header and the largest frame */

static void rx_post(struct netdev *n, uint8_t *buf)
{
	struct vq_buf b = { buf, n->rx_buf_size, true };

	if (!vq_add(n->rx, &b, 1, buf)) {
		printf("virtio-net: FAIL BUG more receive buffers than ring entries\n");
		guest_exit(0x7f);
	}
}

bool netdev_open(struct netdev *n)
{
	uint64_t wanted = VIRTIO_NET_F_MAC | (cmdline_u64("mrg", 1) ? VIRTIO_NET_F_MRG_RXBUF : 0);

	memset(n, 0, sizeof(*n));
	if (!virtio_start(&n->vdev, VIRTIO_ID_NET, wanted))
		return false;
	if (!virtio_has(&n->vdev, VIRTIO_NET_F_MAC)) {
		printf("virtio-net: FAIL device offers no MAC address (VIRTIO_NET_F_MAC)\n");
		return false;
	}
	for (int i = 0; i < ETH_ALEN; i++)
		n->mac[i] = virtio_cfg8(&n->vdev, CFG_MAC + i);
	n->rx = virtio_queue(&n->vdev, RX_QUEUE);
	n->tx = n->rx ? virtio_queue(&n->vdev, TX_QUEUE) : NULL;
	if (!n->tx)
		return false;
	n->rx_buf_size = netdev_mergeable(n) ? RX_BUF_MERGEABLE : RX_BUF_WHOLE;
	n->rx_bufs = phys_alloc((uint64_t)n->rx->size * n->rx_buf_size);
	n->tx_slots = phys_alloc(TX_SLOTS * sizeof(struct tx_slot));
	if (!n->rx_bufs || !n->tx_slots) {
		printf("virtio-net: FAIL no memory for the buffers\n");
		return false;
	}
	/* Two descriptors a frame without INDIRECT_DESC: never more slots than the ring takes. */
	for (unsigned i = 0; i < TX_SLOTS && i < n->tx->size / 2u; i++) {
		memset(&n->tx_slots[i].hdr, 0, sizeof(n->tx_slots[i].hdr));
		n->tx_free[n->tx_nfree++] = &n->tx_slots[i];
	}
	if (!virtio_ready(&n->vdev))
		return false;
	/* No notification before DRIVER_OK: the buffers go in after it. */
	for (unsigned i = 0; i < n->rx->size; i++)
		rx_post(n, n->rx_bufs + i * n->rx_buf_size);
	vq_kick(n->rx);
	return true;
}

static uint8_t *rx_next(struct netdev *n, uint32_t *len)
{
	vq_wait(n->rx);
	return vq_pop(n->rx, len);
}

/* A frame is a header, then data in the rest of the first buffer and, with
 * MRG_RXBUF, in num_buffers - 1 more.  Each buffer goes back right after
 * its bytes are copied out. */
uint32_t netdev_receive_for(struct netdev *n, uint64_t cycles)
{
	const uint32_t hdr_len = sizeof(struct virtio_net_hdr);

	for (;;) {
		uint32_t len, total = 0;
		uint8_t *buf;

		if (!vq_wait_for(n->rx, cycles))
			return 0;
		buf = vq_pop(n->rx, &len);
		uint16_t nbufs = netdev_mergeable(n) ? ((struct virtio_net_hdr *)buf)->num_buffers : 1;
		bool fits = true;

		if (len < hdr_len || nbufs == 0 || nbufs > n->rx->size) {
			printf("virtio-net: FAIL receive buffer of %u bytes with num_buffers %u\n", len, nbufs);
			guest_exit(VIRTIO_EXIT_DEVICE);
		}
		for (uint16_t i = 0; i < nbufs; i++) {
			uint32_t skip = i ? 0 : hdr_len;

			if (i)
				buf = rx_next(n, &len);
			if (total + len - skip > ETH_FRAME_MAX)
				fits = false;
			if (fits)
				memcpy(n->frame + total, buf + skip, len - skip);
			total += len - skip;
			rx_post(n, buf);
		}
		vq_kick(n->rx);
		if (fits) {
			n->rx_frames++;
			return total;
		}
		n->rx_dropped++;
	}
}

uint32_t netdev_receive(struct netdev *n)
{
	return netdev_receive_for(n, UINT64_MAX);
}

static void tx_reclaim(struct netdev *n)
{
	struct tx_slot *slot;
	uint32_t len;

	while ((slot = vq_pop(n->tx, &len)))
		n->tx_free[n->tx_nfree++] = slot;
}

void netdev_send(struct netdev *n, const void *frame, uint32_t len)
{
	struct tx_slot *slot;
	struct vq_buf bufs[2];

	if (len > ETH_FRAME_MAX) {
		printf("virtio-net: FAIL BUG sending a %u-byte frame\n", len);
		guest_exit(0x7f);
	}
	tx_reclaim(n);
	while (!n->tx_nfree) {
		vq_wait(n->tx);
		tx_reclaim(n);
	}
	slot = n->tx_free[--n->tx_nfree];
	memcpy(slot->frame, frame, len);
	bufs[0] = (struct vq_buf){ &slot->hdr, sizeof(slot->hdr), false };
	bufs[1] = (struct vq_buf){ slot->frame, len, false };
	if (!vq_add(n->tx, bufs, 2, slot)) {
		printf("virtio-net: FAIL BUG transmit ring full with a free slot\n");
		guest_exit(0x7f);
	}
	vq_kick(n->tx);
	n->tx_frames++;
}

void netdev_drain(struct netdev *n)
{
	tx_reclaim(n);
	while (vq_in_flight(n->tx)) {
		vq_wait(n->tx);
		tx_reclaim(n);
	}
}
