"""Host file operations the os module lacks: fallocate(2) with its mode flags (os.posix_fallocate
only reserves space; punching holes and zeroing ranges need the Linux call), and a walk over a
file's data and holes (lseek SEEK_DATA/SEEK_HOLE)."""

from __future__ import annotations

import ctypes
import errno
import os
from typing import Iterator

FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x01, 0x02, 0x10

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


def extents(fd: int, start: int, end: int) -> Iterator[tuple[int, int, bool]]:
    """(offset, length, holds data?) for consecutive pieces of [start, end) of the file: data
    extents and holes, as the file system reports them. Where it cannot tell (no SEEK_DATA
    support), everything is data; a device reads as data throughout."""
    at = start
    while at < end:
        try:
            data = os.lseek(fd, at, os.SEEK_DATA)
        except OSError as error:
            if error.errno == errno.ENXIO:  # no data from here to the end of the file
                data = end
            elif error.errno == errno.EINVAL:
                yield at, end - at, True
                return
            else:
                raise
        data = min(data, end)
        if data > at:
            yield at, data - at, False
        if data == end:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        yield data, hole - data, True
        at = hole
