/* TCP: the connections, what a segment does to one, and the timers.  Read
 * tcp.h first; section numbers are RFC 9293's. */
#include "tcp.h"
#include "net_wire.h"

#define FIN 0x01
#define SYN 0x02
#define RST 0x04
#define PSH 0x08
#define ACK 0x10

#define OUR_MSS      1460       /* 1500 - IPv4 header - TCP header */
#define DEFAULT_MSS  536        /* the peer's, when its SYN does not say (3.7.1) */
#define OPT_END      0
#define OPT_NOP      1
#define OPT_MSS      2
#define RTO_FIRST_MS 200        /* a LAN's round trip is far shorter: no estimation */
#define RTO_MAX_MS   3200
#define SYN_RETRIES  4          /* SYN-ACKs sent again before a half-open connection goes */
#define DATA_RETRIES 12         /* timeouts without progress before we reset (~30 s) */
#define TIME_WAIT_MS 1000       /* short: we never open connections, so never reuse a port */
#define TICK_MS      5          /* how long tcp_poll waits for a frame */

struct tcp_hdr {
	uint16_t sport, dport;
	uint32_t seq, ack;
	uint8_t off;                    /* header length in 32-bit words, in the high nibble */
	uint8_t flags;
	uint16_t win, csum, urg;
} __attribute__((packed));

/* An arriving segment, its fields in host order. */
struct segment {
	uint32_t seq, ack, len;         /* len: data bytes */
	uint16_t sport, dport, wnd;
	uint8_t flags;
	const uint8_t *data, *opts;
	uint32_t opts_len;
};

struct tcp_stats tcp_stats;

static struct {
	struct net *net;
	const struct tcp_app *apps;
	unsigned napps;
	struct tcp_conn conns[TCP_CONNS];
} tcp;

static struct ipv4_frame out;           /* the segment being sent */

/* Sequence numbers wrap: compare by the sign of the difference (3.4). */
static bool seq_lt(uint32_t a, uint32_t b) { return (int32_t)(a - b) < 0; }
static bool seq_gt(uint32_t a, uint32_t b) { return (int32_t)(a - b) > 0; }
static uint32_t min(uint32_t a, uint32_t b) { return a < b ? a : b; }

static uint64_t ms(uint64_t n) { return n * tsc_hz / 1000; }

/* ---- buffers: rings of a power-of-two size ----------------------------- */

static void ring_put(uint8_t *ring, uint32_t size, uint32_t at, const uint8_t *src, uint32_t n)
{
	for (uint32_t i = 0; i < n; i++)
		ring[(at + i) & (size - 1)] = src[i];
}

static void ring_get(const uint8_t *ring, uint32_t size, uint32_t at, uint8_t *dst, uint32_t n)
{
	for (uint32_t i = 0; i < n; i++)
		dst[i] = ring[(at + i) & (size - 1)];
}

_Static_assert(!(TCP_RX_BUF & (TCP_RX_BUF - 1)) && !(TCP_TX_BUF & (TCP_TX_BUF - 1)), "ring sizes are powers of two");
_Static_assert(TCP_RX_BUF <= 65535, "the window fits in 16 bits without scaling");

uint32_t tcp_readable(const struct tcp_conn *c) { return c->rx_len; }

uint32_t tcp_peek(const struct tcp_conn *c, void *buf, uint32_t max)
{
	uint32_t n = min(max, c->rx_len);

	ring_get(c->rx, TCP_RX_BUF, c->rx_head, buf, n);
	return n;
}

void tcp_consume(struct tcp_conn *c, uint32_t n)
{
	n = min(n, c->rx_len);
	c->rx_head = (c->rx_head + n) & (TCP_RX_BUF - 1);
	c->rx_len -= n;
}

uint32_t tcp_read(struct tcp_conn *c, void *buf, uint32_t max)
{
	uint32_t n = tcp_peek(c, buf, max);

	tcp_consume(c, n);
	return n;
}

uint32_t tcp_writable(const struct tcp_conn *c)
{
	bool open = c->state == TCP_ESTABLISHED || c->state == TCP_CLOSE_WAIT;

	return open && !c->fin_queued ? TCP_TX_BUF - c->tx_len : 0;
}

uint32_t tcp_write(struct tcp_conn *c, const void *data, uint32_t len)
{
	uint32_t n = min(len, tcp_writable(c));

	ring_put(c->tx, TCP_TX_BUF, c->tx_head + c->tx_len, data, n);
	c->tx_len += n;
	return n;
}

void tcp_close(struct tcp_conn *c)
{
	c->fin_queued = true;
}

