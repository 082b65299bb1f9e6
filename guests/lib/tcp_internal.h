/* What tcp.c (connections, arriving segments, timers) and tcp_output.c
 * (buffers, sending) share; not for applications, which include tcp.h. */
#ifndef TCP_INTERNAL_H
#define TCP_INTERNAL_H

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

/* The stack: one per guest, on one NIC. */
struct tcp_stack {
	struct net *net;
	const struct tcp_app *apps;
	unsigned napps;
	struct tcp_conn conns[TCP_CONNS];
};
extern struct tcp_stack tcp_stack;

/* Sequence numbers wrap: compare by the sign of the difference (3.4). */
static inline bool seq_lt(uint32_t a, uint32_t b) { return (int32_t)(a - b) < 0; }
static inline bool seq_gt(uint32_t a, uint32_t b) { return (int32_t)(a - b) > 0; }
static inline uint32_t min(uint32_t a, uint32_t b) { return a < b ? a : b; }
static inline uint64_t ms(uint64_t n) { return n * tsc_hz / 1000; }

/* The window we offer: the free room in the receive buffer. */
static inline uint32_t window(const struct tcp_conn *c) { return TCP_RX_BUF - c->rx_len; }

void tcp_ring_put(uint8_t *ring, uint32_t size, uint32_t at, const uint8_t *src, uint32_t n);
void tcp_reset_reply(const uint8_t *mac, uint32_t ip, const struct segment *s);
void tcp_send_segment(struct tcp_conn *c, uint32_t seq, uint8_t flags, uint32_t len);
void tcp_send_syn_ack(struct tcp_conn *c);
void tcp_arm(struct tcp_conn *c, uint64_t cycles);
uint64_t tcp_rto(const struct tcp_conn *c);
bool tcp_in_flight(const struct tcp_conn *c);
bool tcp_blocked(const struct tcp_conn *c);
void tcp_output(struct tcp_conn *c);

#endif
