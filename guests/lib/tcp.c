/* TCP: the connections, what an arriving segment does to one, and the
 * timers.  Read tcp.h first; section numbers are RFC 9293's.  Sending and
 * the buffers are in tcp_output.c. */
#include "tcp_internal.h"

struct tcp_stats tcp_stats;
struct tcp_stack tcp_stack;

/* ---- connections -------------------------------------------------------- */

static void release(struct tcp_conn *c)
{
	c->state = TCP_FREE;
}

static struct tcp_conn *find(uint32_t ip, uint16_t port, uint16_t local_port)
{
	for (unsigned i = 0; i < TCP_CONNS; i++) {
		struct tcp_conn *c = &tcp_stack.conns[i];

		if (c->state != TCP_FREE && c->ip == ip && c->port == port && c->local_port == local_port)
			return c;
	}
	return NULL;
}

/* A free slot; else the oldest half-open connection's, if it has waited
 * for the peer's ACK longer than a LAN's round trip could take (a flood of
 * SYNs must not lock out the next real client, nor a burst of real clients
 * push each other out); else none.  Not while frames wait to be read: the
 * peer's ACK may be among them, late only because we are (a burst of SYNs
 * read by a slow guest would otherwise push out the connections it had just
 * accepted); a flood is all read before a new client's SYN comes again. */
static struct tcp_conn *new_slot(void)
{
	struct tcp_conn *oldest = NULL;
	uint64_t now = rdtsc();

	for (unsigned i = 0; i < TCP_CONNS; i++) {
		struct tcp_conn *c = &tcp_stack.conns[i];

		if (c->state == TCP_FREE)
			return c;
		if (c->state == TCP_SYN_RECEIVED && (!oldest || now - c->born > now - oldest->born))
			oldest = c;
	}
	if (net_pending(tcp_stack.net))
		return NULL;
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

	for (unsigned i = 0; i < tcp_stack.napps; i++)
		if (tcp_stack.apps[i].port == s->dport)
			app = &tcp_stack.apps[i];
	if ((s->flags & (SYN | ACK | RST)) != SYN || !app) {
		tcp_reset_reply(mac, ip, s);
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
	tcp_send_syn_ack(c);
	tcp_arm(c, tcp_rto(c));
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
	c->timer_len = 0;                               /* tcp_output() arms it again if need be */
	if (n == data)
		return true;
	/* our FIN is acknowledged too */
	if (c->state == TCP_FIN_WAIT_1) {
		c->state = TCP_FIN_WAIT_2;
	} else if (c->state == TCP_CLOSING) {
		c->state = TCP_TIME_WAIT;
		tcp_arm(c, ms(TIME_WAIT_MS));
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
		tcp_ring_put(c->rx, TCP_RX_BUF, c->rx_head + c->rx_len, s->data + skip, n);
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
		tcp_arm(c, ms(TIME_WAIT_MS));
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
				tcp_send_syn_ack(c);
			return true;
		}
		if (!(s->flags & ACK))
			return true;
		if (s->ack != c->iss + 1) {
			tcp_reset_reply(mac, ip, s);
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
	tcp_output(c);
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
			tcp_send_syn_ack(c);
			tcp_arm(c, tcp_rto(c));
		}
		return;
	}
	if (tcp_in_flight(c)) {
		if (++c->retries > DATA_RETRIES) {
			tcp_send_segment(c, c->snd_nxt, RST, 0);
			tcp_stats.resets_out++;
			release(c);
			return;
		}
		c->snd_nxt = c->snd_una;
		tcp_stats.retransmits++;
		tcp_output(c);
	} else if (tcp_blocked(c)) {
		/* A zero-window probe (3.8.6.1): an old sequence number, which the
		 * peer answers with an ACK that carries its window.  It goes on as
		 * long as the peer answers; only the interval grows. */
		if (c->retries < 8)
			c->retries++;
		tcp_send_segment(c, c->snd_una - 1, 0, 0);
		tcp_arm(c, tcp_rto(c));
	}
}

void tcp_poll(struct net *net)
{
	uint64_t now;

	bool timing = false;

	for (unsigned i = 0; i < TCP_CONNS; i++)
		timing |= tcp_stack.conns[i].state != TCP_FREE && tcp_stack.conns[i].timer_len;
	net_poll_for(net, timing ? ms(TICK_MS) : UINT64_MAX);  /* no timer to run: wait for a frame alone */
	now = rdtsc();
	for (unsigned i = 0; i < TCP_CONNS; i++) {
		struct tcp_conn *c = &tcp_stack.conns[i];

		if (c->state != TCP_FREE && c->timer_len && now - c->timer_at >= c->timer_len)
			expire(c);
	}
}

unsigned tcp_busy(void)
{
	unsigned n = 0;

	for (unsigned i = 0; i < TCP_CONNS; i++)
		n += tcp_stack.conns[i].state != TCP_FREE && tcp_stack.conns[i].state != TCP_TIME_WAIT;
	return n;
}

void tcp_open(struct net *net, const struct tcp_app *apps, unsigned napps)
{
	if (!tsc_hz)
		tsc_init();
	tcp_stack.net = net;
	tcp_stack.apps = apps;
	tcp_stack.napps = napps;
	net->tcp = segment_in;
}
