"""Thin wrappers over the three kinds of KVM file descriptor.

Modelled on rust-vmm's kvm-ioctls: ``Kvm`` (/dev/kvm) creates ``VmFd``s, which
create ``VcpuFd``s. Each method is one ioctl; state structs are the ctypes
types from :mod:`pykvm.kvm.structs`, passed to ``fcntl.ioctl`` as mutable
buffers so the kernel reads and writes them in place (CPython bounces buffers
of up to 1 KiB through a stack copy and hands bigger ones over directly).

Every failed ioctl raises :class:`KvmError` naming the ioctl, except that
``VcpuFd.run`` lets ``InterruptedError`` (EINTR) through untouched: that is how
a signalled vCPU thread, or ``immediate_exit``, comes back to its caller.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import fcntl
import mmap
import os
import struct
from collections.abc import Iterable, Mapping, Sequence

from .constants import (
    KVM_API_VERSION,
    KVM_DIRTY_LOG_PAGE_OFFSET,
    KVM_IOEVENTFD_FLAG_DATAMATCH,
    KVM_IOEVENTFD_FLAG_DEASSIGN,
    KVM_IOEVENTFD_FLAG_PIO,
    KVM_IRQFD_FLAG_DEASSIGN,
    KVM_IRQFD_FLAG_RESAMPLE,
)
from .ioctls import (
    IOCTL_NAMES,
    KVM_CHECK_EXTENSION,
    KVM_CLEAR_DIRTY_LOG,
    KVM_CREATE_IRQCHIP,
    KVM_CREATE_PIT2,
    KVM_CREATE_VCPU,
    KVM_CREATE_VM,
    KVM_ENABLE_CAP,
    KVM_GET_API_VERSION,
    KVM_GET_CLOCK,
    KVM_GET_CPUID2,
    KVM_GET_DEBUGREGS,
    KVM_GET_DIRTY_LOG,
    KVM_GET_FPU,
    KVM_GET_IRQCHIP,
    KVM_GET_LAPIC,
    KVM_GET_MP_STATE,
    KVM_GET_MSR_FEATURE_INDEX_LIST,
    KVM_GET_MSR_INDEX_LIST,
    KVM_GET_MSRS,
    KVM_GET_PIT2,
    KVM_GET_REGS,
    KVM_GET_SREGS,
    KVM_GET_SUPPORTED_CPUID,
    KVM_GET_TSC_KHZ,
    KVM_GET_VCPU_EVENTS,
    KVM_GET_VCPU_MMAP_SIZE,
    KVM_GET_XCRS,
    KVM_GET_XSAVE,
    KVM_IOEVENTFD,
    KVM_IRQ_LINE,
    KVM_IRQ_LINE_STATUS,
    KVM_IRQFD,
    KVM_KVMCLOCK_CTRL,
    KVM_REINJECT_CONTROL,
    KVM_RESET_DIRTY_RINGS,
    KVM_RUN,
    KVM_SET_BOOT_CPU_ID,
    KVM_SET_CLOCK,
    KVM_SET_CPUID2,
    KVM_SET_DEBUGREGS,
    KVM_SET_FPU,
    KVM_SET_GSI_ROUTING,
    KVM_SET_GUEST_DEBUG,
    KVM_SET_IDENTITY_MAP_ADDR,
    KVM_SET_IRQCHIP,
    KVM_SET_LAPIC,
    KVM_SET_MP_STATE,
    KVM_SET_MSRS,
    KVM_SET_PIT2,
    KVM_SET_REGS,
    KVM_SET_SREGS,
    KVM_SET_TSC_KHZ,
    KVM_SET_TSS_ADDR,
    KVM_SET_USER_MEMORY_REGION,
    KVM_SET_VCPU_EVENTS,
    KVM_SET_XCRS,
    KVM_SET_XSAVE,
    KVM_SIGNAL_MSI,
    KVM_TRANSLATE,
)
from .structs import (
    KvmClearDirtyLog,
    KvmClockData,
    KvmDebugregs,
    KvmDirtyGfn,
    KvmDirtyLog,
    KvmEnableCap,
    KvmFpu,
    KvmGuestDebug,
    KvmIoeventfd,
    KvmIrqchip,
    KvmIrqfd,
    KvmIrqRoutingEntry,
    KvmLapicState,
    KvmMpState,
    KvmMsi,
    KvmPitConfig,
    KvmPitState2,
    KvmReinjectControl,
    KvmRegs,
    KvmRun,
    KvmSregs,
    KvmTranslation,
    KvmUserspaceMemoryRegion,
    KvmVcpuEvents,
    KvmXcrs,
    KvmXsave,
    cpuid2_type,
    irq_routing_type,
    msr_list_type,
    msrs_type,
)

__all__ = ["KvmError", "KvmUnavailable", "Kvm", "VmFd", "VcpuFd"]

_PAGE_SIZE = 4096  # x86 guest page: the unit of dirty bitmaps
# Growth bound for the E2BIG retry loops; KVM's own limits are far below.
_MAX_LIST_ENTRIES = 1 << 16


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


class KvmError(OSError):
    """A KVM call failed.

    ``str(e)`` is ``"<IOCTL_NAME> failed: <strerror>"``; ``e.ioctl`` is the
    ioctl's name and ``e.errno`` the errno (None when KVM reported a partial
    result rather than an errno, e.g. an MSR that could not be set).
    """

    def __init__(self, errno: int | None, message: str, ioctl: str | None = None):
        # Argument order mirrors OSError so that pickling (which replays
        # self.args) round-trips.
        super().__init__(errno, message)
        self.ioctl = ioctl

    def __str__(self) -> str:
        return self.strerror if self.strerror is not None else super().__str__()


class KvmUnavailable(KvmError):
    """/dev/kvm cannot be used; the message says what to do about it."""


def _ioctl_error(request: int, exc: OSError) -> KvmError:
    name = IOCTL_NAMES.get(request, f"ioctl {request:#x}")
    return KvmError(exc.errno, f"{name} failed: {os.strerror(exc.errno)}", name)


def _unavailable(path: str, exc: OSError) -> KvmUnavailable:
    if exc.errno in (_errno.ENOENT, _errno.ENODEV, _errno.ENXIO):
        why = (
            f"{path} does not exist: KVM is not available on this machine "
            "(load kvm_intel/kvm_amd or enable virtualization)"
        )
    elif exc.errno in (_errno.EACCES, _errno.EPERM):
        why = f"permission denied on {path}: run as root or add your user to the 'kvm' group"
    else:
        why = f"cannot open {path}: {os.strerror(exc.errno)}"
    return KvmUnavailable(exc.errno, why)


# ---------------------------------------------------------------------------
# The one ioctl helper
# ---------------------------------------------------------------------------

_fcntl_ioctl = fcntl.ioctl
_INT_MIN, _INT_MAX = -(1 << 31), (1 << 31) - 1
_libc_ioctl = None


def _ioctl_ulong(fd: int, request: int, value: int) -> int:
    # fcntl.ioctl parses an integer argument as a C int, but some KVM ioctls
    # take an unsigned long (KVM_SET_TSS_ADDR is usually 0xfffbd000); for
    # those, call libc directly.
    global _libc_ioctl
    if _libc_ioctl is None:
        func = ctypes.CDLL(None, use_errno=True).ioctl
        func.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong)
        func.restype = ctypes.c_int
        _libc_ioctl = func
    ret = _libc_ioctl(fd, request, value)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def _ioctl(fd: int, request: int, arg=0) -> int:
    """ioctl(fd, request, arg) -> return value; failures raise KvmError.

    ``arg`` is an int, or a ctypes object (any writable buffer) that the
    kernel reads and/or fills in place.
    """
    try:
        if arg.__class__ is int and not _INT_MIN <= arg <= _INT_MAX:
            return _ioctl_ulong(fd, request, arg)
        return _fcntl_ioctl(fd, request, arg, True)
    except OSError as exc:
        raise _ioctl_error(request, exc) from None


def _get(fd: int, request: int, ctype):
    obj = ctype()
    _ioctl(fd, request, obj)
    return obj


def _set(fd: int, request: int, ctype, obj) -> None:
    # The kernel copies sizeof(ctype) bytes from our pointer: a smaller object
    # would let it read past the end, so insist on the right type.
    if not isinstance(obj, ctype):
        raise TypeError(f"{IOCTL_NAMES[request]} needs a {ctype.__name__}, not {type(obj).__name__}")
    _ioctl(fd, request, obj)


def _get_growing(fd: int, request: int, make_type, count_field: str, n: int):
    """Run a GET ioctl on a flexible-array struct, growing it while KVM says E2BIG.

    Returns the struct trimmed to the count KVM filled in.
    """
    while True:
        obj = make_type(n)()
        setattr(obj, count_field, n)
        try:
            _ioctl(fd, request, obj)
        except KvmError as exc:
            if exc.errno != _errno.E2BIG or n >= _MAX_LIST_ENTRIES:
                raise
            # KVM writes back the count it needs; at least double anyway.
            n = max(2 * n, getattr(obj, count_field))
            continue
        filled = getattr(obj, count_field)
        return make_type(filled).from_buffer_copy(obj)


def _enable_cap(fd: int, cap: int, args: Sequence[int], flags: int) -> None:
    if len(args) > 4:
        raise ValueError(f"KVM_ENABLE_CAP takes at most 4 args, got {len(args)}")
    ec = KvmEnableCap(cap=cap, flags=flags)
    for i, value in enumerate(args):
        ec.args[i] = value
    _ioctl(fd, KVM_ENABLE_CAP, ec)


def _fileno(f) -> int:
    return f if isinstance(f, int) else f.fileno()


def _buffer_address(buf, min_bytes: int) -> int:
    """Address of a writable, contiguous buffer of at least ``min_bytes``.

    Only valid while ``buf`` is alive and not resized: use it within the call.
    """
    view = memoryview(buf)
    if view.readonly or not view.c_contiguous:
        raise TypeError("bitmap must be a writable, contiguous buffer (bytearray, numpy array, mmap)")
    if view.nbytes < min_bytes:
        raise ValueError(f"bitmap is {view.nbytes} bytes, KVM will access {min_bytes}")
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def _bitmap_bytes(pages: int) -> int:
    # KVM dirty bitmaps are arrays of unsigned longs, one bit per page.
    return (pages + 63) // 64 * 8


# ---------------------------------------------------------------------------
# /dev/kvm
# ---------------------------------------------------------------------------


class Kvm:
    """The KVM system fd (/dev/kvm)."""

    def __init__(self, path: str = "/dev/kvm"):
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise _unavailable(path, exc) from None
        try:
            version = self.api_version()
        except KvmError as exc:
            self.close()
            raise KvmUnavailable(exc.errno, f"{path} is not a KVM device: {exc}", exc.ioctl) from None
        if version != KVM_API_VERSION:
            self.close()
            raise KvmUnavailable(
                None,
                f"{path} speaks KVM API version {version}, pykvm needs version {KVM_API_VERSION}",
                "KVM_GET_API_VERSION",
            )

    def fileno(self) -> int:
        return self.fd

    def api_version(self) -> int:
        return _ioctl(self.fd, KVM_GET_API_VERSION)

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION: 0 if unsupported, else 1 or a cap-specific value."""
        return _ioctl(self.fd, KVM_CHECK_EXTENSION, cap)

    def vcpu_mmap_size(self) -> int:
        return _ioctl(self.fd, KVM_GET_VCPU_MMAP_SIZE)

    def supported_cpuid(self, max_entries: int = 256):
        """KVM_GET_SUPPORTED_CPUID as a ``cpuid2_type(nent)`` struct."""
        return _get_growing(self.fd, KVM_GET_SUPPORTED_CPUID, cpuid2_type, "nent", max_entries)

    def msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: the MSRs to save/restore."""
        lst = _get_growing(self.fd, KVM_GET_MSR_INDEX_LIST, msr_list_type, "nmsrs", 256)
        return list(lst.indices)

    def msr_feature_index_list(self) -> list[int]:
        """KVM_GET_MSR_FEATURE_INDEX_LIST: feature MSRs readable on /dev/kvm."""
        lst = _get_growing(self.fd, KVM_GET_MSR_FEATURE_INDEX_LIST, msr_list_type, "nmsrs", 256)
        return list(lst.indices)

    def create_vm(self, machine_type: int = 0) -> VmFd:
        vcpu_mmap_size = self.vcpu_mmap_size()
        return VmFd(_ioctl(self.fd, KVM_CREATE_VM, machine_type), vcpu_mmap_size)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Kvm:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------
# VM
# ---------------------------------------------------------------------------

_pack_irq_level = struct.Struct("=II").pack  # struct kvm_irq_level {irq, level}
_unpack_irq_status = struct.Struct("=i").unpack_from


class VmFd:
    """A VM fd (from ``Kvm.create_vm``)."""

    def __init__(self, fd: int, vcpu_mmap_size: int | None = None):
        self.fd = fd
        self.vcpu_mmap_size = vcpu_mmap_size
        # slot -> size in bytes of the regions set through this object, to
        # refuse dirty bitmaps too small for what KVM will write into them.
        self._slot_sizes: dict[int, int] = {}

    def fileno(self) -> int:
        return self.fd

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM (answers can differ from /dev/kvm's)."""
        return _ioctl(self.fd, KVM_CHECK_EXTENSION, cap)

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        _enable_cap(self.fd, cap, args, flags)

    def create_vcpu(self, vcpu_id: int, mmap_size: int | None = None) -> VcpuFd:
        """KVM_CREATE_VCPU, then mmap its kvm_run (``mmap_size`` defaults to KVM's)."""
        if mmap_size is None:
            mmap_size = self.vcpu_mmap_size
        if mmap_size is None:
            raise ValueError("mmap_size is needed (Kvm.vcpu_mmap_size())")
        fd = _ioctl(self.fd, KVM_CREATE_VCPU, vcpu_id)
        try:
            return VcpuFd(fd, vcpu_id, mmap_size)
        except BaseException:
            os.close(fd)
            raise

    # -- memory -----------------------------------------------------------------

    def set_user_memory_region(
        self, slot: int, guest_phys_addr: int, memory_size: int, userspace_addr: int, flags: int = 0
    ) -> None:
        """Create, move, resize or (memory_size=0) delete a memory slot."""
        region = KvmUserspaceMemoryRegion(slot, flags, guest_phys_addr, memory_size, userspace_addr)
        _ioctl(self.fd, KVM_SET_USER_MEMORY_REGION, region)
        if memory_size:
            self._slot_sizes[slot] = memory_size
        else:
            self._slot_sizes.pop(slot, None)

    def set_tss_address(self, addr: int) -> None:
        """KVM_SET_TSS_ADDR: 3 pages of guest-physical space KVM may use."""
        _ioctl(self.fd, KVM_SET_TSS_ADDR, addr)

    def set_identity_map_address(self, addr: int) -> None:
        """KVM_SET_IDENTITY_MAP_ADDR: 1 page of guest-physical space KVM may use."""
        _ioctl(self.fd, KVM_SET_IDENTITY_MAP_ADDR, ctypes.c_uint64(addr))

    def get_dirty_log(self, slot: int, bitmap) -> None:
        """KVM_GET_DIRTY_LOG straight into ``bitmap`` (writable buffer, no copy).

        ``bitmap`` needs one bit per page of the slot, rounded up to 8 bytes.
        """
        pages = self._slot_sizes.get(slot, 0) // _PAGE_SIZE
        log = KvmDirtyLog(slot=slot)
        log.dirty_bitmap = _buffer_address(bitmap, _bitmap_bytes(pages))
        _ioctl(self.fd, KVM_GET_DIRTY_LOG, log)

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int, bitmap) -> None:
        """KVM_CLEAR_DIRTY_LOG: re-protect the pages whose bits are set in ``bitmap``.

        Bit 0 of ``bitmap`` is ``first_page`` (a multiple of 64); needs
        KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 enabled.
        """
        log = KvmClearDirtyLog(slot=slot, num_pages=num_pages, first_page=first_page)
        log.dirty_bitmap = _buffer_address(bitmap, _bitmap_bytes(num_pages))
        _ioctl(self.fd, KVM_CLEAR_DIRTY_LOG, log)

    def reset_dirty_rings(self) -> int:
        """KVM_RESET_DIRTY_RINGS: returns the number of entries reset."""
        return _ioctl(self.fd, KVM_RESET_DIRTY_RINGS)

    # -- interrupt controllers and timers ----------------------------------------

    def create_irqchip(self) -> None:
        """KVM_CREATE_IRQCHIP: in-kernel PIC x2, IOAPIC and per-vCPU LAPICs."""
        _ioctl(self.fd, KVM_CREATE_IRQCHIP)

    def create_pit2(self, flags: int = 0) -> None:
        _ioctl(self.fd, KVM_CREATE_PIT2, KvmPitConfig(flags=flags))

    def irq_line(self, irq: int, level: int) -> None:
        """KVM_IRQ_LINE: set GSI ``irq`` to ``level`` (hot path: 8 packed bytes)."""
        try:
            _fcntl_ioctl(self.fd, KVM_IRQ_LINE, _pack_irq_level(irq, level))
        except OSError as exc:
            raise _ioctl_error(KVM_IRQ_LINE, exc) from None

    def irq_line_status(self, irq: int, level: int) -> int:
        """KVM_IRQ_LINE_STATUS: like irq_line, returns the delivery status."""
        try:
            out = _fcntl_ioctl(self.fd, KVM_IRQ_LINE_STATUS, _pack_irq_level(irq, level))
        except OSError as exc:
            raise _ioctl_error(KVM_IRQ_LINE_STATUS, exc) from None
        return _unpack_irq_status(out)[0]

    def get_irqchip(self, chip_id: int) -> KvmIrqchip:
        """KVM_GET_IRQCHIP for KVM_IRQCHIP_PIC_MASTER/PIC_SLAVE/IOAPIC."""
        chip = KvmIrqchip(chip_id=chip_id)
        _ioctl(self.fd, KVM_GET_IRQCHIP, chip)
        return chip

    def set_irqchip(self, chip: KvmIrqchip) -> None:
        _set(self.fd, KVM_SET_IRQCHIP, KvmIrqchip, chip)

    def get_pit2(self) -> KvmPitState2:
        return _get(self.fd, KVM_GET_PIT2, KvmPitState2)

    def set_pit2(self, state: KvmPitState2) -> None:
        _set(self.fd, KVM_SET_PIT2, KvmPitState2, state)

    def reinject_control(self, pit_reinject: bool) -> None:
        """KVM_REINJECT_CONTROL: whether the PIT replays ticks missed while paused."""
        _ioctl(self.fd, KVM_REINJECT_CONTROL, KvmReinjectControl(pit_reinject=int(bool(pit_reinject))))

    def get_clock(self) -> KvmClockData:
        return _get(self.fd, KVM_GET_CLOCK, KvmClockData)

    def set_clock(self, clock: KvmClockData) -> None:
        _set(self.fd, KVM_SET_CLOCK, KvmClockData, clock)

    def set_boot_cpu_id(self, vcpu_id: int) -> None:
        _ioctl(self.fd, KVM_SET_BOOT_CPU_ID, vcpu_id)

    # -- eventfds, MSI, routing ---------------------------------------------------

    def _ioeventfd(self, fd, addr, length, pio, datamatch, deassign) -> None:
        flags = KVM_IOEVENTFD_FLAG_PIO if pio else 0
        if datamatch is not None:
            flags |= KVM_IOEVENTFD_FLAG_DATAMATCH
        if deassign:
            flags |= KVM_IOEVENTFD_FLAG_DEASSIGN
        ioev = KvmIoeventfd(
            datamatch=datamatch or 0, addr=addr, len=length, fd=_fileno(fd), flags=flags
        )
        _ioctl(self.fd, KVM_IOEVENTFD, ioev)

    def register_ioeventfd(self, fd, addr: int, length: int, *, pio: bool, datamatch: int | None = None) -> None:
        """Signal eventfd ``fd`` on guest writes to ``addr`` (a port if ``pio``)."""
        self._ioeventfd(fd, addr, length, pio, datamatch, deassign=False)

    def unregister_ioeventfd(self, fd, addr: int, length: int, *, pio: bool, datamatch: int | None = None) -> None:
        """Undo register_ioeventfd (all arguments must match)."""
        self._ioeventfd(fd, addr, length, pio, datamatch, deassign=True)

    def register_irqfd(self, fd, gsi: int, resample_fd=None) -> None:
        """Raise GSI ``gsi`` when eventfd ``fd`` is signalled (level-triggered with resample_fd)."""
        irqfd = KvmIrqfd(fd=_fileno(fd), gsi=gsi)
        if resample_fd is not None:
            irqfd.flags = KVM_IRQFD_FLAG_RESAMPLE
            irqfd.resamplefd = _fileno(resample_fd)
        _ioctl(self.fd, KVM_IRQFD, irqfd)

    def unregister_irqfd(self, fd, gsi: int) -> None:
        _ioctl(self.fd, KVM_IRQFD, KvmIrqfd(fd=_fileno(fd), gsi=gsi, flags=KVM_IRQFD_FLAG_DEASSIGN))

    def signal_msi(self, address: int, data: int, flags: int = 0, devid: int = 0) -> int:
        """KVM_SIGNAL_MSI: >0 delivered, 0 blocked by the guest."""
        msi = KvmMsi(
            address_lo=address & 0xFFFFFFFF, address_hi=address >> 32, data=data, flags=flags, devid=devid
        )
        return _ioctl(self.fd, KVM_SIGNAL_MSI, msi)

    def set_gsi_routing(self, entries: Iterable[KvmIrqRoutingEntry]) -> None:
        """KVM_SET_GSI_ROUTING: replace the whole GSI routing table."""
        entries = list(entries)
        table = irq_routing_type(len(entries))(nr=len(entries))
        for i, entry in enumerate(entries):
            table.entries[i] = entry
        _ioctl(self.fd, KVM_SET_GSI_ROUTING, table)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> VmFd:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------
