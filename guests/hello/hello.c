/* The smallest guest: serial output, boot information, clean exit. */
#include "runtime.h"

int guest_main(void)
{
	printf("Hello from pykvm guest!\n");
	printf("cmdline: %s\n", cmdline());
	printf("memory: %lu KiB\n", ram_end() / 1024);
	return 0;
}
