"""A debugged VM: stop and resume it, step a vCPU, breakpoints, registers and guest-virtual memory.

All-stop: when one vCPU stops (a breakpoint, the end of a step) it asks for a pause
(RunControl.request_pause, from its own thread) and posts a StopEvent; whoever consumes the event
(the gdb server, or Python code through wait()) takes the "gdb" pause, under which every vCPU is
parked, until resume(). The vCPU layer calls `_on_exit` for KVM_EXIT_DEBUG and internal errors.

How each kind of stop reaches the VMM, on hardware KVM and on the PVM backend (where guest ring 0
is emulated and ring 3 runs natively; see /work/shared/notes/kvm-here.md):

- int3 in ring 0: hardware KVM exits with KVM_EXIT_DEBUG (#BP, KVM_GUESTDBG_USE_SW_BP); PVM
  hands it back as KVM_EXIT_INTERNAL_ERROR with RIP at the int3. Either way RIP is the address.
- int3 in ring 3: hardware KVM exits as above; PVM delivers #BP to the guest's own IDT whatever
  USE_SW_BP says. Its handler runs in (emulated) ring 0, where debug registers work: DR3 sits on
  the handler (the "catch"), and when it fires with an interrupt frame from ring 3 whose int3 is
  ours, the exception is undone: RIP, RSP, RFLAGS, CS and SS are put back from the frame. Until
  the guest has an IDT with a #BP gate, a vCPU with breakpoints set single-steps its ring 0 code
  watching for one (~5000 instructions, ~1-2 s, for the bundled guests' runtime).
- Single step: KVM_GUESTDBG_SINGLESTEP where it works (ring 0: emulated, or hardware); in 64-bit
  ring 3, temporary int3s on every successor of the instruction (pykvm.gdb.stepping), since PVM's
  native ring 3 ignores the trap flag KVM sets.
- Hardware breakpoints: DR0-DR2 (KVM_GUESTDBG_USE_HW_BP); on PVM they fire in ring 0 only.
A vCPU resumed at one of its breakpoints first steps over it silently with the breakpoint lifted.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pykvm.gdb import registers, virtual
from pykvm.gdb.breakpoints import CATCH_SLOT, DR6_SINGLE_STEP, HardwareBreakpoints, SoftwareBreakpoints
from pykvm.gdb.stepping import MAX_INSTRUCTION, successors
from pykvm.internal_errors import complete_internal_error
from pykvm.kvm import KvmError
from pykvm.kvm import constants as k
from pykvm.run_control import Pause

if TYPE_CHECKING:
    from pykvm.vcpu import Vcpu
    from pykvm.vm import Vm

SIGINT, SIGTRAP = 2, 5
DB_VECTOR, BP_VECTOR = 1, 3
EFER_LMA = 1 << 10
GUEST_DEBUG = k.KVM_GUESTDBG_ENABLE | k.KVM_GUESTDBG_USE_SW_BP | k.KVM_GUESTDBG_USE_HW_BP


@dataclass(frozen=True)
class StopEvent:
    """Why the guest stopped: `thread` (vCPU index + 1) with `signal`, or the VM ended (`exit_status`)."""

    thread: int = 0
    signal: int = SIGTRAP
    why: str = ""  # "start", "breakpoint", "hw-breakpoint", "step", "interrupt", "exited"
    exit_status: int | None = None


@dataclass
class _VcpuDebug:
    step: str | None = None  # None, "report" (gdb asked) or "silent" (stepping over a breakpoint)
    single_step: bool = False  # through KVM_GUESTDBG_SINGLESTEP
    temps: list[int] = field(default_factory=list)  # temporary int3s of a step
    lifted: int | None = None  # the breakpoint address this step goes over
    catch_lifted: bool = False  # stepping the guest's #BP handler past the catch
    watch_idt: bool = False  # stepping ring 0 until the guest has a #BP handler to put the catch on


class DebugTarget:
    """The VM held at its first instruction until resume(); see the module's docstring."""

    def __init__(self, vm: Vm) -> None:
        self.vm, self.control = vm, vm.control
        self.software = SoftwareBreakpoints()
        self.hardware = HardwareBreakpoints()
        self._vcpus = [_VcpuDebug() for _ in vm.vcpus]
        self._cond = threading.Condition()
        self._exit_lock = threading.Lock()
        self._events: deque[tuple[StopEvent, Pause | None]] = deque()
        self.wakeup_fd, self._wakeup_writer = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._held: Pause | None = vm.control.pause("gdb")  # before start: vCPUs park at once
        self.stop: StopEvent | None = StopEvent(1, SIGTRAP, "start")
        self.current = 1  # the thread gdb's register and memory requests go to
        self._block_irq = True  # KVM_GUESTDBG_BLOCKIRQ while stepping, where KVM knows it
        for vcpu in vm.vcpus:
            vcpu.debugger = self._on_exit
        self._watcher = threading.Thread(target=self._watch_end, name="gdb-watch", daemon=True)
        self._watcher.start()

    # -- stops -------------------------------------------------------------------------------------

    def wait(self, timeout: float | None = None) -> StopEvent | None:
        """The next stop (the VM paused), or None after `timeout` seconds of running."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._events or self.stop is not None, timeout):
                return None
        return self.poll() or self.stop

    def poll(self) -> StopEvent | None:
        """Settle a posted stop, if any: the VM is paused when this returns it."""
        with self._cond:
            if not self._events:
                return None
            event, hold = self._events.popleft()
        if self._held is None:
            self._held = self.control.pause("gdb")  # every vCPU parked
        if hold is not None:
            self.control.resume(hold)
        self._cancel_steps()
        self.stop = event
        if event.thread:
            self.current = event.thread
        return event

    def interrupt(self) -> StopEvent:
        """Stop the running guest (gdb's Ctrl-C); a breakpoint reached meanwhile wins."""
        if self.stop is not None:
            return self.stop
        if self._held is None:
            self._held = self.control.pause("gdb")
        event = self.poll()
        if event is None:
            self._cancel_steps()
            event = self.stop = StopEvent(self.current, SIGINT, "interrupt")
        return event

    def resume(self, step_thread: int | None = None) -> None:
        """Run every vCPU; `step_thread` (1-based) stops again after one instruction."""
        with self._cond:
            if self._events:  # a stop posted during the last one: report it before running
                self._wake()
                self.stop = None
                return
        for vcpu, state in zip(self.vm.vcpus, self._vcpus):
            stepping = step_thread == vcpu.index + 1
            regs = vcpu.fd.get_regs()
            at_breakpoint = self.software.is_ours(regs.rip) or regs.rip in self.hardware.slots
            if stepping or at_breakpoint:
                self._begin_step(vcpu, state, regs, "report" if stepping else "silent")
            state.watch_idt = bool(self.software.inserted) and self._bp_handler(vcpu) is None
            self._apply(vcpu, state)
        self.stop = None
        held, self._held = self._held, None
        if held is not None:
            self.control.resume(held)

    def _post(self, event: StopEvent, hold: Pause | None) -> None:
        with self._cond:
            self._events.append((event, hold))
            self._cond.notify_all()
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wakeup_writer, b"!")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already (nobody reads it when Python code waits)

    def _report(self, vcpu: Vcpu, why: str) -> bool:
        self._post(StopEvent(vcpu.index + 1, SIGTRAP, why), self.control.request_pause("gdb stop"))
        return True

    def end_posted(self) -> None:
        """Once the VM has stopped: return when its exit event is posted."""
        if self.control.stop_reason is not None:
            self._watcher.join()

    def _watch_end(self) -> None:
        reason = self.vm.wait()
        if reason is not None:
            self._post(StopEvent(0, 0, "exited", reason.status), None)

    # -- the vCPU's exits (on its own thread) -------------------------------------------------------

    def _on_exit(self, vcpu: Vcpu, reason: int) -> bool:
        with self._exit_lock:  # vCPUs share the breakpoint tables
            return self._classify(vcpu, self._vcpus[vcpu.index], reason)

    def _classify(self, vcpu: Vcpu, state: _VcpuDebug, reason: int) -> bool:
        if reason == k.KVM_EXIT_INTERNAL_ERROR:  # PVM: an int3 in ring 0, RIP at it
            rip = vcpu.fd.get_regs().rip
            return self._int3(vcpu, state, rip) if self.software.is_ours(rip) else False
        arch = vcpu.fd.run_struct.debug.arch
        regs = vcpu.fd.get_regs()
        if arch.exception == BP_VECTOR:  # hardware KVM intercepted an int3, RIP at it
            if self.software.is_ours(regs.rip):
                return self._int3(vcpu, state, regs.rip)
            complete_internal_error(vcpu)  # the guest's own int3: deliver its #BP
            return True
        if state.catch_lifted and arch.dr6 & DR6_SINGLE_STEP:  # past the catch: arm it again
            state.catch_lifted = state.single_step = False
            self._apply(vcpu, state)
            return True
        if state.single_step and arch.dr6 & DR6_SINGLE_STEP:
            return self._step_done(vcpu, state)
        if arch.dr6 >> CATCH_SLOT & 1 and not state.catch_lifted:
            return self._caught(vcpu, state, regs)
        if self.hardware.hit(arch.dr6) is not None:
            return self._report(vcpu, "hw-breakpoint")
        if state.watch_idt and arch.dr6 & DR6_SINGLE_STEP:
            if self._bp_handler(vcpu) is not None:  # the guest loaded its IDT: catch, stop stepping
                state.watch_idt = False
                self._apply(vcpu, state)
            return True
        return True  # a stale trap (a step or breakpoint cancelled by a stop): run on

    def _int3(self, vcpu: Vcpu, state: _VcpuDebug, address: int) -> bool:
        if address in state.temps:
            return self._step_done(vcpu, state)
        if self.software.owned_by(address, "gdb"):
            return self._report(vcpu, "breakpoint")
        # Another vCPU's temporary breakpoint: step this one over it, unseen.
        if state.step is None:
            self._begin_step(vcpu, state, vcpu.fd.get_regs(), "silent")
            self._apply(vcpu, state)
        return True

    def _caught(self, vcpu: Vcpu, state: _VcpuDebug, regs) -> bool:
        """DR3 fired on the guest's #BP handler: undo the exception if its int3 was ours."""
        try:
            frame = [virtual.read_u64(vcpu, regs.rsp + 8 * i) for i in range(5)]  # rip cs rflags rsp ss
        except virtual.MemoryFault:
            frame = [0] * 5
        rip, cs, rflags, rsp, ss = frame
        if cs & 3 == 3 and self.software.is_ours(rip - 1):
            sregs = vcpu.fd.get_sregs()
            sregs.cs = virtual.segment_from_gdt(vcpu, sregs.gdt.base, cs)
            sregs.ss = virtual.segment_from_gdt(vcpu, sregs.gdt.base, ss)
            regs.rip, regs.rflags, regs.rsp = rip - 1, rflags, rsp
            vcpu.fd.set_sregs(sregs)
            vcpu.fd.set_regs(regs)
            return self._int3(vcpu, state, rip - 1)
        # The guest's own breakpoint: let its handler run, stepping past the catch first.
        state.catch_lifted = state.single_step = True
        self._apply(vcpu, state)
        return True

    def _step_done(self, vcpu: Vcpu, state: _VcpuDebug) -> bool:
        kind = state.step
        self._end_step(vcpu, state)
        self._apply(vcpu, state)
        if kind == "report":
            return self._report(vcpu, "step")
        return True

    # -- stepping ----------------------------------------------------------------------------------

    def _begin_step(self, vcpu: Vcpu, state: _VcpuDebug, regs, kind: str) -> None:
        state.step = kind
        if self.software.lift(vcpu, regs.rip) or regs.rip in self.hardware.slots:
            state.lifted = regs.rip
        sregs = vcpu.fd.get_sregs()
        if sregs.cs.dpl == 0 or not sregs.efer & EFER_LMA or not sregs.cs.l:
            state.single_step = True
            return
        code = b""
        for length in (MAX_INSTRUCTION, 0x1000 - (regs.rip & 0xFFF)):  # the page's end may be near
            try:
                code = virtual.read(vcpu, regs.rip, min(length, MAX_INSTRUCTION))
                break
            except virtual.MemoryFault:
                continue
        owner = ("step", vcpu.index)
        for address in successors(code, regs, lambda at: virtual.read_u64(vcpu, at)):
            self.software.add(vcpu, address, owner)
            state.temps.append(address)

    def _end_step(self, vcpu: Vcpu, state: _VcpuDebug) -> None:
        for address in state.temps:
            self.software.discard(vcpu, address, ("step", vcpu.index))
        if state.lifted is not None:
            self.software.drop(vcpu, state.lifted)
        state.temps, state.lifted, state.step = [], None, None
        state.single_step = state.catch_lifted = False

    def _cancel_steps(self) -> None:
        for vcpu, state in zip(self.vm.vcpus, self._vcpus):
            if state.step is not None or state.single_step or state.watch_idt:
                self._end_step(vcpu, state)
                state.watch_idt = False
                self._apply(vcpu, state)

    def _apply(self, vcpu: Vcpu, state: _VcpuDebug) -> None:
        """KVM_SET_GUEST_DEBUG for this vCPU's breakpoints, catch and step."""
        control = GUEST_DEBUG
        if state.single_step or state.watch_idt:
            control |= k.KVM_GUESTDBG_SINGLESTEP | (k.KVM_GUESTDBG_BLOCKIRQ if self._block_irq else 0)
        catch = None if state.catch_lifted or not self.software.inserted else self._bp_handler(vcpu)
        debugregs = self.hardware.debugregs(skip=state.lifted, catch=catch)
        try:
            vcpu.fd.set_guest_debug(control, debugregs)
        except KvmError:
            if not control & k.KVM_GUESTDBG_BLOCKIRQ:
                raise
            self._block_irq = False  # an older KVM: steps may enter interrupt handlers
            vcpu.fd.set_guest_debug(control & ~k.KVM_GUESTDBG_BLOCKIRQ, debugregs)

    @staticmethod
    def _bp_handler(vcpu: Vcpu) -> int | None:
        """The address of the guest's #BP handler (64-bit IDT gate 3), if it has one."""
        sregs = vcpu.fd.get_sregs()
        if not sregs.efer & EFER_LMA or sregs.idt.limit < 16 * (BP_VECTOR + 1) - 1:
            return None
        try:
            gate = virtual.read(vcpu, sregs.idt.base + 16 * BP_VECTOR, 16)
        except virtual.MemoryFault:
            return None
        low, high = int.from_bytes(gate[:8], "little"), int.from_bytes(gate[8:], "little")
        if not low >> 47 & 1:  # not present
            return None
        return (low & 0xFFFF) | ((low >> 48) & 0xFFFF) << 16 | (high & 0xFFFF_FFFF) << 32

    # -- inspection (paused) ------------------------------------------------------------------------

    def vcpu(self, thread: int | None = None) -> Vcpu:
        thread = self.current if thread in (None, 0, -1) else thread
        if not 1 <= thread <= len(self.vm.vcpus):
            raise LookupError(f"no thread {thread}: the guest has vCPUs 1 to {len(self.vm.vcpus)}")
        return self.vm.vcpus[thread - 1]

    @property
    def threads(self) -> list[int]:
        return [vcpu.index + 1 for vcpu in self.vm.vcpus]

    def read_registers(self, thread: int | None = None) -> list[int]:
        return registers.read_all(self.vcpu(thread).fd)

    def write_registers(self, changes: dict[int, int], thread: int | None = None) -> None:
        registers.write(self.vcpu(thread).fd, changes)

    def read_memory(self, address: int, length: int, thread: int | None = None) -> bytes:
        """Guest-virtual memory as the program sees it: our int3s show their original bytes."""
        return self.software.mask(address, virtual.read(self.vcpu(thread), address, length))

    def write_memory(self, address: int, data: bytes, thread: int | None = None) -> None:
        vcpu = self.vcpu(thread)
        virtual.write(vcpu, address, data)
        for at, entry in self.software.inserted.items():  # a write over our int3 changes what it hides
            if address <= at < address + len(data):
                entry.original = data[at - address: at - address + 1]
                if not entry.lifted:
                    virtual.write(vcpu, at, b"\xcc")

    # -- breakpoints ---------------------------------------------------------------------------------

    def insert_breakpoint(self, address: int, *, hardware: bool = False) -> None:
        if hardware:
            self.hardware.add(address)
        else:
            self.software.add(self.vcpu(), address, "gdb")

    def remove_breakpoint(self, address: int, *, hardware: bool = False) -> None:
        if hardware:
            self.hardware.discard(address)
        else:
            self.software.discard(self.vcpu(), address, "gdb")

    # -- the end ---------------------------------------------------------------------------------------

    def detach(self) -> None:
        """Take every breakpoint out and let the guest run on, undebugged."""
        if self.stop is None:
            self.interrupt()
        self._cancel_steps()
        self.software.clear(self.vcpu())
        self.hardware = HardwareBreakpoints()
        for vcpu in self.vm.vcpus:
            vcpu.fd.set_guest_debug(0)
        self.stop = None
        held, self._held = self._held, None
        if held is not None:
            self.control.resume(held)

    def kill(self) -> None:
        self.vm.stop(0, "killed from the debugger")
        if self._held is not None:
            self.control.resume(self._held)
            self._held = None

    def close(self) -> None:
        for vcpu in self.vm.vcpus:
            vcpu.debugger = None
        os.close(self.wakeup_fd)
        os.close(self._wakeup_writer)
