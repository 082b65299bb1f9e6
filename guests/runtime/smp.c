/* Starting application processors. */
#include "runtime.h"

extern const char ap_trampoline[], ap_trampoline_end[];
void idt_load(void);

/* Handed from the BSP to one starting AP at a time. */
void *ap_stack;                                 /* read by ap_long in entry.S */
static void (*ap_fn)(void);
static bool ap_started;

static void send_ipi(uint32_t apic_id, uint32_t icr)
{
	lapic_write(LAPIC_ICR_HI, apic_id << 24);
	lapic_write(LAPIC_ICR_LO, icr);
	while (lapic_read(LAPIC_ICR_LO) & (1 << 12))   /* delivery pending */
		cpu_relax();
}

bool ap_start(uint32_t apic_id, void (*fn)(void), void *stack_top)
{
	uint64_t deadline;

	memcpy((void *)AP_TRAMPOLINE, ap_trampoline, ap_trampoline_end - ap_trampoline);
	ap_stack = stack_top;
	ap_fn = fn;
	__atomic_store_n(&ap_started, false, __ATOMIC_RELEASE);

	send_ipi(apic_id, 0x4500);                      /* INIT */
	tsc_delay_us(10000);
	for (int i = 0; i < 2 && !__atomic_load_n(&ap_started, __ATOMIC_ACQUIRE); i++) {
		send_ipi(apic_id, 0x4600 | AP_TRAMPOLINE >> 12);   /* STARTUP */
		tsc_delay_us(200);
	}
	deadline = rdtsc() + tsc_hz;
	while (!__atomic_load_n(&ap_started, __ATOMIC_ACQUIRE))
		if (rdtsc() > deadline)
			return false;
	return true;
}

/* Called by ap_long on the AP, on ap_stack. */
__attribute__((noreturn)) void ap_entry(void)
{
	void (*fn)(void) = ap_fn;

	idt_load();
	__atomic_store_n(&ap_started, true, __ATOMIC_RELEASE); /* the BSP may reuse ap_stack/ap_fn now */
	fn();
	for (;;)
		__asm__ volatile("cli; hlt");
}
