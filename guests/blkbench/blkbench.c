/* Timed workloads on the first virtio-blk device, for bench/blk.py: the
 * guest times itself with the TSC, so the VMM's start-up (QEMU's firmware)
 * does not count.  Tests, in this order, each for ms= milliseconds:
 *
 *   seq-write-64k        64 KiB writes over the region, in order, `depth` in flight
 *                        (at least one whole pass: it fills the region for the reads)
 *   seq-read-64k         64 KiB reads, in order, `depth` in flight
 *   rand-read-4k-qd1     4 KiB reads at random 4 KiB-aligned offsets, one at a time
 *   rand-write-4k-qd1    4 KiB writes, likewise
 *   rand-read-4k-qdD     4 KiB random reads, D = depth in flight
 *   rand-write-4k-qdD    4 KiB random writes, D in flight
 *
 * One line per test:
 *   blkbench: NAME depth=D MB/s=M.M iops=N requests=R bytes=B us=T lat_us=L.L
 * (MB = 10^6 bytes; us is the test's duration; lat_us the mean time from a
 * request's kick to its completion being seen).  Between tests the guest
 * spins at CPL3 for gap= ms without touching the device, so a host can read
 * exit counters while nothing happens.
 *
 * Every sector written carries a stamp in its first 8 bytes, (sector *
 * GOLDEN) ^ seed, and every sector read is checked against it, so a device
 * that moves the wrong data fails the run (exit 3) instead of looking fast. */
#include "virtio_blk.h"

#define GOLDEN    0x9E3779B97F4A7C15ULL
#define MAX_DEPTH 32
#define BIG       (64 * 1024)
#define SMALL     4096

struct params {
	uint64_t region;                        /* sectors */
	uint64_t ms, gap_ms, depth, seed;
};

struct slot {
	struct blk_req req;
	uint8_t *buf;
	uint64_t sector, issued;                /* issued: TSC at queueing */
};

struct test {
	const char *name;
	uint32_t type, bytes;
	bool random;
	unsigned depth;
	bool full_pass;                         /* cover the region at least once */
};

static struct blk_dev blk;
static struct slot slots[MAX_DEPTH];
static struct params p;
static uint64_t rng, next_seq;

static uint64_t xorshift(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return rng;
}

static uint64_t stamp(uint64_t sector)
{
	return sector * GOLDEN ^ p.seed;
}

/* The next request's first sector: in order (wrapping), or random and aligned to its size. */
static uint64_t next_sector(const struct test *t)
{
	uint64_t step = t->bytes / SECTOR_SIZE, sector;

	if (t->random)
		return xorshift() % (p.region / step) * step;
	if (next_seq + step > p.region)
		next_seq = 0;
	sector = next_seq;
	next_seq += step;
	return sector;
}

static void issue(const struct test *t, struct slot *s)
{
	struct vq_buf data = { s->buf, t->bytes, false };

	s->sector = next_sector(t);
	if (t->type == VIRTIO_BLK_T_OUT)
		for (uint32_t i = 0; i < t->bytes / SECTOR_SIZE; i++)
			*(uint64_t *)(s->buf + i * SECTOR_SIZE) = stamp(s->sector + i);
	else
		for (uint32_t i = 0; i < t->bytes / SECTOR_SIZE; i++)
			*(uint64_t *)(s->buf + i * SECTOR_SIZE) = ~stamp(s->sector + i);    /* no stale match */
	if (!blk_queue(&blk, &s->req, t->type, s->sector, &data, 1)) {
		printf("blkbench: FAIL the queue (%u entries) is full with %u requests in flight\n",
		       blk.vq->size, vq_in_flight(blk.vq));
		guest_exit(3);
	}
	s->issued = rdtsc();
}

static bool complete(const struct test *t, const struct slot *s)
{
	if (s->req.status != VIRTIO_BLK_S_OK) {
		printf("blkbench: FAIL %s at sector %lu: status %u\n", t->name, s->sector, s->req.status);
		return false;
	}
	if (t->type == VIRTIO_BLK_T_IN)
		for (uint32_t i = 0; i < t->bytes / SECTOR_SIZE; i++)
			if (*(uint64_t *)(s->buf + i * SECTOR_SIZE) != stamp(s->sector + i)) {
				printf("blkbench: FAIL %s: sector %lu read 0x%016lx, expected 0x%016lx\n", t->name,
				       s->sector + i, *(uint64_t *)(s->buf + i * SECTOR_SIZE), stamp(s->sector + i));
				return false;
			}
	return true;
}

/* "12.3" from a value in tenths. */
static void print_tenths(const char *key, uint64_t tenths)
{
	printf(" %s=%lu.%lu", key, tenths / 10, tenths % 10);
}