/* ---- sending ------------------------------------------------------------ */

/* Fills in the TCP header in `out` (options and data already after it) and
 * sends the segment. */
static void transmit(const uint8_t *mac, uint32_t ip, uint16_t sport, uint16_t dport, uint32_t seq, uint32_t ack,
		     uint8_t flags, uint16_t wnd, uint32_t opts_len, uint32_t data_len)
{
	struct tcp_hdr *h = (struct tcp_hdr *)out.payload;
	uint32_t len = sizeof(*h) + opts_len + data_len;

	*h = (struct tcp_hdr){
		.sport = be16(sport), .dport = be16(dport), .seq = be32(seq), .ack = be32(ack),
		.off = (sizeof(*h) + opts_len) / 4 << 4, .flags = flags, .win = be16(wnd),
	};
	h->csum = be16(fold(sum16(h, len, pseudo_sum(tcp.net->ip, ip, IP_PROTO_TCP, len))));
	ipv4_send(tcp.net, &out, mac, ip, IP_PROTO_TCP, len);
	tcp_stats.segments_out++;
}

/* The reply to a segment no connection wants (3.10.7.1): it carries the
 * sequence number the sender expects, so the sender believes it. */
static void reset_reply(const uint8_t *mac, uint32_t ip, const struct segment *s)
{
	if (s->flags & RST)
		return;                                 /* never answer a reset */
	if (s->flags & ACK)
		transmit(mac, ip, s->dport, s->sport, s->ack, 0, RST, 0, 0, 0);
	else
		transmit(mac, ip, s->dport, s->sport, 0, s->seq + s->len + !!(s->flags & SYN) + !!(s->flags & FIN),
			 RST | ACK, 0, 0, 0);
	tcp_stats.resets_out++;
}

static uint32_t window(const struct tcp_conn *c)
{
	return TCP_RX_BUF - c->rx_len;
}

/* A segment of the connection: len bytes of its send buffer from seq. */
static void send_segment(struct tcp_conn *c, uint32_t seq, uint8_t flags, uint32_t len)
{
	ring_get(c->tx, TCP_TX_BUF, c->tx_head + (seq - c->snd_una), out.payload + sizeof(struct tcp_hdr), len);
	c->rcv_adv = c->rcv_nxt + window(c);
	c->ack_owed = false;
	transmit(c->mac, c->ip, c->local_port, c->port, seq, c->rcv_nxt, flags | ACK, window(c), 0, len);
}

static void send_syn_ack(struct tcp_conn *c)
{
	uint8_t *opt = out.payload + sizeof(struct tcp_hdr);

	opt[0] = OPT_MSS;
	opt[1] = 4;
	opt[2] = OUR_MSS >> 8;
	opt[3] = OUR_MSS & 0xff;
	c->rcv_adv = c->rcv_nxt + window(c);
	transmit(c->mac, c->ip, c->local_port, c->port, c->iss, c->rcv_nxt, SYN | ACK, window(c), 4, 0);
}

static void arm(struct tcp_conn *c, uint64_t cycles)
{
	c->timer_at = rdtsc();
	c->timer_len = cycles;
}

/* The retransmission timeout: doubled at each retry, up to a cap. */
static uint64_t rto(const struct tcp_conn *c)
{
	uint64_t t = (uint64_t)RTO_FIRST_MS << min(c->retries, 8);

	return ms(t < RTO_MAX_MS ? t : RTO_MAX_MS);
}

/* Data (or our FIN) is out and not acknowledged. */
static bool in_flight(const struct tcp_conn *c)
{
	return c->snd_max != c->snd_una;
}

/* Data or a FIN waits for the peer's window to open. */
static bool blocked(const struct tcp_conn *c)
{
	uint32_t offset = c->snd_nxt - c->snd_una;

	return offset < c->tx_len && offset >= c->snd_wnd;
}

/* Sends what the peer's window lets go, then our FIN once the data is out
 * (3.10.4), then an ACK if one is owed and no segment carried it. */
