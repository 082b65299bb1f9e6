"""ctypes mirrors of the KVM x86-64 uAPI structures (<linux/kvm.h>, <asm/kvm.h>).

Layouts match the C headers byte for byte; tests/test_kvm_uapi.py checks every
field's offset, size and signedness against the installed headers with gcc.
Field names follow C, so ``run.io.port`` reads like the C code it replaces.
Anonymous C unions become ctypes ``_anonymous_`` members (named ``_u*``), so
their fields are reached directly, as in C.

C ``char`` arrays (lapic regs, padding) are declared as ``c_uint8`` arrays so
that indexing yields ints, not 1-byte strings; the layout is the same.

Structures whose C definition ends in a flexible array member (kvm_msrs,
kvm_msr_list, kvm_cpuid2, kvm_irq_routing) are built by factories that return
a fixed-size type for n entries: ``msrs_type(n)`` etc.
"""

from __future__ import annotations

import functools
from ctypes import (
    Structure,
    Union,
    c_int32,
    c_int64,
    c_uint8,
    c_uint16,
    c_uint32,
    c_uint64,
    c_void_p,
    sizeof,
)

from .constants import (
    KVM_APIC_REG_SIZE,
    KVM_IOAPIC_NUM_PINS,
    KVM_MAX_XCRS,
    KVM_NR_INTERRUPTS,
)

__all__ = [
    # <asm/kvm.h> (x86)
    "KvmPicState",
    "KvmIoapicState",
    "KvmRegs",
    "KvmLapicState",
    "KvmSegment",
    "KvmDtable",
    "KvmSregs",
    "KvmFpu",
    "KvmMsrEntry",
    "msrs_type",
    "msr_list_type",
    "KvmCpuidEntry2",
    "cpuid2_type",
    "KvmPitChannelState",
    "KvmDebugExitArch",
    "KvmGuestDebugArch",
    "KvmPitState2",
    "KvmReinjectControl",
    "KvmVcpuEventsException",
    "KvmVcpuEventsInterrupt",
    "KvmVcpuEventsNmi",
    "KvmVcpuEventsSmi",
    "KvmVcpuEventsTripleFault",
    "KvmVcpuEvents",
    "KvmDebugregs",
    "KvmXsave",
    "KvmXcr",
    "KvmXcrs",
    "KvmSyncRegs",
    # <linux/kvm.h>
    "KvmUserspaceMemoryRegion",
    "KvmIrqLevel",
    "KvmIrqchipUnion",
    "KvmIrqchip",
    "KvmPitConfig",
    "KvmRunHw",
    "KvmRunFailEntry",
    "KvmRunEx",
    "KvmRunIo",
    "KvmRunDebug",
    "KvmRunMmio",
    "KvmRunHypercall",
    "KvmRunTprAccess",
    "KvmRunInternal",
    "KvmRunEmulationFailure",
    "KvmRunSystemEvent",
    "KvmRunEoi",
    "KvmRunMsr",
    "KvmRunNotify",
    "KvmRunExit",
    "KvmRunSyncRegs",
    "KvmRun",
    "KvmTranslation",
    "KvmDirtyLog",
    "KvmClearDirtyLog",
    "KvmSignalMask",
    "KvmMpState",
    "KvmGuestDebug",
    "KvmIoeventfd",
    "KvmEnableCap",
    "KvmIrqRoutingIrqchip",
    "KvmIrqRoutingMsi",
    "KvmIrqRoutingS390Adapter",
    "KvmIrqRoutingHvSint",
    "KvmIrqRoutingXenEvtchn",
    "KvmIrqRoutingEntryUnion",
    "KvmIrqRoutingEntry",
    "irq_routing_type",
    "KvmIrqfd",
    "KvmClockData",
    "KvmMsi",
    "KvmDirtyGfn",
]


# ---------------------------------------------------------------------------
# <asm/kvm.h> (x86), in header order
# ---------------------------------------------------------------------------


