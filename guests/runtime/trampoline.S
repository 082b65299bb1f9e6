/* AP start-up code.  ap_start() copies it to AP_TRAMPOLINE; a SIPI with
 * vector AP_TRAMPOLINE >> 12 starts the AP at CS = 0x0800, IP = 0 in real
 * mode.  It goes 16 -> 32 -> 64-bit on the runtime's GDT and page tables
 * and jumps to ap_long in entry.S.  Addresses inside the copy are computed
 * from offsets, since the code runs away from where it was linked. */
#include "runtime.h"

#define HERE(label) (AP_TRAMPOLINE + (label) - ap_trampoline)

	.section .rodata
	.code16
	.globl ap_trampoline, ap_trampoline_end
ap_trampoline:
	cli
	lgdtl %cs:(tramp_gdtr - ap_trampoline)
	mov $(CR0_PE | 0x10), %eax      /* PE | ET; also clears CD/NW left by INIT */
	mov %eax, %cr0
	ljmpl $KERNEL_CS32, $HERE(ap_prot)

	.code32
ap_prot:
	mov $KERNEL_DS, %eax
	mov %eax, %ds
	mov %eax, %es
	mov %eax, %ss
	mov %cr4, %eax
	or $CR4_PAE, %eax
	mov %eax, %cr4
	mov $pml4, %eax
	mov %eax, %cr3
	mov $MSR_EFER, %ecx
	rdmsr
	or $EFER_LME, %eax
	wrmsr
	mov %cr0, %eax
	or $CR0_PG, %eax
	mov %eax, %cr0
	ljmp $KERNEL_CS, $ap_long

	.align 4
tramp_gdtr:                             /* real mode reaches only this copy */
	.word GDT_BYTES - 1
	.long gdt
ap_trampoline_end:
