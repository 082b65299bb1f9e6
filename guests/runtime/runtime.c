/* Boot-time setup (TSS, IDT, PIC, LAPIC), traps, exit, boot information. */
#include "runtime.h"

struct multiboot_info {
	uint32_t flags;
	uint32_t mem_lower, mem_upper;  /* KiB; valid if flags bit 0 */
	uint32_t boot_device;
	uint32_t cmdline;               /* physical address; valid if flags bit 2 */
};

struct trap_frame {                     /* as pushed by isr_common in entry.S */
	uint64_t r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
	uint64_t vector, error;
	uint64_t rip, cs, rflags, rsp, ss;
};

/* A zero I/O permission bitmap over all 65536 ports lets CPL3 code do port
 * I/O: IOPL=3 alone is not honoured at CPL3 on this project's KVM. */
static struct {
	uint32_t reserved0;
	uint64_t rsp0, rsp1, rsp2, reserved1, ist[7], reserved2;
	uint16_t reserved3, iomap_base;
	uint8_t iomap[8192];
	uint8_t iomap_end;              /* 0xff: the CPU reads two bytes per check */
} __attribute__((packed)) tss;

struct idt_gate {
	uint16_t offset_lo, selector;
	uint8_t ist, type;
	uint16_t offset_mid;
	uint32_t offset_hi, reserved;
};
static struct idt_gate idt[256];
static void (*irq_handlers[256])(void);

extern uint64_t gdt_tss[2];
extern char isr_stubs[], int_stack_top[], _end[];

static char cmdline_buf[1024];
static uint64_t mem_end, heap;

static const char *const exception_names[32] = {
	"#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "CSO", "#TS", "#NP",
	"#SS", "#GP", "#PF", "res", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP",
	[28] = "#HV", "#VC", "#SX",
};

void serial_init(void);
void console_break_lock(void);

__attribute__((noreturn)) void guest_exit(int status)
{
	uint16_t cs;

	if (status == 0)
		outb(0x64, 0xfe);       /* i8042: pulse the reset line */
	else
		outb(0xf4, status);     /* isa-debug-exit */
	__asm__ volatile("mov %%cs, %0" : "=r"(cs));
	for (;;) {
		if (cs & 3)
			cpu_relax();    /* cli/hlt would fault at CPL3 */
		else
			__asm__ volatile("cli; hlt");
	}
}

static void fatal(const char *what, uint64_t value)
{
	printf("runtime: %s 0x%lx\n", what, value);
	guest_exit(0x7f);
}

static void tss_init(void)
{
	uint64_t base = (uint64_t)&tss, limit = sizeof(tss) - 1;

	tss.rsp0 = (uint64_t)int_stack_top;
	tss.iomap_base = offsetof(typeof(tss), iomap);
	tss.iomap_end = 0xff;
	gdt_tss[0] = (limit & 0xffff) | (base & 0xffffff) << 16 | 0x89ULL << 40 /* present, available */
		| (limit >> 16 & 0xf) << 48 | (base >> 24 & 0xff) << 56;
	gdt_tss[1] = base >> 32;
	__asm__ volatile("ltr %w0" : : "r"(TSS_SEL));
}

void idt_load(void)
{
	struct __attribute__((packed)) { uint16_t limit; uint64_t base; } idtr = { sizeof(idt) - 1, (uint64_t)idt };

	__asm__ volatile("lidt %0" : : "m"(idtr));
}

static void idt_init(void)
{
	for (int v = 0; v < 256; v++) {
		uint64_t stub = (uint64_t)isr_stubs + 16 * v;

		idt[v] = (struct idt_gate){
			.offset_lo = stub, .selector = KERNEL_CS, .type = 0x8e, /* present, DPL0 interrupt gate */
			.offset_mid = stub >> 16, .offset_hi = stub >> 32,
		};
	}
	idt_load();
}

