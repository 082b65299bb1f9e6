"""The CPU state a boot format promises at its entry point: real, 32-bit protected or 64-bit mode.

The loaders put the image in RAM; these functions then set the boot vCPU's control registers,
segments and entry registers. Protected and long mode load their segments from the boot GDT whose
layout is defined here too (``write_boot_gdt``), so selectors and descriptors cannot drift apart.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pykvm.kvm.structs import KvmSegment

if TYPE_CHECKING:
    from pykvm.memory import GuestMemory
    from pykvm.vcpu import Vcpu

CR0_PE = 1 << 0  # protected mode
CR0_ET = 1 << 4  # extension type: hardwired to 1 since the 486
CR0_PG = 1 << 31  # paging
CR4_PAE = 1 << 5  # physical address extension, required by long mode
EFER_LME = 1 << 8  # long mode enable
EFER_LMA = 1 << 10  # long mode active (KVM checks it agrees with LME and PG)
RFLAGS_RESERVED = 1 << 1  # bit 1 of RFLAGS always reads as 1

# The boot GDT: null, 64-bit code, 32-bit code, data; flat 4 GiB, ring 0.
BOOT_CS64, BOOT_CS32, BOOT_DS = 0x08, 0x10, 0x18
BOOT_GDT_DESCRIPTORS = {
    BOOT_CS64: 0x00AF_9B00_0000_FFFF,
    BOOT_CS32: 0x00CF_9B00_0000_FFFF,
    BOOT_DS: 0x00CF_9300_0000_FFFF,
}
BOOT_GDT_LIMIT = 4 * 8 - 1


def write_boot_gdt(memory: GuestMemory, base: int) -> None:
    """Write the boot GDT at guest-physical ``base`` (the loader's choice of address)."""
    memory.write_u64(base, 0)
    for selector, descriptor in BOOT_GDT_DESCRIPTORS.items():
        memory.write_u64(base + selector, descriptor)


def enter_protected_mode(vcpu: Vcpu, rip: int, *, gdt_base: int, rax: int = 0, rbx: int = 0) -> None:
    """32-bit protected mode, paging off, flat 4 GiB segments (the multiboot entry state)."""
    sregs = vcpu.fd.get_sregs()
    _flat_segment(sregs.cs, selector=BOOT_CS32, code=True, long=False)
    for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        _flat_segment(seg, selector=BOOT_DS, code=False, long=False)
    sregs.gdt.base, sregs.gdt.limit = gdt_base, BOOT_GDT_LIMIT
    sregs.cr0 = (sregs.cr0 | CR0_PE | CR0_ET) & ~CR0_PG
    sregs.cr4 = 0
    sregs.efer = 0
    vcpu.fd.set_sregs(sregs)
    _set_entry_regs(vcpu, rip, rax, rbx)


def enter_long_mode(vcpu: Vcpu, rip: int, *, cr3: int, gdt_base: int, rax: int = 0, rbx: int = 0) -> None:
    """64-bit mode with the given page tables and the boot GDT (the ELF64 entry state)."""
    sregs = vcpu.fd.get_sregs()
    _flat_segment(sregs.cs, selector=BOOT_CS64, code=True, long=True)
    for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        _flat_segment(seg, selector=BOOT_DS, code=False, long=False)
    sregs.gdt.base, sregs.gdt.limit = gdt_base, BOOT_GDT_LIMIT
    sregs.cr3 = cr3
    sregs.cr4 = CR4_PAE
    sregs.cr0 = CR0_PE | CR0_ET | CR0_PG
    sregs.efer = EFER_LME | EFER_LMA
    vcpu.fd.set_sregs(sregs)
    _set_entry_regs(vcpu, rip, rax, rbx)


def enter_real_mode(vcpu: Vcpu, segment: int, offset: int) -> None:
    """16-bit real mode at segment:offset (the flat-binary entry state)."""
    sregs = vcpu.fd.get_sregs()
    for seg in (sregs.cs, sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        seg.selector, seg.base = segment, segment << 4
    vcpu.fd.set_sregs(sregs)
    regs = vcpu.fd.get_regs()
    regs.rip, regs.rflags, regs.rsp = offset, RFLAGS_RESERVED, 0xFFF0
    vcpu.fd.set_regs(regs)


def _set_entry_regs(vcpu: Vcpu, rip: int, rax: int, rbx: int) -> None:
    regs = vcpu.fd.get_regs()
    regs.rip, regs.rax, regs.rbx, regs.rflags = rip, rax, rbx, RFLAGS_RESERVED
    vcpu.fd.set_regs(regs)


def _flat_segment(seg: KvmSegment, *, selector: int, code: bool, long: bool) -> None:
    """A present, ring-0, flat (base 0, 4 GiB, page-granular) code or data segment."""
    seg.base, seg.limit, seg.selector = 0, 0xFFFF_FFFF, selector
    seg.type = 0xB if code else 0x3  # execute/read accessed, or read/write accessed
    seg.present, seg.dpl, seg.s, seg.g, seg.avl, seg.unusable = 1, 0, 1, 1, 0, 0
    seg.l = 1 if long else 0
    seg.db = 0 if long else 1
