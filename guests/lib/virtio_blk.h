/* virtio-blk requests on the first (only) request queue. */
#ifndef VIRTIO_BLK_H
#define VIRTIO_BLK_H

#include "virtio.h"

#define SECTOR_SIZE 512

#define VIRTIO_BLK_F_SEG_MAX      (1ULL << 2)
#define VIRTIO_BLK_F_RO           (1ULL << 5)
#define VIRTIO_BLK_F_FLUSH        (1ULL << 9)
#define VIRTIO_BLK_F_DISCARD      (1ULL << 13)
#define VIRTIO_BLK_F_WRITE_ZEROES (1ULL << 14)

#define VIRTIO_BLK_T_IN           0
#define VIRTIO_BLK_T_OUT          1
#define VIRTIO_BLK_T_FLUSH        4
#define VIRTIO_BLK_T_GET_ID       8
#define VIRTIO_BLK_T_DISCARD      11
#define VIRTIO_BLK_T_WRITE_ZEROES 13

#define VIRTIO_BLK_S_OK     0
#define VIRTIO_BLK_S_IOERR  1
#define VIRTIO_BLK_S_UNSUPP 2

#define VIRTIO_BLK_ID_BYTES 20

/* The data of a DISCARD or WRITE_ZEROES request. */
struct virtio_blk_range {
	uint64_t sector;
	uint32_t num_sectors;
	uint32_t flags;
};

struct blk_dev {
	struct virtio_dev vdev;
	struct virtq *vq;
	uint64_t capacity;                      /* 512-byte sectors */
	uint32_t seg_max;                       /* data buffers per request */
	uint32_t max_discard_sectors, max_write_zeroes_sectors;
};

struct blk_req {
	struct {
		uint32_t type, reserved;
		uint64_t sector;
	} hdr;                                  /* what the device reads first */
	uint8_t status;                         /* what it writes last */
};

/* Takes the first virtio-blk device to DRIVER_OK with RO, FLUSH, SEG_MAX,
 * DISCARD and WRITE_ZEROES when offered (CPL0).  False, printed, on failure. */
bool blk_open(struct blk_dev *b);

static inline bool blk_has(const struct blk_dev *b, uint64_t feature)
{
	return virtio_has(&b->vdev, feature);
}

/* Queues request r with n data buffers (device-readable for OUT, DISCARD
 * and WRITE_ZEROES, device-written otherwise); false if the ring is full.
 * r must stay put until it completes.  vq_kick(b->vq) sends it. */
bool blk_queue(struct blk_dev *b, struct blk_req *r, uint32_t type, uint64_t sector,
	       const struct vq_buf *data, unsigned n);
/* Waits for the next completed request and returns it. */
struct blk_req *blk_complete(struct blk_dev *b);
/* One request with one data buffer (len may be 0), start to finish, on a
 * queue with nothing else in flight; returns its status. */
uint8_t blk_do(struct blk_dev *b, uint32_t type, uint64_t sector, void *buf, uint32_t len);

#endif
