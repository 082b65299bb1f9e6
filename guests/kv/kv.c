/* A toy replicated-storage server: a key-value log on the first virtio-blk
 * disk, served over UDP and TCP port 9000 on the first virtio-net device.
 *
 * One request per datagram (a trailing newline is ignored), or per line on
 * a TCP connection (answers one per line, in order, on the connection):
 *   put <seq> <data>   -> "ok <seq>" once the record is on disk and flushed; again
 *                         for a retry with the same data; "err <seq> exists"
 *                         with other data; "err <seq> full" when the log is full
 *   get <seq>          -> "val <seq> <data>" or "none <seq>"
 * seq is a decimal u64; data is 0..400 bytes, anything but a newline.
 *
 * The disk: sector 0 holds a header, sectors 1, 2, ... one record each, up
 * to the first sector that is not a valid record naming the checksum of the
 * sector before it (see guests/README.md for the layout).  A zero-filled
 * disk is an empty store. */
#include "tcp.h"
#include "virtio_blk.h"

#define KV_PORT      9000
#define DATA_MAX     400
#define TCP_LINE_MAX 1024               /* longer lines are malformed, not "too long" */
#define STORE_MAGIC  "PYKVMKV1"
#define RECORD_MAGIC 0x3152564bu        /* "KVR1" as little-endian bytes */
#define REPLAY_BATCH 64                 /* sectors per read while replaying */
#define INDEX_MAX    (1u << 19)         /* hash table entries: 8 MiB */

struct header {
	char magic[8];
	uint64_t store_id;              /* random: the header's crc differs from an old store's */
	uint8_t zero[492];
	uint32_t crc;                   /* CRC-32 of the bytes before it */
};

/* Each record names the checksum of the sector before it, so a log cut
 * short by a torn record and then appended to does not take back the stale
 * records beyond the new end. */
struct record {
	uint32_t magic;
	uint32_t len;
	uint64_t seq;
	uint32_t prev_crc;              /* crc of the previous record, or of the header */
	uint8_t data[DATA_MAX];
	uint8_t zero[88];
	uint32_t crc;                   /* CRC-32 of the bytes before it */
};

_Static_assert(sizeof(struct header) == SECTOR_SIZE, "header is one sector");
_Static_assert(sizeof(struct record) == SECTOR_SIZE, "record is one sector");

struct entry {
	uint64_t seq;
	uint32_t sector;                /* 0: empty */
};

static struct blk_dev blk;
static struct net net;
static uint32_t last_crc;               /* of the log's last sector */
static uint64_t records, capacity;      /* capacity: records that fit */
static struct entry *table;
static uint32_t table_mask;             /* entries - 1 */
static struct record *io;               /* sector buffer for requests */
static uint32_t crc_table[256];

static void crc_init(void)
{
	for (uint32_t i = 0; i < 256; i++) {
		uint32_t c = i;

		for (int k = 0; k < 8; k++)
			c = c & 1 ? 0xedb88320 ^ c >> 1 : c >> 1;
		crc_table[i] = c;
	}
}

/* CRC-32 as zlib.crc32 computes it. */
static uint32_t crc32(const void *data, size_t len)
{
	const uint8_t *p = data;
	uint32_t c = 0xffffffff;

	while (len--)
		c = crc_table[(c ^ *p++) & 0xff] ^ c >> 8;
	return ~c;
}

static uint32_t sector_crc(const void *sector)
{
	return crc32(sector, SECTOR_SIZE - sizeof(uint32_t));
}

static bool equal(const void *a, const void *b, size_t n)
{
	const uint8_t *x = a, *y = b;

	while (n--)
		if (*x++ != *y++)
			return false;
	return true;
}

static bool all_zero(const void *p, size_t n)
{
	const uint8_t *b = p;

	while (n--)
		if (*b++)
			return false;
	return true;
}

static bool valid(const struct record *r, uint32_t prev_crc)
{
	return r->magic == RECORD_MAGIC && r->len <= DATA_MAX && r->prev_crc == prev_crc && r->crc == sector_crc(r);
}

/* ---- the index: seq -> sector, open addressing ------------------------ */

static struct entry *slot_of(uint64_t seq)
{
	uint32_t i = (seq * 0x9E3779B97F4A7C15ULL) >> 32 & table_mask;

	while (table[i].sector && table[i].seq != seq)
		i = (i + 1) & table_mask;
	return &table[i];
}

/* ---- the disk -------------------------------------------------------- */

static bool disk(uint32_t type, uint64_t sector, void *buf, uint32_t len)
{
	uint8_t status = blk_do(&blk, type, sector, buf, len);

	if (status != VIRTIO_BLK_S_OK)
		printf("kv: %s of sector %lu failed: status %u\n", type == VIRTIO_BLK_T_IN ? "read" : "write", sector, status);
	return status == VIRTIO_BLK_S_OK;
}

static bool flush(void)
{
	return !blk_has(&blk, VIRTIO_BLK_F_FLUSH) || disk(VIRTIO_BLK_T_FLUSH, 0, NULL, 0);
}

