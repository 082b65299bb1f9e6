"""The KVM system fd (/dev/kvm): what the host supports, and creating VMs.

Modelled on rust-vmm's kvm-ioctls: ``Kvm`` creates ``VmFd``s, which create ``VcpuFd``s; each
method is one ioctl and a failed one raises :class:`KvmError` naming it.
"""

from __future__ import annotations

import os

from .calls import OwnedFd, get_growing, ioctl
from .constants import KVM_API_VERSION
from .errors import KvmError, KvmUnavailable, unavailable
from .ioctls import (
    KVM_CHECK_EXTENSION,
    KVM_CREATE_VM,
    KVM_GET_API_VERSION,
    KVM_GET_MSR_INDEX_LIST,
    KVM_GET_SUPPORTED_CPUID,
    KVM_GET_VCPU_MMAP_SIZE,
)
from .structs import cpuid2_type, msr_list_type
from .vm_fd import VmFd

__all__ = ["Kvm"]


class Kvm(OwnedFd):
    """The KVM system fd (/dev/kvm)."""

    def __init__(self, path: str = "/dev/kvm"):
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise unavailable(path, exc) from None
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

    def api_version(self) -> int:
        return ioctl(self.fd, KVM_GET_API_VERSION)

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION: 0 if unsupported, else 1 or a cap-specific value."""
        return ioctl(self.fd, KVM_CHECK_EXTENSION, cap)

    def vcpu_mmap_size(self) -> int:
        return ioctl(self.fd, KVM_GET_VCPU_MMAP_SIZE)

    def supported_cpuid(self, max_entries: int = 256):
        """KVM_GET_SUPPORTED_CPUID as a ``cpuid2_type(nent)`` struct."""
        return get_growing(self.fd, KVM_GET_SUPPORTED_CPUID, cpuid2_type, "nent", max_entries)

    def msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: the MSRs to save/restore."""
        lst = get_growing(self.fd, KVM_GET_MSR_INDEX_LIST, msr_list_type, "nmsrs", 256)
        return list(lst.indices)

    def create_vm(self, machine_type: int = 0) -> VmFd:
        vcpu_mmap_size = self.vcpu_mmap_size()
        return VmFd(ioctl(self.fd, KVM_CREATE_VM, machine_type), vcpu_mmap_size)