class KvmPicState(Structure):
    """struct kvm_pic_state (one 8259; KVM_GET/SET_IRQCHIP)."""

    _fields_ = [
        ("last_irr", c_uint8),
        ("irr", c_uint8),
        ("imr", c_uint8),
        ("isr", c_uint8),
        ("priority_add", c_uint8),
        ("irq_base", c_uint8),
        ("read_reg_select", c_uint8),
        ("poll", c_uint8),
        ("special_mask", c_uint8),
        ("init_state", c_uint8),
        ("auto_eoi", c_uint8),
        ("rotate_on_auto_eoi", c_uint8),
        ("special_fully_nested_mode", c_uint8),
        ("init4", c_uint8),
        ("elcr", c_uint8),
        ("elcr_mask", c_uint8),
    ]


class KvmIoapicState(Structure):
    """struct kvm_ioapic_state.

    ``redirtbl`` entries are the raw 64-bit redirection entries (the C union's
    ``bits`` view); decode the bit fields yourself if needed.
    """

    _fields_ = [
        ("base_address", c_uint64),
        ("ioregsel", c_uint32),
        ("id", c_uint32),
        ("irr", c_uint32),
        ("pad", c_uint32),
        ("redirtbl", c_uint64 * KVM_IOAPIC_NUM_PINS),
    ]


class KvmRegs(Structure):
    """struct kvm_regs (KVM_GET/SET_REGS)."""

    _fields_ = [
        (name, c_uint64)
        for name in (
            "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
            "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
            "rip", "rflags",
        )
    ]


class KvmLapicState(Structure):
    """struct kvm_lapic_state: the 1 KiB APIC register page (KVM_GET/SET_LAPIC)."""

    _fields_ = [("regs", c_uint8 * KVM_APIC_REG_SIZE)]


class KvmSegment(Structure):
    """struct kvm_segment."""

    _fields_ = [
        ("base", c_uint64),
        ("limit", c_uint32),
        ("selector", c_uint16),
        ("type", c_uint8),
        ("present", c_uint8),
        ("dpl", c_uint8),
        ("db", c_uint8),
        ("s", c_uint8),
        ("l", c_uint8),
        ("g", c_uint8),
        ("avl", c_uint8),
        ("unusable", c_uint8),
        ("padding", c_uint8),
    ]


class KvmDtable(Structure):
    """struct kvm_dtable (GDTR/IDTR)."""

    _fields_ = [
        ("base", c_uint64),
        ("limit", c_uint16),
        ("padding", c_uint16 * 3),
    ]