/* Reads sector 0: an existing store's header, or zeros for a new store,
 * which gets a header now. */
static bool open_store(void)
{
	struct header *h = (struct header *)io;

	if (!disk(VIRTIO_BLK_T_IN, 0, h, SECTOR_SIZE))
		return false;
	if (equal(h->magic, STORE_MAGIC, 8) && h->crc == sector_crc(h)) {
		last_crc = h->crc;
		return true;
	}
	if (!all_zero(h, SECTOR_SIZE)) {
		printf("kv: FAIL sector 0 is neither zeros nor a store header\n");
		return false;
	}
	memset(h, 0, SECTOR_SIZE);
	memcpy(h->magic, STORE_MAGIC, 8);
	h->store_id = rdtsc();
	h->crc = last_crc = sector_crc(h);
	return disk(VIRTIO_BLK_T_OUT, 0, h, SECTOR_SIZE) && flush();
}

/* Rebuilds the index from the log, up to its first invalid record. */
static bool replay(void)
{
	static struct record batch[REPLAY_BATCH];

	while (records < capacity) {
		uint64_t first = 1 + records, n = capacity - records < REPLAY_BATCH ? capacity - records : REPLAY_BATCH;

		if (!disk(VIRTIO_BLK_T_IN, first, batch, n * SECTOR_SIZE))
			return false;
		for (uint64_t i = 0; i < n; i++) {
			struct entry *e;

			if (!valid(&batch[i], last_crc))
				return true;
			last_crc = batch[i].crc;
			e = slot_of(batch[i].seq);
			if (!e->sector)                 /* a duplicate cannot be written: keep the first */
				*e = (struct entry){ batch[i].seq, first + i };
			records++;
		}
	}
	return true;
}

/* ---- requests -------------------------------------------------------- */

struct reply {
	char text[32 + DATA_MAX];
	uint32_t len;
};

static void add(struct reply *r, const void *bytes, uint32_t n)
{
	memcpy(r->text + r->len, bytes, n);
	r->len += n;
}

static void add_str(struct reply *r, const char *s)
{
	add(r, s, strlen(s));
}

static void add_u64(struct reply *r, uint64_t v)
{
	char digits[20];
	int n = 0;

	do {
		digits[n++] = '0' + v % 10;
		v /= 10;
	} while (v);
	while (n)
		r->text[r->len++] = digits[--n];
}

static void answer(struct reply *r, const char *word, uint64_t seq, const char *tail)
{
	add_str(r, word);
	add_str(r, " ");
	add_u64(r, seq);
	add_str(r, tail);
}

/* Decimal digits up to a space or the end; false on overflow or none. */
static bool parse_seq(const uint8_t **p, const uint8_t *end, uint64_t *seq)
{
	const uint8_t *s = *p;
	uint64_t v = 0;

	if (s == end || *s < '0' || *s > '9')
		return false;
	for (; s < end && *s >= '0' && *s <= '9'; s++) {
		if (v > (UINT64_MAX - (*s - '0')) / 10)
			return false;
		v = v * 10 + (*s - '0');
	}
	*p = s;
	*seq = v;
	return true;
}

/* The record of an indexed seq, read back and checked. */
static const struct record *load(const struct entry *e)
{
	if (!disk(VIRTIO_BLK_T_IN, e->sector, io, SECTOR_SIZE))
		return NULL;
	if (!valid(io, io->prev_crc) || io->seq != e->seq) {
		printf("kv: record at sector %u does not read back valid\n", e->sector);
		return NULL;
	}
	return io;
}

static void put(struct reply *r, uint64_t seq, const uint8_t *data, uint32_t len)
{
	struct entry *e = slot_of(seq);
	const struct record *old;
	uint64_t sector = 1 + records;

	if (e->sector) {                        /* a retry, or a conflict */
		bool same;

		if (!(old = load(e))) {
			answer(r, "err", seq, " io");
			return;
		}
		same = old->len == len && equal(old->data, data, len);
		answer(r, same ? "ok" : "err", seq, same ? "" : " exists");
		return;
	}
	if (records == capacity) {
		answer(r, "err", seq, " full");
		return;
	}
	*io = (struct record){ .magic = RECORD_MAGIC, .len = len, .seq = seq, .prev_crc = last_crc };
	memcpy(io->data, data, len);
	io->crc = sector_crc(io);
	if (!disk(VIRTIO_BLK_T_OUT, sector, io, SECTOR_SIZE) || !flush()) {
		answer(r, "err", seq, " io");
		return;
	}
	last_crc = io->crc;
	*e = (struct entry){ seq, sector };
	records++;
	answer(r, "ok", seq, "");
}

static void get(struct reply *r, uint64_t seq)
{
	const struct entry *e = slot_of(seq);
	const struct record *rec;

	if (!e->sector) {
		answer(r, "none", seq, "");
	} else if (!(rec = load(e))) {
		answer(r, "err", seq, " io");
	} else {
		answer(r, "val", seq, " ");
		add(r, rec->data, rec->len);
	}
}

