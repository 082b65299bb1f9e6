"""A vCPU: its KVM fd, and the thread that runs KVM_RUN and dispatches exits.

The run loop is the VMM's hottest path. Per exit it does one ioctl, one read of the exit reason
through a memoryview of the kvm_run page, one struct unpack of the exit data, one list index into
the port table and one device call; everything rarer (MMIO, string I/O, tracing, faults) is off
to the side. Pausing costs the loop nothing (see pykvm.run_control): only a KVM_RUN that returns
EINTR consults RunControl.

Boot-time CPU modes are set by pykvm.boot.cpu_mode; saved state lives in pykvm.vcpu_state.
"""

from __future__ import annotations

import fcntl
import signal
import struct
import threading
from typing import TYPE_CHECKING, Callable

from pykvm.bus import IoBus
from pykvm.diagnostics import describe_vcpu
from pykvm.internal_errors import complete_internal_error
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
from pykvm.memory import GuestMemory
from pykvm.run_control import KICK_SIGNAL, RunControl, StopKind, StopReason
from pykvm.vcpu_state import VcpuState, restore_vcpu_state, save_vcpu_state

if TYPE_CHECKING:
    from ctypes import Structure as KvmCpuid2  # a cpuid2_type(n) instance

_U32 = struct.Struct("<I")

# Asynchronous signals go to the main thread, never interrupt a vCPU by accident.
_BLOCKED_IN_VCPU_THREADS = {
    signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGCHLD,
    signal.SIGWINCH, signal.SIGPIPE, signal.SIGALRM, signal.SIGUSR2, signal.SIGTSTP,
}

# LAPIC register offsets and LVT delivery modes, for wiring LINT0/LINT1 as a PC firmware does.
APIC_LVT0, APIC_LVT1 = 0x350, 0x360
APIC_MODE_EXTINT, APIC_MODE_NMI = 0x7 << 8, 0x4 << 8


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
        # A debugger's hook (pykvm.gdb), called as debugger(vcpu, exit_reason) on KVM_EXIT_DEBUG and
        # KVM_EXIT_INTERNAL_ERROR; True: the exit was its own breakpoint or step, handled.
        self.debugger: Callable[[Vcpu, int], bool] | None = None
        self.msr_indices = msr_indices  # the MSRs saved and restored with the vCPU
        self._run_view = memoryview(fd.run_mmap)
        self._setup_cpuid(cpuid)
        self._setup_lapic()
        control.attach(self)

    # -- creation-time state -----------------------------------------------------------------------

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

    # -- state (the VM must be paused) -------------------------------------------------------------

    def save_state(self) -> VcpuState:
        return save_vcpu_state(self.fd, self.msr_indices)

    def restore_state(self, state: VcpuState) -> None:
        restore_vcpu_state(self.fd, state)

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
                kicked = True
            except BlockingIOError:
                continue  # EAGAIN: an AP left wait-for-SIPI inside KVM; just run it again
            except OSError as error:
                raise KvmError(error.errno, f"KVM_RUN failed: {error.strerror}", ioctl="KVM_RUN") from None
            else:
                kicked = False
            if kicked:  # (out of the except: work this thread runs while parked must not chain to the EINTR)
                if control.interrupted():
                    return
                continue
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
            if self.debugger is not None:
                self.debugger(self, reason)
            return
        if reason == k.KVM_EXIT_SHUTDOWN:
            raise GuestFault("triple fault (KVM_EXIT_SHUTDOWN)", self._report())
        if reason == k.KVM_EXIT_INTERNAL_ERROR:
            if self.debugger is not None and self.debugger(self, reason):
                return  # a debugger's own int3 (PVM hands int3 in guest ring 0 back to the VMM)
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
