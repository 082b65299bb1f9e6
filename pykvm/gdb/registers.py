"""The x86-64 registers as gdb numbers them, their target description, and their values on a vCPU.

gdb's amd64 target wants the `org.gnu.gdb.i386.core` feature (general registers, rip, eflags,
segment selectors, x87 stack and control registers) and optionally `org.gnu.gdb.i386.sse`
(xmm0-15, mxcsr), in that order; the `g` packet is every register's bytes, little-endian, in
that order. Values come from KVM_GET_REGS/SREGS and the legacy area of KVM_GET_XSAVE.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pykvm.kvm import VcpuFd

GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
SEGMENTS = ("cs", "ss", "ds", "es", "fs", "gs")
X87_CONTROL = ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop")


@dataclass(frozen=True)
class Register:
    name: str
    bits: int
    type: str  # the target description's type
    feature: str  # "core" or "sse"


REGISTERS: tuple[Register, ...] = (
    *(Register(name, 64, "data_ptr" if name in ("rbp", "rsp") else "int64", "core") for name in GPRS),
    Register("rip", 64, "code_ptr", "core"),
    Register("eflags", 32, "int32", "core"),
    *(Register(name, 32, "int32", "core") for name in SEGMENTS),
    *(Register(f"st{i}", 80, "i387_ext", "core") for i in range(8)),
    *(Register(name, 32, "int", "core") for name in X87_CONTROL),
    *(Register(f"xmm{i}", 128, "uint128", "sse") for i in range(16)),
    Register("mxcsr", 32, "int", "sse"),
)
NUMBER = {register.name: number for number, register in enumerate(REGISTERS)}
G_PACKET_BYTES = sum(register.bits // 8 for register in REGISTERS)

# Offsets in the XSAVE legacy region (the FXSAVE layout).
FCW, FSW, FTW, FOP, FIP, FCS, FDP, FDS, MXCSR = 0, 2, 4, 6, 8, 12, 16, 20, 24
ST0, XMM0 = 32, 160


def target_xml() -> bytes:
    """The target description gdb reads with `qXfer:features:read:target.xml`."""
    features = []
    for feature in ("core", "sse"):
        lines = [f'<feature name="org.gnu.gdb.i386.{feature}">']
        for number, register in enumerate(REGISTERS):
            if register.feature == feature:
                group = ' group="float"' if register.name in X87_CONTROL else ""
                lines.append(f'  <reg name="{register.name}" bitsize="{register.bits}" type="{register.type}"'
                             f' regnum="{number}"{group}/>')
        lines.append("</feature>")
        features.append("\n".join(lines))
    return ('<?xml version="1.0"?>\n<!DOCTYPE target SYSTEM "gdb-target.dtd">\n<target version="1.0">\n'
            "<architecture>i386:x86-64</architecture>\n" + "\n".join(features) + "\n</target>\n").encode()


class RegisterError(ValueError):
    """A register write that this stub cannot make (a segment selector without its descriptor)."""


def read_all(fd: VcpuFd) -> list[int]:
    """Every register's value, in gdb's order."""
    regs, sregs, xsave = fd.get_regs(), fd.get_sregs(), bytes(fd.get_xsave())
    values = [getattr(regs, name) for name in GPRS]
    values += [regs.rip, regs.rflags & 0xFFFF_FFFF]
    values += [getattr(sregs, name).selector for name in SEGMENTS]
    values += [int.from_bytes(xsave[ST0 + 16 * i: ST0 + 16 * i + 10], "little") for i in range(8)]
    word = lambda offset, size=2: int.from_bytes(xsave[offset: offset + size], "little")  # noqa: E731
    values += [word(FCW), word(FSW), _full_tag_word(word(FTW, 1)), word(FCS), word(FIP, 4),
               word(FDS), word(FDP, 4), word(FOP) & 0x7FF]
    values += [int.from_bytes(xsave[XMM0 + 16 * i: XMM0 + 16 * i + 16], "little") for i in range(16)]
    values.append(word(MXCSR, 4))
    return values


def encode_all(values: list[int]) -> bytes:
    """The `g` reply: each value little-endian in its register's width, as hex."""
    return b"".join(encode_one(number, value) for number, value in enumerate(values))


def encode_one(number: int, value: int) -> bytes:
    return value.to_bytes(REGISTERS[number].bits // 8, "little").hex().encode()


def decode_all(data: bytes) -> list[int]:
    """The values a `G` packet carries (raw bytes, already unhexed)."""
    if len(data) != G_PACKET_BYTES:
        raise RegisterError(f"G carries {len(data)} bytes, the registers take {G_PACKET_BYTES}")
    values, offset = [], 0
    for register in REGISTERS:
        size = register.bits // 8
        values.append(int.from_bytes(data[offset: offset + size], "little"))
        offset += size
    return values


def write(fd: VcpuFd, changes: dict[int, int]) -> None:
    """Write the registers numbered in `changes` (gdb's numbers), leaving the others."""
    current = read_all(fd)
    changes = {number: value for number, value in changes.items() if current[number] != value}
    if not changes:
        return
    names = {REGISTERS[number].name: value for number, value in changes.items()}
    if any(name in SEGMENTS for name in names):
        raise RegisterError("segment selectors cannot be written from the debugger (their descriptors would not follow)")
    if any(name in GPRS or name in ("rip", "eflags") for name in names):
        regs = fd.get_regs()
        for name, value in names.items():
            if name == "eflags":
                regs.rflags = value | 0x2  # bit 1 always reads as one
            elif name in GPRS or name == "rip":
                setattr(regs, name, value)
        fd.set_regs(regs)
    fpu = {name: value for name, value in names.items() if name not in GPRS and name not in ("rip", "eflags")}
    if fpu:
        xsave = fd.get_xsave()
        for name, value in fpu.items():
            offset, size = _xsave_field(name)
            if name == "ftag":
                value = _abridged_tag_word(value)
            data = (value & ((1 << 8 * size) - 1)).to_bytes(size, "little")
            ctypes.memmove(ctypes.addressof(xsave) + offset, data, size)
        fd.set_xsave(xsave)


def _xsave_field(name: str) -> tuple[int, int]:
    if name.startswith("st"):
        return ST0 + 16 * int(name[2:]), 10
    if name.startswith("xmm"):
        return XMM0 + 16 * int(name[3:]), 16
    return {"fctrl": (FCW, 2), "fstat": (FSW, 2), "ftag": (FTW, 1), "fiseg": (FCS, 2), "fioff": (FIP, 4),
            "foseg": (FDS, 2), "fooff": (FDP, 4), "fop": (FOP, 2), "mxcsr": (MXCSR, 4)}[name]


def _full_tag_word(abridged: int) -> int:
    """FXSAVE keeps one bit per x87 register (valid or empty); gdb shows the full two-bit tags.
    A register in use is shown as valid (00), which is all that reading it needs."""
    return sum((0b00 if abridged >> i & 1 else 0b11) << 2 * i for i in range(8))


def _abridged_tag_word(full: int) -> int:
    return sum(1 << i for i in range(8) if (full >> 2 * i) & 0b11 != 0b11)