/* "put <seq> <data>" -> 'p' with *data set, "get <seq>" -> 'g'; 0 if malformed. */
static char parse(const uint8_t *p, const uint8_t *end, uint64_t *seq, const uint8_t **data)
{
	char command;

	if (end - p < 4 || !(equal(p, "put ", 4) || equal(p, "get ", 4)))
		return 0;
	command = p[0];
	p += 4;
	if (!parse_seq(&p, end, seq))
		return 0;
	if (command == 'g')
		return p == end ? 'g' : 0;
	if (p == end || *p++ != ' ')
		return 0;
	for (const uint8_t *c = p; c < end; c++)
		if (*c == '\n')
			return 0;
	*data = p;
	return 'p';
}

/* Serves one request (without its newline) into r. */
static void serve(const uint8_t *p, const uint8_t *end, struct reply *r)
{
	const uint8_t *data;
	uint64_t seq;

	r->len = 0;
	switch (parse(p, end, &seq, &data)) {
	case 'g':
		get(r, seq);
		break;
	case 'p':
		if (end - data > DATA_MAX)
			answer(r, "err", seq, " too long");
		else
			put(r, seq, data, end - data);
		break;
	default:
		add_str(r, "err malformed");
	}
}

static void udp_request(struct net *n, const struct udp_in *in)
{
	const uint8_t *end = in->data + in->len;
	static struct reply r;

	if (in->local_port != KV_PORT)
		return;
	if (end > in->data && end[-1] == '\n')
		end--;
	serve(in->data, end, &r);
	udp_reply(n, in, r.text, r.len);
}

/* TCP: requests one per line, answers one per line in the same order.  A
 * line is served only once its answer fits in the send buffer, so a client
 * that does not read its answers stops its own requests, nobody else's.  A
 * line longer than TCP_LINE_MAX is answered "err malformed" and skipped up
 * to its newline (conn->user is 1 while skipping).  The peer's last line
 * may lack its newline. */
static void tcp_requests(struct tcp_conn *c)
{
	static uint8_t line[TCP_LINE_MAX + 1];
	static struct reply r;

	while (tcp_readable(c) && tcp_writable(c) > sizeof(r.text)) {
		uint32_t n = tcp_peek(c, line, sizeof(line)), len = 0;
		bool ended;

		while (len < n && line[len] != '\n')
			len++;
		ended = len < n || tcp_peer_closed(c);
		if (!ended && n <= TCP_LINE_MAX)
			break;                          /* the rest of the line is on its way */
		tcp_consume(c, len + (len < n));
		if (c->user) {                          /* the rest of an overlong line */
			c->user = !ended;
			continue;
		}
		if (len > TCP_LINE_MAX) {
			r.len = 0;
			add_str(&r, "err malformed");
			c->user = !ended;
		} else {
			serve(line, line + len, &r);
		}
		r.text[r.len++] = '\n';
		tcp_write(c, r.text, r.len);
	}
	if (tcp_peer_closed(c) && !tcp_readable(c) && !c->fin_queued)
		tcp_close(c);
}

static const struct tcp_app tcp_service[] = { { KV_PORT, tcp_requests } };

static int run(void *arg)
{
	(void)arg;
	memset(table, 0, (table_mask + 1) * sizeof(struct entry));     /* at CPL3: fast here */
	crc_init();
	if (!open_store() || !replay()) {
		printf("kv: FAIL cannot read the store\n");
		return 3;
	}
	tcp_open(&net, tcp_service, 1);
	printf("kv: ready records=%lu capacity=%lu\n", records, capacity);
	net_announce(&net);
	for (;;)
		tcp_poll(&net);
}

int guest_main(void)
{
	uint32_t index_size = 2;

	printf("kv: udp port %u, tcp port %u\n", KV_PORT, KV_PORT);
	if (!blk_open(&blk) || !net_open(&net, "kv", udp_request))
		return 2;
	if (blk_has(&blk, VIRTIO_BLK_F_RO) || blk.capacity < 2) {
		printf("kv: FAIL the disk is read-only or smaller than two sectors\n");
		return 2;
	}
	capacity = blk.capacity - 1;
	if (capacity > INDEX_MAX / 2)
		capacity = INDEX_MAX / 2;       /* the index stays at most half full */
	while (index_size < 2 * capacity)
		index_size *= 2;
	table_mask = index_size - 1;
	table = phys_alloc(index_size * sizeof(struct entry));
	io = phys_alloc(SECTOR_SIZE);
	if (!table || !io) {
		printf("kv: FAIL no memory for an index of %u entries\n", index_size);
		return 2;
	}
	printf("kv: disk irq=%s capacity=%lu sectors; net irq=%s ip=" IP_FMT "/%u mac=" MAC_FMT "\n",
	       virtio_irq_name(&blk.vdev), blk.capacity, virtio_irq_name(&net.dev.vdev), IP_ARGS(net.ip), net.prefix,
	       MAC_ARGS(net.dev.mac));
	enter_user(run, NULL);
}
