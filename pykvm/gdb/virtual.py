"""Guest-virtual memory, as a debugger sees it: through the vCPU's page tables (KVM_TRANSLATE),
page by page, bounds-checked against guest RAM; and the segment descriptors of the guest's GDT."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pykvm.kvm import KvmError
from pykvm.kvm.structs import KvmSegment
from pykvm.memory import GuestMemoryError

if TYPE_CHECKING:
    from pykvm.vcpu import Vcpu

PAGE = 0x1000


class MemoryFault(Exception):
    """A guest-virtual address that is not mapped, or maps outside guest RAM."""


def _physical(vcpu: Vcpu, address: int) -> int:
    try:
        translation = vcpu.fd.translate(address)
    except KvmError as error:
        raise MemoryFault(f"{address:#x}: {error}") from None
    if not translation.valid:
        raise MemoryFault(f"{address:#x} is not mapped")
    return translation.physical_address


def read(vcpu: Vcpu, address: int, length: int) -> bytes:
    """`length` bytes at a guest-virtual address; MemoryFault if any page of them is missing."""
    data = bytearray()
    while len(data) < length:
        at = address + len(data)
        chunk = min(length - len(data), PAGE - (at & (PAGE - 1)))
        try:
            data += vcpu.memory.read(_physical(vcpu, at), chunk)
        except GuestMemoryError as error:
            raise MemoryFault(f"{at:#x}: {error}") from None
    return bytes(data)


def write(vcpu: Vcpu, address: int, data: bytes) -> None:
    """Every page is translated before any byte is written: a fault writes nothing."""
    pieces, done = [], 0
    while done < len(data):
        at = address + done
        chunk = min(len(data) - done, PAGE - (at & (PAGE - 1)))
        pieces.append((_physical(vcpu, at), data[done: done + chunk]))
        done += chunk
    for physical, piece in pieces:
        if not vcpu.memory.contains(physical, len(piece)):
            raise MemoryFault(f"{physical:#x} (physical) is outside guest RAM")
    for physical, piece in pieces:
        vcpu.memory.write(physical, piece)


def read_u64(vcpu: Vcpu, address: int) -> int:
    return int.from_bytes(read(vcpu, address, 8), "little")


def segment_from_gdt(vcpu: Vcpu, gdt_base: int, selector: int) -> KvmSegment:
    """The segment register a load of `selector` from the guest's GDT would give (64-bit mode:
    code and data segments; base and limit matter little there, but are decoded anyway)."""
    segment = KvmSegment(selector=selector)
    if selector & ~3 == 0:
        segment.unusable = 1
        return segment
    raw = int.from_bytes(read(vcpu, gdt_base + (selector & ~7), 8), "little")
    segment.limit = (raw & 0xFFFF) | ((raw >> 48) & 0xF) << 16
    segment.base = ((raw >> 16) & 0xFF_FFFF) | ((raw >> 56) & 0xFF) << 24
    segment.type = (raw >> 40) & 0xF
    segment.s = (raw >> 44) & 1
    segment.dpl = (raw >> 45) & 3
    segment.present = (raw >> 47) & 1
    segment.avl = (raw >> 52) & 1
    segment.l = (raw >> 53) & 1
    segment.db = (raw >> 54) & 1
    segment.g = (raw >> 55) & 1
    if segment.g:
        segment.limit = segment.limit << 12 | 0xFFF
    return segment
