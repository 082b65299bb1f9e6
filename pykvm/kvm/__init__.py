"""pykvm.kvm: the KVM ioctl layer (structs, constants, ioctl numbers, fd wrappers).

One module per file descriptor: system (/dev/kvm: ``Kvm``), vm_fd (``VmFd``), vcpu_fd
(``VcpuFd``); errors holds ``KvmError``, run_layout the kvm_run offsets the run loop reads.

    from pykvm.kvm import Kvm, KVM_CAP_IRQCHIP
    with Kvm() as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        regs = vcpu.get_regs()
"""

from .constants import *  # noqa: F401,F403
from .errors import KvmError, KvmUnavailable  # noqa: F401
from .system import Kvm  # noqa: F401
from .vcpu_fd import VcpuFd  # noqa: F401
from .vm_fd import VmFd  # noqa: F401
from .ioctls import *  # noqa: F401,F403
from .structs import *  # noqa: F401,F403
from . import constants as _constants, ioctls as _ioctls, structs as _structs

__all__ = [
    "Kvm",
    "VmFd",
    "VcpuFd",
    "KvmError",
    "KvmUnavailable",
    *(name for name in vars(_constants) if not name.startswith("_")),
    *_ioctls.__all__,
    *_structs.__all__,
]
