/* Ethernet, ARP, IPv4, ICMP echo and UDP: just enough to be pinged and to
 * answer datagrams.  TCP segments go to tcp.c through net->tcp. */
#include "net_wire.h"

#define ETHERTYPE_ARP  0x0806
#define ARP_HTYPE_ETHERNET 1
#define ARP_REQUEST 1
#define ARP_REPLY   2
#define IP_FLAG_DF    0x4000
#define IP_FRAGMENT   0x3fff    /* more-fragments flag and offset */
#define IP_TTL        64
#define ICMP_ECHO_REPLY   0
#define ICMP_ECHO_REQUEST 8
#define ETH_FRAME_MIN 60        /* without the FCS: shorter frames are padded */

struct arp_pkt {
	uint16_t htype, ptype;
	uint8_t hlen, plen;
	uint16_t op;
	uint8_t sha[ETH_ALEN];
	uint32_t spa;
	uint8_t tha[ETH_ALEN];
	uint32_t tpa;
} __attribute__((packed));

struct icmp_hdr {
	uint8_t type, code;
	uint16_t csum;
} __attribute__((packed));

struct udp_hdr {
	uint16_t sport, dport, len, csum;
} __attribute__((packed));

static const uint8_t broadcast[ETH_ALEN] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };

static bool same_mac(const uint8_t *a, const uint8_t *b)
{
	for (int i = 0; i < ETH_ALEN; i++)
		if (a[i] != b[i])
			return false;
	return true;
}

static bool parse_ipv4(const char *s, uint32_t *ip, unsigned *prefix)
{
	uint32_t v = 0;

	for (int part = 0; part < 4; part++) {
		unsigned octet = 0, digits = 0;

		for (; *s >= '0' && *s <= '9' && digits < 3; s++, digits++)
			octet = octet * 10 + *s - '0';
		if (!digits || octet > 255 || (part < 3 && *s++ != '.'))
			return false;
		v = v << 8 | octet;
	}
	*ip = v;
	if (!prefix)
		return !*s;
	*prefix = 24;
	if (*s == '/') {
		unsigned n = 0, digits = 0;

		for (s++; *s >= '0' && *s <= '9' && digits < 2; s++, digits++)
			n = n * 10 + *s - '0';
		if (!digits || n > 32)
			return false;
		*prefix = n;
	}
	return !*s;
}

bool net_open(struct net *net, const char *name, void (*udp)(struct net *, const struct udp_in *))
{
	char ip[24], gw[24];

	memset(net, 0, sizeof(*net));
	net->name = name;
	net->udp = udp;
	if (!parse_ipv4(cmdline_str("ip", "10.0.2.15/24", ip, sizeof(ip)), &net->ip, &net->prefix) ||
	    !parse_ipv4(cmdline_str("gw", "10.0.2.2", gw, sizeof(gw)), &net->gw, NULL)) {
		printf("%s: FAIL bad ip=A.B.C.D/N or gw=A.B.C.D\n", name);
		return false;
	}
	return netdev_open(&net->dev);
}

static void send_frame(struct net *net, const void *frame, uint32_t len)
{
	uint8_t padded[ETH_FRAME_MIN] = { 0 };

	if (len < ETH_FRAME_MIN) {
		memcpy(padded, frame, len);
		frame = padded;
		len = ETH_FRAME_MIN;
	}
	netdev_send(&net->dev, frame, len);
}

static void arp_send(struct net *net, uint16_t op, const uint8_t *dst_mac, const uint8_t *target_mac, uint32_t target_ip)
{
	struct {
		struct eth_hdr eth;
		struct arp_pkt arp;
	} __attribute__((packed)) f;

	memcpy(f.eth.dst, dst_mac, ETH_ALEN);
	memcpy(f.eth.src, net->dev.mac, ETH_ALEN);
	f.eth.type = be16(ETHERTYPE_ARP);
	f.arp = (struct arp_pkt){
		.htype = be16(ARP_HTYPE_ETHERNET), .ptype = be16(ETHERTYPE_IPV4), .hlen = ETH_ALEN, .plen = 4,
		.op = be16(op), .spa = be32(net->ip), .tpa = be32(target_ip),
	};
	memcpy(f.arp.sha, net->dev.mac, ETH_ALEN);
	memcpy(f.arp.tha, target_mac, ETH_ALEN);
	send_frame(net, &f, sizeof(f));
}

void net_announce(struct net *net)
{
	static const uint8_t unknown[ETH_ALEN];

	arp_send(net, ARP_REQUEST, broadcast, unknown, net->gw);
}

static void arp_in(struct net *net, const struct arp_pkt *a, uint32_t len)
{
	if (len < sizeof(*a) || be16(a->htype) != ARP_HTYPE_ETHERNET || be16(a->ptype) != ETHERTYPE_IPV4 ||
	    a->hlen != ETH_ALEN || a->plen != 4)
		return;
	if (be16(a->op) == ARP_REQUEST && be32(a->tpa) == net->ip) {
		arp_send(net, ARP_REPLY, a->sha, a->sha, be32(a->spa));
		net->arp_replies++;
	} else if (be16(a->op) == ARP_REPLY && be32(a->spa) == net->gw && !net->gw_known) {
		net->gw_known = true;
		printf("%s: gateway " IP_FMT " is at " MAC_FMT "\n", net->name, IP_ARGS(net->gw), MAC_ARGS(a->sha));
	}
}

