"""The errors every KVM call raises, and how an errno becomes one."""

from __future__ import annotations

import errno as _errno
import os

from .ioctls import IOCTL_NAMES

__all__ = ["KvmError", "KvmUnavailable"]


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


def ioctl_error(request: int, exc: OSError) -> KvmError:
    """The KvmError for a failed ioctl, named after the ioctl."""
    name = IOCTL_NAMES.get(request, f"ioctl {request:#x}")
    return KvmError(exc.errno, f"{name} failed: {os.strerror(exc.errno)}", name)


def unavailable(path: str, exc: OSError) -> KvmUnavailable:
    """Why opening /dev/kvm failed, phrased as what the user can do about it."""
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