# vCPU
# ---------------------------------------------------------------------------


class VcpuFd:
    """A vCPU fd (from ``VmFd.create_vcpu``) with its mmapped ``kvm_run``."""

    def __init__(self, fd: int, vcpu_id: int, mmap_size: int):
        self.fd = fd
        self.id = vcpu_id
        self.run_mmap = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.run_struct = KvmRun.from_buffer(self.run_mmap)

    def fileno(self) -> int:
        return self.fd

    def run(self) -> int:
        """KVM_RUN. Raises InterruptedError (not KvmError) on EINTR."""
        try:
            return _fcntl_ioctl(self.fd, KVM_RUN, 0)
        except InterruptedError:
            raise
        except OSError as exc:
            raise _ioctl_error(KVM_RUN, exc) from None

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        _enable_cap(self.fd, cap, args, flags)

    def dirty_ring_mmap(self, num_entries: int) -> mmap.mmap:
        """Map this vCPU's dirty ring (KVM_CAP_DIRTY_LOG_RING) as KvmDirtyGfn[num_entries]."""
        return mmap.mmap(
            self.fd,
            num_entries * ctypes.sizeof(KvmDirtyGfn),
            mmap.MAP_SHARED,
            mmap.PROT_READ | mmap.PROT_WRITE,
            offset=KVM_DIRTY_LOG_PAGE_OFFSET * mmap.PAGESIZE,
        )

    # -- register state: each get returns a fresh struct, each set takes one ----

    def get_regs(self) -> KvmRegs:
        return _get(self.fd, KVM_GET_REGS, KvmRegs)

    def set_regs(self, regs: KvmRegs) -> None:
        _set(self.fd, KVM_SET_REGS, KvmRegs, regs)

    def get_sregs(self) -> KvmSregs:
        return _get(self.fd, KVM_GET_SREGS, KvmSregs)

    def set_sregs(self, sregs: KvmSregs) -> None:
        _set(self.fd, KVM_SET_SREGS, KvmSregs, sregs)

    def get_fpu(self) -> KvmFpu:
        return _get(self.fd, KVM_GET_FPU, KvmFpu)

    def set_fpu(self, fpu: KvmFpu) -> None:
        _set(self.fd, KVM_SET_FPU, KvmFpu, fpu)

    def get_xsave(self) -> KvmXsave:
        return _get(self.fd, KVM_GET_XSAVE, KvmXsave)

    def set_xsave(self, xsave: KvmXsave) -> None:
        _set(self.fd, KVM_SET_XSAVE, KvmXsave, xsave)

    def get_xcrs(self) -> KvmXcrs:
        return _get(self.fd, KVM_GET_XCRS, KvmXcrs)

    def set_xcrs(self, xcrs: KvmXcrs) -> None:
        _set(self.fd, KVM_SET_XCRS, KvmXcrs, xcrs)

    def get_lapic(self) -> KvmLapicState:
        return _get(self.fd, KVM_GET_LAPIC, KvmLapicState)

    def set_lapic(self, lapic: KvmLapicState) -> None:
        _set(self.fd, KVM_SET_LAPIC, KvmLapicState, lapic)

    def get_vcpu_events(self) -> KvmVcpuEvents:
        return _get(self.fd, KVM_GET_VCPU_EVENTS, KvmVcpuEvents)

    def set_vcpu_events(self, events: KvmVcpuEvents) -> None:
        _set(self.fd, KVM_SET_VCPU_EVENTS, KvmVcpuEvents, events)

    def get_mp_state(self) -> KvmMpState:
        return _get(self.fd, KVM_GET_MP_STATE, KvmMpState)

    def set_mp_state(self, mp_state: KvmMpState) -> None:
        _set(self.fd, KVM_SET_MP_STATE, KvmMpState, mp_state)

    def get_debugregs(self) -> KvmDebugregs:
        return _get(self.fd, KVM_GET_DEBUGREGS, KvmDebugregs)

    def set_debugregs(self, debugregs: KvmDebugregs) -> None:
        _set(self.fd, KVM_SET_DEBUGREGS, KvmDebugregs, debugregs)

    # -- MSRs and CPUID -----------------------------------------------------------

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        """KVM_GET_MSRS: {index: value}; KvmError names the first unreadable MSR."""
        indices = list(indices)
        msrs = msrs_type(len(indices))(nmsrs=len(indices))
        for entry, index in zip(msrs.entries, indices):
            entry.index = index
        done = _ioctl(self.fd, KVM_GET_MSRS, msrs)
        if done < len(indices):
            raise _msr_error("KVM_GET_MSRS", "read", indices, done)
        return {entry.index: entry.data for entry in msrs.entries}

    def set_msrs(self, values: Mapping[int, int]) -> int:
        """KVM_SET_MSRS: returns how many were set; KvmError names the first rejected MSR."""
        items = list(values.items())
        msrs = msrs_type(len(items))(nmsrs=len(items))
        for entry, (index, data) in zip(msrs.entries, items):
            entry.index = index
            entry.data = data
        done = _ioctl(self.fd, KVM_SET_MSRS, msrs)
        if done < len(items):
            raise _msr_error("KVM_SET_MSRS", "set", [index for index, _ in items], done)
        return done

    def set_cpuid2(self, cpuid) -> None:
        """KVM_SET_CPUID2 with a ``cpuid2_type(n)`` struct (e.g. from supported_cpuid)."""
        if cpuid.nent > len(cpuid.entries):
            raise ValueError(f"cpuid.nent is {cpuid.nent} but the struct holds {len(cpuid.entries)} entries")
        _ioctl(self.fd, KVM_SET_CPUID2, cpuid)

    def get_cpuid2(self, max_entries: int = 256):
        """KVM_GET_CPUID2 as a ``cpuid2_type(nent)`` struct."""
        return _get_growing(self.fd, KVM_GET_CPUID2, cpuid2_type, "nent", max_entries)

    # -- misc -----------------------------------------------------------------

    def set_guest_debug(self, control: int, debugreg: Sequence[int] | None = None) -> None:
        """KVM_SET_GUEST_DEBUG: ``control`` is KVM_GUESTDBG_*; ``debugreg`` DR0-7."""
        dbg = KvmGuestDebug(control=control)
        if debugreg is not None:
            if len(debugreg) > 8:
                raise ValueError("debugreg holds at most 8 values (DR0-DR7)")
            for i, value in enumerate(debugreg):
                dbg.arch.debugreg[i] = value
        _ioctl(self.fd, KVM_SET_GUEST_DEBUG, dbg)

    def translate(self, gva: int) -> KvmTranslation:
        """KVM_TRANSLATE a guest-virtual address with the vCPU's current paging."""
        tr = KvmTranslation(linear_address=gva)
        _ioctl(self.fd, KVM_TRANSLATE, tr)
        return tr

    def set_tsc_khz(self, khz: int) -> None:
        _ioctl(self.fd, KVM_SET_TSC_KHZ, khz)

    def get_tsc_khz(self) -> int:
        return _ioctl(self.fd, KVM_GET_TSC_KHZ)

    def kvmclock_ctrl(self) -> None:
        """KVM_KVMCLOCK_CTRL: tell a kvmclock guest it was paused (no soft-lockup)."""
        _ioctl(self.fd, KVM_KVMCLOCK_CTRL)

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

    def __enter__(self) -> VcpuFd:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _msr_error(ioctl: str, verb: str, indices: list[int], done: int) -> KvmError:
    msr = indices[done]
    err = KvmError(
        None, f"{ioctl} failed: MSR {msr:#x} could not be {verb} ({done} of {len(indices)} {verb})", ioctl
    )
    err.msr = msr
    return err
