/* The pykvm test-guest runtime: boot, CPU tables, serial, timers, exit.
 *
 * A guest defines guest_main(); the runtime calls it at CPL0 with interrupts
 * off once the GDT, TSS, IDT, PIC and LAPIC are set up, and exits the VM with
 * its return value.  Hot loops belong at CPL3 (enter_user): on this project's
 * KVM, ring-0 code is emulated while ring-3 code runs natively. */
#ifndef RUNTIME_H
#define RUNTIME_H

/* Shared with the assembly sources. */
#define MULTIBOOT_MAGIC 0x2badb002      /* what the bootloader leaves in EAX */
#define KERNEL_CS   0x08                /* selectors of the GDT in entry.S */
#define KERNEL_DS   0x10
#define USER_DS     (0x18 | 3)
#define USER_CS     (0x20 | 3)
#define KERNEL_CS32 0x28                /* only for the AP trampoline */
#define TSS_SEL     0x30
#define GDT_BYTES   0x40
#define AP_TRAMPOLINE 0x8000            /* page the APs start in (SIPI vector 0x08) */
#define CR0_PE      0x1
#define CR0_PG      0x80000000
#define CR4_PAE     0x20
#define CR4_SMEP    (1 << 20)
#define CR4_SMAP    (1 << 21)
#define MSR_EFER    0xc0000080
#define EFER_LME    0x100

#ifndef __ASSEMBLER__

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define PAGE_SIZE 4096UL

/* Interrupt vectors. */
#define VEC_PIC_BASE    32      /* PIC IRQ n arrives as VEC_PIC_BASE + n */
#define VEC_LAPIC_TIMER 48
#define VEC_SPURIOUS    0xff

#define LAPIC_BASE 0xfee00000UL
#define PIT_HZ     1193182UL

int guest_main(void);

/* Exit the VM: 0 pulses the i8042 reset line, 1..255 goes to port 0xf4.
 * Works at CPL0 and CPL3. */
__attribute__((noreturn)) void guest_exit(int status);

/* Serial console (COM1).  Lines end in a bare '\n'.  A lock keeps one call's
 * output together when several CPUs print. */
__attribute__((format(printf, 1, 2))) void printf(const char *fmt, ...);

void *memset(void *dst, int c, size_t n);
void *memcpy(void *dst, const void *src, size_t n);
size_t strlen(const char *s);
int strcmp(const char *a, const char *b);

/* Boot information, copied from the multiboot info at entry. */
const char *cmdline(void);
uint64_t cmdline_u64(const char *key, uint64_t dflt);
/* Copies the value of key=value into buf (NUL-terminated, truncated to size). */
const char *cmdline_str(const char *key, const char *dflt, char *buf, size_t size);
uint64_t ram_end(void);              /* 1 MiB + mem_upper: end of the RAM from 1 MiB */

/* Bump allocator over the RAM after the image; NULL if it does not fit.
 * The memory is not zeroed (the bootloader may have left data there). */
void *phys_alloc(uint64_t bytes);

/* Runs fn(arg) at CPL3 with IF=1 on the runtime's user stack; the guest exits
 * with fn's return value when it returns.  arg may point into the caller's
 * frame: nothing uses that stack afterwards. */
__attribute__((noreturn)) void enter_user(int (*fn)(void *), void *arg);

/* Idle until an interrupt has changed *counter from `seen` (an interrupt
 * handler's count), giving the CPU back instead of spinning.  At CPL3 a `hlt`
 * traps (#GP) to the runtime, which checks the counter once more with IF=0
 * and halts with `sti; hlt`, so an interrupt that came after the caller's
 * check is not slept through.  At CPL0 (IF=0 there) it only pauses: the
 * caller spins. */
void wait_for_interrupt(const volatile uint32_t *counter, uint32_t seen);

/* Interrupts: handlers run at CPL0 with IF=0; the runtime sends the EOI. */
void irq_register(int vector, void (*handler)(void));
void pic_unmask(int irq);
void pic_mask(int irq);

static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline uint8_t inb(uint16_t port)
{
	uint8_t v;
	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}
static inline void cpu_relax(void) { __asm__ volatile("pause"); }
static inline uint64_t rdtsc(void)
{
	uint32_t lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return (uint64_t)hi << 32 | lo;
}
static inline void cpuid(uint32_t leaf, uint32_t *a, uint32_t *b, uint32_t *c, uint32_t *d)
{
	__asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(0));
}

/* TSC.  tsc_init() (CPL0 or CPL3) takes the frequency from CPUID leaf 0x15
 * when it is complete, else measures it against PIT channel 2. */
extern uint64_t tsc_hz;
extern const char *tsc_source;       /* "cpuid" or "pit" */
void tsc_init(void);
void tsc_delay_us(uint64_t us);
/* The TSC when read() sampled its counter (into *value): the midpoint of
 * the tightest of a few rdtsc pairs around it, so a read stretched by a host
 * preemption does not count. */
uint64_t tsc_at_read(uint32_t (*read)(void), uint32_t *value);

/* PIT channel 0 as a rate generator at about hz; returns the exact rate in mHz. */
uint64_t pit_start_periodic(unsigned hz);

/* CMOS/RTC register. */
uint8_t cmos_read(uint8_t reg);

/* Local APIC (xAPIC MMIO, mapped user-accessible). */
#define LAPIC_ID       0x020
#define LAPIC_EOI      0x0b0
#define LAPIC_SVR      0x0f0
#define LAPIC_ICR_LO   0x300
#define LAPIC_ICR_HI   0x310
#define LAPIC_LVT_TMR  0x320
#define LAPIC_LVT_LINT0 0x350
#define LAPIC_LVT_LINT1 0x360
#define LAPIC_TMR_INIT 0x380
#define LAPIC_TMR_CUR  0x390
#define LAPIC_TMR_DIV  0x3e0
#define LAPIC_LVT_MASKED   (1u << 16)
#define LAPIC_LVT_PERIODIC (1u << 17)

static inline uint32_t lapic_read(uint32_t reg) { return *(volatile uint32_t *)(LAPIC_BASE + reg); }
static inline void lapic_write(uint32_t reg, uint32_t v) { *(volatile uint32_t *)(LAPIC_BASE + reg) = v; }
static inline uint32_t lapic_id(void) { return lapic_read(LAPIC_ID) >> 24; }

/* Starts the AP with this LAPIC id via INIT-SIPI-SIPI (CPL0 only, tsc_init()
 * first).  It runs fn() at CPL0 with IF=0 on the given stack and halts if fn
 * returns.  Returns false if the AP did not start within a second. */
bool ap_start(uint32_t apic_id, void (*fn)(void), void *stack_top);

#endif /* __ASSEMBLER__ */
#endif
