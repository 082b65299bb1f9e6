/* TSC frequency, delays, PIT channel 0, CMOS. */
#include "runtime.h"

uint64_t tsc_hz;
const char *tsc_source;

uint64_t tsc_at_read(uint32_t (*read)(void), uint32_t *value)
{
	uint64_t best = UINT64_MAX, at = 0;

	for (int i = 0; i < 8 && best > 100000; i++) {   /* 100000 cycles: tens of µs */
		uint64_t t0 = rdtsc();
		uint32_t v = read();
		uint64_t t1 = rdtsc();

		if (i == 0 || t1 - t0 < best) {
			best = t1 - t0;
			at = t0 + best / 2;
			*value = v;
		}
	}
	return at;
}

static uint32_t pit2_read(void)
{
	uint8_t lo;

	outb(0x43, 0x80);                               /* latch channel 2 */
	lo = inb(0x42);
	return lo | inb(0x42) << 8;
}

/* TSC Hz over ~30 ms of PIT channel 2 (mode 0, no interrupts), or 0 if the
 * counter wrapped meanwhile (the vCPU was descheduled for long). */
static uint64_t tsc_hz_from_pit(void)
{
	uint32_t c0, c1;
	uint64_t t0, t1;

	outb(0x61, (inb(0x61) & ~0x02) | 0x01);        /* gate on, speaker off */
	outb(0x43, 0xb0);                               /* channel 2, lo/hi byte, mode 0 */
	outb(0x42, 0xff);
	outb(0x42, 0xff);
	t0 = tsc_at_read(pit2_read, &c0);
	while (c0 - pit2_read() < PIT_HZ * 3 / 100 && !(inb(0x61) & 0x20)) /* OUT: no PIT, or wrapped */
		cpu_relax();
	t1 = tsc_at_read(pit2_read, &c1);
	if (inb(0x61) & 0x20 || c1 >= c0)               /* OUT rises at terminal count */
		return 0;
	return (t1 - t0) * PIT_HZ / (c0 - c1);
}

static uint64_t median3(uint64_t a, uint64_t b, uint64_t c)
{
	uint64_t lo = a < b ? a : b, hi = a < b ? b : a;

	return c < lo ? lo : c > hi ? hi : c;
}

void tsc_init(void)
{
	uint32_t max, denom, numer, crystal, unused;
	uint64_t m[3];

	cpuid(0, &max, &unused, &unused, &unused);
	if (max >= 0x15) {
		cpuid(0x15, &denom, &numer, &crystal, &unused);
		if (denom && numer && crystal) {
			tsc_hz = (uint64_t)crystal * numer / denom;
			tsc_source = "cpuid";
			return;
		}
	}
	for (int i = 0, tries = 0; i < 3; tries++) {
		if (tries == 10) {
			printf("runtime: PIT channel 2 does not count\n");
			guest_exit(0x7f);
		}
		if ((m[i] = tsc_hz_from_pit()))
			i++;
	}
	tsc_hz = median3(m[0], m[1], m[2]);
	tsc_source = "pit";
}

void tsc_delay_us(uint64_t us)
{
	uint64_t end = rdtsc() + us * tsc_hz / 1000000;

	while (rdtsc() < end)
		cpu_relax();
}

uint64_t pit_start_periodic(unsigned hz)
{
	unsigned divisor = (PIT_HZ + hz / 2) / hz;

	outb(0x43, 0x34);                               /* channel 0, lo/hi byte, mode 2 */
	outb(0x40, divisor & 0xff);
	outb(0x40, divisor >> 8);
	return PIT_HZ * 1000 / divisor;
}

uint8_t cmos_read(uint8_t reg)
{
	outb(0x70, 0x80 | reg);                         /* bit 7 keeps NMIs off */
	return inb(0x71);
}
