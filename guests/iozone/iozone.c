/* An IOzone-like write workload on the first virtio-blk disk, with a UDP
 * report after every point where an application would see its data safe,
 * so that a client outside can measure the externally observed latency of
 * fault tolerance (`pykvm ft study`).
 *
 *   mode=buffered   each write goes into a page cache in guest RAM (the file
 *                   region mapped page for page); every fsync= writes the
 *                   dirty pages go to the disk (runs of up to 1 MiB, up to
 *                   8 requests in flight), then a FLUSH: IOzone's
 *                   "buffered writes + fsync"
 *   mode=sync       every write goes into the cache and to the disk, then a
 *                   FLUSH, before the next (O_SYNC)
 *
 * Writes are record= bytes (a multiple of 512, at most 64 KiB) in order over
 * a file= MiB region of the disk, wrapping around.  After each fsync
 * (buffered) or each write (sync) the guest sends the report below to
 * whoever sent `start`.
 *
 * Control (UDP port= 9001; one command per datagram, answered to its sender):
 *   probe<cookie>   -> "IOZP" tsc cookie: the TSC read when the probe was
 *                      handled (the client calibrates the guest's TSC, offset
 *                      and rate, against its own clock)
 *   start           -> "IOZS" mode record fsync, then the workload
 *   stop            -> "IOZE" writes bytes fsyncs: the workload ends (probes
 *                      are answered again)
 *   quit            -> "IOZQ", then the guest exits 0
 * Integers are little-endian u64.  A report is "IOZR" seq tsc writes bytes
 * pages: seq counts reports from 1, tsc is read just before the report is
 * queued, writes/bytes are totals since start, pages the cache pages this
 * fsync wrote (1 write's pages in sync mode).  Commands are looked at between
 * writes, so a probe during the workload waits for the current write. */
#include "net.h"
#include "virtio_blk.h"

#define PAGE        4096u
#define MAX_RECORD  (64u * 1024)
#define RUN_PAGES   256                     /* pages per request at fsync (1 MiB) */
#define DEPTH       8                       /* requests in flight at fsync */

enum mode { BUFFERED, SYNC };

struct slot {
	struct blk_req req;
	bool busy;
};

static struct blk_dev blk;
static struct net net;
static enum mode mode;
static uint64_t record, fsync_every, file_bytes, port;
static uint8_t *cache;                      /* the file region, page for page */
static uint8_t *dirty;                      /* a byte per cache page */
static uint64_t offset;                     /* of the next write in the file */
static uint64_t writes, bytes, fsyncs, reports, pattern;
static struct slot slots[DEPTH];
static struct udp_in client;                /* who sent start: where reports go */
static bool running, quitting;

static void put64(uint8_t *p, uint64_t v)
{
	memcpy(p, &v, 8);
}

static bool command(const struct udp_in *in, const char *word)
{
	size_t n = strlen(word);

	if (in->len < n)
		return false;
	for (size_t i = 0; i < n; i++)
		if (in->data[i] != (uint8_t)word[i])
			return false;
	return true;
}

static void reply(const struct udp_in *to, const char *magic, const uint64_t *values, unsigned n,
		  const uint8_t *tail, uint32_t tail_len)
{
	static uint8_t out[256];
	uint32_t len = 4 + 8 * n;

	if (tail_len > sizeof(out) - len)
		tail_len = sizeof(out) - len;
	memcpy(out, magic, 4);
	for (unsigned i = 0; i < n; i++)
		put64(out + 4 + 8 * i, values[i]);
	memcpy(out + len, tail, tail_len);
	udp_reply(&net, to, out, len + tail_len);
}

static void control(struct net *n, const struct udp_in *in)
{
	uint64_t tsc = rdtsc();

	(void)n;
	if (in->local_port != port)
		return;
	if (command(in, "probe")) {
		reply(in, "IOZP", &tsc, 1, in->data + 5, in->len - 5);
	} else if (command(in, "start")) {
		uint64_t v[3] = { mode, record, fsync_every };

		client = *in;
		running = true;
		reply(in, "IOZS", v, 3, NULL, 0);
	} else if (command(in, "stop")) {
		uint64_t v[3] = { writes, bytes, fsyncs };

		running = false;
		reply(in, "IOZE", v, 3, NULL, 0);
	} else if (command(in, "quit")) {
		quitting = true;
		running = false;
		reply(in, "IOZQ", NULL, 0, NULL, 0);
	}
}

static void report(uint64_t pages)
{
	uint64_t v[5] = { ++reports, rdtsc(), writes, bytes, pages };

	reply(&client, "IOZR", v, 5, NULL, 0);
}

static void check(const struct blk_req *r, const char *what)
{
	if (r->status != VIRTIO_BLK_S_OK) {
		printf("iozone: FAIL %s at sector %lu: status %u\n", what, r->hdr.sector, r->status);
		guest_exit(3);
	}
}

static void flush(void)
{
	if (blk_has(&blk, VIRTIO_BLK_F_FLUSH) && blk_do(&blk, VIRTIO_BLK_T_FLUSH, 0, NULL, 0) != VIRTIO_BLK_S_OK) {
		printf("iozone: FAIL flush\n");
		guest_exit(3);
	}
}

/* One request for pages [first, first + count) of the cache; waits for a
 * free slot first. */
