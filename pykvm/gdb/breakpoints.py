"""Breakpoints in a guest: int3 bytes written into its memory, and debug-register slots.

Software breakpoints replace the first byte of an instruction with int3 (0xCC). One address can be
wanted by several owners at once (gdb's breakpoint, a step's temporary breakpoint on each vCPU):
the original byte is put back when the last owner lets go, or while a vCPU steps over it
(`lift`). Hardware breakpoints are DR0-DR2 (execute, one byte); DR3 is kept for the catch of the
guest's #BP vector (see pykvm.gdb.target), so gdb sees three slots.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Hashable

from pykvm.gdb import virtual

if TYPE_CHECKING:
    from pykvm.vcpu import Vcpu

INT3 = b"\xcc"
HW_SLOTS = 3  # DR0-DR2 for gdb's hardware breakpoints
CATCH_SLOT = 3  # DR3: the guest's #BP handler
DR7_LOCAL_ENABLE = 1  # L0; slot i is bit 2*i
DR7_RESERVED_ONE = 1 << 10
DR6_SINGLE_STEP = 1 << 14


class BreakpointError(Exception):
    """A breakpoint that cannot be placed (unmapped address, no free debug register)."""


@dataclass
class Inserted:
    original: bytes
    owners: set[Hashable] = field(default_factory=set)
    lifted: bool = False  # the original byte is back while a vCPU steps over it


class SoftwareBreakpoints:
    """The int3 bytes in guest memory, written through `vcpu`'s page tables."""

    def __init__(self) -> None:
        self.inserted: dict[int, Inserted] = {}

    def add(self, vcpu: Vcpu, address: int, owner: Hashable) -> None:
        entry = self.inserted.get(address)
        if entry is None:
            try:
                original = virtual.read(vcpu, address, 1)
                virtual.write(vcpu, address, INT3)
            except virtual.MemoryFault as error:
                raise BreakpointError(f"no breakpoint at {address:#x}: {error}") from None
            entry = self.inserted[address] = Inserted(original)
        entry.owners.add(owner)

    def discard(self, vcpu: Vcpu, address: int, owner: Hashable) -> None:
        entry = self.inserted.get(address)
        if entry is None:
            return
        entry.owners.discard(owner)
        if not entry.owners:
            del self.inserted[address]
            if not entry.lifted:
                self._put(vcpu, address, entry.original)

    def owned_by(self, address: int, owner: Hashable) -> bool:
        entry = self.inserted.get(address)
        return entry is not None and owner in entry.owners

    def is_ours(self, address: int) -> bool:
        """An int3 at `address` is one of ours (lifted ones are not in memory: not ours)."""
        entry = self.inserted.get(address)
        return entry is not None and not entry.lifted

    def lift(self, vcpu: Vcpu, address: int) -> bool:
        entry = self.inserted.get(address)
        if entry is None or entry.lifted:
            return False
        self._put(vcpu, address, entry.original)
        entry.lifted = True
        return True

    def drop(self, vcpu: Vcpu, address: int) -> None:
        """Put a lifted breakpoint back (if anyone still wants it)."""
        entry = self.inserted.get(address)
        if entry is not None and entry.lifted:
            self._put(vcpu, address, INT3)
            entry.lifted = False

    def mask(self, address: int, data: bytes) -> bytes:
        """`data` read at `address` with the original bytes where our int3s are."""
        out = bytearray(data)
        for at, entry in self.inserted.items():
            if address <= at < address + len(data) and not entry.lifted:
                out[at - address] = entry.original[0]
        return bytes(out)

    def clear(self, vcpu: Vcpu) -> None:
        for address, entry in list(self.inserted.items()):
            if not entry.lifted:
                self._put(vcpu, address, entry.original)
        self.inserted.clear()

    @staticmethod
    def _put(vcpu: Vcpu, address: int, byte: bytes) -> None:
        try:
            virtual.write(vcpu, address, byte)
        except virtual.MemoryFault:
            pass  # the guest unmapped the page since: nothing of ours is left there to undo


class HardwareBreakpoints:
    """DR0-DR2: execution breakpoints."""

    def __init__(self) -> None:
        self.slots: list[int | None] = [None] * HW_SLOTS

    def add(self, address: int) -> None:
        if address in self.slots:
            return
        if None not in self.slots:
            raise BreakpointError(f"no free debug register for a hardware breakpoint at {address:#x} "
                                  f"({HW_SLOTS} are in use)")
        self.slots[self.slots.index(None)] = address

    def discard(self, address: int) -> None:
        self.slots = [None if slot == address else slot for slot in self.slots]

    def debugregs(self, *, skip: int | None, catch: int | None) -> list[int]:
        """DR0-DR7 for KVM_SET_GUEST_DEBUG: gdb's slots but `skip` (being stepped over), DR3 on
        `catch`."""
        regs = [0] * 8
        dr7 = DR7_RESERVED_ONE
        for index, address in enumerate(self.slots):
            if address is not None and address != skip:
                regs[index] = address
                dr7 |= DR7_LOCAL_ENABLE << 2 * index
        if catch is not None:
            regs[CATCH_SLOT] = catch
            dr7 |= DR7_LOCAL_ENABLE << 2 * CATCH_SLOT
        regs[7] = dr7
        return regs

    def hit(self, dr6: int) -> int | None:
        """The slot's address a debug exit's DR6 names, if one of gdb's."""
        for index, address in enumerate(self.slots):
            if dr6 >> index & 1 and address is not None:
                return address
        return None
