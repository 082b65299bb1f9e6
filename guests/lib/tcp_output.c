/* TCP: the buffers an application reads and writes, and sending segments.
 * Read tcp.h first; section numbers are RFC 9293's. */
#include "tcp_internal.h"

static struct ipv4_frame out;           /* the segment being sent */

/* ---- buffers: rings of a power-of-two size ----------------------------- */

void tcp_ring_put(uint8_t *ring, uint32_t size, uint32_t at, const uint8_t *src, uint32_t n)
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

	tcp_ring_put(c->tx, TCP_TX_BUF, c->tx_head + c->tx_len, data, n);
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
	h->csum = be16(fold(sum16(h, len, pseudo_sum(tcp_stack.net->ip, ip, IP_PROTO_TCP, len))));
	ipv4_send(tcp_stack.net, &out, mac, ip, IP_PROTO_TCP, len);
	tcp_stats.segments_out++;
}

/* The reply to a segment no connection wants (3.10.7.1): it carries the
 * sequence number the sender expects, so the sender believes it. */
void tcp_reset_reply(const uint8_t *mac, uint32_t ip, const struct segment *s)
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

/* A segment of the connection: len bytes of its send buffer from seq. */
void tcp_send_segment(struct tcp_conn *c, uint32_t seq, uint8_t flags, uint32_t len)
{
	ring_get(c->tx, TCP_TX_BUF, c->tx_head + (seq - c->snd_una), out.payload + sizeof(struct tcp_hdr), len);
	c->rcv_adv = c->rcv_nxt + window(c);
	c->ack_owed = false;
	transmit(c->mac, c->ip, c->local_port, c->port, seq, c->rcv_nxt, flags | ACK, window(c), 0, len);
}

void tcp_send_syn_ack(struct tcp_conn *c)
{
	uint8_t *opt = out.payload + sizeof(struct tcp_hdr);

	opt[0] = OPT_MSS;
	opt[1] = 4;
	opt[2] = OUR_MSS >> 8;
	opt[3] = OUR_MSS & 0xff;
	c->rcv_adv = c->rcv_nxt + window(c);
	transmit(c->mac, c->ip, c->local_port, c->port, c->iss, c->rcv_nxt, SYN | ACK, window(c), 4, 0);
}

void tcp_arm(struct tcp_conn *c, uint64_t cycles)
{
	c->timer_at = rdtsc();
	c->timer_len = cycles;
}

/* The retransmission timeout: doubled at each retry, up to a cap. */
uint64_t tcp_rto(const struct tcp_conn *c)
{
	uint64_t t = (uint64_t)RTO_FIRST_MS << min(c->retries, 8);

	return ms(t < RTO_MAX_MS ? t : RTO_MAX_MS);
}

/* Data (or our FIN) is out and not acknowledged. */
bool tcp_in_flight(const struct tcp_conn *c)
{
	return c->snd_max != c->snd_una;
}

/* Data or a FIN waits for the peer's window to open. */
bool tcp_blocked(const struct tcp_conn *c)
{
	uint32_t offset = c->snd_nxt - c->snd_una;

	return offset < c->tx_len && offset >= c->snd_wnd;
}

/* Sends what the peer's window lets go, then our FIN once the data is out
 * (3.10.4), then an ACK if one is owed and no segment carried it. */
void tcp_output(struct tcp_conn *c)
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
		tcp_send_segment(c, c->snd_nxt, (n ? PSH : 0) | (fin ? FIN : 0), n);
		c->snd_nxt += n + fin;
		if (seq_gt(c->snd_nxt, c->snd_max))
			c->snd_max = c->snd_nxt;
		if (fin && c->state == TCP_ESTABLISHED)
			c->state = TCP_FIN_WAIT_1;
		else if (fin && c->state == TCP_CLOSE_WAIT)
			c->state = TCP_LAST_ACK;                /* (a FIN sent again changes nothing) */
	}
	if (c->ack_owed)
		tcp_send_segment(c, c->snd_nxt, 0, 0);
	/* One timer: retransmission while something is in flight, else the
	 * persist timer while the peer's window is shut on our data. */
	if (c->state == TCP_TIME_WAIT)
		return;
	if (!tcp_in_flight(c) && !tcp_blocked(c))
		c->timer_len = 0;
	else if (!c->timer_len)
		tcp_arm(c, tcp_rto(c));
}
