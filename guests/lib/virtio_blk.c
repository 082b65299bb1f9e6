/* virtio-blk: device setup and request chains (header, data..., status). */
#include "virtio_blk.h"

/* Device configuration offsets */
#define CFG_CAPACITY          0
#define CFG_SEG_MAX           12
#define CFG_MAX_DISCARD_SECTORS      36
#define CFG_MAX_WRITE_ZEROES_SECTORS 48

bool blk_open(struct blk_dev *b)
{
	memset(b, 0, sizeof(*b));
	if (!virtio_start(&b->vdev, VIRTIO_ID_BLK, VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_RO | VIRTIO_BLK_F_FLUSH |
			  VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES))
		return false;
	b->capacity = virtio_cfg64(&b->vdev, CFG_CAPACITY);
	b->seg_max = VQ_MAX_SG - 2;
	if (blk_has(b, VIRTIO_BLK_F_SEG_MAX) && virtio_cfg32(&b->vdev, CFG_SEG_MAX) < b->seg_max)
		b->seg_max = virtio_cfg32(&b->vdev, CFG_SEG_MAX);
	if (blk_has(b, VIRTIO_BLK_F_DISCARD))
		b->max_discard_sectors = virtio_cfg32(&b->vdev, CFG_MAX_DISCARD_SECTORS);
	if (blk_has(b, VIRTIO_BLK_F_WRITE_ZEROES))
		b->max_write_zeroes_sectors = virtio_cfg32(&b->vdev, CFG_MAX_WRITE_ZEROES_SECTORS);
	b->vq = virtio_queue(&b->vdev, 0);
	return b->vq && b->seg_max && virtio_ready(&b->vdev);
}

static bool device_reads(uint32_t type)
{
	return type == VIRTIO_BLK_T_OUT || type == VIRTIO_BLK_T_DISCARD || type == VIRTIO_BLK_T_WRITE_ZEROES;
}

bool blk_queue(struct blk_dev *b, struct blk_req *r, uint32_t type, uint64_t sector,
	       const struct vq_buf *data, unsigned n)
{
	struct vq_buf chain[VQ_MAX_SG];

	if (n > b->seg_max) {
		printf("virtio-blk: FAIL BUG %u data buffers, the device takes %u\n", n, b->seg_max);
		guest_exit(0x7f);
	}
	r->hdr.type = type;
	r->hdr.reserved = 0;
	r->hdr.sector = sector;
	r->status = 0xff;                       /* not a status: shows a device that wrote none */
	chain[0] = (struct vq_buf){ &r->hdr, sizeof(r->hdr), false };
	for (unsigned i = 0; i < n; i++)
		chain[1 + i] = (struct vq_buf){ data[i].addr, data[i].len, !device_reads(type) };
	chain[1 + n] = (struct vq_buf){ &r->status, 1, true };
	return vq_add(b->vq, chain, n + 2, r);
}

struct blk_req *blk_complete(struct blk_dev *b)
{
	uint32_t len;

	vq_wait(b->vq);
	return vq_pop(b->vq, &len);
}

uint8_t blk_do(struct blk_dev *b, uint32_t type, uint64_t sector, void *buf, uint32_t len)
{
	struct vq_buf data = { buf, len, false };
	struct blk_req r;

	if (vq_in_flight(b->vq) || !blk_queue(b, &r, type, sector, &data, len ? 1 : 0)) {
		printf("virtio-blk: FAIL BUG blk_do with other requests in flight\n");
		guest_exit(0x7f);
	}
	vq_kick(b->vq);
	blk_complete(b);
	return r.status;
}
