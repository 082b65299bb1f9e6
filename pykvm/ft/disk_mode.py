"""Where the standby's disks come from (`--ft-disk`, protocol.DISK_MODES: the primary's choice;
the standby follows its Hello).

replicated (the default): the standby has a copy of each disk of its own. A disk write is not an
output: it completes on the primary at once and travels to the standby with the next sync (as
in Remus), which applies it under its undo journal (ft.journal). Only frames wait for a sync.
A flush completes at once as well (Blk.flush_deferred): each sync that covers a guest flush
fdatasyncs the primary's copy of that disk on a thread of its own while the sync travels
(`flush_for_sync`), and the outputs it covers wait for that flush as they wait for the Ack
(writes that no flush covers are not fdatasynced, as without FT). So a
flush's promise is kept by the primary's disk, and the standby's commit needs no fdatasync: its
page cache serves a takeover, which flushes the standby's disks before the guest runs. The
primary flushes its own disks before it goes on alone, and when it ends.

shared (Kemari): both VMMs open the same file (shared storage). The standby receives no disk
data; a disk write is an output and waits for the sync whose state precedes it, so the file
never holds a write that the state a standby would take over from does not precede.

A shared disk's identity is what makes two opens one file: its size, the file system it lives
on (statvfs's f_fsid) and its inode number, or, for a block device, the device number. On one
host that is exactly "the same file" (a hard link is the same file, a copy is not); across hosts
it holds on a network or cluster file system that reports the server's inode numbers and one
file system id to every client. The standby refuses a primary whose shared disk it cannot open
for writing (it needs to once it takes over), or whose size or identity differs from its own;
and, replicated, a primary whose disk it has read-only (`--disk PATH,readonly`), which it could
not write the syncs' disk changes to (`disk_refusal`).
"""

from __future__ import annotations

import errno
import functools
import os
import stat
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import astuple, dataclass
from typing import Callable, Iterable, Iterator

from pykvm.devices.virtio.blk import Blk, DiskImage
from pykvm.devices.virtio.gate import DiskChange
from pykvm.ft import faults
from pykvm.ft.journal import merge_ranges
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
                yield DiskChange(at, zeroed=piece) if _all_zero(data) else DiskChange(at, data)


def _all_zero(data: bytes) -> bool:
    """Compared with zeros, not counted: the comparison is a memcmp that stops at the first byte
    of data, where `bytes.count` walks every byte. Reading 32 MiB of written data back, as a
    capture does with the guest paused, took 15-17 ms counting and 3.5-4 ms comparing."""
    return data == (_zero_piece() if len(data) == PIECE else bytes(len(data)))


@functools.cache
def _zero_piece() -> bytes:
    return bytes(PIECE)


def identities(images: list[DiskImage]) -> tuple[tuple[int, int, int], ...]:
    """What the primary's Hello says of its shared disks."""
    return tuple(tuple(DiskIdentity.of(image.fd).encode()) for image in images)


def disk_refusal(mode: str, images: list[DiskImage], theirs: tuple[tuple[int, int, int], ...]) -> str | None:
    """Why this standby cannot follow a primary whose Hello says `mode` (and, shared, `theirs`)
    with these disks, or None."""
    if mode == "shared":
        return shared_disk_refusal(images, theirs)
    for index, image in enumerate(images):
        if image.spec.readonly:  # each sync's disk changes are written to it, and a takeover runs on it
            return (f"disk {index} ({image.spec.path}) is read-only here: a standby of replicated disks "
                    "writes each sync's disk changes to its copy")
    return None


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


