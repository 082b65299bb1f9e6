"""A vCPU: its KVM fd, its boot-time CPU state, and the thread that runs KVM_RUN and dispatches exits.

The run loop is the VMM's hottest path. Per exit it does one ioctl, one read of the exit reason
through a memoryview of the kvm_run page, one struct unpack of the exit data, one list index into
the port table and one device call; everything rarer (MMIO, string I/O, tracing, faults) is off
to the side. Pausing costs the loop nothing (see pykvm.run_control): only a KVM_RUN that returns
EINTR consults RunControl.
"""

from __future__ import annotations

import ctypes
import fcntl
import signal
import struct
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from pykvm.bus import IoBus
from pykvm.kvm import KvmError, VcpuFd
from pykvm.kvm import constants as k
from pykvm.kvm.ioctls import KVM_RUN
from pykvm.kvm.run_layout import (
    EXIT_REASON_WORD,
    IO_EXIT,
    IO_EXIT_OFFSET,
    MMIO_DATA_OFFSET,
    MMIO_EXIT,
    MMIO_EXIT_OFFSET,
)
from pykvm.kvm.structs import (
    KvmDebugregs,
    KvmLapicState,
    KvmMpState,
    KvmRegs,
    KvmSegment,
    KvmSregs,
    KvmVcpuEvents,
    KvmXcrs,
    KvmXsave,
)
from pykvm.diagnostics import describe_vcpu
from pykvm.internal_errors import complete_internal_error
from pykvm.memory import GuestMemory
from pykvm.run_control import KICK_SIGNAL, RunControl, StopKind, StopReason
from pykvm.state import StateError

if TYPE_CHECKING:
    from ctypes import Structure as KvmCpuid2  # a cpuid2_type(n) instance

_U32 = struct.Struct("<I")

# Asynchronous signals go to the main thread, never interrupt a vCPU by accident.
_BLOCKED_IN_VCPU_THREADS = {
    signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGCHLD,
    signal.SIGWINCH, signal.SIGPIPE, signal.SIGALRM, signal.SIGUSR2, signal.SIGTSTP,
}

CR0_PE = 1 << 0
CR0_ET = 1 << 4
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
RFLAGS_RESERVED = 1 << 1

# Selectors of the GDT the loaders write (pykvm.boot.loader): 64-bit code, 32-bit code, data.
BOOT_CS64, BOOT_CS32, BOOT_DS = 0x08, 0x10, 0x18

# LAPIC register offsets and LVT delivery modes, for wiring LINT0/LINT1 as a PC firmware does.
APIC_LVT0, APIC_LVT1 = 0x350, 0x360
APIC_MODE_EXTINT, APIC_MODE_NMI = 0x7 << 8, 0x4 << 8


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


class GuestFault(Exception):
    """The guest did something the VMM cannot continue from (triple fault, internal error)."""

    def __init__(self, message: str, report: str) -> None:
        super().__init__(message)
        self.report = report


