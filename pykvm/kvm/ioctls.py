"""KVM ioctl request numbers, computed the way <asm-generic/ioctl.h> does.

Sizes come from ``ctypes.sizeof`` of our own structs, so a wrong struct would
show up as a wrong number too; tests/test_kvm_uapi.py compares every number
here with the C header.

Traps in the header that these names reproduce faithfully:
  * KVM_SET_IRQCHIP is encoded _IOR (0x8208ae63), not _IOW.
  * KVM_GET/SET_PIT2 share their nr (0x9f/0xa0) with KVM_GET/SET_VCPU_EVENTS;
    only the size field tells them apart. Likewise KVM_SET_TSC_KHZ/KVM_GET_TSC_KHZ
    share nr 0xa2/0xa3 with KVM_SET_DEBUGREGS/KVM_ENABLE_CAP.
  * KVM_REINJECT_CONTROL is _IO but takes a pointer to kvm_reinject_control.
"""

from ctypes import c_uint64, sizeof

from . import structs as _s

# Bit layout of an ioctl number (x86; asm-generic):
#   dir:2 | size:14 | type:8 | nr:8   (from most to least significant)
_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS

_IOC_NONE = 0
_IOC_WRITE = 1  # userspace writes, kernel reads
_IOC_READ = 2  # kernel writes, userspace reads


def _IOC(direction: int, type_: int, nr: int, size: int) -> int:
    """Encode an ioctl number."""
    if not 0 <= size < (1 << _IOC_SIZEBITS):
        raise ValueError(f"ioctl argument size {size} does not fit in {_IOC_SIZEBITS} bits")
    return (
        (direction << _IOC_DIRSHIFT)
        | (type_ << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def _IO(type_: int, nr: int) -> int:
    return _IOC(_IOC_NONE, type_, nr, 0)


def _IOR(type_: int, nr: int, ctype) -> int:
    return _IOC(_IOC_READ, type_, nr, sizeof(ctype))


def _IOW(type_: int, nr: int, ctype) -> int:
    return _IOC(_IOC_WRITE, type_, nr, sizeof(ctype))


def _IOWR(type_: int, nr: int, ctype) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, type_, nr, sizeof(ctype))


KVMIO = 0xAE

# The flexible-array structs are encoded with their header size only, as in C.
_kvm_msrs = _s.msrs_type(0)
_kvm_msr_list = _s.msr_list_type(0)
_kvm_cpuid2 = _s.cpuid2_type(0)
_kvm_irq_routing = _s.irq_routing_type(0)

# -- /dev/kvm (system) ioctls -------------------------------------------------
KVM_GET_API_VERSION = _IO(KVMIO, 0x00)
KVM_CREATE_VM = _IO(KVMIO, 0x01)  # returns a VM fd
KVM_GET_MSR_INDEX_LIST = _IOWR(KVMIO, 0x02, _kvm_msr_list)
KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)  # also valid on VM fds
KVM_GET_VCPU_MMAP_SIZE = _IO(KVMIO, 0x04)
KVM_GET_SUPPORTED_CPUID = _IOWR(KVMIO, 0x05, _kvm_cpuid2)
KVM_GET_MSR_FEATURE_INDEX_LIST = _IOWR(KVMIO, 0x0A, _kvm_msr_list)

# -- VM ioctls -----------------------------------------------------------------
KVM_CREATE_VCPU = _IO(KVMIO, 0x41)  # returns a vCPU fd
KVM_GET_DIRTY_LOG = _IOW(KVMIO, 0x42, _s.KvmDirtyLog)
KVM_SET_USER_MEMORY_REGION = _IOW(KVMIO, 0x46, _s.KvmUserspaceMemoryRegion)
KVM_SET_TSS_ADDR = _IO(KVMIO, 0x47)
KVM_SET_IDENTITY_MAP_ADDR = _IOW(KVMIO, 0x48, c_uint64)
KVM_CREATE_IRQCHIP = _IO(KVMIO, 0x60)
KVM_IRQ_LINE = _IOW(KVMIO, 0x61, _s.KvmIrqLevel)
KVM_GET_IRQCHIP = _IOWR(KVMIO, 0x62, _s.KvmIrqchip)
KVM_SET_IRQCHIP = _IOR(KVMIO, 0x63, _s.KvmIrqchip)  # sic: _IOR in the header
KVM_IRQ_LINE_STATUS = _IOWR(KVMIO, 0x67, _s.KvmIrqLevel)
KVM_SET_GSI_ROUTING = _IOW(KVMIO, 0x6A, _kvm_irq_routing)
KVM_REINJECT_CONTROL = _IO(KVMIO, 0x71)  # arg: struct kvm_reinject_control *
KVM_IRQFD = _IOW(KVMIO, 0x76, _s.KvmIrqfd)
KVM_CREATE_PIT2 = _IOW(KVMIO, 0x77, _s.KvmPitConfig)
KVM_SET_BOOT_CPU_ID = _IO(KVMIO, 0x78)
KVM_IOEVENTFD = _IOW(KVMIO, 0x79, _s.KvmIoeventfd)
KVM_SET_CLOCK = _IOW(KVMIO, 0x7B, _s.KvmClockData)
KVM_GET_CLOCK = _IOR(KVMIO, 0x7C, _s.KvmClockData)
KVM_GET_PIT2 = _IOR(KVMIO, 0x9F, _s.KvmPitState2)  # nr shared with GET_VCPU_EVENTS
KVM_SET_PIT2 = _IOW(KVMIO, 0xA0, _s.KvmPitState2)  # nr shared with SET_VCPU_EVENTS
KVM_SIGNAL_MSI = _IOW(KVMIO, 0xA5, _s.KvmMsi)
KVM_CLEAR_DIRTY_LOG = _IOWR(KVMIO, 0xC0, _s.KvmClearDirtyLog)
KVM_RESET_DIRTY_RINGS = _IO(KVMIO, 0xC7)

