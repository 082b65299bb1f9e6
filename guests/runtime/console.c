/* printf on COM1, polled. */
#include <stdarg.h>
#include "runtime.h"

#define COM1     0x3f8
#define LSR_THRE 0x20

static int print_lock;

void serial_init(void)
{
	outb(COM1 + 1, 0x00);           /* no interrupts */
	outb(COM1 + 3, 0x80);           /* DLAB: divisor 1 = 115200 baud */
	outb(COM1 + 0, 0x01);
	outb(COM1 + 1, 0x00);
	outb(COM1 + 3, 0x03);           /* 8N1 */
	outb(COM1 + 2, 0xc7);           /* FIFOs on and cleared */
	outb(COM1 + 4, 0x03);           /* DTR, RTS */
}

static void put(char c)
{
	while (!(inb(COM1 + 5) & LSR_THRE))
		cpu_relax();
	outb(COM1, c);
}

static void put_uint(uint64_t v, unsigned base, int width, char pad)
{
	char digits[20];
	int n = 0;

	do {
		digits[n++] = "0123456789abcdef"[v % base];
		v /= base;
	} while (v);
	while (width-- > n)
		put(pad);
	while (n)
		put(digits[--n]);
}

/* Conversions: %s %c %d %u %x %p %%, with optional '0', width and l/ll/z. */
static void vprint(const char *fmt, va_list ap)
{
	for (; *fmt; fmt++) {
		char pad = ' ';
		int width = 0, longs = 0;
		int64_t sv;

		if (*fmt != '%') {
			put(*fmt);
			continue;
		}
		if (*++fmt == '0')
			pad = '0';
		while (*fmt >= '0' && *fmt <= '9')
			width = width * 10 + *fmt++ - '0';
		while (*fmt == 'l' || *fmt == 'z') {
			longs++;
			fmt++;
		}
		switch (*fmt) {
		case 'd':
			sv = longs ? va_arg(ap, int64_t) : va_arg(ap, int);
			if (sv < 0) {
				put('-');
				width--;
			}
			put_uint(sv < 0 ? -(uint64_t)sv : (uint64_t)sv, 10, width, pad);
			break;
		case 'u':
			put_uint(longs ? va_arg(ap, uint64_t) : va_arg(ap, unsigned), 10, width, pad);
			break;
		case 'x':
			put_uint(longs ? va_arg(ap, uint64_t) : va_arg(ap, unsigned), 16, width, pad);
			break;
		case 'p':
			put('0');
			put('x');
			put_uint((uint64_t)va_arg(ap, void *), 16, width, pad);
			break;
		case 's':
			for (const char *s = va_arg(ap, const char *); *s; s++)
				put(*s);
			break;
		case 'c':
			put(va_arg(ap, int));
			break;
		case '%':
			put('%');
			break;
		default:                /* unknown: show it rather than guess */
			put('%');
			if (!*fmt)
				return;
			put(*fmt);
		}
	}
}

/* For the exception report: the faulting code may hold the lock itself. */
void console_break_lock(void)
{
	__atomic_store_n(&print_lock, 0, __ATOMIC_RELEASE);
}

void printf(const char *fmt, ...)
{
	va_list ap;

	while (__atomic_exchange_n(&print_lock, 1, __ATOMIC_ACQUIRE))
		cpu_relax();
	va_start(ap, fmt);
	vprint(fmt, ap);
	va_end(ap);
	__atomic_store_n(&print_lock, 0, __ATOMIC_RELEASE);
}