class KvmSregs(Structure):
    """struct kvm_sregs (KVM_GET/SET_SREGS)."""

    _fields_ = [
        ("cs", KvmSegment),
        ("ds", KvmSegment),
        ("es", KvmSegment),
        ("fs", KvmSegment),
        ("gs", KvmSegment),
        ("ss", KvmSegment),
        ("tr", KvmSegment),
        ("ldt", KvmSegment),
        ("gdt", KvmDtable),
        ("idt", KvmDtable),
        ("cr0", c_uint64),
        ("cr2", c_uint64),
        ("cr3", c_uint64),
        ("cr4", c_uint64),
        ("cr8", c_uint64),
        ("efer", c_uint64),
        ("apic_base", c_uint64),
        ("interrupt_bitmap", c_uint64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class KvmFpu(Structure):
    """struct kvm_fpu (KVM_GET/SET_FPU; prefer XSAVE, see notes)."""

    _fields_ = [
        ("fpr", (c_uint8 * 16) * 8),
        ("fcw", c_uint16),
        ("fsw", c_uint16),
        ("ftwx", c_uint8),
        ("pad1", c_uint8),
        ("last_opcode", c_uint16),
        ("last_ip", c_uint64),
        ("last_dp", c_uint64),
        ("xmm", (c_uint8 * 16) * 16),
        ("mxcsr", c_uint32),
        ("pad2", c_uint32),
    ]


class KvmMsrEntry(Structure):
    """struct kvm_msr_entry."""

    _fields_ = [
        ("index", c_uint32),
        ("reserved", c_uint32),
        ("data", c_uint64),
    ]


@functools.lru_cache(maxsize=None)
def msrs_type(n: int) -> type[Structure]:
    """struct kvm_msrs with room for ``n`` entries (KVM_GET/SET_MSRS)."""
    return type(
        f"KvmMsrs_{n}",
        (Structure,),
        {
            "_fields_": [
                ("nmsrs", c_uint32),
                ("pad", c_uint32),
                ("entries", KvmMsrEntry * n),
            ]
        },
    )


@functools.lru_cache(maxsize=None)
def msr_list_type(n: int) -> type[Structure]:
    """struct kvm_msr_list with room for ``n`` indices (KVM_GET_MSR_INDEX_LIST)."""
    return type(
        f"KvmMsrList_{n}",
        (Structure,),
        {"_fields_": [("nmsrs", c_uint32), ("indices", c_uint32 * n)]},
    )


class KvmCpuidEntry2(Structure):
    """struct kvm_cpuid_entry2."""

    _fields_ = [
        ("function", c_uint32),
        ("index", c_uint32),
        ("flags", c_uint32),
        ("eax", c_uint32),
        ("ebx", c_uint32),
        ("ecx", c_uint32),
        ("edx", c_uint32),
        ("padding", c_uint32 * 3),
    ]


@functools.lru_cache(maxsize=None)
def cpuid2_type(n: int) -> type[Structure]:
    """struct kvm_cpuid2 with room for ``n`` entries."""
    return type(
        f"KvmCpuid2_{n}",
        (Structure,),
        {
            "_fields_": [
                ("nent", c_uint32),
                ("padding", c_uint32),
                ("entries", KvmCpuidEntry2 * n),
            ]
        },
    )


class KvmPitChannelState(Structure):
    """struct kvm_pit_channel_state (one i8254 channel)."""

    _fields_ = [
        ("count", c_uint32),  # can be 65536
        ("latched_count", c_uint16),
        ("count_latched", c_uint8),
        ("status_latched", c_uint8),
        ("status", c_uint8),
        ("read_state", c_uint8),
        ("write_state", c_uint8),
        ("write_latch", c_uint8),
        ("rw_mode", c_uint8),
        ("mode", c_uint8),
        ("bcd", c_uint8),
        ("gate", c_uint8),
        ("count_load_time", c_int64),
    ]


class KvmDebugExitArch(Structure):
    """struct kvm_debug_exit_arch (run.debug.arch)."""

    _fields_ = [
        ("exception", c_uint32),
        ("pad", c_uint32),
        ("pc", c_uint64),
        ("dr6", c_uint64),
        ("dr7", c_uint64),
    ]


class KvmGuestDebugArch(Structure):
    """struct kvm_guest_debug_arch."""

    _fields_ = [("debugreg", c_uint64 * 8)]


class KvmPitState2(Structure):
    """struct kvm_pit_state2 (KVM_GET/SET_PIT2)."""

    _fields_ = [
        ("channels", KvmPitChannelState * 3),
        ("flags", c_uint32),
        ("reserved", c_uint32 * 9),
    ]


class KvmReinjectControl(Structure):
    """struct kvm_reinject_control (KVM_REINJECT_CONTROL)."""

    _fields_ = [
        ("pit_reinject", c_uint8),
        ("reserved", c_uint8 * 31),
    ]


class KvmVcpuEventsException(Structure):
    """kvm_vcpu_events.exception."""

    _fields_ = [
        ("injected", c_uint8),
        ("nr", c_uint8),
        ("has_error_code", c_uint8),
        ("pending", c_uint8),
        ("error_code", c_uint32),
    ]


class KvmVcpuEventsInterrupt(Structure):
    """kvm_vcpu_events.interrupt."""

    _fields_ = [
        ("injected", c_uint8),
        ("nr", c_uint8),
        ("soft", c_uint8),
        ("shadow", c_uint8),
    ]


class KvmVcpuEventsNmi(Structure):
    """kvm_vcpu_events.nmi."""

    _fields_ = [
        ("injected", c_uint8),
        ("pending", c_uint8),
        ("masked", c_uint8),
        ("pad", c_uint8),
    ]


class KvmVcpuEventsSmi(Structure):
    """kvm_vcpu_events.smi."""

    _fields_ = [
        ("smm", c_uint8),
        ("pending", c_uint8),
        ("smm_inside_nmi", c_uint8),
        ("latched_init", c_uint8),
    ]


class KvmVcpuEventsTripleFault(Structure):
    """kvm_vcpu_events.triple_fault."""

    _fields_ = [("pending", c_uint8)]


class KvmVcpuEvents(Structure):
    """struct kvm_vcpu_events (KVM_GET/SET_VCPU_EVENTS)."""

    _fields_ = [
        ("exception", KvmVcpuEventsException),
        ("interrupt", KvmVcpuEventsInterrupt),
        ("nmi", KvmVcpuEventsNmi),
        ("sipi_vector", c_uint32),
        ("flags", c_uint32),
        ("smi", KvmVcpuEventsSmi),
        ("triple_fault", KvmVcpuEventsTripleFault),
        ("reserved", c_uint8 * 26),
        ("exception_has_payload", c_uint8),
        ("exception_payload", c_uint64),
    ]


class KvmDebugregs(Structure):
    """struct kvm_debugregs (KVM_GET/SET_DEBUGREGS)."""

    _fields_ = [
        ("db", c_uint64 * 4),
        ("dr6", c_uint64),
        ("dr7", c_uint64),
        ("flags", c_uint64),
        ("reserved", c_uint64 * 9),
    ]


class KvmXsave(Structure):
    """struct kvm_xsave: the 4 KiB XSAVE area (KVM_GET/SET_XSAVE).

    The C struct ends in a flexible ``extra[]`` used only by KVM_GET_XSAVE2
    when KVM_CAP_XSAVE2 reports more than 4096 bytes; it is not mirrored.
    """

    _fields_ = [("region", c_uint32 * 1024)]


class KvmXcr(Structure):
    """struct kvm_xcr."""

    _fields_ = [
        ("xcr", c_uint32),
        ("reserved", c_uint32),
        ("value", c_uint64),
    ]


class KvmXcrs(Structure):
    """struct kvm_xcrs (KVM_GET/SET_XCRS)."""

    _fields_ = [
        ("nr_xcrs", c_uint32),
        ("flags", c_uint32),
        ("xcrs", KvmXcr * KVM_MAX_XCRS),
        ("padding", c_uint64 * 16),
    ]


class KvmSyncRegs(Structure):
    """struct kvm_sync_regs (run.s.regs, with KVM_CAP_SYNC_REGS)."""

    _fields_ = [
        ("regs", KvmRegs),
        ("sregs", KvmSregs),
        ("events", KvmVcpuEvents),
    ]


# ---------------------------------------------------------------------------
# <linux/kvm.h>, in header order
# ---------------------------------------------------------------------------


class KvmUserspaceMemoryRegion(Structure):
    """struct kvm_userspace_memory_region (KVM_SET_USER_MEMORY_REGION)."""

    _fields_ = [
        ("slot", c_uint32),
        ("flags", c_uint32),
        ("guest_phys_addr", c_uint64),
        ("memory_size", c_uint64),  # bytes
        ("userspace_addr", c_uint64),
    ]


class _KvmIrqLevelUnion(Union):
    _fields_ = [("irq", c_uint32), ("status", c_int32)]


class KvmIrqLevel(Structure):
    """struct kvm_irq_level (KVM_IRQ_LINE[_STATUS]): ``irq`` in, ``status`` out."""

    _anonymous_ = ("_u",)
    _fields_ = [("_u", _KvmIrqLevelUnion), ("level", c_uint32)]


class KvmIrqchipUnion(Union):
    """kvm_irqchip.chip: PIC or IOAPIC state, padded to 512 bytes."""

    _fields_ = [
        ("dummy", c_uint8 * 512),
        ("pic", KvmPicState),
        ("ioapic", KvmIoapicState),
    ]


class KvmIrqchip(Structure):
    """struct kvm_irqchip (KVM_GET/SET_IRQCHIP); ``chip_id`` is KVM_IRQCHIP_*."""

    _fields_ = [
        ("chip_id", c_uint32),
        ("pad", c_uint32),
        ("chip", KvmIrqchipUnion),
    ]


class KvmPitConfig(Structure):
    """struct kvm_pit_config (KVM_CREATE_PIT2)."""

    _fields_ = [("flags", c_uint32), ("pad", c_uint32 * 15)]


# -- struct kvm_run and the members of its exit-reason union -----------------


class KvmRunHw(Structure):
    """run.hw (KVM_EXIT_UNKNOWN)."""

    _fields_ = [("hardware_exit_reason", c_uint64)]


class KvmRunFailEntry(Structure):
    """run.fail_entry (KVM_EXIT_FAIL_ENTRY)."""

    _fields_ = [("hardware_entry_failure_reason", c_uint64), ("cpu", c_uint32)]


class KvmRunEx(Structure):
    """run.ex (KVM_EXIT_EXCEPTION)."""

    _fields_ = [("exception", c_uint32), ("error_code", c_uint32)]


class KvmRunIo(Structure):
    """run.io (KVM_EXIT_IO); data lives at run + data_offset, count * size bytes."""

    _fields_ = [
        ("direction", c_uint8),  # KVM_EXIT_IO_IN / KVM_EXIT_IO_OUT
        ("size", c_uint8),  # bytes
        ("port", c_uint16),
        ("count", c_uint32),
        ("data_offset", c_uint64),  # relative to the start of kvm_run
    ]


class KvmRunDebug(Structure):
    """run.debug (KVM_EXIT_DEBUG)."""

    _fields_ = [("arch", KvmDebugExitArch)]


class KvmRunMmio(Structure):
    """run.mmio (KVM_EXIT_MMIO)."""

    _fields_ = [
        ("phys_addr", c_uint64),
        ("data", c_uint8 * 8),
        ("len", c_uint32),
        ("is_write", c_uint8),
    ]


class KvmRunHypercall(Structure):
    """run.hypercall (KVM_EXIT_HYPERCALL)."""

    _fields_ = [
        ("nr", c_uint64),
        ("args", c_uint64 * 6),
        ("ret", c_uint64),
        ("longmode", c_uint32),
        ("pad", c_uint32),
    ]


class KvmRunTprAccess(Structure):
    """run.tpr_access (KVM_EXIT_TPR_ACCESS)."""

    _fields_ = [("rip", c_uint64), ("is_write", c_uint32), ("pad", c_uint32)]


class KvmRunInternal(Structure):
    """run.internal (KVM_EXIT_INTERNAL_ERROR); ``suberror`` is KVM_INTERNAL_ERROR_*."""

    _fields_ = [
        ("suberror", c_uint32),
        ("ndata", c_uint32),  # valid with KVM_CAP_INTERNAL_ERROR_DATA
        ("data", c_uint64 * 16),
    ]


class _KvmRunEmulationFailureInsn(Structure):
    _fields_ = [("insn_size", c_uint8), ("insn_bytes", c_uint8 * 15)]


class _KvmRunEmulationFailureUnion(Union):
    _anonymous_ = ("_s",)
    _fields_ = [("_s", _KvmRunEmulationFailureInsn)]


class KvmRunEmulationFailure(Structure):
    """run.emulation_failure: overlay of run.internal for KVM_INTERNAL_ERROR_EMULATION."""

    _anonymous_ = ("_u",)
    _fields_ = [
        ("suberror", c_uint32),
        ("ndata", c_uint32),
        ("flags", c_uint64),  # KVM_INTERNAL_ERROR_EMULATION_FLAG_*
        ("_u", _KvmRunEmulationFailureUnion),
    ]


class _KvmRunSystemEventUnion(Union):
    _fields_ = [("flags", c_uint64), ("data", c_uint64 * 16)]


class KvmRunSystemEvent(Structure):
    """run.system_event (KVM_EXIT_SYSTEM_EVENT); ``type`` is KVM_SYSTEM_EVENT_*."""

    _anonymous_ = ("_u",)
    _fields_ = [
        ("type", c_uint32),
        ("ndata", c_uint32),
        ("_u", _KvmRunSystemEventUnion),
    ]


class KvmRunEoi(Structure):
    """run.eoi (KVM_EXIT_IOAPIC_EOI)."""

    _fields_ = [("vector", c_uint8)]


class KvmRunMsr(Structure):
    """run.msr (KVM_EXIT_X86_RDMSR / KVM_EXIT_X86_WRMSR)."""

    _fields_ = [
        ("error", c_uint8),  # user -> kernel
        ("pad", c_uint8 * 7),
        ("reason", c_uint32),  # KVM_MSR_EXIT_REASON_*
        ("index", c_uint32),
        ("data", c_uint64),  # kernel <-> user
    ]


class KvmRunNotify(Structure):
    """run.notify (KVM_EXIT_NOTIFY)."""

    _fields_ = [("flags", c_uint32)]


class KvmRunExit(Union):
    """The anonymous exit-reason union of struct kvm_run (x86 members only).

    s390/PPC/ARM/RISC-V/Hyper-V/Xen members are left out; ``padding`` fixes
    the union at 256 bytes as in C, so the layout is unaffected.
    """

    _fields_ = [
        ("hw", KvmRunHw),
        ("fail_entry", KvmRunFailEntry),
        ("ex", KvmRunEx),
        ("io", KvmRunIo),
        ("debug", KvmRunDebug),
        ("mmio", KvmRunMmio),
        ("hypercall", KvmRunHypercall),
        ("tpr_access", KvmRunTprAccess),
        ("internal", KvmRunInternal),
        ("emulation_failure", KvmRunEmulationFailure),
        ("system_event", KvmRunSystemEvent),
        ("eoi", KvmRunEoi),
        ("msr", KvmRunMsr),
        ("notify", KvmRunNotify),
        ("padding", c_uint8 * 256),
    ]


class KvmRunSyncRegs(Union):
    """kvm_run.s: the sync-regs area, padded to SYNC_REGS_SIZE_BYTES (2048)."""

    _fields_ = [("regs", KvmSyncRegs), ("padding", c_uint8 * 2048)]


class KvmRun(Structure):
    """struct kvm_run: the shared page at offset 0 of the vCPU mmap.

    Use as ``KvmRun.from_buffer(vcpu_mmap)``; exit union members are direct
    attributes (``run.io``, ``run.mmio``, ``run.internal``) as in C.
    """

    _anonymous_ = ("_u",)
    _fields_ = [
        # in
        ("request_interrupt_window", c_uint8),
        ("immediate_exit", c_uint8),
        ("padding1", c_uint8 * 6),
        # out
        ("exit_reason", c_uint32),
        ("ready_for_interrupt_injection", c_uint8),
        ("if_flag", c_uint8),
        ("flags", c_uint16),  # KVM_RUN_X86_*
        # in (pre_kvm_run), out (post_kvm_run)
        ("cr8", c_uint64),
        ("apic_base", c_uint64),
        ("_u", KvmRunExit),
        ("kvm_valid_regs", c_uint64),
        ("kvm_dirty_regs", c_uint64),
        ("s", KvmRunSyncRegs),
    ]


class KvmTranslation(Structure):
    """struct kvm_translation (KVM_TRANSLATE)."""

    _fields_ = [
        ("linear_address", c_uint64),  # in
        ("physical_address", c_uint64),  # out
        ("valid", c_uint8),
        ("writeable", c_uint8),
        ("usermode", c_uint8),
        ("pad", c_uint8 * 5),
    ]


class _KvmDirtyBitmapUnion(Union):
    _fields_ = [("dirty_bitmap", c_void_p), ("padding2", c_uint64)]


class KvmDirtyLog(Structure):
    """struct kvm_dirty_log (KVM_GET_DIRTY_LOG); ``dirty_bitmap`` is an address."""

    _anonymous_ = ("_u",)
    _fields_ = [
        ("slot", c_uint32),
        ("padding1", c_uint32),
        ("_u", _KvmDirtyBitmapUnion),
    ]


class KvmClearDirtyLog(Structure):
    """struct kvm_clear_dirty_log (KVM_CLEAR_DIRTY_LOG)."""

    _anonymous_ = ("_u",)
    _fields_ = [
        ("slot", c_uint32),
        ("num_pages", c_uint32),
        ("first_page", c_uint64),
        ("_u", _KvmDirtyBitmapUnion),
    ]


class KvmSignalMask(Structure):
    """struct kvm_signal_mask header (KVM_SET_SIGNAL_MASK); sigset[len] follows."""

    _fields_ = [("len", c_uint32), ("sigset", c_uint8 * 0)]


class KvmMpState(Structure):
    """struct kvm_mp_state (KVM_GET/SET_MP_STATE); value is KVM_MP_STATE_*."""

    _fields_ = [("mp_state", c_uint32)]


class KvmGuestDebug(Structure):
    """struct kvm_guest_debug (KVM_SET_GUEST_DEBUG); ``control`` is KVM_GUESTDBG_*."""

    _fields_ = [
        ("control", c_uint32),
        ("pad", c_uint32),
        ("arch", KvmGuestDebugArch),
    ]


class KvmIoeventfd(Structure):
    """struct kvm_ioeventfd (KVM_IOEVENTFD)."""

    _fields_ = [
        ("datamatch", c_uint64),
        ("addr", c_uint64),  # PIO port or MMIO address
        ("len", c_uint32),  # 1, 2, 4 or 8; 0 ignores the length
        ("fd", c_int32),
        ("flags", c_uint32),  # KVM_IOEVENTFD_FLAG_*
        ("pad", c_uint8 * 36),
    ]


class KvmEnableCap(Structure):
    """struct kvm_enable_cap (KVM_ENABLE_CAP)."""

    _fields_ = [
        ("cap", c_uint32),
        ("flags", c_uint32),
        ("args", c_uint64 * 4),
        ("pad", c_uint8 * 64),
    ]


class KvmIrqRoutingIrqchip(Structure):
    """struct kvm_irq_routing_irqchip."""

    _fields_ = [("irqchip", c_uint32), ("pin", c_uint32)]


class _KvmIrqRoutingMsiUnion(Union):
    _fields_ = [("pad", c_uint32), ("devid", c_uint32)]


class KvmIrqRoutingMsi(Structure):
    """struct kvm_irq_routing_msi."""

    _anonymous_ = ("_u",)
    _fields_ = [
        ("address_lo", c_uint32),
        ("address_hi", c_uint32),
        ("data", c_uint32),
        ("_u", _KvmIrqRoutingMsiUnion),
    ]


# The s390/Hyper-V/Xen entry kinds are mirrored too: the s390 one holds u64s,
# which gives the C union (and so kvm_irq_routing_entry) 8-byte alignment.
class KvmIrqRoutingS390Adapter(Structure):
    """struct kvm_irq_routing_s390_adapter."""

    _fields_ = [
        ("ind_addr", c_uint64),
        ("summary_addr", c_uint64),
        ("ind_offset", c_uint64),
        ("summary_offset", c_uint32),
        ("adapter_id", c_uint32),
    ]


class KvmIrqRoutingHvSint(Structure):
    """struct kvm_irq_routing_hv_sint."""

    _fields_ = [("vcpu", c_uint32), ("sint", c_uint32)]


class KvmIrqRoutingXenEvtchn(Structure):
    """struct kvm_irq_routing_xen_evtchn."""

    _fields_ = [("port", c_uint32), ("vcpu", c_uint32), ("priority", c_uint32)]


class KvmIrqRoutingEntryUnion(Union):
    """kvm_irq_routing_entry.u."""

    _fields_ = [
        ("irqchip", KvmIrqRoutingIrqchip),
        ("msi", KvmIrqRoutingMsi),
        ("adapter", KvmIrqRoutingS390Adapter),
        ("hv_sint", KvmIrqRoutingHvSint),
        ("xen_evtchn", KvmIrqRoutingXenEvtchn),
        ("pad", c_uint32 * 8),
    ]


class KvmIrqRoutingEntry(Structure):
    """struct kvm_irq_routing_entry; ``type`` is KVM_IRQ_ROUTING_IRQCHIP/MSI."""

    _fields_ = [
        ("gsi", c_uint32),
        ("type", c_uint32),
        ("flags", c_uint32),
        ("pad", c_uint32),
        ("u", KvmIrqRoutingEntryUnion),
    ]


@functools.lru_cache(maxsize=None)
def irq_routing_type(n: int) -> type[Structure]:
    """struct kvm_irq_routing with room for ``n`` entries (KVM_SET_GSI_ROUTING)."""
    return type(
        f"KvmIrqRouting_{n}",
        (Structure,),
        {
            "_fields_": [
                ("nr", c_uint32),
                ("flags", c_uint32),
                ("entries", KvmIrqRoutingEntry * n),
            ]
        },
    )


class KvmIrqfd(Structure):
    """struct kvm_irqfd (KVM_IRQFD)."""

    _fields_ = [
        ("fd", c_uint32),
        ("gsi", c_uint32),
        ("flags", c_uint32),  # KVM_IRQFD_FLAG_*
        ("resamplefd", c_uint32),
        ("pad", c_uint8 * 16),
    ]


class KvmClockData(Structure):
    """struct kvm_clock_data (KVM_GET/SET_CLOCK)."""

    _fields_ = [
        ("clock", c_uint64),
        ("flags", c_uint32),  # KVM_CLOCK_*
        ("pad0", c_uint32),
        ("realtime", c_uint64),
        ("host_tsc", c_uint64),
        ("pad", c_uint32 * 4),
    ]


class KvmMsi(Structure):
    """struct kvm_msi (KVM_SIGNAL_MSI)."""

    _fields_ = [
        ("address_lo", c_uint32),
        ("address_hi", c_uint32),
        ("data", c_uint32),
        ("flags", c_uint32),
        ("devid", c_uint32),
        ("pad", c_uint8 * 12),
    ]


class KvmDirtyGfn(Structure):
    """struct kvm_dirty_gfn: one dirty-ring entry (flags are KVM_DIRTY_GFN_F_*)."""

    _fields_ = [
        ("flags", c_uint32),
        ("slot", c_uint32),
        ("offset", c_uint64),
    ]


# Cheap import-time guard for the sizes the rest of pykvm leans on; the full
# field-by-field check against the C headers is in tests/test_kvm_uapi.py.
assert sizeof(KvmRun) == 2352 and KvmRun.exit_reason.offset == 8