void wait_for_interrupt(const volatile uint32_t *counter, uint32_t seen)
{
	uint16_t cs;

	__asm__ volatile("mov %%cs, %0" : "=r"(cs));
	if (cs & 3)  /* traps (#GP): idle_trap halts for us */
		__asm__ volatile("hlt" : : "D"(counter), "S"(seen) : "memory");
	else
		cpu_relax();
}

/* Remap the PIC off the exception vectors and mask every line but the cascade. */
static void pic_init(void)
{
	outb(0x20, 0x11);
	outb(0xa0, 0x11);
	outb(0x21, VEC_PIC_BASE);
	outb(0xa1, VEC_PIC_BASE + 8);
	outb(0x21, 1 << 2);
	outb(0xa1, 2);
	outb(0x21, 0x01);
	outb(0xa1, 0x01);
	outb(0x21, 0xff & ~(1 << 2));
	outb(0xa1, 0xff);
}

void pic_unmask(int irq)
{
	uint16_t port = irq < 8 ? 0x21 : 0xa1;

	outb(port, inb(port) & ~(1 << (irq & 7)));
}

void pic_mask(int irq)
{
	uint16_t port = irq < 8 ? 0x21 : 0xa1;

	outb(port, inb(port) | 1 << (irq & 7));
}

/* Virtual-wire mode: with no firmware to set LINT0 to ExtINT, the PIC could
 * not reach the BSP once the LAPIC is enabled. */
static void lapic_init(void)
{
	lapic_write(LAPIC_SVR, 0x100 | VEC_SPURIOUS);
	lapic_write(LAPIC_LVT_LINT0, 0x700);            /* ExtINT */
	lapic_write(LAPIC_LVT_LINT1, 0x400);            /* NMI */
	lapic_write(LAPIC_LVT_TMR, LAPIC_LVT_MASKED);
	lapic_write(0x080, 0);                          /* TPR: accept all */
}

void irq_register(int vector, void (*handler)(void))
{
	irq_handlers[vector] = handler;
}

/* A `hlt` at CPL3 (wait_for_interrupt; this KVM takes no software interrupt
 * from CPL3) traps here with IF=0: unless the interrupt count in rdi moved
 * from esi meanwhile, halt until an interrupt (sti's shadow covers hlt, so
 * none slips in between; it runs its handler nested, on this stack), then
 * return past the hlt. */
static bool idle_trap(struct trap_frame *f)
{
	if (f->vector != 13 || !(f->cs & 3) || *(const uint8_t *)f->rip != 0xf4)
		return false;
	if (*(const volatile uint32_t *)f->rdi == (uint32_t)f->rsi)
		__asm__ volatile("sti; hlt; cli" : : : "memory");
	f->rip += 1;
	return true;
}

void trap_dispatch(struct trap_frame *f)
{
	uint64_t v = f->vector;

	if (idle_trap(f))
		return;
	if (v < 32) {
		uint64_t cr2;

		__asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
		console_break_lock();
		printf("EXCEPTION %s (vector %lu) error 0x%lx rip 0x%lx cr2 0x%lx cpl %lu\n",
		       exception_names[v] ? exception_names[v] : "?", v, f->error, f->rip, cr2, f->cs & 3);
		guest_exit(0x7f);
	}
	if (irq_handlers[v]) {
		irq_handlers[v]();
	} else if (v == VEC_SPURIOUS || v == VEC_PIC_BASE + 7) {
		return;                 /* spurious: no EOI */
	} else if (v == VEC_PIC_BASE + 15) {
		outb(0x20, 0x20);       /* spurious on the slave: only the master's cascade IRQ was real */
		return;
	} else {
		fatal("unexpected interrupt, vector", v);
	}

	if (v >= VEC_PIC_BASE && v < VEC_PIC_BASE + 16) {
		if (v >= VEC_PIC_BASE + 8)
			outb(0xa0, 0x20);
		outb(0x20, 0x20);
	} else {
		lapic_write(LAPIC_EOI, 0);
	}
}

