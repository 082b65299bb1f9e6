"""Where one instruction can go next: the addresses a step by temporary breakpoints must cover.

Where KVM cannot single-step the guest (on the PVM backend, native guest ring-3 code ignores
KVM_GUESTDBG_SINGLESTEP), a step puts an int3 on every instruction the current one can be
followed by. capstone decodes it: a conditional branch has two successors (fall-through and
target), a direct jump or call its target, an indirect one the value of its register or memory
operand, a return the address on the stack; anything else falls through. An instruction that
enters the kernel (`syscall`, `int`) is followed by the fall-through, where the guest returns.
"""

from __future__ import annotations

from typing import Callable

import capstone
from capstone import x86

from pykvm.kvm.structs import KvmRegs

MAX_INSTRUCTION = 15
_decoder = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
_decoder.detail = True

# capstone register ids to KvmRegs fields, for indirect branches' operands
_REGISTER_FIELDS = {
    x86.X86_REG_RAX: "rax", x86.X86_REG_RBX: "rbx", x86.X86_REG_RCX: "rcx", x86.X86_REG_RDX: "rdx",
    x86.X86_REG_RSI: "rsi", x86.X86_REG_RDI: "rdi", x86.X86_REG_RBP: "rbp", x86.X86_REG_RSP: "rsp",
    x86.X86_REG_R8: "r8", x86.X86_REG_R9: "r9", x86.X86_REG_R10: "r10", x86.X86_REG_R11: "r11",
    x86.X86_REG_R12: "r12", x86.X86_REG_R13: "r13", x86.X86_REG_R14: "r14", x86.X86_REG_R15: "r15",
    x86.X86_REG_RIP: "rip",
}
_UNCONDITIONAL = {x86.X86_INS_JMP, x86.X86_INS_LJMP, x86.X86_INS_CALL, x86.X86_INS_LCALL}


class CannotStep(Exception):
    """The instruction at RIP cannot be decoded, or its successor not computed."""


def successors(code: bytes, regs: KvmRegs, read_u64: Callable[[int], int]) -> list[int]:
    """The addresses the instruction at regs.rip (its bytes in `code`) can continue at, in 64-bit
    code. `read_u64` reads guest-virtual memory (a return address, a jump table slot)."""
    instruction = next(_decoder.disasm(code, regs.rip, 1), None)
    if instruction is None:
        raise CannotStep(f"no instruction decodes at {regs.rip:#x} ({code[:MAX_INSTRUCTION].hex(' ')})")
    following = regs.rip + instruction.size
    groups = set(instruction.groups)
    if x86.X86_GRP_RET in groups or capstone.CS_GRP_RET in groups:
        return [read_u64(regs.rsp)]
    if capstone.CS_GRP_IRET in groups:
        return [read_u64(regs.rsp)]
    if not groups & {capstone.CS_GRP_JUMP, capstone.CS_GRP_CALL}:
        return [following]
    if not instruction.operands:
        return [following]
    target = _operand_value(instruction, instruction.operands[0], regs, read_u64)
    if instruction.id in _UNCONDITIONAL:
        return [target]
    return sorted({following, target})  # jcc, loop, jrcxz: taken or not


def _operand_value(instruction, operand, regs: KvmRegs, read_u64: Callable[[int], int]) -> int:
    if operand.type == x86.X86_OP_IMM:
        return operand.imm & 0xFFFF_FFFF_FFFF_FFFF
    if operand.type == x86.X86_OP_REG:
        return _register(operand.reg, regs, instruction)
    if operand.type == x86.X86_OP_MEM:
        memory = operand.mem
        address = memory.disp
        if memory.base != 0:
            base = _register(memory.base, regs, instruction)
            address += base + (instruction.size if memory.base == x86.X86_REG_RIP else 0)
        if memory.index != 0:
            address += _register(memory.index, regs, instruction) * memory.scale
        return read_u64(address & 0xFFFF_FFFF_FFFF_FFFF)
    raise CannotStep(f"{instruction.mnemonic} {instruction.op_str}: operand not understood")


def _register(register: int, regs: KvmRegs, instruction) -> int:
    field = _REGISTER_FIELDS.get(register)
    if field is None:
        raise CannotStep(f"{instruction.mnemonic} {instruction.op_str}: a branch through a partial register")
    return getattr(regs, field)
