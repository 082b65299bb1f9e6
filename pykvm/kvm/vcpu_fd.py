"""A vCPU fd (from ``VmFd.create_vcpu``): KVM_RUN, its mmapped ``kvm_run``, and register state.

``run`` lets ``InterruptedError`` (EINTR) through untouched rather than raising KvmError: that is
how a signalled vCPU thread, or ``immediate_exit``, comes back to its caller.
"""

from __future__ import annotations

import functools
import mmap
import os
import struct
from collections.abc import Iterable, Mapping

from .calls import OwnedFd, fcntl_ioctl, get_growing, get_struct, ioctl, set_struct
from .errors import KvmError, ioctl_error
from .ioctls import (
    KVM_GET_CPUID2,
    KVM_GET_DEBUGREGS,
    KVM_GET_LAPIC,
    KVM_GET_MP_STATE,
    KVM_GET_MSRS,
    KVM_GET_REGS,
    KVM_GET_SREGS,
    KVM_GET_VCPU_EVENTS,
    KVM_GET_XCRS,
    KVM_GET_XSAVE,
    KVM_RUN,
    KVM_SET_CPUID2,
    KVM_SET_DEBUGREGS,
    KVM_SET_GUEST_DEBUG,
    KVM_SET_LAPIC,
    KVM_SET_MP_STATE,
    KVM_SET_MSRS,
    KVM_SET_REGS,
    KVM_SET_SREGS,
    KVM_SET_VCPU_EVENTS,
    KVM_SET_XCRS,
    KVM_SET_XSAVE,
    KVM_TRANSLATE,
)
from .structs import (
    KvmDebugregs,
    KvmGuestDebug,
    KvmLapicState,
    KvmMpState,
    KvmRegs,
    KvmRun,
    KvmSregs,
    KvmTranslation,
    KvmVcpuEvents,
    KvmXcrs,
    KvmXsave,
    cpuid2_type,
    msrs_type,
)

__all__ = ["VcpuFd"]


