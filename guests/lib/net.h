/* A minimal IPv4 host over virtio-net: answers ARP requests and ICMP echo
 * requests for its address and hands UDP datagrams to the guest (and TCP
 * segments to tcp.c, when a guest opens it).  Replies go back to the
 * sender's MAC address, so no ARP cache is needed.
 *
 * Command line: ip=A.B.C.D/N (default 10.0.2.15/24), gw=A.B.C.D (default
 * 10.0.2.2; asked for with an ARP request at start, which also shows the
 * network that we are up). */
#ifndef NET_H
#define NET_H

#include "virtio_net.h"

#define UDP_PAYLOAD_MAX 1472    /* 1500 - IPv4 header - UDP header */

#define MAC_FMT "%02x:%02x:%02x:%02x:%02x:%02x"
#define MAC_ARGS(m) (m)[0], (m)[1], (m)[2], (m)[3], (m)[4], (m)[5]
#define IP_FMT "%u.%u.%u.%u"
#define IP_ARGS(ip) (ip) >> 24, (ip) >> 16 & 0xff, (ip) >> 8 & 0xff, (ip) & 0xff

/* A datagram received, and where a reply goes. */
struct udp_in {
	uint8_t mac[ETH_ALEN];
	uint32_t ip;                    /* host byte order, like every address here */
	uint16_t port, local_port;
	const uint8_t *data;
	uint32_t len;
};

struct net {
	struct netdev dev;
	const char *name;               /* prefix of the lines printed */
	uint32_t ip, gw;
	unsigned prefix;
	void (*udp)(struct net *, const struct udp_in *);
	/* Set by tcp_open: a segment for our address from ip at mac (a pointer,
	 * so guests without TCP do not link it). */
	void (*tcp)(struct net *, const uint8_t *mac, uint32_t ip, const uint8_t *segment, uint32_t len);
	bool gw_known;
	uint16_t ip_id;
	uint64_t arp_replies, icmp_replies, udp_datagrams;
};

/* Opens the first virtio-net device (CPL0); udp gets every datagram for
 * our address.  False, printed, on failure. */
bool net_open(struct net *net, const char *name, void (*udp)(struct net *, const struct udp_in *));
/* Sends the ARP request for the gateway. */
void net_announce(struct net *net);
/* Whether a frame has arrived that net_poll would handle without waiting. */
static inline bool net_pending(const struct net *net)
{
	return net->dev.rx->used->idx != net->dev.rx->last_used;
}
/* Waits for one frame and handles it. */
void net_poll(struct net *net);
/* The same, waiting at most about `cycles` TSC cycles; false if no frame came. */
bool net_poll_for(struct net *net, uint64_t cycles);
/* Sends len bytes (at most UDP_PAYLOAD_MAX) back to the sender of `to`. */
void udp_reply(struct net *net, const struct udp_in *to, const void *data, uint32_t len);

#endif
