"""What a user sees when something goes wrong, or asks to see everything: register dumps, the
faulting instructions disassembled with capstone, and the per-exit trace of `--trace`."""

from __future__ import annotations

import sys
import threading
from typing import TYPE_CHECKING, TextIO

from pykvm.kvm import KvmError
from pykvm.kvm.constants import EXIT_REASON_NAMES
from pykvm.memory import GuestMemoryError

if TYPE_CHECKING:
    from pykvm.vcpu import Vcpu

CODE_BYTES = 48  # enough for several x86 instructions (at most 15 bytes each)
INSTRUCTIONS_SHOWN = 6
# capstone's CS_MODE_* values: capstone (~9 MiB resident) is imported only to decode something
CS_MODE_16, CS_MODE_32, CS_MODE_64 = 1 << 1, 1 << 2, 1 << 3


def cpu_mode(cs_l: int, cs_db: int, cr0: int) -> tuple[int, str]:
    """The capstone mode and a name for the vCPU's current code size."""
    if not cr0 & 1:
        return CS_MODE_16, "real mode"
    if cs_l:
        return CS_MODE_64, "64-bit"
    if cs_db:
        return CS_MODE_32, "32-bit protected mode"
    return CS_MODE_16, "16-bit protected mode"


def linear_rip(rip: int, cs_base: int, mode: int) -> int:
    """The linear address of RIP: 64-bit mode ignores the CS base, other modes wrap at 4 GiB."""
    return rip if mode == CS_MODE_64 else (cs_base + rip) & 0xFFFF_FFFF


def disassemble(code: bytes, address: int, mode: int, limit: int = INSTRUCTIONS_SHOWN) -> list[str]:
    import capstone

    md = capstone.Cs(capstone.CS_ARCH_X86, mode)
    lines = []
    for insn in md.disasm(code, address):
        lines.append(f"{insn.address:#018x}: {insn.bytes.hex(' '):<30} {insn.mnemonic} {insn.op_str}".rstrip())
        if len(lines) == limit:
            break
    if not lines:
        lines.append(f"{address:#018x}: {code[:16].hex(' ')}  (not decodable)")
    return lines


def describe_vcpu(vcpu: Vcpu) -> str:
    """Registers and the instructions at RIP, as text. Never raises: it runs on error paths."""
    try:
        regs = vcpu.fd.get_regs()
        sregs = vcpu.fd.get_sregs()
    except KvmError as error:
        return f"vcpu{vcpu.index}: registers unavailable: {error}"
    mode, mode_name = cpu_mode(sregs.cs.l, sregs.cs.db, sregs.cr0)
    lines = [
        f"vcpu{vcpu.index} registers ({mode_name}):",
        f"  rip={regs.rip:#018x} rflags={regs.rflags:#010x} rsp={regs.rsp:#018x} rbp={regs.rbp:#018x}",
        f"  rax={regs.rax:#018x} rbx={regs.rbx:#018x} rcx={regs.rcx:#018x} rdx={regs.rdx:#018x}",
        f"  rsi={regs.rsi:#018x} rdi={regs.rdi:#018x} r8={regs.r8:#018x}  r9={regs.r9:#018x}",
        f"  r10={regs.r10:#018x} r11={regs.r11:#018x} r12={regs.r12:#018x} r13={regs.r13:#018x}",
        f"  r14={regs.r14:#018x} r15={regs.r15:#018x}",
        f"  cs={sregs.cs.selector:#06x} (base {sregs.cs.base:#x} l={sregs.cs.l} db={sregs.cs.db} dpl={sregs.cs.dpl})"
        f" ss={sregs.ss.selector:#06x} ds={sregs.ds.selector:#06x} tr={sregs.tr.selector:#06x}",
        f"  cr0={sregs.cr0:#x} cr2={sregs.cr2:#x} cr3={sregs.cr3:#x} cr4={sregs.cr4:#x} efer={sregs.efer:#x}",
        f"  gdt={sregs.gdt.base:#x}/{sregs.gdt.limit:#x} idt={sregs.idt.base:#x}/{sregs.idt.limit:#x}",
    ]
    linear = linear_rip(regs.rip, sregs.cs.base, mode)
    lines.append("code at rip:")
    lines.extend("  " + line for line in _code_at(vcpu, linear, regs.rip, mode))
    return "\n".join(lines)


def _code_at(vcpu: Vcpu, linear: int, rip: int, mode: int) -> list[str]:
    try:
        translation = vcpu.fd.translate(linear)
    except KvmError as error:
        return [f"cannot translate {linear:#x}: {error}"]
    if not translation.valid:
        return [f"{linear:#x} is not mapped by the guest's page tables"]
    physical = translation.physical_address
    # Stop at the end of the page: the next one may map elsewhere (or nowhere).
    length = min(CODE_BYTES, 0x1000 - (physical & 0xFFF))
    try:
        code = vcpu.memory.read(physical, length)
    except GuestMemoryError as error:
        return [str(error)]
    return disassemble(code, rip, mode)


class ExitTracer:
    """`--trace`: one line per exit, written to `out` (stderr by default)."""

    def __init__(self, out: TextIO = sys.stderr) -> None:
        self.out = out
        self._lock = threading.Lock()

    def __call__(self, vcpu: Vcpu, kind: str, **fields: int | bool) -> None:
        if kind == "io":
            line = (f"io   {'out' if fields['write'] else 'in '} port={fields['port']:#06x} "
                    f"size={fields['size']} data={fields['value']:#x}")
        elif kind == "mmio":
            line = (f"mmio {'write' if fields['write'] else 'read '} addr={fields['addr']:#x} "
                    f"size={fields['size']} data={fields['value']:#x}")
        else:
            reason = int(fields["reason"])
            line = f"exit {EXIT_REASON_NAMES.get(reason, reason)}"
        with self._lock:
            print(f"[vcpu{vcpu.index}] {line}", file=self.out, flush=True)
