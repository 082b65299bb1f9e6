"""A virtual machine: the KVM VM fd, guest RAM, the I/O bus, the in-kernel PC chips and the vCPUs.

A Vm knows nothing of particular devices or boot formats; the machine layer (pykvm.machine)
places devices on its bus and loads an image into its memory. What it does own is the life cycle:
start the vCPU threads, pause and resume them all (see RunControl), stop, and close.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from pykvm.bus import IoBus
from pykvm.devices.platform import IoeventfdUnavailable
from pykvm.errors import ConfigError
from pykvm.kvm import Kvm, KvmError
from pykvm.kvm import constants as k
from pykvm.kvm.structs import KvmClockData, KvmIrqchip, KvmPitState2
from pykvm.memory import GuestMemory, MemorySlot
from pykvm.state import StateError
from pykvm.run_control import KICK_SIGNAL, Pause, RunControl, RunState, StopKind, StopReason
from pykvm.vcpu import Vcpu
from pykvm.vcpu_state import VcpuState, uapi_struct

if TYPE_CHECKING:
    import numpy as np

# KVM needs three pages for the real-mode TSS and one for the EPT identity map on Intel; both sit
# just below the BIOS area at the top of the 4 GiB space, inside the MMIO hole (as in QEMU).
TSS_ADDRESS = 0xFFFB_D000
IDENTITY_MAP_ADDRESS = 0xFFFB_C000
IRQCHIPS = (k.KVM_IRQCHIP_PIC_MASTER, k.KVM_IRQCHIP_PIC_SLAVE, k.KVM_IRQCHIP_IOAPIC)


@dataclass
class VmState:
    """The VM-wide state KVM keeps: interrupt controllers, PIT, kvmclock, and every vCPU."""

    irqchips: list[bytes]  # PIC master, PIC slave, IOAPIC (struct kvm_irqchip)
    pit: bytes  # struct kvm_pit_state2
    clock: bytes  # struct kvm_clock_data
    vcpus: list[VcpuState]


class Vm:
    def __init__(self, memory_size: int, cpus: int = 1, *, kvm: Kvm | None = None, shared_memory: bool = False,
                 memory: GuestMemory | None = None) -> None:
        self.kvm = kvm or Kvm()
        self._own_kvm = kvm is None
        max_vcpus = self.kvm.check_extension(k.KVM_CAP_MAX_VCPUS) or self.kvm.check_extension(k.KVM_CAP_NR_VCPUS) or 1
        if not 1 <= cpus <= max_vcpus:
            raise ConfigError(f"--cpus {cpus}: KVM on this host allows 1 to {max_vcpus} vCPUs")
        self.fd = self.kvm.create_vm()
        self.fd.set_tss_address(TSS_ADDRESS)
        self.fd.set_identity_map_address(IDENTITY_MAP_ADDRESS)
        self.fd.create_irqchip()  # PIC + IOAPIC + per-vCPU LAPICs, before any vCPU exists
        # SPEAKER_DUMMY is what makes KVM serve port 0x61 (PIT channel 2 gate and output, which
        # guests use to calibrate the TSC); without it those accesses would exit to us.
        self.fd.create_pit2(k.KVM_PIT_SPEAKER_DUMMY)
        self.memory = memory if memory is not None else GuestMemory(memory_size, shared=shared_memory)
        self.memory.tracking = False  # until set_dirty_logging: no dirty log is kept, nobody harvests it
        self._dirty_logs: dict[int, np.ndarray] = {}  # slot -> the bitmap dirty_bitmap fills
        for slot in self.memory.slots:
            self.fd.set_user_memory_region(slot.index, slot.guest_addr, slot.size, slot.host_addr)
        self.bus = IoBus()
        self.control = RunControl()
        cpuid = self.kvm.supported_cpuid()
        mmap_size = self.kvm.vcpu_mmap_size()
        self.vcpus = [
            Vcpu(self.fd.create_vcpu(i, mmap_size), i, self.bus, self.memory, self.control, cpuid, [])
            for i in range(cpus)
        ]
        msrs = _saveable_msrs(self.kvm, self.vcpus[0])
        for vcpu in self.vcpus:
            vcpu.msr_indices = msrs
        self._irq_lock = threading.Lock()

    @property
    def state(self) -> RunState:
        return self.control.state

    def irq_line(self, irq: int, level: bool) -> None:
        """Drive an interrupt line of the in-kernel PIC/IOAPIC (GSI `irq`)."""
        with self._irq_lock:
            self.fd.irq_line(irq, 1 if level else 0)

    def set_level_triggered(self, irqs: tuple[int, ...]) -> None:
        """Mark ISA IRQs level-triggered in the PICs' ELCR registers, as PC firmware leaves the
        ones it routes PCI INTx to (a shared, level-triggered line)."""
        for chip, base in ((k.KVM_IRQCHIP_PIC_MASTER, 0), (k.KVM_IRQCHIP_PIC_SLAVE, 8)):
            state = self.fd.get_irqchip(chip)
            state.chip.pic.elcr |= sum(1 << (irq - base) for irq in irqs if base <= irq < base + 8)
            self.fd.set_irqchip(state)

    # -- dirty page tracking ------------------------------------------------------------------------

    def set_dirty_logging(self, enabled: bool) -> None:
        """Have KVM track guest writes per page (migration, FT), and GuestMemory the VMM's own
        writes (only while a log is kept); dirty_bitmap() merges both."""
        flags = k.KVM_MEM_LOG_DIRTY_PAGES if enabled else 0
        for slot in self.memory.slots:
            self.fd.set_user_memory_region(slot.index, slot.guest_addr, slot.size, slot.host_addr, flags)
        self.memory.tracking = enabled  # before the bitmap is cleared: a write marked after it counts
        for slot in self.memory.slots:
            self.memory.take_dirty(slot)  # what happened before now is not "since the last look"

    def dirty_bitmap(self, slot: MemorySlot) -> np.ndarray:
        """Pages written since the last call (by vCPUs or the VMM), as a u64 bitmap; KVM
        re-protects the pages as it reports them, so each write is reported once. The bitmap is
        the slot's own, filled again by the next call: a new one each time made an FT pause
        ~50 µs longer here (its pages faulted in, zeroed, and the VMM's bits copied apart). Copy
        what must outlive the next call."""
        import numpy as np  # only migration and FT ask: a plain run never loads numpy

        bitmap = self._dirty_logs.get(slot.index)
        if bitmap is None:
            bitmap = self._dirty_logs[slot.index] = np.zeros_like(slot.dirty)
        self.fd.get_dirty_log(slot.index, bitmap)  # every word of it
        self.memory.take_dirty_into(slot, bitmap)
        return bitmap

    # -- state (paused VM only) --------------------------------------------------------------------

    def save_state(self) -> VmState:
        return VmState(
            irqchips=[bytes(self.fd.get_irqchip(chip)) for chip in IRQCHIPS],
            pit=bytes(self.fd.get_pit2()),
            clock=bytes(self.fd.get_clock()),
            vcpus=[vcpu.save_state() for vcpu in self.vcpus],
        )

    def restore_state(self, state: VmState) -> None:
        """Into a VM created with the same configuration, before it starts (or while paused)."""
        if len(state.vcpus) != len(self.vcpus) or len(state.irqchips) != len(IRQCHIPS):
            raise StateError(f"state has {len(state.vcpus)} vCPUs, this VM {len(self.vcpus)}")
        clock = uapi_struct(KvmClockData, state.clock)
        clock.flags = 0  # only the value is settable; the flags describe how it was read
        self.fd.set_clock(clock)
        for blob in state.irqchips:
            self.fd.set_irqchip(uapi_struct(KvmIrqchip, blob))
        self.fd.set_pit2(uapi_struct(KvmPitState2, state.pit))
        for vcpu, vcpu_state in zip(self.vcpus, state.vcpus):
            vcpu.restore_state(vcpu_state)

    # -- life cycle --------------------------------------------------------------------------------

    def start(self) -> None:
        _install_kick_handler()
        for vcpu in self.vcpus:
            vcpu.start()

    def pause(self, owner: str) -> Pause:
        """Hold all vCPUs stopped for `owner`; returns once each is outside KVM_RUN with its pending
        I/O completed. They run again when every holder has resumed (see RunControl)."""
        return self.control.pause(owner)

    def resume(self, hold: Pause) -> None:
        self.control.resume(hold)

    def paused(self, owner: str) -> contextlib.AbstractContextManager[Pause]:
        return self.control.paused(owner)

    def run_paused(self, owner: str, work: Callable[[], Any]) -> tuple[Any, Pause]:
        """`work()` with every vCPU parked, on the thread of the vCPU that parks last, which then
        runs on at once (see RunControl.run_paused); its result, and the pause."""
        return self.control.run_paused(owner, work)

    def stop(self, status: int, reason: str, report: str = "", kind: StopKind = StopKind.ENDED) -> None:
        """Stop the VM for good; callable from any thread, including a vCPU's own device handler."""
        self.control.stop(StopReason(status, reason, report, kind))

    def wait(self, timeout: float | None = None) -> StopReason | None:
        """Wait for every vCPU thread to leave; returns why the VM stopped (None on timeout)."""
        return self.control.wait_stopped(timeout)

    def run(self) -> StopReason:
        self.start()
        reason = self.wait()
        assert reason is not None
        return reason

    def close(self) -> None:
        if self.control.state is not RunState.STOPPED:
            self.stop(0, "closed")
        self.wait()
        for vcpu in self.vcpus:
            if vcpu.thread is not None:
                vcpu.thread.join()
            vcpu.close()
        self.fd.close()
        self.memory.close()
        if self._own_kvm:
            self.kvm.close()

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class VmPlatform:
    """The Vm as devices see it (pykvm.devices.platform.Platform): its I/O bus and memory,
    interrupt lines, MSI delivery and ioeventfds, and nothing else."""

    def __init__(self, vm: Vm) -> None:
        self.bus, self.memory = vm.bus, vm.memory
        self.irq_line = vm.irq_line
        self._fd = vm.fd

    def signal_msi(self, address: int, data: int) -> None:
        self._fd.signal_msi(address, data)

    def register_ioeventfd(self, fd: int, address: int, length: int, *, pio: bool,
                           datamatch: int | None = None) -> None:
        try:
            self._fd.register_ioeventfd(fd, address, length, pio=pio, datamatch=datamatch)
        except KvmError as error:
            raise IoeventfdUnavailable(str(error)) from None

    def unregister_ioeventfd(self, fd: int, address: int, length: int, *, pio: bool,
                             datamatch: int | None = None) -> None:
        self._fd.unregister_ioeventfd(fd, address, length, pio=pio, datamatch=datamatch)


def _saveable_msrs(kvm: Kvm, vcpu: Vcpu) -> list[int]:
    """The MSRs KVM lists for save/restore, less any this vCPU cannot read back."""
    indices = kvm.msr_index_list()
    try:
        vcpu.fd.get_msrs(indices)
        return indices
    except KvmError:
        readable = []
        for index in indices:
            try:
                vcpu.fd.get_msrs([index])
            except KvmError:
                continue
            readable.append(index)
        return readable


def _install_kick_handler() -> None:
    """KICK_SIGNAL must have a handler (any handler) so that it interrupts KVM_RUN with EINTR.
    SIG_DFL would kill the process and SIG_IGN would discard the signal."""
    current = signal.getsignal(KICK_SIGNAL)
    if callable(current):
        return
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError(f"install a handler for {KICK_SIGNAL.name} from the main thread before starting a VM")
    signal.signal(KICK_SIGNAL, _ignore_kick)


def _ignore_kick(signum: int, frame: object) -> None:
    """The kick's only job is to interrupt KVM_RUN; nothing to do here."""
