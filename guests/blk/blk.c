/* Exercises the first virtio-blk device: writes a pattern the host can
 * recompute, flushes, reads it back and compares, then tries GET_ID,
 * WRITE_ZEROES and DISCARD.  Requests go in batches of several chains of
 * assorted sizes, each scattered over 3 or more unaligned buffers.
 *
 * The pattern: the little-endian u64 at disk byte offset o (a multiple of 8)
 * is (o * 0x9E3779B97F4A7C15) ^ seed. */
#include "virtio_blk.h"

#define GOLDEN      0x9E3779B97F4A7C15ULL
#define SLOTS       8                           /* requests in flight per batch */
#define MAX_REQUEST 128                         /* sectors */
#define SLOT_BYTES  (MAX_REQUEST * SECTOR_SIZE + PAGE_SIZE)
#define SEG_GAP     0x45                        /* between a request's buffers: odd, so most are unaligned */

struct params {
	uint64_t seed, start, sectors, zero;
};

struct slot {
	struct blk_req req;
	struct vq_buf seg[VQ_MAX_SG];
	unsigned nseg;
	uint64_t sector;
};

static struct blk_dev blk;
static struct slot slots[SLOTS];
static uint8_t *staging;                        /* SLOTS * SLOT_BYTES */
static uint64_t requests;

/* Request sizes in sectors, cycled through. */
static const uint32_t request_sectors[] = { 1, 8, 3, 64, 16, MAX_REQUEST, 5, 32 };

static uint64_t pattern(uint64_t offset, uint64_t seed)
{
	return offset * GOLDEN ^ seed;
}

static uint64_t min(uint64_t a, uint64_t b)
{
	return a < b ? a : b;
}

/* Splits `bytes` (a multiple of 512) into nseg buffers of multiples of 8
 * bytes, laid out in the slot's staging area with gaps between them. */
static void layout(struct slot *s, unsigned index, uint32_t bytes, unsigned nseg)
{
	uint8_t *at = staging + index * SLOT_BYTES + 0x10 * (index + 1);
	uint32_t each = bytes / nseg & ~7u;

	s->nseg = nseg;
	for (unsigned i = 0; i < nseg; i++) {
		uint32_t len = i + 1 < nseg ? each : bytes - each * (nseg - 1);

		s->seg[i] = (struct vq_buf){ at, len, false };
		at += len + SEG_GAP;
	}
}

/* Unaligned u64 access: x86 does it, C wants memcpy to say so. */
static void put64(uint8_t *p, uint64_t v)
{
	__builtin_memcpy(p, &v, 8);
}

static uint64_t get64(const uint8_t *p)
{
	uint64_t v;

	__builtin_memcpy(&v, p, 8);
	return v;
}

static void fill(const struct slot *s, uint64_t seed)
{
	uint64_t offset = s->sector * SECTOR_SIZE;

	for (unsigned i = 0; i < s->nseg; i++) {
		for (uint32_t b = 0; b < s->seg[i].len; b += 8)
			put64((uint8_t *)s->seg[i].addr + b, pattern(offset + b, seed));
		offset += s->seg[i].len;
	}
}

static bool check(const struct slot *s, uint64_t seed, bool zeros)
{
	uint64_t offset = s->sector * SECTOR_SIZE;

	for (unsigned i = 0; i < s->nseg; i++) {
		for (uint32_t b = 0; b < s->seg[i].len; b += 8) {
			uint64_t got = get64((uint8_t *)s->seg[i].addr + b);
			uint64_t want = zeros ? 0 : pattern(offset + b, seed);

			if (got != want) {
				printf("blk: FAIL disk byte %lu (sector %lu) read 0x%016lx, expected 0x%016lx\n",
				       offset + b, (offset + b) / SECTOR_SIZE, got, want);
				return false;
			}
		}
		offset += s->seg[i].len;
	}
	return true;
}

/* Writes the pattern over sectors [first, first + count) (VIRTIO_BLK_T_OUT),
 * or reads them and compares with the pattern or zeros (VIRTIO_BLK_T_IN). */
static bool pass(const struct params *p, uint32_t type, uint64_t first, uint64_t count, bool zeros)
{
	uint64_t sector = first, end = first + count;

	while (sector < end) {
		unsigned queued = 0;

		for (; queued < SLOTS && sector < end; queued++) {
			struct slot *s = &slots[queued];
			uint32_t n = min(request_sectors[requests % 8], end - sector);

			layout(s, queued, n * SECTOR_SIZE, min(3 + requests % 4, blk.seg_max));
			s->sector = sector;
			if (type == VIRTIO_BLK_T_OUT)
				fill(s, p->seed);
			else
				memset(staging + queued * SLOT_BYTES, 0xa5, SLOT_BYTES);  /* no stale match */
			if (!blk_queue(&blk, &s->req, type, sector, s->seg, s->nseg))
				break;          /* ring full: send what fits */
			sector += n;
			requests++;
		}
		if (!queued) {
			printf("blk: FAIL the queue (%u entries) cannot take one request\n", blk.vq->size);
			return false;
		}
		vq_kick(blk.vq);        /* one notification for the whole batch */
		for (unsigned i = 0; i < queued; i++) {
			struct blk_req *r = blk_complete(&blk);

			if (r->status != VIRTIO_BLK_S_OK) {
				printf("blk: FAIL %s at sector %lu: status %u\n", type == VIRTIO_BLK_T_OUT ? "write" : "read",
				       r->hdr.sector, r->status);
				return false;
			}
		}
		for (unsigned i = 0; type == VIRTIO_BLK_T_IN && i < queued; i++)
			if (!check(&slots[i], p->seed, zeros))
				return false;
	}
	return true;
}