class ReplicatedDisks:
    """The primary's record of its replicated disks' writes since the last sync (the ranges; the
    data is read back at the capture), and the deferred flushes it owes them. Writes are recorded
    from device threads; `backlog` tells the FT thread when enough piled up to start a sync."""

    def __init__(self, disks: list[Blk], on_backlog: Callable[[], None], backlog_limit: int) -> None:
        self.disks = disks
        self._on_backlog = on_backlog
        self.backlog_limit = backlog_limit
        self._written: list[list[tuple[int, int]]] = []  # per disk, ranges since the last capture
        self.backlog = 0  # their bytes
        self._flushes_seen: list[int] = []  # per disk, Blk.deferred_flushes at the last capture

    def attach(self) -> None:
        """From now on each write is recorded, and a guest flush completes at once (counted: the
        sync that covers it flushes the disk, flush_for_sync)."""
        self._written, self.backlog = [[] for _ in self.disks], 0
        self._flushes_seen = [disk.deferred_flushes for disk in self.disks]
        for index, disk in enumerate(self.disks):
            disk.write_observer = lambda offset, length, i=index: self._record(i, offset, length)
            disk.flush_deferred = True

    def detach(self) -> None:
        for disk in self.disks:
            disk.write_observer = None
        self._written = []

    def _record(self, index: int, offset: int, length: int) -> None:
        written = self._written
        if index >= len(written):
            return  # detached meanwhile (the standby was just lost): nothing is recorded any more
        written[index].append((offset, length))
        self.backlog += length
        if self.backlog >= self.backlog_limit:
            self._on_backlog()

    def take(self, full: bool) -> list[list[DiskChange]]:
        """(Quiesced) what the disks hold now in the ranges written since the last sync, read from
        the files: the disks as of the state this sync captures, each range once however often it
        was rewritten. Nothing for a full sync, which sends the whole disks."""
        written, self._written = self._written, [[] for _ in self._written]
        self.backlog = 0
        return [[] if full else list(contents(disk.disk, merge_ranges(ranges)))
                for disk, ranges in zip(self.disks, written)]

    def flush_for_sync(self, sync: int, *, full: bool) -> Future | None:
        """(Quiesced, at the capture of sync `sync`) start fdatasyncing the disks the guest flushed
        since the last capture (all of them for a full sync) on the flusher thread; None if there
        are none. The outputs the sync covers must wait for the result (which raises
        OwnFlushFailed) as for its Ack."""
        counts = [disk.deferred_flushes for disk in self.disks]
        disks = [disk for disk, now, seen in zip(self.disks, counts, self._flushes_seen) if full or now != seen]
        self._flushes_seen = counts
        return _flusher().submit(_flush_disks, sync, disks) if disks else None

    def flush_own(self, why: str, log: Callable[[str], None], *, alone: bool = False) -> bool:
        """The guest's flushes, deferred to the syncs while there was a standby, made here:
        before the primary goes on `alone`, or ends. False if a disk cannot be flushed."""
        for disk in self.disks:
            if disk.flush_deferred:
                disk.flush_deferred = False  # first: a flush from now on is made here again
                try:
                    _flush(disk, alone=alone)
                except OwnFlushFailed as error:
                    log(f"ft primary: {why}, but {error}")
                    return False
        return True


class OwnFlushFailed(Exception):
    """The primary's own copy of a disk cannot be flushed: a flush the guest was told is done is
    not durable here, so no output that follows it may leave (the primary fences)."""


def _flush_disks(sync: int, disks: list[Blk]) -> None:
    for disk in disks:
        _flush(disk, sync)


def _flush(disk: Blk, sync: int | None = None, *, alone: bool = False) -> None:
    """fdatasync the primary's copy of `disk` (`sync`: the sync it is made for; `alone`: made before
    going on without a standby; the faults' points)."""
    try:
        if sync is not None:
            faults.flushing_own(sync)
        elif alone:
            faults.flushing_alone()
        disk.disk.flush()
    except OSError as error:
        raise OwnFlushFailed(f"flushing {disk.disk.spec.path} failed: {error.strerror}") from None


@functools.cache
def _flusher() -> ThreadPoolExecutor:
    """The thread that flushes the primary's disks while a sync travels (fdatasync frees the GIL)."""
    return ThreadPoolExecutor(1, thread_name_prefix="ft-flush")