# -- VM and vCPU ioctls ------------------------------------------------------------
KVM_ENABLE_CAP = _IOW(KVMIO, 0xA3, _s.KvmEnableCap)

# -- vCPU ioctls -----------------------------------------------------------------
KVM_RUN = _IO(KVMIO, 0x80)
KVM_GET_REGS = _IOR(KVMIO, 0x81, _s.KvmRegs)
KVM_SET_REGS = _IOW(KVMIO, 0x82, _s.KvmRegs)
KVM_GET_SREGS = _IOR(KVMIO, 0x83, _s.KvmSregs)
KVM_SET_SREGS = _IOW(KVMIO, 0x84, _s.KvmSregs)
KVM_TRANSLATE = _IOWR(KVMIO, 0x85, _s.KvmTranslation)
KVM_GET_MSRS = _IOWR(KVMIO, 0x88, _kvm_msrs)
KVM_SET_MSRS = _IOW(KVMIO, 0x89, _kvm_msrs)
KVM_SET_SIGNAL_MASK = _IOW(KVMIO, 0x8B, _s.KvmSignalMask)
KVM_GET_FPU = _IOR(KVMIO, 0x8C, _s.KvmFpu)
KVM_SET_FPU = _IOW(KVMIO, 0x8D, _s.KvmFpu)
KVM_GET_LAPIC = _IOR(KVMIO, 0x8E, _s.KvmLapicState)
KVM_SET_LAPIC = _IOW(KVMIO, 0x8F, _s.KvmLapicState)
KVM_SET_CPUID2 = _IOW(KVMIO, 0x90, _kvm_cpuid2)
KVM_GET_CPUID2 = _IOWR(KVMIO, 0x91, _kvm_cpuid2)
KVM_GET_MP_STATE = _IOR(KVMIO, 0x98, _s.KvmMpState)
KVM_SET_MP_STATE = _IOW(KVMIO, 0x99, _s.KvmMpState)
KVM_SET_GUEST_DEBUG = _IOW(KVMIO, 0x9B, _s.KvmGuestDebug)
KVM_GET_VCPU_EVENTS = _IOR(KVMIO, 0x9F, _s.KvmVcpuEvents)
KVM_SET_VCPU_EVENTS = _IOW(KVMIO, 0xA0, _s.KvmVcpuEvents)
KVM_GET_DEBUGREGS = _IOR(KVMIO, 0xA1, _s.KvmDebugregs)
KVM_SET_DEBUGREGS = _IOW(KVMIO, 0xA2, _s.KvmDebugregs)
KVM_SET_TSC_KHZ = _IO(KVMIO, 0xA2)
KVM_GET_TSC_KHZ = _IO(KVMIO, 0xA3)
KVM_GET_XSAVE = _IOR(KVMIO, 0xA4, _s.KvmXsave)
KVM_SET_XSAVE = _IOW(KVMIO, 0xA5, _s.KvmXsave)
KVM_GET_XCRS = _IOR(KVMIO, 0xA6, _s.KvmXcrs)
KVM_SET_XCRS = _IOW(KVMIO, 0xA7, _s.KvmXcrs)
KVM_KVMCLOCK_CTRL = _IO(KVMIO, 0xAD)

# number -> name, for error messages. Every number above is distinct (the test
# checks), so the reverse map is unambiguous.
IOCTL_NAMES = {
    value: name
    for name, value in dict(globals()).items()
    if name.startswith("KVM_") and isinstance(value, int)
}

__all__ = ["KVMIO", "IOCTL_NAMES", *IOCTL_NAMES.values()]