static bool simple(const char *what, uint32_t type, uint64_t sector, void *buf, uint32_t len)
{
	uint8_t status = blk_do(&blk, type, sector, buf, len);

	if (status != VIRTIO_BLK_S_OK)
		printf("blk: FAIL %s: status %u\n", what, status);
	return status == VIRTIO_BLK_S_OK;
}

static bool flush(void)
{
	return !blk_has(&blk, VIRTIO_BLK_F_FLUSH) || simple("flush", VIRTIO_BLK_T_FLUSH, 0, NULL, 0);
}

/* DISCARD or WRITE_ZEROES over [first, first + count) in pieces of at most max sectors. */
static bool ranges(const char *what, uint32_t type, uint64_t first, uint64_t count, uint32_t max)
{
	for (uint64_t done = 0; done < count;) {
		struct virtio_blk_range range = { first + done, min(count - done, max ? max : UINT32_MAX), 0 };

		if (!simple(what, type, 0, &range, sizeof(range)))
			return false;
		done += range.num_sectors;
	}
	return true;
}

static void print_id(void)
{
	char id[VIRTIO_BLK_ID_BYTES + 1] = { 0 };
	uint8_t status = blk_do(&blk, VIRTIO_BLK_T_GET_ID, 0, id, VIRTIO_BLK_ID_BYTES);

	for (int i = 0; id[i]; i++)
		if (id[i] < ' ' || id[i] > '~')
			id[i] = '?';
	if (status == VIRTIO_BLK_S_OK)
		printf("blk: id %s\n", id);
	else
		printf("blk: id unavailable (status %u)\n", status);
}

/* Only reads are allowed: a write must fail with IOERR. */
static int read_only(const struct params *p)
{
	uint8_t *sector = staging;
	uint8_t status;

	memset(sector, 0, SECTOR_SIZE);
	status = blk_do(&blk, VIRTIO_BLK_T_OUT, p->start, sector, SECTOR_SIZE);
	if (status != VIRTIO_BLK_S_IOERR) {
		printf("blk: FAIL write to a read-only device: status %u, expected IOERR\n", status);
		return 3;
	}
	if (!simple("read", VIRTIO_BLK_T_IN, p->start, sector, SECTOR_SIZE))
		return 3;
	printf("blk: sector %lu:", p->start);
	for (int i = 0; i < 16; i++)
		printf(" %02x", sector[i]);
	printf("\n");
	printf("blk: read-only, write refused\n");
	return 0;
}

static int run(void *arg)
{
	const struct params *p = arg;
	uint64_t end = p->start + p->sectors, zero = p->zero;

	print_id();
	if (blk_has(&blk, VIRTIO_BLK_F_RO))
		return read_only(p);
	if (end > blk.capacity || end < p->start) {
		printf("blk: FAIL sectors [%lu, %lu) do not fit in the capacity of %lu\n", p->start, end, blk.capacity);
		return 2;
	}
	if (!blk_has(&blk, VIRTIO_BLK_F_WRITE_ZEROES) && !blk_has(&blk, VIRTIO_BLK_F_DISCARD))
		zero = 0;
	zero = min(zero, blk.capacity - end);

	/* The zero range gets the pattern too, so zeros read later are WRITE_ZEROES' doing. */
	if (!pass(p, VIRTIO_BLK_T_OUT, p->start, p->sectors + zero, false) || !flush())
		return 3;
	printf("blk: wrote %lu sectors in %lu requests, flushed\n", p->sectors + zero, requests);
	if (!pass(p, VIRTIO_BLK_T_IN, p->start, p->sectors, false))
		return 3;
	printf("blk: read back %lu sectors, all match\n", p->sectors);

	if (zero && blk_has(&blk, VIRTIO_BLK_F_WRITE_ZEROES)) {
		if (!ranges("write-zeroes", VIRTIO_BLK_T_WRITE_ZEROES, end, zero, blk.max_write_zeroes_sectors) ||
		    !pass(p, VIRTIO_BLK_T_IN, end, zero, true))
			return 3;
		printf("blk: write-zeroes %lu sectors, read back zeros\n", zero);
	}
	if (zero && blk_has(&blk, VIRTIO_BLK_F_DISCARD)) {
		if (!ranges("discard", VIRTIO_BLK_T_DISCARD, end, zero, blk.max_discard_sectors))
			return 3;
		printf("blk: discard %lu sectors ok\n", zero);
	}
	if (!flush())
		return 3;
	if (!virtio_healthy(&blk.vdev))
		return VIRTIO_EXIT_DEVICE;
	printf("blk: requests=%lu interrupts=%u\n", requests, blk.vq->irqs);
	printf("blk: ok sectors=%lu capacity=%lu\n", p->sectors, blk.capacity);
	return 0;
}

int guest_main(void)
{
	static struct params p;
	const struct pci_dev *d = &blk.vdev.pci;

	p.seed = cmdline_u64("seed", 1);
	p.start = cmdline_u64("start", 0);
	p.sectors = cmdline_u64("sectors", 2048);
	p.zero = cmdline_u64("zero", 64);
	printf("blk: seed=%lu start=%lu sectors=%lu zero=%lu\n", p.seed, p.start, p.sectors, p.zero);
	if (!blk_open(&blk))
		return 2;
	if (!(staging = phys_alloc(SLOTS * SLOT_BYTES))) {
		printf("blk: FAIL no memory for the buffers\n");
		return 2;
	}
	printf("blk: device %02x:%02x.%u common=%p irq=%s features=0x%lx queue=%u seg_max=%u capacity=%lu\n",
	       d->bus, d->slot, d->fn, (void *)blk.vdev.common, virtio_irq_name(&blk.vdev), blk.vdev.features,
	       blk.vq->size, blk.seg_max, blk.capacity);
	enter_user(run, &p);
}
