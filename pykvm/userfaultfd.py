"""userfaultfd(2) write-protection, as ctypes mirrors of <linux/userfaultfd.h>: the syscall, the
UFFDIO_API handshake, registering a range in write-protect mode, protecting and unprotecting
ranges, and reading fault messages.

A range registered with UFFDIO_REGISTER_MODE_WP and protected with UFFDIO_WRITEPROTECT lets
every read through; the first write to a protected page (by any thread, and by KVM on behalf of
a vCPU inside KVM_RUN) blocks the writer and queues a message naming the page. Whoever serves
the descriptor does what it must (FT's copy-on-write copies the page aside) and unprotects the
page, which wakes the writer. Nothing here knows about guest RAM or FT (pykvm.ft.cow does).

Needs root here (vm.unprivileged_userfaultfd=0) and UFFD_FEATURE_WP_UNPOPULATED: without it,
pages never touched are silently left unprotected. The descriptor is opened O_NONBLOCK (poll on
a blocking one reports POLLERR), and without UFFD_USER_MODE_ONLY (with it, KVM_RUN fails
with EFAULT: KVM's own accesses to guest RAM are kernel-mode faults).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import select
import struct

from pykvm.kvm.ioctls import _IOR, _IOWR

SYS_USERFAULTFD = 323  # x86_64
UFFD_API = 0xAA
UFFDIO = 0xAA

UFFD_FEATURE_PAGEFAULT_FLAG_WP = 1 << 0
UFFD_FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13

UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0

UFFD_EVENT_PAGEFAULT = 0x12
UFFD_PAGEFAULT_FLAG_WRITE = 1 << 0
UFFD_PAGEFAULT_FLAG_WP = 1 << 1

_UFFDIO_WRITEPROTECT_BIT = 0x06  # the bit of UFFDIO_WRITEPROTECT in a registration's `ioctls`


class UffdioApi(ctypes.Structure):
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class UffdioRange(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class UffdioRegister(ctypes.Structure):
    _fields_ = [("range", UffdioRange), ("mode", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class UffdioWriteprotect(ctypes.Structure):
    _fields_ = [("range", UffdioRange), ("mode", ctypes.c_uint64)]


UFFDIO_API = _IOWR(UFFDIO, 0x3F, UffdioApi)
UFFDIO_REGISTER = _IOWR(UFFDIO, 0x00, UffdioRegister)
UFFDIO_UNREGISTER = _IOR(UFFDIO, 0x01, UffdioRange)
UFFDIO_WRITEPROTECT = _IOWR(UFFDIO, _UFFDIO_WRITEPROTECT_BIT, UffdioWriteprotect)

# struct uffd_msg: event (u8), 7 reserved bytes, then for a page fault: flags, address (u64 each)
# and the thread id (u32); 32 bytes in all.
UFFD_MSG_SIZE = 32
_MSG_HEAD = struct.Struct("<B7xQQ")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class UserfaultfdUnavailable(Exception):
    """This host cannot write-protect memory with userfaultfd (no permission, an old kernel, a
    missing feature); the message says which."""


class WriteProtector:
    """One userfaultfd, handling write-protect faults of the ranges registered on it."""

    def __init__(self) -> None:
        fd = _libc.syscall(SYS_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK)
        if fd < 0:
            err = ctypes.get_errno()
            hint = " (root is needed: vm.unprivileged_userfaultfd is 0)" if err == errno.EPERM else ""
            raise UserfaultfdUnavailable(f"userfaultfd: {os.strerror(err)}{hint}")
        self.fd = fd
        api = UffdioApi(UFFD_API, 0, 0)  # a first handshake with no features asks which exist
        try:
            fcntl.ioctl(fd, UFFDIO_API, api)
        except OSError as error:
            os.close(fd)
            raise UserfaultfdUnavailable(f"UFFDIO_API: {error.strerror}") from None
        wanted = UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_WP_UNPOPULATED
        if api.features & wanted != wanted:
            os.close(fd)
            raise UserfaultfdUnavailable("this kernel's userfaultfd lacks write-protection of unpopulated pages "
                                         "(UFFD_FEATURE_WP_UNPOPULATED)")
        # The API handshake may be done once per descriptor: open it again, asking for the features.
        os.close(fd)
        self.fd = _libc.syscall(SYS_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK)
        if self.fd < 0:
            raise UserfaultfdUnavailable(f"userfaultfd: {os.strerror(ctypes.get_errno())}")
        self.features = wanted | (api.features & UFFD_FEATURE_WP_HUGETLBFS_SHMEM)
        fcntl.ioctl(self.fd, UFFDIO_API, UffdioApi(UFFD_API, self.features, 0))
        self._message = bytearray(UFFD_MSG_SIZE * 64)

    def register(self, start: int, length: int) -> None:
        """Register [start, start+length) (page aligned) for write-protect faults."""
        request = UffdioRegister(UffdioRange(start, length), UFFDIO_REGISTER_MODE_WP, 0)
        try:
            fcntl.ioctl(self.fd, UFFDIO_REGISTER, request)
        except OSError as error:
            raise UserfaultfdUnavailable(f"UFFDIO_REGISTER of {length} bytes: {error.strerror}") from None
        if not request.ioctls >> _UFFDIO_WRITEPROTECT_BIT & 1:
            self.unregister(start, length)
            raise UserfaultfdUnavailable("this mapping cannot be write-protected with userfaultfd")

    def unregister(self, start: int, length: int) -> None:
        fcntl.ioctl(self.fd, UFFDIO_UNREGISTER, UffdioRange(start, length))

    def protect(self, start: int, length: int) -> None:
        """Write-protect [start, start+length): the next write to each page faults."""
        fcntl.ioctl(self.fd, UFFDIO_WRITEPROTECT, UffdioWriteprotect(UffdioRange(start, length),
                                                                     UFFDIO_WRITEPROTECT_MODE_WP))

    def unprotect(self, start: int, length: int) -> None:
        """Lift the protection of [start, start+length) and wake the writers blocked on it."""
        fcntl.ioctl(self.fd, UFFDIO_WRITEPROTECT, UffdioWriteprotect(UffdioRange(start, length), 0))

    def wait(self, timeout: float | None, *also: int) -> list[int]:
        """Block (the GIL released) until a fault is queued or one of the descriptors `also` is
        readable; returns the ready descriptors (empty after `timeout`)."""
        ready, _, _ = select.select([self.fd, *also], [], [], timeout)
        return ready

    def faults(self) -> list[int]:
        """The addresses of the write-protect faults queued now (none: an empty list)."""
        try:
            count = os.readv(self.fd, [self._message])
        except BlockingIOError:
            return []
        addresses = []
        for at in range(0, count - count % UFFD_MSG_SIZE, UFFD_MSG_SIZE):
            event, flags, address = _MSG_HEAD.unpack_from(self._message, at)
            if event == UFFD_EVENT_PAGEFAULT and flags & UFFD_PAGEFAULT_FLAG_WP:
                addresses.append(address)
        return addresses

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> WriteProtector:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
