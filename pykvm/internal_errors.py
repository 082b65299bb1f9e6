"""Completing instructions a KVM backend gave up on (KVM_EXIT_INTERNAL_ERROR).

Hardware KVM executes `int3` and `fwait` in the guest itself, so this code never runs there.
Backends that emulate guest kernel code can return KVM_EXIT_INTERNAL_ERROR instead: PVM (the
backend on some cloud machines) does so for `int3` in guest ring 0, which Linux executes at every
boot (its int3 self-test, text patching), and for `fwait`. Both are simple enough to finish in
the VMM with what KVM's API offers:

- `int3`: move RIP past the instruction and inject #BP (vector 3) with KVM_SET_VCPU_EVENTS, which
  is what the CPU does (#BP is a trap: the handler sees the address after the int3).
- `fwait` / `wait`: with no unmasked x87 exception pending it does nothing, so skip it. A pending
  x87 exception (FSW.ES set) would raise #MF: inject that instead.

Anything else is not guessed at: the caller reports registers and disassembly and stops the VM.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pykvm.diagnostics import cpu_mode, linear_rip
from pykvm.kvm import KvmError
from pykvm.kvm import constants as k
from pykvm.memory import GuestMemoryError

if TYPE_CHECKING:
    import capstone

    from pykvm.vcpu import Vcpu

BP_VECTOR = 3
MF_VECTOR = 16
FSW_ES = 1 << 7  # x87 status word: an unmasked exception is pending
MAX_INSTRUCTION = 15

_decoders: dict[int, capstone.Cs] = {}


def _decoder(mode: int) -> capstone.Cs:
    import capstone  # here, not at the top: most runs never hand an instruction back

    if mode not in _decoders:
        _decoders[mode] = capstone.Cs(capstone.CS_ARCH_X86, mode)
    return _decoders[mode]


def _instruction_bytes(vcpu: Vcpu, linear: int) -> bytes | None:
    """Up to 15 bytes at a guest-virtual address (two pages if the instruction crosses one)."""
    code = b""
    while len(code) < MAX_INSTRUCTION:
        try:
            translation = vcpu.fd.translate(linear + len(code))
        except KvmError:
            break
        if not translation.valid:
            break
        physical = translation.physical_address
        length = min(MAX_INSTRUCTION - len(code), 0x1000 - (physical & 0xFFF))
        try:
            code += vcpu.memory.read(physical, length)
        except GuestMemoryError:
            break
    return code or None


def _exit_bytes(vcpu: Vcpu) -> bytes | None:
    """The instruction bytes KVM put in the exit, when it reports them (KVM_CAP_INTERNAL_ERROR_DATA)."""
    internal = vcpu.fd.run_struct.internal
    if internal.suberror != k.KVM_INTERNAL_ERROR_EMULATION or internal.ndata < 2:
        return None
    if not internal.data[0] & k.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES:
        return None
    size = min(internal.data[1], MAX_INSTRUCTION, 8 * (internal.ndata - 2))
    raw = b"".join(internal.data[i].to_bytes(8, "little") for i in range(2, internal.ndata))
    return raw[:size] or None


def complete_internal_error(vcpu: Vcpu) -> str | None:
    """Finish the instruction the backend could not; returns its mnemonic, or None when it is
    not one this module completes (the caller then stops the VM with a report)."""
    regs = vcpu.fd.get_regs()
    sregs = vcpu.fd.get_sregs()
    mode, _ = cpu_mode(sregs.cs.l, sregs.cs.db, sregs.cr0)
    linear = linear_rip(regs.rip, sregs.cs.base, mode)
    code = _instruction_bytes(vcpu, linear) or _exit_bytes(vcpu)
    if code is None:
        return None
    instruction = next(_decoder(mode).disasm(code, regs.rip, 1), None)
    if instruction is None:
        return None
    from capstone import x86

    if instruction.id == x86.X86_INS_INT3:
        regs.rip += instruction.size
        vcpu.fd.set_regs(regs)
        _inject_exception(vcpu, BP_VECTOR)
        return "int3"
    if instruction.id == x86.X86_INS_WAIT:
        regs.rip += instruction.size
        vcpu.fd.set_regs(regs)
        if _x87_exception_pending(vcpu):
            _inject_exception(vcpu, MF_VECTOR)
        return "fwait"
    return None


def _inject_exception(vcpu: Vcpu, vector: int) -> None:
    events = vcpu.fd.get_vcpu_events()
    events.exception.injected = 1
    events.exception.nr = vector
    events.exception.has_error_code = 0
    events.exception.error_code = 0
    events.exception.pending = 0
    events.flags = 0  # change nothing else (NMI, SIPI, SMM, shadow fields keep their values)
    vcpu.fd.set_vcpu_events(events)


def _x87_exception_pending(vcpu: Vcpu) -> bool:
    """FSW.ES, from the legacy area of the XSAVE image (bytes 2-3)."""
    xsave = vcpu.fd.get_xsave()
    fsw = int.from_bytes(bytes(xsave)[2:4], "little")
    return bool(fsw & FSW_ES)
