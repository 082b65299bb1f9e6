"""A vCPU's state as KVM keeps it: saved as the raw bytes of its uapi structures, put back in the
order KVM needs. The VM must be paused (RunControl.pause completes pending I/O first)."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from pykvm.kvm import VcpuFd
from pykvm.kvm.structs import (
    KvmDebugregs,
    KvmLapicState,
    KvmMpState,
    KvmRegs,
    KvmSregs,
    KvmVcpuEvents,
    KvmXcrs,
    KvmXsave,
)
from pykvm.state import StateError

MSR_IA32_TSC_DEADLINE = 0x6E0


@dataclass
class VcpuState:
    """Everything KVM keeps for a vCPU, as the raw bytes of its uapi structures."""

    regs: bytes
    sregs: bytes
    xsave: bytes
    xcrs: bytes
    msrs: dict[int, int]
    lapic: bytes
    events: bytes
    mp_state: bytes
    debugregs: bytes


def save_vcpu_state(fd: VcpuFd, msr_indices: list[int]) -> VcpuState:
    return VcpuState(
        regs=bytes(fd.get_regs()),
        sregs=bytes(fd.get_sregs()),
        xsave=bytes(fd.get_xsave()),
        xcrs=bytes(fd.get_xcrs()),
        msrs=fd.get_msrs(msr_indices),
        lapic=bytes(fd.get_lapic()),
        events=bytes(fd.get_vcpu_events()),
        mp_state=bytes(fd.get_mp_state()),
        debugregs=bytes(fd.get_debugregs()),
    )


def restore_vcpu_state(fd: VcpuFd, state: VcpuState) -> None:
    """Put a saved state into a vCPU (CPUID was set when it was created). The order matters:
    MSRs after SREGS (EFER), LAPIC before events, and the TSC deadline after the LAPIC is in
    TSC-deadline mode, or KVM drops it."""
    fd.set_sregs(uapi_struct(KvmSregs, state.sregs))
    fd.set_msrs({i: v for i, v in state.msrs.items() if i != MSR_IA32_TSC_DEADLINE})
    fd.set_lapic(uapi_struct(KvmLapicState, state.lapic))
    fd.set_regs(uapi_struct(KvmRegs, state.regs))
    fd.set_xcrs(uapi_struct(KvmXcrs, state.xcrs))
    fd.set_xsave(uapi_struct(KvmXsave, state.xsave))
    fd.set_vcpu_events(uapi_struct(KvmVcpuEvents, state.events))
    fd.set_mp_state(uapi_struct(KvmMpState, state.mp_state))
    fd.set_debugregs(uapi_struct(KvmDebugregs, state.debugregs))
    if MSR_IA32_TSC_DEADLINE in state.msrs:
        fd.set_msrs({MSR_IA32_TSC_DEADLINE: state.msrs[MSR_IA32_TSC_DEADLINE]})


def uapi_struct(kind: type, data: bytes):
    """A uapi structure from saved bytes, refusing a blob of the wrong size."""
    if len(data) != ctypes.sizeof(kind):
        raise StateError(f"{kind.__name__}: {len(data)} bytes, expected {ctypes.sizeof(kind)}")
    return kind.from_buffer_copy(data)