class VcpuFd(OwnedFd):
    """A vCPU fd (from ``VmFd.create_vcpu``) with its mmapped ``kvm_run``."""

    def __init__(self, fd: int, vcpu_id: int, mmap_size: int):
        self.fd = fd
        self.id = vcpu_id
        self.run_mmap = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.run_struct = KvmRun.from_buffer(self.run_mmap)

    def run(self) -> int:
        """KVM_RUN. Raises InterruptedError (not KvmError) on EINTR."""
        try:
            return fcntl_ioctl(self.fd, KVM_RUN, 0)
        except InterruptedError:
            raise
        except OSError as exc:
            raise ioctl_error(KVM_RUN, exc) from None

    # -- register state: each get returns a fresh struct, each set takes one ----

    def get_regs(self) -> KvmRegs:
        return get_struct(self.fd, KVM_GET_REGS, KvmRegs)

    def set_regs(self, regs: KvmRegs) -> None:
        set_struct(self.fd, KVM_SET_REGS, KvmRegs, regs)

    def get_sregs(self) -> KvmSregs:
        return get_struct(self.fd, KVM_GET_SREGS, KvmSregs)

    def set_sregs(self, sregs: KvmSregs) -> None:
        set_struct(self.fd, KVM_SET_SREGS, KvmSregs, sregs)

    def get_xsave(self) -> KvmXsave:
        return get_struct(self.fd, KVM_GET_XSAVE, KvmXsave)

    def set_xsave(self, xsave: KvmXsave) -> None:
        set_struct(self.fd, KVM_SET_XSAVE, KvmXsave, xsave)

    def get_xcrs(self) -> KvmXcrs:
        return get_struct(self.fd, KVM_GET_XCRS, KvmXcrs)

    def set_xcrs(self, xcrs: KvmXcrs) -> None:
        set_struct(self.fd, KVM_SET_XCRS, KvmXcrs, xcrs)

    def get_lapic(self) -> KvmLapicState:
        return get_struct(self.fd, KVM_GET_LAPIC, KvmLapicState)

    def set_lapic(self, lapic: KvmLapicState) -> None:
        set_struct(self.fd, KVM_SET_LAPIC, KvmLapicState, lapic)

    def get_vcpu_events(self) -> KvmVcpuEvents:
        return get_struct(self.fd, KVM_GET_VCPU_EVENTS, KvmVcpuEvents)

    def set_vcpu_events(self, events: KvmVcpuEvents) -> None:
        set_struct(self.fd, KVM_SET_VCPU_EVENTS, KvmVcpuEvents, events)

    def get_mp_state(self) -> KvmMpState:
        return get_struct(self.fd, KVM_GET_MP_STATE, KvmMpState)

    def set_mp_state(self, mp_state: KvmMpState) -> None:
        set_struct(self.fd, KVM_SET_MP_STATE, KvmMpState, mp_state)

    def get_debugregs(self) -> KvmDebugregs:
        return get_struct(self.fd, KVM_GET_DEBUGREGS, KvmDebugregs)

    def set_debugregs(self, debugregs: KvmDebugregs) -> None:
        set_struct(self.fd, KVM_SET_DEBUGREGS, KvmDebugregs, debugregs)

    # -- MSRs and CPUID -----------------------------------------------------------

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        """KVM_GET_MSRS: {index: value}; KvmError names the first unreadable MSR."""
        indices = tuple(map(int, indices))  # (plain ints: they become the state's keys)
        request, values = _msrs_request(indices)
        msrs = bytearray(request)
        done = ioctl(self.fd, KVM_GET_MSRS, msrs)
        if done < len(indices):
            raise _msr_error("KVM_GET_MSRS", "read", list(indices), done)
        return dict(zip(indices, values.unpack_from(msrs)))

    def set_msrs(self, values: Mapping[int, int]) -> int:
        """KVM_SET_MSRS: returns how many were set; KvmError names the first rejected MSR."""
        items = list(values.items())
        msrs = msrs_type(len(items))(nmsrs=len(items))
        for entry, (index, data) in zip(msrs.entries, items):
            entry.index = index
            entry.data = data
        done = ioctl(self.fd, KVM_SET_MSRS, msrs)
        if done < len(items):
            raise _msr_error("KVM_SET_MSRS", "set", [index for index, _ in items], done)
        return done

    def set_cpuid2(self, cpuid) -> None:
        """KVM_SET_CPUID2 with a ``cpuid2_type(n)`` struct (e.g. from supported_cpuid)."""
        if cpuid.nent > len(cpuid.entries):
            raise ValueError(f"cpuid.nent is {cpuid.nent} but the struct holds {len(cpuid.entries)} entries")
        ioctl(self.fd, KVM_SET_CPUID2, cpuid)

    def get_cpuid2(self, max_entries: int = 256):
        """KVM_GET_CPUID2 as a ``cpuid2_type(nent)`` struct."""
        return get_growing(self.fd, KVM_GET_CPUID2, cpuid2_type, "nent", max_entries)

    def set_guest_debug(self, control: int, debugregs: Iterable[int] = ()) -> None:
        """KVM_SET_GUEST_DEBUG: KVM_GUESTDBG_* flags and DR0-DR7 for the debugger's breakpoints."""
        debug = KvmGuestDebug(control=control)
        for index, value in enumerate(debugregs):
            debug.arch.debugreg[index] = value
        set_struct(self.fd, KVM_SET_GUEST_DEBUG, KvmGuestDebug, debug)

    def translate(self, gva: int) -> KvmTranslation:
        """KVM_TRANSLATE a guest-virtual address with the vCPU's current paging."""
        tr = KvmTranslation(linear_address=gva)
        ioctl(self.fd, KVM_TRANSLATE, tr)
        return tr

    def close(self) -> None:
        """Unmap kvm_run, then close the fd.

        If someone still holds ``run_struct`` (or another view of it), the
        mapping is released when the last such reference goes away instead.
        """
        if self.fd < 0:
            return
        run_mmap, self.run_mmap, self.run_struct = self.run_mmap, None, None
        try:
            run_mmap.close()
        except BufferError:
            pass  # exported views remain; mmap's finalizer unmaps later
        os.close(self.fd)
        self.fd = -1


@functools.lru_cache(maxsize=16)
def _msrs_request(indices: tuple[int, ...]) -> tuple[bytes, struct.Struct]:
    """A struct kvm_msrs asking for `indices`, and the layout of the values KVM fills in: built
    once, as a VMM reads the same MSRs at every save (inside every FT pause; filling a ctypes
    array entry by entry took 3 times the ioctl)."""
    entry = struct.Struct("<IIQ")  # struct kvm_msr_entry: index, reserved, data
    request = struct.pack("<II", len(indices), 0) + b"".join(entry.pack(index, 0, 0) for index in indices)
    return request, struct.Struct("<8x" + "8xQ" * len(indices))


def _msr_error(ioctl_name: str, verb: str, indices: list[int], done: int) -> KvmError:
    msr = indices[done]
    err = KvmError(
        None, f"{ioctl_name} failed: MSR {msr:#x} could not be {verb} ({done} of {len(indices)} {verb})", ioctl_name
    )
    err.msr = msr
    return err