void ipv4_send(struct net *net, struct ipv4_frame *f, const uint8_t *dst_mac, uint32_t dst, uint8_t proto,
	       uint32_t len)
{
	memcpy(f->eth.dst, dst_mac, ETH_ALEN);
	memcpy(f->eth.src, net->dev.mac, ETH_ALEN);
	f->eth.type = be16(ETHERTYPE_IPV4);
	f->ip = (struct ipv4_hdr){
		.ver_ihl = 0x45, .total_len = be16(sizeof(f->ip) + len), .id = be16(net->ip_id++),
		.frag = be16(IP_FLAG_DF), .ttl = IP_TTL, .proto = proto, .src = be32(net->ip), .dst = be32(dst),
	};
	f->ip.csum = be16(fold(sum16(&f->ip, sizeof(f->ip), 0)));
	send_frame(net, f, sizeof(f->eth) + sizeof(f->ip) + len);
}

static void icmp_in(struct net *net, const struct eth_hdr *eth, const struct ipv4_hdr *ip, const uint8_t *p,
		    uint32_t len)
{
	static struct ipv4_frame f;
	struct icmp_hdr *reply = (struct icmp_hdr *)f.payload;

	if (len < sizeof(struct icmp_hdr) || fold(sum16(p, len, 0)) || p[0] != ICMP_ECHO_REQUEST)
		return;
	memcpy(f.payload, p, len);      /* identifier, sequence number and data come back as they were */
	reply->type = ICMP_ECHO_REPLY;
	reply->csum = 0;
	reply->csum = be16(fold(sum16(reply, len, 0)));
	ipv4_send(net, &f, eth->src, be32(ip->src), IP_PROTO_ICMP, len);
	net->icmp_replies++;
}

static void udp_in(struct net *net, const struct eth_hdr *eth, const struct ipv4_hdr *ip, const uint8_t *p,
		   uint32_t len)
{
	const struct udp_hdr *u = (const void *)p;
	struct udp_in in;

	if (len < sizeof(*u) || be16(u->len) < sizeof(*u) || be16(u->len) > len || !net->udp)
		return;                         /* the checksum is not checked: any is accepted */
	memcpy(in.mac, eth->src, ETH_ALEN);
	in.ip = be32(ip->src);
	in.port = be16(u->sport);
	in.local_port = be16(u->dport);
	in.data = p + sizeof(*u);
	in.len = be16(u->len) - sizeof(*u);
	net->udp_datagrams++;
	net->udp(net, &in);
}

void udp_reply(struct net *net, const struct udp_in *to, const void *data, uint32_t len)
{
	static struct ipv4_frame f;
	struct udp_hdr *u = (struct udp_hdr *)f.payload;
	uint32_t ulen = sizeof(*u) + len, sum;

	if (len > UDP_PAYLOAD_MAX) {
		printf("%s: BUG a %u-byte UDP reply\n", net->name, len);
		guest_exit(0x7f);
	}
	*u = (struct udp_hdr){ .sport = be16(to->local_port), .dport = be16(to->port), .len = be16(ulen) };
	memcpy(u + 1, data, len);
	/* Over the pseudo-header (addresses, protocol, length) and the datagram. */
	sum = sum16(u, ulen, pseudo_sum(net->ip, to->ip, IP_PROTO_UDP, ulen));
	u->csum = be16(fold(sum) ? fold(sum) : 0xffff);         /* 0 would mean "no checksum" */
	ipv4_send(net, &f, to->mac, to->ip, IP_PROTO_UDP, ulen);
}

static void ipv4_in(struct net *net, const struct eth_hdr *eth, const uint8_t *p, uint32_t len)
{
	const struct ipv4_hdr *ip = (const void *)p;
	uint32_t hlen, total;

	if (len < sizeof(*ip) || ip->ver_ihl >> 4 != 4)
		return;
	hlen = (ip->ver_ihl & 0xf) * 4;
	total = be16(ip->total_len);
	if (hlen < sizeof(*ip) || total < hlen || total > len || fold(sum16(p, hlen, 0)))
		return;
	if (be16(ip->frag) & IP_FRAGMENT || be32(ip->dst) != net->ip)
		return;                         /* fragments are not reassembled */
	if (ip->proto == IP_PROTO_ICMP)
		icmp_in(net, eth, ip, p + hlen, total - hlen);
	else if (ip->proto == IP_PROTO_UDP)
		udp_in(net, eth, ip, p + hlen, total - hlen);
	else if (ip->proto == IP_PROTO_TCP && net->tcp)
		net->tcp(net, eth->src, be32(ip->src), p + hlen, total - hlen);
}

bool net_poll_for(struct net *net, uint64_t cycles)
{
	uint32_t len = netdev_receive_for(&net->dev, cycles);
	const struct eth_hdr *eth = (const void *)net->dev.frame;
	const uint8_t *payload = net->dev.frame + sizeof(*eth);

	if (!len)
		return false;
	if (len < sizeof(*eth) || !(same_mac(eth->dst, net->dev.mac) || same_mac(eth->dst, broadcast)))
		return true;
	len -= sizeof(*eth);
	if (be16(eth->type) == ETHERTYPE_ARP)
		arp_in(net, (const void *)payload, len);
	else if (be16(eth->type) == ETHERTYPE_IPV4)
		ipv4_in(net, eth, payload, len);
	return true;
}

void net_poll(struct net *net)
{
	net_poll_for(net, UINT64_MAX);
}
