/* Answers ARP and ping for its address and echoes UDP datagrams sent to
 * port 7, on the first virtio-net device.  count=N: exit 0 after N echoes
 * (default 0: run forever). */
#include "net.h"

#define ECHO_PORT 7

static struct net net;
static uint64_t echoes;

static void echo(struct net *n, const struct udp_in *in)
{
	if (in->local_port != ECHO_PORT)
		return;
	udp_reply(n, in, in->data, in->len);
	echoes++;
}

static int run(void *arg)
{
	uint64_t count = *(uint64_t *)arg;

	net_announce(&net);
	while (!count || echoes < count)
		net_poll(&net);
	netdev_drain(&net.dev);         /* the last echo out before the VM ends */
	if (!virtio_healthy(&net.dev.vdev))
		return VIRTIO_EXIT_DEVICE;
	printf("net-echo: done udp=%lu icmp=%lu arp=%lu rx=%lu dropped=%lu tx=%lu interrupts=%u\n",
	       echoes, net.icmp_replies, net.arp_replies, net.dev.rx_frames, net.dev.rx_dropped, net.dev.tx_frames,
	       net.dev.rx->irqs + net.dev.tx->irqs);
	return 0;
}

int guest_main(void)
{
	static uint64_t count;
	const struct netdev *d = &net.dev;

	count = cmdline_u64("count", 0);
	printf("net-echo: count=%lu\n", count);
	if (!net_open(&net, "net-echo", echo))
		return 2;
	printf("net-echo: device %02x:%02x.%u irq=%s features=0x%lx queues=%u/%u rx_buf=%u\n",
	       d->vdev.pci.bus, d->vdev.pci.slot, d->vdev.pci.fn, virtio_irq_name(&d->vdev), d->vdev.features,
	       d->rx->size, d->tx->size, d->rx_buf_size);
	printf("net-echo: ready mac=" MAC_FMT " ip=" IP_FMT "/%u\n", MAC_ARGS(d->mac), IP_ARGS(net.ip), net.prefix);
	enter_user(run, &count);
}
