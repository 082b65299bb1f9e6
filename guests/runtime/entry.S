/* Boot entries, static CPU tables, interrupt stubs and the switch to CPL3.
 *
 * Two ways in, one way on:
 *   _start32  multiboot v1 (a.out kludge): 32-bit protected mode, paging off.
 *   _start64  ELF64 e_entry: long mode on the loader's identity map.
 * Both load this file's GDT and page tables and meet at start64 with
 * EDI = multiboot magic and ESI = multiboot info address. */
#include "runtime.h"

#define MB_FLAGS   ((1 << 1) | (1 << 16))   /* want memory info; a.out kludge addresses */
#define PTE_PSU    0x87                     /* present, writable, user, 2 MiB page */

	.section .multiboot, "a"
	.align 4
multiboot_header:
	.long 0x1badb002
	.long MB_FLAGS
	.long -(0x1badb002 + MB_FLAGS)
	.long multiboot_header          /* header_addr */
	.long _image_start              /* load_addr: file offset 0 */
	.long _load_end                 /* load_end_addr */
	.long _end                      /* bss_end_addr */
	.long _start32                  /* entry_addr */

	.text
	.code32
	.globl _start32
_start32:
	cli
	mov %eax, %edi                  /* rdmsr below clobbers EAX */
	mov %ebx, %esi
	lgdt gdtr
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
	or $(CR0_PG | CR0_PE), %eax
	mov %eax, %cr0
	ljmp $KERNEL_CS, $start64

	.code64
	.globl _start64
_start64:
	cli
	mov %eax, %edi
	mov %ebx, %esi
	mov $boot_stack_top, %esp       /* the loader leaves RSP undefined; lretq needs one */
	lgdt gdtr
	mov %cr4, %rax                  /* ring 0 uses our user pages: no SMEP/SMAP */
	and $~(CR4_SMEP | CR4_SMAP), %eax
	mov %rax, %cr4
	mov $pml4, %eax
	mov %rax, %cr3
	pushq $KERNEL_CS
	pushq $start64
	lretq

start64:
	mov $KERNEL_DS, %eax
	mov %eax, %ds
	mov %eax, %es
	mov %eax, %fs
	mov %eax, %gs
	mov %eax, %ss
	mov $boot_stack_top, %esp
	mov %edi, %edi                  /* upper halves are undefined after a mode switch */
	mov %esi, %esi
	xor %ebp, %ebp
	call runtime_main
	ud2                             /* runtime_main does not return */

/* An AP arrives here from the trampoline, on our GDT and page tables. */
	.globl ap_long
ap_long:
	mov $KERNEL_DS, %eax
	mov %eax, %ds
	mov %eax, %es
	mov %eax, %fs
	mov %eax, %gs
	mov %eax, %ss
	mov ap_stack, %rsp
	xor %ebp, %ebp
	call ap_entry
	ud2

/* enter_user(fn, arg): iretq to user_start(fn, arg) at CPL3 with IF=1. */
	.globl enter_user
enter_user:
	mov $USER_DS, %eax
	mov %eax, %ds
	mov %eax, %es
	pushq $USER_DS
	pushq $(user_stack_top - 8)     /* as if user_start had been called */
	pushq $0x202                    /* IF */
	pushq $USER_CS
	pushq $user_start
	iretq

/* One 16-byte stub per vector: push a dummy error code where the CPU pushes
 * none, then the vector number, so every trap frame has the same shape. */
	.align 16
	.globl isr_stubs
isr_stubs:
	.set vec, 0
	.rept 256
	.align 16
	.if !(vec == 8 || (vec >= 10 && vec <= 14) || vec == 17 || vec == 21 || vec == 29 || vec == 30)
	pushq $0
	.endif
	pushq $vec
	jmp isr_common
	.set vec, vec + 1
	.endr

isr_common:                             /* builds struct trap_frame */
	push %rax
	push %rbx
	push %rcx
	push %rdx
	push %rsi
	push %rdi
	push %rbp
	push %r8
	push %r9
	push %r10
	push %r11
	push %r12
	push %r13
	push %r14
	push %r15
	mov %rsp, %rdi
	cld
	call trap_dispatch
	pop %r15
	pop %r14
	pop %r13
	pop %r12
	pop %r11
	pop %r10
	pop %r9
	pop %r8
	pop %rbp
	pop %rdi
	pop %rsi
	pop %rdx
	pop %rcx
	pop %rbx
	pop %rax
	add $16, %rsp                   /* vector and error code */
	iretq

	.data
	.align 16
	.globl gdt, gdt_tss
gdt:
	.quad 0
	.quad 0x00af9a000000ffff        /* KERNEL_CS: 64-bit, DPL0 */
	.quad 0x00cf92000000ffff        /* KERNEL_DS */
	.quad 0x00cff2000000ffff        /* USER_DS: DPL3 */
	.quad 0x00affa000000ffff        /* USER_CS: 64-bit, DPL3 */
	.quad 0x00cf9a000000ffff        /* KERNEL_CS32 */
gdt_tss:
	.quad 0, 0                      /* TSS_SEL: filled in by runtime.c */
gdt_end:
	.if gdt_end - gdt != GDT_BYTES
	.error "GDT_BYTES does not match the GDT"
	.endif

gdtr:
	.word GDT_BYTES - 1
	.quad gdt

/* Identity map of the first 4 GiB in 2 MiB pages, all user-accessible so
 * CPL3 code may touch any memory, the LAPIC included. */
	.align 4096
pml4:
	.quad pdpt + 7
	.fill 511, 8, 0
pdpt:
	.quad pd + 7, pd + 0x1000 + 7, pd + 0x2000 + 7, pd + 0x3000 + 7
	.fill 508, 8, 0
pd:
	.set addr, 0
	.rept 2048
	.quad addr + PTE_PSU
	.set addr, addr + 0x200000
	.endr
	.globl pml4

	.bss
	.align 16
	.skip 16384
boot_stack_top:
	.skip 16384
	.globl int_stack_top
int_stack_top:                          /* TSS.RSP0: interrupts taken at CPL3 */
	.skip 65536
user_stack_top:
