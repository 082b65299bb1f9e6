/* count=N port I/O instructions at CPL3 on port 0x80, which no device
 * claims: each one is a VM exit and nothing else. */
#include "runtime.h"

struct params {
	uint64_t count;
	bool in;
};

static int run(void *arg)
{
	const struct params *p = arg;

	if (p->in)
		for (uint64_t i = p->count; i; i--)
			inb(0x80);
	else
		for (uint64_t i = p->count; i; i--)
			outb(0x80, 0);
	printf("pio: done count=%lu\n", p->count);
	return 0;
}

int guest_main(void)
{
	char buf[8];
	const char *mode = cmdline_str("mode", "out", buf, sizeof(buf));
	struct params p = { cmdline_u64("count", 1000000), strcmp(mode, "in") == 0 };

	if (!p.in && strcmp(mode, "out") != 0) {
		printf("pio: FAIL mode=%s: expected in or out\n", mode);
		return 2;
	}
	printf("pio: count=%lu mode=%s\n", p.count, mode);
	enter_user(run, &p);
}
