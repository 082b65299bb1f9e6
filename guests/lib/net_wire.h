/* The wire formats net.c and tcp.c share: Ethernet and IPv4 headers, byte
 * order, the Internet checksum, and sending an IPv4 packet.  Every field in
 * these structures is big-endian, as on the wire; every address and number
 * outside them is in host byte order. */
#ifndef NET_WIRE_H
#define NET_WIRE_H

#include "net.h"

#define ETHERTYPE_IPV4 0x0800
#define IP_PROTO_ICMP  1
#define IP_PROTO_TCP   6
#define IP_PROTO_UDP   17

struct eth_hdr {
	uint8_t dst[ETH_ALEN], src[ETH_ALEN];
	uint16_t type;
} __attribute__((packed));

struct ipv4_hdr {
	uint8_t ver_ihl, tos;
	uint16_t total_len, id, frag;
	uint8_t ttl, proto;
	uint16_t csum;
	uint32_t src, dst;
} __attribute__((packed));

/* A frame being built: the headers of an IPv4 packet, then its payload. */
struct ipv4_frame {
	struct eth_hdr eth;
	struct ipv4_hdr ip;
	uint8_t payload[ETH_FRAME_MAX - sizeof(struct eth_hdr) - sizeof(struct ipv4_hdr)];
} __attribute__((packed));

static inline uint16_t be16(uint16_t v) { return __builtin_bswap16(v); }
static inline uint32_t be32(uint32_t v) { return __builtin_bswap32(v); }

/* The Internet checksum: the ones' complement of the ones' complement sum
 * of big-endian 16-bit words; over data that holds its own checksum, 0. */
static inline uint32_t sum16(const void *data, uint32_t len, uint32_t sum)
{
	const uint8_t *p = data;

	for (; len > 1; len -= 2, p += 2)
		sum += p[0] << 8 | p[1];
	if (len)
		sum += p[0] << 8;
	return sum;
}

static inline uint16_t fold(uint32_t sum)
{
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return ~sum;
}

/* The sum over the pseudo-header UDP and TCP checksums cover: both
 * addresses, the protocol and the length of the datagram or segment. */
static inline uint32_t pseudo_sum(uint32_t src, uint32_t dst, uint8_t proto, uint32_t len)
{
	return (src >> 16) + (src & 0xffff) + (dst >> 16) + (dst & 0xffff) + proto + len;
}

/* Fills in the headers of f around a payload of len bytes and sends it. */
void ipv4_send(struct net *net, struct ipv4_frame *f, const uint8_t *dst_mac, uint32_t dst, uint8_t proto,
	       uint32_t len);

#endif
