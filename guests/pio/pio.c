/* count=N port I/O instructions at CPL3 on port=P (default 0x80, which no
 * device claims; 0xf4, the debug-exit port, answers reads and ends the run on
 * a write): each one is a VM exit and nothing else. */
#include "runtime.h"

struct params {
	uint64_t count;
	uint16_t port;
	bool in;
};

static int run(void *arg)
{
	const struct params *p = arg;

	if (p->in)
		for (uint64_t i = p->count; i; i--)
			inb(p->port);
	else
		for (uint64_t i = p->count; i; i--)
			outb(p->port, 0);
	printf("pio: done count=%lu\n", p->count);
	return 0;
}

int guest_main(void)
{
	char buf[8];
	const char *mode = cmdline_str("mode", "out", buf, sizeof(buf));
	struct params p = { cmdline_u64("count", 1000000), (uint16_t)cmdline_u64("port", 0x80),
			    strcmp(mode, "in") == 0 };

	if (!p.in && strcmp(mode, "out") != 0) {
		printf("pio: FAIL mode=%s: expected in or out\n", mode);
		return 2;
	}
	printf("pio: count=%lu mode=%s port=0x%x\n", p.count, mode, (unsigned)p.port);
	enter_user(run, &p);
}