static void write_pages(uint64_t first, uint64_t count, unsigned *in_flight)
{
	struct vq_buf data = { cache + first * PAGE, count * PAGE, false };
	struct slot *s = NULL;

	while (*in_flight == DEPTH) {
		struct slot *done = (struct slot *)blk_complete(&blk);

		check(&done->req, "write");
		done->busy = false;
		(*in_flight)--;
	}
	for (unsigned i = 0; i < DEPTH && !s; i++)
		if (!slots[i].busy)
			s = &slots[i];
	s->busy = true;
	if (!blk_queue(&blk, &s->req, VIRTIO_BLK_T_OUT, first * PAGE / SECTOR_SIZE, &data, 1)) {
		printf("iozone: FAIL the queue is full\n");
		guest_exit(3);
	}
	vq_kick(blk.vq);
	(*in_flight)++;
}

/* Writes every dirty cache page (contiguous runs coalesced), then flushes;
 * returns the pages written. */
static uint64_t fsync(void)
{
	uint64_t pages = file_bytes / PAGE, written = 0;
	unsigned in_flight = 0;

	for (uint64_t page = 0; page < pages;) {
		uint64_t run = 0;

		while (page + run < pages && dirty[page + run] && run < RUN_PAGES)
			dirty[page + run++] = 0;
		if (run) {
			write_pages(page, run, &in_flight);
			written += run;
			page += run;
		} else {
			page++;
		}
	}
	while (in_flight--) {
		struct slot *done = (struct slot *)blk_complete(&blk);

		check(&done->req, "write");
		done->busy = false;
	}
	flush();
	fsyncs++;
	return written;
}

/* One record into the cache: a pattern no two writes share. */
static void write_record(void)
{
	uint64_t *p = (uint64_t *)(cache + offset);

	pattern++;
	for (uint64_t i = 0; i < record / 8; i++)
		p[i] = pattern ^ i;
	for (uint64_t page = offset / PAGE; page * PAGE < offset + record; page++)
		dirty[page] = 1;
	offset += record;
	if (offset + record > file_bytes)
		offset = 0;
	writes++;
	bytes += record;
}

static void poll_commands(void)
{
	while (net_pending(&net))
		net_poll(&net);
}

static void workload(void)
{
	uint64_t since_fsync = 0;

	while (running) {
		uint64_t first = offset / PAGE, count = (offset % PAGE + record + PAGE - 1) / PAGE;

		write_record();
		if (mode == SYNC) {
			unsigned in_flight = 0;
			struct slot *done;

			for (uint64_t i = 0; i < count; i++)
				dirty[first + i] = 0;
			write_pages(first, count, &in_flight);
			done = (struct slot *)blk_complete(&blk);
			check(&done->req, "write");
			done->busy = false;
			flush();
			report(count);
		} else if (++since_fsync == fsync_every) {
			since_fsync = 0;
			report(fsync());
		}
		poll_commands();
	}
}

static int run(void *arg)
{
	(void)arg;
	memset(cache, 0, file_bytes);           /* at CPL3: fast here */
	memset(dirty, 0, file_bytes / PAGE);
	printf("iozone: ready\n");
	net_announce(&net);
	while (!quitting) {
		net_poll(&net);
		if (running)
			workload();
	}
	netdev_drain(&net.dev);                 /* the last reply leaves before the guest does */
	printf("iozone: done writes=%lu bytes=%lu fsyncs=%lu reports=%lu\n", writes, bytes, fsyncs, reports);
	return 0;
}

int guest_main(void)
{
	char name[16];

	cmdline_str("mode", "buffered", name, sizeof(name));
	record = cmdline_u64("record", 4096);
	fsync_every = cmdline_u64("fsync", 3000);
	file_bytes = cmdline_u64("file", 16) << 20;
	port = cmdline_u64("port", 9001);
	if (!strcmp(name, "buffered")) {
		mode = BUFFERED;
	} else if (!strcmp(name, "sync")) {
		mode = SYNC;
	} else {
		printf("iozone: FAIL mode=%s: buffered or sync\n", name);
		return 2;
	}
	if (!record || record % SECTOR_SIZE || record > MAX_RECORD || !fsync_every || file_bytes < MAX_RECORD ||
	    !port || port > 65535) {
		printf("iozone: FAIL record= must be a multiple of 512 up to 65536, fsync= and port= positive, file= >= 1\n");
		return 2;
	}
	/* No tsc_init(): its PIT measurement fails when FT syncs pause the guest during it, and the
	 * client measures the TSC's rate against its own clock anyway. */
	printf("iozone: mode=%s record=%lu fsync=%lu file=%lu MiB port=%lu\n", name, record, fsync_every,
	       file_bytes >> 20, port);
	if (!blk_open(&blk) || !net_open(&net, "iozone", control))
		return 2;
	if (blk_has(&blk, VIRTIO_BLK_F_RO) || blk.capacity * SECTOR_SIZE < file_bytes) {
		printf("iozone: FAIL the disk is read-only or smaller than file= (%lu sectors)\n", blk.capacity);
		return 2;
	}
	cache = phys_alloc(file_bytes);
	dirty = phys_alloc(file_bytes / PAGE);
	if (!cache || !dirty) {
		printf("iozone: FAIL no memory for a %lu MiB cache\n", file_bytes >> 20);
		return 2;
	}
	enter_user(run, NULL);
}
