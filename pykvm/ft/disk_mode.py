"""Where the standby's disks come from (`--ft-disk`, protocol.DISK_MODES: the primary's choice;
the standby follows its Hello).

replicated (the default): the standby has a copy of each disk of its own. A disk write is not an
output: it completes on the primary at once and travels to the standby with the next sync (as
in Remus), which applies it under its undo journal (ft.journal). Only frames wait for a sync.
A flush completes at once as well (Blk.durable_elsewhere): the standby's commit makes the sync
durable before any frame that follows the flush leaves; the primary flushes its own disks
before it goes on alone, and when it ends.

shared (Kemari): both VMMs open the same file (shared storage). The standby receives no disk
data; a disk write is an output and waits for the sync whose state precedes it, so the file
never holds a write that the state a standby would take over from does not precede.

A shared disk's identity is what makes two opens one file: its size, the file system it lives
on (statvfs's f_fsid) and its inode number, or, for a block device, the device number. On one
host that is exactly "the same file" (a hard link is the same file, a copy is not); across hosts
it holds on a network or cluster file system that reports the server's inode numbers and one
file system id to every client. The standby refuses a primary whose shared disk it cannot open
for writing (it needs to once it takes over), or whose size or identity differs from its own.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import astuple, dataclass
from typing import Iterable, Iterator

from pykvm.devices.virtio.blk import DiskImage
from pykvm.devices.virtio.gate import DiskChange
from pykvm.hostfile import extents

PIECE = 1 << 20  # a written range is read this much at a time


@dataclass(frozen=True)
class DiskIdentity:
    size: int
    filesystem: int  # f_fsid; 0 for a block device
    file: int  # the inode number; a block device's device number

    @classmethod
    def of(cls, fd: int) -> DiskIdentity:
        info = os.fstat(fd)
        if stat.S_ISBLK(info.st_mode):
            return cls(os.lseek(fd, 0, os.SEEK_END), 0, info.st_rdev)
        return cls(info.st_size, os.fstatvfs(fd).f_fsid, info.st_ino)

    def encode(self) -> list[int]:
        return list(astuple(self))


def contents(image: DiskImage, ranges: Iterable[tuple[int, int]]) -> Iterator[DiskChange]:
    """What a replicated disk holds in `ranges` ((offset, length), merged), as changes: holes
    (SEEK_DATA/SEEK_HOLE) and all-zero pieces as zeroed ranges, data a piece at a time."""
    for start, length in ranges:
        for offset, size, holds_data in extents(image.fd, start, start + length):
            if not holds_data:
                yield DiskChange(offset, zeroed=size)
                continue
            for at in range(offset, offset + size, PIECE):
                piece = min(PIECE, offset + size - at)
                data = image.read(at, piece)
                if len(data) != piece:
                    raise OSError(errno.EIO, f"short read of {image.spec.path} ({len(data)} of {piece} bytes at {at})")
                yield DiskChange(at, zeroed=piece) if data.count(0) == piece else DiskChange(at, data)


def identities(images: list[DiskImage]) -> tuple[tuple[int, int, int], ...]:
    """What the primary's Hello says of its shared disks."""
    return tuple(tuple(DiskIdentity.of(image.fd).encode()) for image in images)


def shared_disk_refusal(images: list[DiskImage], theirs: tuple[tuple[int, int, int], ...]) -> str | None:
    """Why this standby cannot share the primary's disks (`theirs`, from its Hello), or None.
    Each path is opened afresh: what counts is the file a takeover would write."""
    if len(theirs) != len(images):
        return f"the primary shares {len(theirs)} disks, this standby has {len(images)}"
    for index, (image, (size, filesystem, file)) in enumerate(zip(images, theirs)):
        path = image.spec.path
        if image.spec.readonly:
            return f"shared disk {index} ({path}) is read-only here: a standby that takes over writes it"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as error:
            return f"cannot open shared disk {index} ({path}) for writing: {error.strerror}"
        try:
            ours = DiskIdentity.of(fd)
        finally:
            os.close(fd)
        if ours.size != size:
            return f"shared disk {index} ({path}) has {ours.size} bytes, the primary's {size}: not the same disk"
        if (ours.filesystem, ours.file) != (filesystem, file):
            return (f"shared disk {index} ({path}) is not the primary's file (file system {ours.filesystem:#x}, "
                    f"file {ours.file}; the primary's: {filesystem:#x}, {file}): a shared disk is one file both open")
        if DiskIdentity.of(image.fd) != ours:
            return f"shared disk {index} ({path}) names another file than the one this standby opened at start"
    return None
