/* A small TCP (RFC 9293) for the test guests: passive open only, several
 * connections at once, in-order delivery, retransmission on a timeout,
 * flow control by the receive window (and zero-window probes), FIN and RST.
 *
 * What it leaves out, to stay short: active open, options other than the
 * MSS (no window scaling, SACK or timestamps: the peer then uses none),
 * reassembly of segments that arrive out of order (they are dropped and the
 * peer sends them again), congestion control beyond the peer's window,
 * urgent data, and round-trip estimation (a fixed first timeout, doubled at
 * each retry).  Enough for a real kernel's TCP on a LAN to talk to it.
 *
 * An application serves ports: tcp_open(net, apps, n) with one struct
 * tcp_app per port, then calls tcp_poll(net) in its loop.  Whenever a
 * connection may have something for it (data came, room to write freed
 * up, the peer closed), the stack calls app->ready(conn); the application
 * takes what it can with tcp_read/tcp_peek/tcp_consume, answers with
 * tcp_write, and calls tcp_close when it is done.  Nothing blocks: a
 * connection whose peer stops reading only stops itself.
 *
 * Time is the TSC (tsc_init, called by tcp_open, at CPL3 is best).  A timer
 * is "armed at t for d cycles" and fires once now - t >= d, unsigned: a VM
 * that was paused (an FT takeover, a migration) or whose TSC jumped either
 * way fires its timers at once rather than waiting for ever. */
#ifndef TCP_H
#define TCP_H

#include "net.h"

#define TCP_CONNS    32         /* connections at once, half-open ones included */
#define TCP_RX_BUF   16384      /* bytes received and not yet read: the largest window */
#define TCP_TX_BUF   16384      /* bytes written and not yet acknowledged */

enum tcp_state {
	TCP_FREE,               /* the slot is unused */
	TCP_SYN_RECEIVED,       /* a SYN came, our SYN-ACK is out */
	TCP_ESTABLISHED,
	TCP_CLOSE_WAIT,         /* the peer sent FIN; we may still send */
	TCP_LAST_ACK,           /* ... and then we did: waiting for its ACK */
	TCP_FIN_WAIT_1,         /* we closed first: our FIN is out */
	TCP_FIN_WAIT_2,         /* ... and acknowledged; the peer may still send */
	TCP_CLOSING,            /* both sent FIN, ours not yet acknowledged */
	TCP_TIME_WAIT,          /* both done; ours was first: linger, then free */
};

struct tcp_conn;

struct tcp_app {
	uint16_t port;
	void (*ready)(struct tcp_conn *conn);
};

/* One connection: the two sequence spaces and the two buffers. */
struct tcp_conn {
	enum tcp_state state;
	const struct tcp_app *app;
	uint8_t mac[ETH_ALEN];          /* the peer's */
	uint32_t ip;
	uint16_t port, local_port;
	uint16_t mss;                   /* the most data the peer takes in one segment */
	/* Sending: [snd_una, snd_nxt) is in flight, snd_max the highest ever sent
	 * (snd_nxt goes back to snd_una when the timer fires); snd_wnd the
	 * peer's window from snd_una, as of the segment (wl1, wl2). */
	uint32_t iss, snd_una, snd_nxt, snd_max, snd_wnd, snd_wl1, snd_wl2;
	/* Receiving: the next byte expected, and the window last advertised. */
	uint32_t irs, rcv_nxt, rcv_adv;
	bool fin_queued;                /* the application closed: a FIN follows the data */
	bool peer_closed;               /* the peer's FIN came */
	bool ack_owed;                  /* send an ACK even if no data goes out */
	uint8_t retries;                /* timeouts since the last progress */
	uint64_t timer_at, timer_len;   /* armed at timer_at for timer_len cycles; 0: off */
	uint64_t born;                  /* the TSC when the SYN came */
	uintptr_t user;                 /* the application's, zero at the start */
	/* tx: snd_una's byte first; rx: the next byte to read first. */
	uint32_t tx_head, tx_len, rx_head, rx_len;
	uint8_t tx[TCP_TX_BUF], rx[TCP_RX_BUF];
};

struct tcp_stats {
	uint64_t segments_in, segments_out, retransmits, resets_in, resets_out, dropped, accepted, refused;
};
extern struct tcp_stats tcp_stats;

/* Serves these ports (the array must outlive the stack) on net. */
void tcp_open(struct net *net, const struct tcp_app *apps, unsigned napps);
/* One round: at most one frame (waiting up to a few ms), then the timers. */
void tcp_poll(struct net *net);
/* Connections neither free nor lingering in TIME_WAIT. */
unsigned tcp_busy(void);

/* Bytes ready to read; copy up to max of them out without taking them;
 * take n (at most tcp_readable); copy and take up to max. */
uint32_t tcp_readable(const struct tcp_conn *conn);
uint32_t tcp_peek(const struct tcp_conn *conn, void *buf, uint32_t max);
void tcp_consume(struct tcp_conn *conn, uint32_t n);
uint32_t tcp_read(struct tcp_conn *conn, void *buf, uint32_t max);
/* Room to write; queue up to len bytes, returns how many were taken (none
 * once the connection is closing). */
uint32_t tcp_writable(const struct tcp_conn *conn);
uint32_t tcp_write(struct tcp_conn *conn, const void *data, uint32_t len);
/* No more data will come from the peer (after what is readable). */
static inline bool tcp_peer_closed(const struct tcp_conn *conn) { return conn->peer_closed; }
/* Sends FIN after what was written; the slot is freed when both sides are done. */
void tcp_close(struct tcp_conn *conn);

#endif
