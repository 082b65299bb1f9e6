/* Dirties pages=N pages at CPL3, generation after generation, for live
 * migration and checkpoint tests.  Each page holds its generation in its
 * first word and its index in its last; a page that comes back from a
 * snapshot or migration with a stale generation or the wrong index stops
 * the guest with exit status 3. */
#include "runtime.h"

struct params {
	uint64_t pages, stride, seconds;
	uint8_t *base;
};

static int fail_page(uint64_t i, const volatile uint64_t *w, uint64_t gen)
{
	printf("dirty: FAIL page %lu at %p holds gen %lu index %lu, expected gen %lu index %lu\n",
	       i, (void *)w, w[0], w[511], gen, i);
	return 3;
}

static int run(void *arg)
{
	const struct params *p = arg;
	uint64_t step = p->stride * PAGE_SIZE, total = 0;
	uint64_t start = rdtsc(), last = start, last_total = 0;
	uint64_t end = p->seconds ? start + p->seconds * tsc_hz : UINT64_MAX;

	for (uint64_t i = 0; i < p->pages; i++) {
		volatile uint64_t *w = (uint64_t *)(p->base + i * step);

		w[0] = 0;
		w[511] = i;
	}
	for (uint64_t gen = 1;; gen++) {
		uint64_t now;

		for (uint64_t i = 0; i < p->pages; i++) {
			volatile uint64_t *w = (uint64_t *)(p->base + i * step);

			if (w[0] != gen - 1 || w[511] != i)
				return fail_page(i, w, gen - 1);
			w[0] = gen;
		}
		total += p->pages;
		now = rdtsc();
		if (now - last >= tsc_hz) {
			printf("dirty: %lu pages/s total=%lu gen=%lu\n",
			       (total - last_total) * tsc_hz / (now - last), total, gen);
			last = now;
			last_total = total;
		}
		if (now >= end) {
			printf("dirty: done\n");
			return 0;
		}
	}
}

int guest_main(void)
{
	struct params p = {
		.pages = cmdline_u64("pages", 256),
		.stride = cmdline_u64("stride", 1),
		.seconds = cmdline_u64("seconds", 0),
	};

	if (!p.pages || !p.stride || p.pages > ram_end() / PAGE_SIZE / p.stride ||
	    !(p.base = phys_alloc(p.pages * p.stride * PAGE_SIZE))) {
		printf("dirty: FAIL pages=%lu stride=%lu do not fit in the RAM after the image (%lu KiB of RAM)\n",
		       p.pages, p.stride, ram_end() / 1024);
		return 2;
	}
	tsc_init();
	printf("dirty: pages=%lu stride=%lu seconds=%lu base=%p tsc=%lu MHz\n",
	       p.pages, p.stride, p.seconds, p.base, tsc_hz / 1000000);
	enter_user(run, &p);
}