__attribute__((noreturn)) void user_start(int (*fn)(void *), void *arg)
{
	guest_exit(fn(arg));
}

/* Copy what we need from the multiboot info first: it may sit in the RAM
 * after the image that phys_alloc hands out. */
static void boot_info_init(uint32_t magic, const struct multiboot_info *mbi)
{
	if (magic != MULTIBOOT_MAGIC)
		fatal("bad multiboot magic", magic);
	if (!(mbi->flags & 1))
		fatal("no memory size in multiboot info, flags", mbi->flags);
	mem_end = 0x100000 + (uint64_t)mbi->mem_upper * 1024;
	if (mbi->flags & 4) {
		const char *s = (const char *)(uint64_t)mbi->cmdline;
		size_t n = 0;

		while (s[n] && n < sizeof(cmdline_buf) - 1) {
			cmdline_buf[n] = s[n];
			n++;
		}
	}
	heap = ((uint64_t)_end + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1);
}

__attribute__((noreturn)) void runtime_main(uint32_t magic, const struct multiboot_info *mbi)
{
	serial_init();
	boot_info_init(magic, mbi);
	tss_init();
	idt_init();
	pic_init();
	lapic_init();
	guest_exit(guest_main());
}

uint64_t ram_end(void)
{
	return mem_end;
}

void *phys_alloc(uint64_t bytes)
{
	uint64_t limit = mem_end < (4ULL << 30) ? mem_end : 4ULL << 30; /* end of the identity map */
	void *p = (void *)heap;

	if (bytes > limit - heap)
		return NULL;
	heap = (heap + bytes + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1);
	return p;
}

const char *cmdline(void)
{
	return cmdline_buf;
}

/* The value of a key=value word, or NULL.  Other words are ignored (QEMU
 * puts the kernel's path first). */
static const char *cmdline_find(const char *key)
{
	size_t n = strlen(key);

	for (const char *p = cmdline_buf; *p;) {
		const char *word = p;

		while (*p && *p != ' ')
			p++;
		if ((size_t)(p - word) > n && word[n] == '=') {
			size_t i = 0;

			while (i < n && word[i] == key[i])
				i++;
			if (i == n)
				return word + n + 1;
		}
		while (*p == ' ')
			p++;
	}
	return NULL;
}

/* Decimal or 0x-prefixed hex; anything else stops the guest. */
uint64_t cmdline_u64(const char *key, uint64_t dflt)
{
	const char *p = cmdline_find(key);
	unsigned base = 10;
	uint64_t v = 0;

	if (!p)
		return dflt;
	if (p[0] == '0' && p[1] == 'x') {
		base = 16;
		p += 2;
	}
	do {
		unsigned d = *p >= '0' && *p <= '9' ? *p - '0'
			   : *p >= 'a' && *p <= 'f' ? *p - 'a' + 10 : 99;

		if (d >= base) {
			printf("runtime: bad number in %s=\n", key);
			guest_exit(0x7f);
		}
		v = v * base + d;
	} while (*++p && *p != ' ');
	return v;
}

const char *cmdline_str(const char *key, const char *dflt, char *buf, size_t size)
{
	const char *p = cmdline_find(key);
	size_t n = 0;

	if (!p)
		return dflt;
	while (p[n] && p[n] != ' ' && n < size - 1) {
		buf[n] = p[n];
		n++;
	}
	buf[n] = 0;
	return buf;
}

void *memset(void *dst, int c, size_t n)
{
	void *d = dst;

	__asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
	return dst;
}

void *memcpy(void *dst, const void *src, size_t n)
{
	void *d = dst;

	__asm__ volatile("rep movsb" : "+D"(d), "+S"(src), "+c"(n) : : "memory");
	return dst;
}

size_t strlen(const char *s)
{
	size_t n = 0;

	while (s[n])
		n++;
	return n;
}

int strcmp(const char *a, const char *b)
{
	while (*a && *a == *b) {
		a++;
		b++;
	}
	return (unsigned char)*a - (unsigned char)*b;
}
