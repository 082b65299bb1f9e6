"""A VM fd (from ``Kvm.create_vm``): memory slots, dirty logs, the in-kernel chips, eventfds."""

from __future__ import annotations

import ctypes
import os
import struct

from .calls import OwnedFd, fcntl_ioctl, get_struct, ioctl, set_struct
from .constants import KVM_IOEVENTFD_FLAG_DATAMATCH, KVM_IOEVENTFD_FLAG_DEASSIGN, KVM_IOEVENTFD_FLAG_PIO
from .errors import ioctl_error
from .ioctls import (
    KVM_CHECK_EXTENSION,
    KVM_CREATE_IRQCHIP,
    KVM_CREATE_PIT2,
    KVM_CREATE_VCPU,
    KVM_GET_CLOCK,
    KVM_GET_DIRTY_LOG,
    KVM_GET_IRQCHIP,
    KVM_GET_PIT2,
    KVM_IOEVENTFD,
    KVM_IRQ_LINE,
    KVM_REINJECT_CONTROL,
    KVM_SET_CLOCK,
    KVM_SET_IDENTITY_MAP_ADDR,
    KVM_SET_IRQCHIP,
    KVM_SET_PIT2,
    KVM_SET_TSS_ADDR,
    KVM_SET_USER_MEMORY_REGION,
    KVM_SIGNAL_MSI,
)
from .structs import (
    KvmClockData,
    KvmDirtyLog,
    KvmIoeventfd,
    KvmIrqchip,
    KvmMsi,
    KvmPitConfig,
    KvmPitState2,
    KvmReinjectControl,
    KvmUserspaceMemoryRegion,
)
from .vcpu_fd import VcpuFd

MSI_MESSAGES_KEPT = 256  # built KVM_SIGNAL_MSI arguments kept (a guest reprogramming vectors makes new ones)

__all__ = ["VmFd"]

_PAGE_SIZE = 4096  # x86 guest page: the unit of dirty bitmaps
_pack_irq_level = struct.Struct("=II").pack  # struct kvm_irq_level {irq, level}