static void output(struct tcp_conn *c)
{
	for (;;) {
		uint32_t offset = c->snd_nxt - c->snd_una, unsent, n;
		bool fin;

		if (offset > c->tx_len)
			break;                          /* our FIN is out: nothing follows it */
		unsent = c->tx_len - offset;
		n = min(min(unsent, c->snd_wnd > offset ? c->snd_wnd - offset : 0), c->mss);
		fin = c->fin_queued && n == unsent;
		if (!n && !fin)
			break;
		send_segment(c, c->snd_nxt, (n ? PSH : 0) | (fin ? FIN : 0), n);
		c->snd_nxt += n + fin;
		if (seq_gt(c->snd_nxt, c->snd_max))
			c->snd_max = c->snd_nxt;
		if (fin)
			c->state = c->state == TCP_CLOSE_WAIT ? TCP_LAST_ACK : TCP_FIN_WAIT_1;
	}
	if (c->ack_owed)
		send_segment(c, c->snd_nxt, 0, 0);
	/* One timer: retransmission while something is in flight, else the
	 * persist timer while the peer's window is shut on our data. */
	if (c->state == TCP_TIME_WAIT)
		return;
	if (!in_flight(c) && !blocked(c))
		c->timer_len = 0;
	else if (!c->timer_len)
		arm(c, rto(c));
}

/* ---- connections -------------------------------------------------------- */

static void release(struct tcp_conn *c)
{
	c->state = TCP_FREE;
}

static struct tcp_conn *find(uint32_t ip, uint16_t port, uint16_t local_port)
{
	for (unsigned i = 0; i < TCP_CONNS; i++) {
		struct tcp_conn *c = &tcp.conns[i];

		if (c->state != TCP_FREE && c->ip == ip && c->port == port && c->local_port == local_port)
			return c;
	}
	return NULL;
}

/* A free slot; else the oldest half-open connection's, if it has waited
 * for the peer's ACK longer than a LAN's round trip could take (a flood of
 * SYNs must not lock out the next real client, nor a burst of real clients
 * push each other out); else none. */
static struct tcp_conn *new_slot(void)
{
	struct tcp_conn *oldest = NULL;
	uint64_t now = rdtsc();

	for (unsigned i = 0; i < TCP_CONNS; i++) {
		struct tcp_conn *c = &tcp.conns[i];

		if (c->state == TCP_FREE)
			return c;
		if (c->state == TCP_SYN_RECEIVED && (!oldest || now - c->born > now - oldest->born))
			oldest = c;
	}
	return oldest && now - oldest->born >= ms(RTO_FIRST_MS) ? oldest : NULL;
}

/* The MSS the peer's SYN names (3.7.1), no more than ours; 536 if none. */
static uint16_t peer_mss(const struct segment *s)
{
	for (uint32_t i = 0; i < s->opts_len;) {
		uint8_t kind = s->opts[i];

		if (kind == OPT_END)
			break;
		if (kind == OPT_NOP) {
			i++;
			continue;
		}
		if (i + 1 >= s->opts_len || s->opts[i + 1] < 2 || i + s->opts[i + 1] > s->opts_len)
			break;                          /* a malformed option ends the list */
		if (kind == OPT_MSS && s->opts[i + 1] == 4) {
			uint16_t mss = s->opts[i + 2] << 8 | s->opts[i + 3];

			return mss < 64 ? 64 : mss > OUR_MSS ? OUR_MSS : mss;
		}
		i += s->opts[i + 1];
	}
	return DEFAULT_MSS;
}

/* A segment for no connection: a SYN to a served port opens one (3.10.7.2),
 * anything else is answered with a reset. */
static void listen_in(const uint8_t *mac, uint32_t ip, const struct segment *s)
{
	const struct tcp_app *app = NULL;
	struct tcp_conn *c;

	for (unsigned i = 0; i < tcp.napps; i++)
		if (tcp.apps[i].port == s->dport)
			app = &tcp.apps[i];
	if ((s->flags & (SYN | ACK | RST)) != SYN || !app) {
		reset_reply(mac, ip, s);
		return;
	}
	if (!(c = new_slot())) {
		tcp_stats.refused++;                    /* the peer sends its SYN again */
		return;
	}
	memset(c, 0, offsetof(struct tcp_conn, tx));
	memcpy(c->mac, mac, ETH_ALEN);
	c->app = app;
	c->ip = ip;
	c->port = s->sport;
	c->local_port = s->dport;
	c->mss = peer_mss(s);
	c->born = rdtsc();
	c->iss = (uint32_t)(c->born >> 8);            /* any number will do: it need not be secret here */
	c->snd_una = c->iss;
	c->snd_nxt = c->snd_max = c->iss + 1;
	c->irs = s->seq;
	c->rcv_nxt = s->seq + 1;
	c->state = TCP_SYN_RECEIVED;
	send_syn_ack(c);
	arm(c, rto(c));
}

