/* Echoes every byte received on TCP port 7 back on the same connection, on
 * the first virtio-net device; closes its side once the peer has closed and
 * everything is echoed.  Answers ARP and ping too.  count=N: exit 0 once N
 * connections have closed (default 0: run forever).  close_after=N: close a
 * connection first, once N bytes are echoed on it (default 0: never). */
#include "tcp.h"

#define ECHO_PORT 7
#define CHUNK     1024

static struct net net;
static uint64_t closed, echoed, close_after;

/* The bytes echoed on a connection are kept in conn->user. */
static void echo(struct tcp_conn *c)
{
	static uint8_t buf[CHUNK];
	uint32_t n;

	/* Only what can be written back is read: a peer that does not read its
	 * echoes fills our send buffer, then our receive window shuts. */
	while ((n = tcp_readable(c) < tcp_writable(c) ? tcp_readable(c) : tcp_writable(c))) {
		if (close_after && n > close_after - c->user)
			n = close_after - c->user;
		if (!n)
			break;
		n = tcp_read(c, buf, n < CHUNK ? n : CHUNK);
		tcp_write(c, buf, n);
		c->user += n;
		echoed += n;
	}
	if (c->fin_queued)
		return;
	if ((close_after && c->user == close_after) || (tcp_peer_closed(c) && !tcp_readable(c))) {
		printf("tcp-echo: connection from " IP_FMT ":%u closed after %lu bytes\n", IP_ARGS(c->ip), c->port,
		       (uint64_t)c->user);     /* by us, after the peer or first */
		tcp_close(c);
		closed++;
	}
}

static const struct tcp_app apps[] = { { ECHO_PORT, echo } };

static int run(void *arg)
{
	uint64_t count = *(uint64_t *)arg;

	tcp_open(&net, apps, 1);
	net_announce(&net);
	printf("tcp-echo: ready mac=" MAC_FMT " ip=" IP_FMT "/%u port %u\n", MAC_ARGS(net.dev.mac), IP_ARGS(net.ip),
	       net.prefix, ECHO_PORT);
	while (!count || closed < count || tcp_busy())
		tcp_poll(&net);
	netdev_drain(&net.dev);         /* the last segment out before the VM ends */
	if (!virtio_healthy(&net.dev.vdev))
		return VIRTIO_EXIT_DEVICE;
	printf("tcp-echo: done connections=%lu bytes=%lu segments_in=%lu segments_out=%lu retransmits=%lu "
	       "resets_in=%lu resets_out=%lu dropped=%lu refused=%lu\n", closed, echoed, tcp_stats.segments_in,
	       tcp_stats.segments_out, tcp_stats.retransmits, tcp_stats.resets_in, tcp_stats.resets_out,
	       tcp_stats.dropped, tcp_stats.refused);
	return 0;
}

int guest_main(void)
{
	static uint64_t count;
	const struct netdev *d = &net.dev;

	count = cmdline_u64("count", 0);
	close_after = cmdline_u64("close_after", 0);
	printf("tcp-echo: count=%lu close_after=%lu\n", count, close_after);
	if (!net_open(&net, "tcp-echo", NULL))
		return 2;
	printf("tcp-echo: device %02x:%02x.%u irq=%s features=0x%lx queues=%u/%u rx_buf=%u\n",
	       d->vdev.pci.bus, d->vdev.pci.slot, d->vdev.pci.fn, virtio_irq_name(&d->vdev), d->vdev.features,
	       d->rx->size, d->tx->size, d->rx_buf_size);
	enter_user(run, &count);
}