class Vcpu:
    def __init__(
        self,
        fd: VcpuFd,
        index: int,
        bus: IoBus,
        memory: GuestMemory,
        control: RunControl,
        cpuid: KvmCpuid2,
        msr_indices: list[int],
    ) -> None:
        self.fd = fd
        self.index = index
        self.bus = bus
        self.memory = memory
        self.control = control
        self.thread: threading.Thread | None = None
        self.exit_count = 0
        self.completed_instructions: dict[str, int] = {}  # mnemonic -> count (see internal_errors)
        # Called as trace(vcpu, kind, **fields) on every exit when set; see diagnostics.ExitTracer.
        self.trace: Callable[..., None] | None = None
        self.msr_indices = msr_indices  # the MSRs saved and restored with the vCPU
        self._run_view = memoryview(fd.run_mmap)
        self._setup_cpuid(cpuid)
        self._setup_lapic()
        control.attach(self)

    # -- boot-time state ---------------------------------------------------------------------------

    def _setup_cpuid(self, supported: KvmCpuid2) -> None:
        """Give this vCPU the supported CPUID with its own APIC ID in the leaves that carry one."""
        for entry in supported.entries[: supported.nent]:
            if entry.function == 1:
                entry.ebx = (entry.ebx & 0x00FF_FFFF) | (self.index << 24)
            elif entry.function in (0xB, 0x1F):
                entry.edx = self.index
        self.fd.set_cpuid2(supported)

    def _setup_lapic(self) -> None:
        """Route the PIC through LINT0 (ExtINT) and NMI through LINT1, as PC firmware leaves them."""
        lapic = self.fd.get_lapic()
        for register, mode in ((APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)):
            lvt = _U32.unpack_from(lapic.regs, register)[0]
            # clear the mask bit (16) and the delivery mode (10:8), then set the mode
            _U32.pack_into(lapic.regs, register, (lvt & ~0x10700) | mode)
        self.fd.set_lapic(lapic)

    def enter_protected_mode(self, rip: int, *, gdt_base: int, gdt_limit: int, rax: int = 0, rbx: int = 0) -> None:
        """32-bit protected mode, paging off, flat 4 GiB segments (the multiboot entry state)."""
        sregs = self.fd.get_sregs()
        _flat_segment(sregs.cs, selector=BOOT_CS32, code=True, long=False)
        for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
            _flat_segment(seg, selector=BOOT_DS, code=False, long=False)
        sregs.gdt.base, sregs.gdt.limit = gdt_base, gdt_limit
        sregs.cr0 = (sregs.cr0 | CR0_PE | CR0_ET) & ~CR0_PG
        sregs.cr4 = 0
        sregs.efer = 0
        self.fd.set_sregs(sregs)
        self._set_entry_regs(rip, rax, rbx)

    def enter_long_mode(self, rip: int, *, cr3: int, gdt_base: int, gdt_limit: int, rax: int = 0, rbx: int = 0) -> None:
        """64-bit mode with the given page tables and GDT (the ELF64 entry state)."""
        sregs = self.fd.get_sregs()
        _flat_segment(sregs.cs, selector=BOOT_CS64, code=True, long=True)
        for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
            _flat_segment(seg, selector=BOOT_DS, code=False, long=False)
        sregs.gdt.base, sregs.gdt.limit = gdt_base, gdt_limit
        sregs.cr3 = cr3
        sregs.cr4 = CR4_PAE
        sregs.cr0 = CR0_PE | CR0_ET | CR0_PG
        sregs.efer = EFER_LME | EFER_LMA
        self.fd.set_sregs(sregs)
        self._set_entry_regs(rip, rax, rbx)

    def enter_real_mode(self, segment: int, offset: int) -> None:
        """16-bit real mode at segment:offset (the flat-binary entry state)."""
        sregs = self.fd.get_sregs()
        for seg in (sregs.cs, sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
            seg.selector, seg.base = segment, segment << 4
        self.fd.set_sregs(sregs)
        regs = self.fd.get_regs()
        regs.rip, regs.rflags, regs.rsp = offset, RFLAGS_RESERVED, 0xFFF0
        self.fd.set_regs(regs)

    def _set_entry_regs(self, rip: int, rax: int, rbx: int) -> None:
        regs = self.fd.get_regs()
        regs.rip, regs.rax, regs.rbx, regs.rflags = rip, rax, rbx, RFLAGS_RESERVED
        self.fd.set_regs(regs)

    # -- state (the VM must be paused: RunControl.pause completes pending I/O first) ---------------

    def save_state(self) -> VcpuState:
        fd = self.fd
        return VcpuState(
            regs=bytes(fd.get_regs()),
            sregs=bytes(fd.get_sregs()),
            xsave=bytes(fd.get_xsave()),
            xcrs=bytes(fd.get_xcrs()),
            msrs=fd.get_msrs(self.msr_indices),
            lapic=bytes(fd.get_lapic()),
            events=bytes(fd.get_vcpu_events()),
            mp_state=bytes(fd.get_mp_state()),
            debugregs=bytes(fd.get_debugregs()),
        )

    def restore_state(self, state: VcpuState) -> None:
        """Put a saved state into this vCPU (CPUID was set when it was created). The order matters:
        MSRs after SREGS (EFER), LAPIC before events, and the TSC deadline after the LAPIC is in
        TSC-deadline mode, or KVM drops it."""
        fd = self.fd
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

    # -- running -----------------------------------------------------------------------------------

    def start(self) -> None:
        self.control.entered()
        self.thread = threading.Thread(target=self._thread_main, name=f"vcpu{self.index}", daemon=True)
        self.thread.start()

    def kick(self) -> None:
        """Make the vCPU leave KVM_RUN (or not enter it) with EINTR as soon as possible."""
        self.fd.run_struct.immediate_exit = 1
        thread = self.thread
        if thread is not None and thread.ident is not None and thread.is_alive():
            signal.pthread_kill(thread.ident, KICK_SIGNAL)

    def clear_kick(self) -> None:
        """Let the next KVM_RUN enter the guest again (called on resume, with the vCPU parked)."""
        self.fd.run_struct.immediate_exit = 0

    def _thread_main(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, _BLOCKED_IN_VCPU_THREADS)
        try:
            self._run_loop()
        except GuestFault as fault:
            self.control.stop(StopReason(1, f"vcpu{self.index}: {fault}", fault.report, StopKind.FAILED))
        except BaseException as error:  # a VMM bug must stop the VM, not leave it half-running
            report = describe_vcpu(self)
            self.control.stop(StopReason(1, f"vcpu{self.index}: internal error: {error!r}", report, StopKind.FAILED))
            raise
        finally:
            self.control.left()

    def _run_loop(self) -> None:
        ioctl = fcntl.ioctl
        fd = self.fd.fd
        run = self._run_view
        words = run.cast("I")
        ports = self.bus.ports
        unpack_io = IO_EXIT.unpack_from
        control = self.control
        trace = self.trace
        while True:
            try:
                ioctl(fd, KVM_RUN, 0)
            except InterruptedError:
                if control.interrupted():
                    return
                continue
            except BlockingIOError:
                continue  # EAGAIN: an AP left wait-for-SIPI inside KVM; just run it again
            except OSError as error:
                raise KvmError(error.errno, f"KVM_RUN failed: {error.strerror}", ioctl="KVM_RUN") from None
            self.exit_count += 1  # live: benchmarks and query-vcpus read it while the vCPU runs
            reason = words[EXIT_REASON_WORD]
            if reason == k.KVM_EXIT_IO:
                direction, size, port, count, offset = unpack_io(run, IO_EXIT_OFFSET)
                entry = ports[port]
                if count != 1 or entry is None or trace is not None:
                    self._port_io_slow(direction, size, port, count, offset)
                elif direction == k.KVM_EXIT_IO_OUT:
                    device, base = entry
                    device.pio_write(port - base, size, int.from_bytes(run[offset : offset + size], "little"))
                else:
                    device, base = entry
                    run[offset : offset + size] = device.pio_read(port - base, size).to_bytes(size, "little")
            elif reason == k.KVM_EXIT_MMIO:
                self._mmio()
            else:
                self._rare_exit(reason)

    def _port_io_slow(self, direction: int, size: int, port: int, count: int, offset: int) -> None:
        """String I/O (rep ins/outs: `count` items), unclaimed ports, and traced I/O."""
        run, bus = self._run_view, self.bus
        for i in range(count):
            at = offset + i * size
            if direction == k.KVM_EXIT_IO_OUT:
                value = int.from_bytes(run[at : at + size], "little")
                bus.pio_write(port, size, value)
            else:
                value = bus.pio_read(port, size)
                run[at : at + size] = value.to_bytes(size, "little")
            if self.trace is not None:
                self.trace(self, "io", write=direction == k.KVM_EXIT_IO_OUT, port=port, size=size, value=value)

    def _mmio(self) -> None:
        run = self._run_view
        addr, data, length, is_write = MMIO_EXIT.unpack_from(run, MMIO_EXIT_OFFSET)
        if length not in (1, 2, 4, 8):
            raise GuestFault(f"MMIO access of {length} bytes at {addr:#x}", self._report())
        if is_write:
            value = int.from_bytes(data[:length], "little")
            self.bus.mmio_write(addr, length, value)
        else:
            value = self.bus.mmio_read(addr, length)
            run[MMIO_DATA_OFFSET : MMIO_DATA_OFFSET + length] = value.to_bytes(length, "little")
        if self.trace is not None:
            self.trace(self, "mmio", write=bool(is_write), addr=addr, size=length, value=value)

    def _rare_exit(self, reason: int) -> None:
        run = self.fd.run_struct
        if self.trace is not None:
            self.trace(self, "exit", reason=reason)
        if reason == k.KVM_EXIT_INTR:
            return  # a signal arrived while KVM was about to run: same as EINTR
        if reason == k.KVM_EXIT_SYSTEM_EVENT:
            kind = run.system_event.type
            if kind in (k.KVM_SYSTEM_EVENT_SHUTDOWN, k.KVM_SYSTEM_EVENT_RESET):
                self.control.stop(StopReason(0, "guest powered off" if kind == k.KVM_SYSTEM_EVENT_SHUTDOWN else "guest reset"))
                return
        if reason == k.KVM_EXIT_DEBUG:
            return
        if reason == k.KVM_EXIT_SHUTDOWN:
            raise GuestFault("triple fault (KVM_EXIT_SHUTDOWN)", self._report())
        if reason == k.KVM_EXIT_INTERNAL_ERROR:
            # Some backends (PVM) hand int3/fwait in guest ring 0 back to us; finish those here.
            completed = complete_internal_error(self)
            if completed is not None:
                self.completed_instructions[completed] = self.completed_instructions.get(completed, 0) + 1
                return
            internal = run.internal
            data = ", ".join(f"{internal.data[i]:#x}" for i in range(min(internal.ndata, 16)))
            raise GuestFault(f"KVM internal error, suberror {internal.suberror} [{data}]", self._report())
        if reason == k.KVM_EXIT_FAIL_ENTRY:
            code = run.fail_entry.hardware_entry_failure_reason
            raise GuestFault(f"VM entry failed, hardware reason {code:#x}", self._report())
        name = k.EXIT_REASON_NAMES.get(reason, str(reason))
        raise GuestFault(f"unexpected exit {name}", self._report())

    def _report(self) -> str:
        return describe_vcpu(self)

    def close(self) -> None:
        self._run_view.release()
        self.fd.close()


def uapi_struct(kind: type, data: bytes):
    """A uapi structure from saved bytes, refusing a blob of the wrong size."""
    if len(data) != ctypes.sizeof(kind):
        raise StateError(f"{kind.__name__}: {len(data)} bytes, expected {ctypes.sizeof(kind)}")
    return kind.from_buffer_copy(data)


def _flat_segment(seg: KvmSegment, *, selector: int, code: bool, long: bool) -> None:
    """A present, ring-0, flat (base 0, 4 GiB, page-granular) code or data segment."""
    seg.base, seg.limit, seg.selector = 0, 0xFFFF_FFFF, selector
    seg.type = 0xB if code else 0x3  # execute/read accessed, or read/write accessed
    seg.present, seg.dpl, seg.s, seg.g, seg.avl, seg.unusable = 1, 0, 1, 1, 0, 0
    seg.l = 1 if long else 0
    seg.db = 0 if long else 1