/* Whether the segment falls in our receive window (3.10.7.4). */
static bool acceptable(const struct tcp_conn *c, const struct segment *s)
{
	uint32_t wnd = window(c);

	if (!s->len)
		return wnd ? s->seq - c->rcv_nxt < wnd : s->seq == c->rcv_nxt;
	return wnd && (s->seq - c->rcv_nxt < wnd || s->seq + s->len - 1 - c->rcv_nxt < wnd);
}

/* The peer acknowledged up to s->ack: drop those bytes, and note our FIN's
 * acknowledgement.  False if the connection is gone. */
static bool acked(struct tcp_conn *c, const struct segment *s)
{
	uint32_t n = s->ack - c->snd_una, data = min(n, c->tx_len);

	c->tx_head = (c->tx_head + data) & (TCP_TX_BUF - 1);
	c->tx_len -= data;
	c->snd_una = s->ack;
	if (seq_lt(c->snd_nxt, c->snd_una))
		c->snd_nxt = c->snd_una;
	c->retries = 0;
	c->timer_len = 0;                               /* output() arms it again if need be */
	if (n == data)
		return true;
	/* our FIN is acknowledged too */
	if (c->state == TCP_FIN_WAIT_1) {
		c->state = TCP_FIN_WAIT_2;
	} else if (c->state == TCP_CLOSING) {
		c->state = TCP_TIME_WAIT;
		arm(c, ms(TIME_WAIT_MS));
	} else if (c->state == TCP_LAST_ACK) {
		release(c);
		return false;
	}
	return true;
}

/* In-order data into the receive buffer, then the peer's FIN if it comes
 * right after (3.10.7.4, seventh and eighth).  Data beyond the next byte we
 * expect is dropped: the peer sends it again. */
static void receive(struct tcp_conn *c, const struct segment *s)
{
	uint32_t skip = seq_lt(s->seq, c->rcv_nxt) ? c->rcv_nxt - s->seq : 0, n = 0;
	bool receiving = c->state == TCP_ESTABLISHED || c->state == TCP_FIN_WAIT_1 || c->state == TCP_FIN_WAIT_2;

	if (s->len || s->flags & FIN)
		c->ack_owed = true;
	if (s->seq + skip != c->rcv_nxt || (s->len && !receiving))
		return;
	if (skip < s->len) {
		n = min(s->len - skip, window(c));
		ring_put(c->rx, TCP_RX_BUF, c->rx_head + c->rx_len, s->data + skip, n);
		c->rx_len += n;
		c->rcv_nxt += n;
	}
	if (!(s->flags & FIN) || skip + n < s->len || c->peer_closed)
		return;
	c->rcv_nxt++;
	c->peer_closed = true;
	if (c->state == TCP_ESTABLISHED) {
		c->state = TCP_CLOSE_WAIT;
	} else if (c->state == TCP_FIN_WAIT_1) {
		c->state = TCP_CLOSING;
	} else if (c->state == TCP_FIN_WAIT_2) {
		c->state = TCP_TIME_WAIT;
		arm(c, ms(TIME_WAIT_MS));
	}
}

/* What a segment does to a connection (3.10.7.3, 3.10.7.4).  False if the
 * connection is gone. */
static bool conn_in(struct tcp_conn *c, const uint8_t *mac, uint32_t ip, const struct segment *s)
{
	if (c->state == TCP_SYN_RECEIVED) {
		if (s->flags & RST) {
			if (s->seq != c->rcv_nxt)
				return true;
			tcp_stats.resets_in++;
			release(c);
			return false;
		}
		if (s->flags & SYN) {                   /* our SYN-ACK was lost: again */
			if (s->seq == c->irs)
				send_syn_ack(c);
			return true;
		}
		if (!(s->flags & ACK))
			return true;
		if (s->ack != c->iss + 1) {
			reset_reply(mac, ip, s);
			return true;
		}
		c->state = TCP_ESTABLISHED;
		c->snd_una = s->ack;
		c->snd_wnd = s->wnd;
		c->snd_wl1 = s->seq;
		c->snd_wl2 = s->ack;
		c->retries = 0;
		c->timer_len = 0;
		tcp_stats.accepted++;
	}
	if (!acceptable(c, s)) {
		if (!(s->flags & RST))
			c->ack_owed = true;             /* tell the peer what we expect */
		return true;
	}
	if (s->flags & RST) {
		/* Only the exact next sequence number resets (RFC 5961): a blind
		 * reset somewhere in the window gets a "challenge" ACK instead. */
		if (s->seq != c->rcv_nxt) {
			c->ack_owed = true;
			return true;
		}
		tcp_stats.resets_in++;
		release(c);
		return false;
	}
	if (s->flags & SYN || !(s->flags & ACK)) {
		if (s->flags & SYN)
			c->ack_owed = true;             /* a challenge ACK (RFC 5961) */
		return true;
	}
	if (seq_gt(s->ack, c->snd_max)) {              /* acknowledges what we never sent */
		c->ack_owed = true;
		return true;
	}
	if (seq_gt(s->ack, c->snd_una) && !acked(c, s))
		return false;
	if (seq_lt(c->snd_wl1, s->seq) || (c->snd_wl1 == s->seq && !seq_lt(s->ack, c->snd_wl2))) {
		c->snd_wnd = s->wnd;
		c->snd_wl1 = s->seq;
		c->snd_wl2 = s->ack;
	}
	receive(c, s);
	return true;
}