class VmFd(OwnedFd):
    """A VM fd (from ``Kvm.create_vm``)."""

    def __init__(self, fd: int, vcpu_mmap_size: int | None = None):
        self.fd = fd
        self.vcpu_mmap_size = vcpu_mmap_size
        self._msi_messages: dict[tuple[int, int, int, int], KvmMsi] = {}  # read-only for the kernel
        # slot -> size in bytes of the regions set through this object, to
        # refuse dirty bitmaps too small for what KVM will write into them.
        self._slot_sizes: dict[int, int] = {}

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM (answers can differ from /dev/kvm's)."""
        return ioctl(self.fd, KVM_CHECK_EXTENSION, cap)

    def create_vcpu(self, vcpu_id: int, mmap_size: int | None = None) -> VcpuFd:
        """KVM_CREATE_VCPU, then mmap its kvm_run (``mmap_size`` defaults to KVM's)."""
        if mmap_size is None:
            mmap_size = self.vcpu_mmap_size
        if mmap_size is None:
            raise ValueError("mmap_size is needed (Kvm.vcpu_mmap_size())")
        fd = ioctl(self.fd, KVM_CREATE_VCPU, vcpu_id)
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
        ioctl(self.fd, KVM_SET_USER_MEMORY_REGION, region)
        if memory_size:
            self._slot_sizes[slot] = memory_size
        else:
            self._slot_sizes.pop(slot, None)

    def set_tss_address(self, addr: int) -> None:
        """KVM_SET_TSS_ADDR: 3 pages of guest-physical space KVM may use."""
        ioctl(self.fd, KVM_SET_TSS_ADDR, addr)

    def set_identity_map_address(self, addr: int) -> None:
        """KVM_SET_IDENTITY_MAP_ADDR: 1 page of guest-physical space KVM may use."""
        ioctl(self.fd, KVM_SET_IDENTITY_MAP_ADDR, ctypes.c_uint64(addr))

    def get_dirty_log(self, slot: int, bitmap) -> None:
        """KVM_GET_DIRTY_LOG straight into ``bitmap`` (writable buffer, no copy).

        ``bitmap`` needs one bit per page of the slot, rounded up to 8 bytes.
        """
        pages = self._slot_sizes.get(slot, 0) // _PAGE_SIZE
        log = KvmDirtyLog(slot=slot)
        log.dirty_bitmap = _buffer_address(bitmap, _bitmap_bytes(pages))
        ioctl(self.fd, KVM_GET_DIRTY_LOG, log)

    # -- interrupt controllers and timers ----------------------------------------

    def create_irqchip(self) -> None:
        """KVM_CREATE_IRQCHIP: in-kernel PIC x2, IOAPIC and per-vCPU LAPICs."""
        ioctl(self.fd, KVM_CREATE_IRQCHIP)

    def create_pit2(self, flags: int = 0) -> None:
        ioctl(self.fd, KVM_CREATE_PIT2, KvmPitConfig(flags=flags))

    def irq_line(self, irq: int, level: int) -> None:
        """KVM_IRQ_LINE: set GSI ``irq`` to ``level`` (hot path: 8 packed bytes)."""
        try:
            fcntl_ioctl(self.fd, KVM_IRQ_LINE, _pack_irq_level(irq, level))
        except OSError as exc:
            raise ioctl_error(KVM_IRQ_LINE, exc) from None

    def get_irqchip(self, chip_id: int) -> KvmIrqchip:
        """KVM_GET_IRQCHIP for KVM_IRQCHIP_PIC_MASTER/PIC_SLAVE/IOAPIC."""
        chip = KvmIrqchip(chip_id=chip_id)
        ioctl(self.fd, KVM_GET_IRQCHIP, chip)
        return chip

    def set_irqchip(self, chip: KvmIrqchip) -> None:
        set_struct(self.fd, KVM_SET_IRQCHIP, KvmIrqchip, chip)

    def get_pit2(self) -> KvmPitState2:
        return get_struct(self.fd, KVM_GET_PIT2, KvmPitState2)

    def set_pit2(self, state: KvmPitState2) -> None:
        set_struct(self.fd, KVM_SET_PIT2, KvmPitState2, state)

    def reinject_control(self, pit_reinject: bool) -> None:
        """KVM_REINJECT_CONTROL: whether the PIT replays ticks missed while paused."""
        ioctl(self.fd, KVM_REINJECT_CONTROL, KvmReinjectControl(pit_reinject=int(bool(pit_reinject))))

    def get_clock(self) -> KvmClockData:
        return get_struct(self.fd, KVM_GET_CLOCK, KvmClockData)

    def set_clock(self, clock: KvmClockData) -> None:
        set_struct(self.fd, KVM_SET_CLOCK, KvmClockData, clock)

    # -- eventfds and MSI ----------------------------------------------------------

    def register_ioeventfd(self, fd, addr: int, length: int, *, pio: bool, datamatch: int | None = None) -> None:
        """Signal eventfd ``fd`` on guest writes to ``addr`` (a port if ``pio``)."""
        self._ioeventfd(fd, addr, length, pio, datamatch, deassign=False)

    def unregister_ioeventfd(self, fd, addr: int, length: int, *, pio: bool, datamatch: int | None = None) -> None:
        """Undo register_ioeventfd (all arguments must match)."""
        self._ioeventfd(fd, addr, length, pio, datamatch, deassign=True)

    def _ioeventfd(self, fd, addr, length, pio, datamatch, deassign) -> None:
        flags = KVM_IOEVENTFD_FLAG_PIO if pio else 0
        if datamatch is not None:
            flags |= KVM_IOEVENTFD_FLAG_DATAMATCH
        if deassign:
            flags |= KVM_IOEVENTFD_FLAG_DEASSIGN
        fileno = fd if isinstance(fd, int) else fd.fileno()
        ioev = KvmIoeventfd(datamatch=datamatch or 0, addr=addr, len=length, fd=fileno, flags=flags)
        ioctl(self.fd, KVM_IOEVENTFD, ioev)

    def signal_msi(self, address: int, data: int, flags: int = 0, devid: int = 0) -> int:
        """KVM_SIGNAL_MSI: >0 delivered, 0 blocked by the guest."""
        key = (address, data, flags, devid)
        msi = self._msi_messages.get(key)
        if msi is None:  # a device sends the same few messages over and over: build each once
            if len(self._msi_messages) >= MSI_MESSAGES_KEPT:
                self._msi_messages.clear()
            msi = self._msi_messages[key] = KvmMsi(
                address_lo=address & 0xFFFFFFFF, address_hi=address >> 32, data=data, flags=flags, devid=devid
            )
        return ioctl(self.fd, KVM_SIGNAL_MSI, msi)


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
