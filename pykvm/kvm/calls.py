"""What the three fd wrappers share: the one ioctl helper, its GET/SET shapes, closing.

State structs are ctypes objects passed to ``fcntl.ioctl`` as mutable buffers, so the kernel
reads and writes them in place (CPython bounces buffers of up to 1 KiB through a stack copy and
hands bigger ones over directly).
"""

from __future__ import annotations

import ctypes
import errno as _errno
import fcntl
import os
from typing import Self

from .errors import KvmError, ioctl_error
from .ioctls import IOCTL_NAMES

fcntl_ioctl = fcntl.ioctl
_INT_MIN, _INT_MAX = -(1 << 31), (1 << 31) - 1
# Growth bound for the E2BIG retry loops; KVM's own limits are far below.
_MAX_LIST_ENTRIES = 1 << 16
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


def ioctl(fd: int, request: int, arg=0) -> int:
    """ioctl(fd, request, arg) -> return value; failures raise KvmError.

    ``arg`` is an int, or a ctypes object (any writable buffer) that the
    kernel reads and/or fills in place.
    """
    try:
        if arg.__class__ is int and not _INT_MIN <= arg <= _INT_MAX:
            return _ioctl_ulong(fd, request, arg)
        return fcntl_ioctl(fd, request, arg, True)
    except OSError as exc:
        raise ioctl_error(request, exc) from None


def get_struct(fd: int, request: int, ctype):
    """A GET ioctl that fills a fresh ``ctype``."""
    obj = ctype()
    ioctl(fd, request, obj)
    return obj


def set_struct(fd: int, request: int, ctype, obj) -> None:
    """A SET ioctl; ``obj`` must be a ``ctype``."""
    # The kernel copies sizeof(ctype) bytes from our pointer: a smaller object
    # would let it read past the end, so insist on the right type.
    if not isinstance(obj, ctype):
        raise TypeError(f"{IOCTL_NAMES[request]} needs a {ctype.__name__}, not {type(obj).__name__}")
    ioctl(fd, request, obj)


def get_growing(fd: int, request: int, make_type, count_field: str, n: int):
    """Run a GET ioctl on a flexible-array struct, growing it while KVM says E2BIG.

    Returns the struct trimmed to the count KVM filled in.
    """
    while True:
        obj = make_type(n)()
        setattr(obj, count_field, n)
        try:
            ioctl(fd, request, obj)
        except KvmError as exc:
            if exc.errno != _errno.E2BIG or n >= _MAX_LIST_ENTRIES:
                raise
            # KVM writes back the count it needs; at least double anyway.
            n = max(2 * n, getattr(obj, count_field))
            continue
        filled = getattr(obj, count_field)
        return make_type(filled).from_buffer_copy(obj)


class OwnedFd:
    """What the three fd wrappers share: an fd closed once (then -1), usable in ``with``."""

    fd: int

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