static bool run_test(const struct test *t)
{
	uint64_t region_bytes = p.region * SECTOR_SIZE;
	uint64_t requests = 0, lat_sum = 0, bytes = 0, start, deadline, end, us;
	unsigned in_flight = 0;
	bool stopping = false;

	next_seq = 0;
	start = rdtsc();
	deadline = start + p.ms * tsc_hz / 1000;
	for (unsigned i = 0; i < t->depth; i++, in_flight++)
		issue(t, &slots[i]);
	while (in_flight) {
		uint32_t len;
		struct blk_req *r = vq_pop(blk.vq, &len);
		struct slot *s;
		uint64_t now;

		if (!r) {
			vq_kick(blk.vq);        /* what we queued since the last kick, in one notification */
			vq_wait(blk.vq);
			continue;
		}
		now = rdtsc();
		s = (struct slot *)r;           /* req is the slot's first member */
		if (!complete(t, s))
			return false;
		requests++;
		bytes += t->bytes;
		lat_sum += now - s->issued;
		if (!stopping && now >= deadline && (!t->full_pass || bytes >= region_bytes))
			stopping = true;
		if (stopping)
			in_flight--;
		else
			issue(t, s);
	}
	end = rdtsc();
	us = (end - start) * 1000000 / tsc_hz;
	if (!us)
		us = 1;
	printf("blkbench: %s depth=%u", t->name, t->depth);
	print_tenths("MB/s", bytes * 10 / us);
	printf(" iops=%lu requests=%lu bytes=%lu us=%lu", requests * 1000000 / us, requests, bytes, us);
	print_tenths("lat_us", lat_sum / requests * 10000000 / tsc_hz);
	printf("\n");
	return true;
}

/* Nothing for the device, no exits: the host reads its counters meanwhile. */
static void gap(void)
{
	uint64_t until = rdtsc() + p.gap_ms * tsc_hz / 1000;

	while (rdtsc() < until)
		cpu_relax();
}

static int run(void *arg)
{
	static char names[2][24];
	unsigned d = p.depth;
	const struct test tests[] = {
		{ "seq-write-64k", VIRTIO_BLK_T_OUT, BIG, false, d, true },
		{ "seq-read-64k", VIRTIO_BLK_T_IN, BIG, false, d, false },
		{ "rand-read-4k-qd1", VIRTIO_BLK_T_IN, SMALL, true, 1, false },
		{ "rand-write-4k-qd1", VIRTIO_BLK_T_OUT, SMALL, true, 1, false },
		{ names[0], VIRTIO_BLK_T_IN, SMALL, true, d, false },
		{ names[1], VIRTIO_BLK_T_OUT, SMALL, true, d, false },
	};

	(void)arg;
	/* printf has no snprintf sibling: build the two names by hand. */
	for (int i = 0; i < 2; i++) {
		const char *base = i ? "rand-write-4k-qd" : "rand-read-4k-qd";
		size_t n = strlen(base);

		memcpy(names[i], base, n);
		if (d >= 10)
			names[i][n++] = '0' + d / 10;
		names[i][n++] = '0' + d % 10;
		names[i][n] = 0;
	}
	for (unsigned i = 0; i < sizeof(tests) / sizeof(tests[0]); i++) {
		gap();
		if (!run_test(&tests[i]))
			return 3;
	}
	if (!virtio_healthy(&blk.vdev))
		return VIRTIO_EXIT_DEVICE;
	printf("blkbench: ok interrupts=%u\n", blk.vq->irqs);
	return 0;
}

int guest_main(void)
{
	const struct pci_dev *dev = &blk.vdev.pci;
	uint64_t region_mib;

	region_mib = cmdline_u64("region", 32);
	p.ms = cmdline_u64("ms", 1000);
	p.gap_ms = cmdline_u64("gap", 100);
	p.depth = cmdline_u64("depth", 16);
	tsc_init();
	p.seed = cmdline_u64("seed", rdtsc());
	rng = p.seed | 1;
	printf("blkbench: region=%lu MiB ms=%lu gap=%lu depth=%lu seed=%lu tsc=%lu MHz (%s)\n", region_mib, p.ms,
	       p.gap_ms, p.depth, p.seed, tsc_hz / 1000000, tsc_source);
	if (p.depth < 1 || p.depth > MAX_DEPTH) {
		printf("blkbench: FAIL depth=%lu: expected 1..%u\n", p.depth, MAX_DEPTH);
		return 2;
	}
	if (!blk_open(&blk))
		return 2;
	if (blk_has(&blk, VIRTIO_BLK_F_RO)) {
		printf("blkbench: FAIL the disk is read-only\n");
		return 2;
	}
	p.region = region_mib * 1024 * 1024 / SECTOR_SIZE;
	if (p.region > blk.capacity)
		p.region = blk.capacity;
	p.region &= ~(uint64_t)(BIG / SECTOR_SIZE - 1);
	if (!p.region || p.depth > blk.vq->size) {
		printf("blkbench: FAIL capacity %lu sectors is under 64 KiB, or depth %lu above the queue size %u\n",
		       blk.capacity, p.depth, blk.vq->size);
		return 2;
	}
	for (unsigned i = 0; i < p.depth; i++)
		if (!(slots[i].buf = phys_alloc(BIG))) {
			printf("blkbench: FAIL no memory for %lu 64 KiB buffers\n", p.depth);
			return 2;
		}
	printf("blkbench: device %02x:%02x.%u irq=%s features=0x%lx queue=%u capacity=%lu region=%lu sectors\n",
	       dev->bus, dev->slot, dev->fn, virtio_irq_name(&blk.vdev), blk.vdev.features, blk.vq->size,
	       blk.capacity, p.region);
	enter_user(run, NULL);
}
