/* Starts every AP with INIT-SIPI-SIPI, one at a time, and waits until each
 * CPU has checked in.  Assumes the APIC ids are 0..cpus-1, as QEMU and pykvm
 * assign them. */
#include "runtime.h"

#define AP_STACK_BYTES 16384

static unsigned checked_in;

static void check_in(void)
{
	printf("smp: cpu %u checked in\n", lapic_id());
	__atomic_add_fetch(&checked_in, 1, __ATOMIC_SEQ_CST);
}

int guest_main(void)
{
	uint64_t cpus = cmdline_u64("cpus", cmos_read(0x5f) + 1);  /* QEMU's CMOS CPU count - 1 */
	uint32_t bsp = lapic_id();
	uint64_t deadline;

	if (cpus < 1 || cpus > 255) {
		printf("smp: FAIL cpus=%lu: expected 1..255\n", cpus);
		return 2;
	}
	printf("smp: starting %lu cpus\n", cpus);
	tsc_init();
	check_in();
	for (uint32_t id = 0; id < cpus; id++) {
		uint8_t *stack;

		if (id == bsp)
			continue;
		if (!(stack = phys_alloc(AP_STACK_BYTES))) {
			printf("smp: FAIL no memory for the stack of cpu %u\n", id);
			return 2;
		}
		if (!ap_start(id, check_in, stack + AP_STACK_BYTES)) {
			printf("smp: FAIL cpu %u did not start\n", id);
			return 1;
		}
	}
	deadline = rdtsc() + 3 * tsc_hz;
	while (__atomic_load_n(&checked_in, __ATOMIC_SEQ_CST) < cpus) {
		if (rdtsc() > deadline) {
			printf("smp: FAIL only %u of %lu cpus checked in\n", checked_in, cpus);
			return 1;
		}
		cpu_relax();
	}
	printf("smp: all %lu cpus checked in\n", cpus);
	return 0;
}