static void segment_in(struct net *net, const uint8_t *mac, uint32_t ip, const uint8_t *p, uint32_t len)
{
	const struct tcp_hdr *h = (const void *)p;
	struct segment s;
	struct tcp_conn *c;
	uint32_t hlen;

	tcp_stats.segments_in++;
	if (len < sizeof(*h) || (hlen = (h->off >> 4) * 4) < sizeof(*h) || hlen > len ||
	    fold(sum16(p, len, pseudo_sum(ip, net->ip, IP_PROTO_TCP, len)))) {
		tcp_stats.dropped++;                    /* malformed or damaged */
		return;
	}
	s = (struct segment){
		.seq = be32(h->seq), .ack = be32(h->ack), .len = len - hlen, .sport = be16(h->sport),
		.dport = be16(h->dport), .wnd = be16(h->win), .flags = h->flags, .data = p + hlen,
		.opts = p + sizeof(*h), .opts_len = hlen - sizeof(*h),
	};
	if (!(c = find(ip, s.sport, s.dport))) {
		listen_in(mac, ip, &s);
		return;
	}
	if (!conn_in(c, mac, ip, &s))
		return;
	if (c->state != TCP_SYN_RECEIVED && c->state != TCP_TIME_WAIT && c->state != TCP_LAST_ACK &&
	    c->state != TCP_CLOSING) {
		c->app->ready(c);
		/* The application read: say so once the window's right edge moved
		 * by a segment or more (receiver side of 3.8.6.2.2). */
		if (c->rcv_nxt + window(c) - c->rcv_adv >= min(c->mss, TCP_RX_BUF / 2))
			c->ack_owed = true;
	}
	output(c);
}

/* ---- time --------------------------------------------------------------- */

/* The connection's timer went off: send the first unacknowledged segment
 * (and what follows, go-back-N), or probe a shut window, or give up. */
static void expire(struct tcp_conn *c)
{
	c->timer_len = 0;
	if (c->state == TCP_TIME_WAIT) {
		release(c);
		return;
	}
	if (c->state == TCP_SYN_RECEIVED) {
		if (++c->retries > SYN_RETRIES) {
			release(c);
		} else {
			send_syn_ack(c);
			arm(c, rto(c));
		}
		return;
	}
	if (in_flight(c)) {
		if (++c->retries > DATA_RETRIES) {
			send_segment(c, c->snd_nxt, RST, 0);
			tcp_stats.resets_out++;
			release(c);
			return;
		}
		c->snd_nxt = c->snd_una;
		tcp_stats.retransmits++;
		output(c);
	} else if (blocked(c)) {
		/* A zero-window probe (3.8.6.1): an old sequence number, which the
		 * peer answers with an ACK that carries its window.  It goes on as
		 * long as the peer answers; only the interval grows. */
		if (c->retries < 8)
			c->retries++;
		send_segment(c, c->snd_una - 1, 0, 0);
		arm(c, rto(c));
	}
}

void tcp_poll(struct net *net)
{
	uint64_t now;

	net_poll_for(net, ms(TICK_MS));
	now = rdtsc();
	for (unsigned i = 0; i < TCP_CONNS; i++) {
		struct tcp_conn *c = &tcp.conns[i];

		if (c->state != TCP_FREE && c->timer_len && now - c->timer_at >= c->timer_len)
			expire(c);
	}
}

unsigned tcp_busy(void)
{
	unsigned n = 0;

	for (unsigned i = 0; i < TCP_CONNS; i++)
		n += tcp.conns[i].state != TCP_FREE && tcp.conns[i].state != TCP_TIME_WAIT;
	return n;
}

void tcp_open(struct net *net, const struct tcp_app *apps, unsigned napps)
{
	if (!tsc_hz)
		tsc_init();
	tcp.net = net;
	tcp.apps = apps;
	tcp.napps = napps;
	net->tcp = segment_in;
}
