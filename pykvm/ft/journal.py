"""The standby's undo journal, one beside each disk file: before a sync's disk changes touch the
disk, the old contents of every range they overwrite go to the journal. If applying the changes
fails part-way (ENOSPC, EIO), `rollback` puts the old contents back, so the disk holds the last
committed sync again. Once a sync is applied its journal is forgotten (marked empty). The
journal is not flushed: it serves this process, which rolls back at once; a standby that dies
is replaced by a new one, which starts from a full sync (and the disks' durability is the
primary's flush, see ft.disk_mode).

    journal = header record* (then whatever an earlier, longer journal left: ignored)
    header  = magic "PYKVUNDO", sync u64, end u64 (where the records end)
    record  = offset u64, length u64, holds data u8, xxh3-64 of (these fields + data),
              then the data (length bytes) if it holds data

The file is never truncated: each sync's journal overwrites blocks the file already has (a
truncated and regrown file costs the file system block allocations at every sync).

Holes are recorded as holes, without data: a sync that writes into a sparse region costs the
journal a few bytes, not the region's size (on a full disk the journal must still fit). Old
data is copied one piece at a time, so the journal holds at most a piece in memory.
"""

from __future__ import annotations

import errno
import os
import struct
from typing import Iterable, Iterator

import xxhash

from pykvm.devices.virtio.blk import DiskImage
from pykvm.errors import ConfigError
from pykvm.hostfile import extents

SUFFIX = ".ft-undo"
MAGIC = b"PYKVUNDO"
PIECE = 1 << 20  # old data is copied this much at a time
_HEADER = struct.Struct("<8sQQ")  # magic, sync, end of the records
_RECORD = struct.Struct("<QQBQ")  # offset, length, holds data, hash
_FIELDS = struct.Struct("<QQB")  # the record's fields the hash covers


class JournalError(Exception):
    """The journal does not read back whole: the disk cannot be rolled back from it."""


class UndoJournal:
    def __init__(self, image: DiskImage) -> None:
        """Creates the journal file now: a directory where it cannot be is found before any
        primary connects."""
        self.image = image
        self.path = image.spec.path + SUFFIX
        try:
            self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as error:
            raise ConfigError(f"{self.path}: cannot create the FT undo journal: {error.strerror}") from None

    def save(self, sync: int, ranges: Iterable[tuple[int, int]]) -> None:
        """Record what the disk holds now in `ranges` ((offset, length) pairs, in any order,
        overlapping or not) before sync `sync` overwrites them."""
        fd = self._fd
        if fd is None:
            raise OSError(errno.EBADF, f"{self.path}: the journal is closed")
        at = _HEADER.size
        for offset, length in merge_ranges(ranges):
            for start, size, holds_data in extents(self.image.fd, offset, offset + length):
                if not holds_data:
                    at = _write_record(fd, at, start, size, None)
                    continue
                for piece in range(start, start + size, PIECE):
                    piece_size = min(PIECE, start + size - piece)
                    at = _write_record(fd, at, piece, piece_size, _pread_all(self.image.fd, piece, piece_size))
        _pwrite_all(fd, _HEADER.pack(MAGIC, sync, at), 0)

    def rollback(self) -> None:
        """Put back what `save` recorded and flush the disk. Holes first: punching them frees the
        space that writing the old data back may need on a full file system."""
        if self._fd is None:
            raise JournalError(f"{self.path}: the journal is closed")
        records = list(self._records(self._end()))
        for offset, length, data_at, digest in sorted(records, key=lambda record: record[2] is not None):
            if data_at is None:
                self.image.zero(offset, length)
            else:
                data = _pread_all(self._fd, data_at, length)
                self._check(offset, length, data, digest)
                self.image.write(offset, data)
        self.image.flush()

    def clear(self) -> None:
        """The sync is applied: its journal is no longer needed. It is marked empty; the file
        keeps its blocks for the next one."""
        if self._fd is not None:
            _pwrite_all(self._fd, _HEADER.pack(MAGIC, 0, _HEADER.size), 0)

    def close(self) -> None:
        """Close the journal; an empty one is removed (one that is not holds what a failed
        rollback could not put back). The descriptor is released even if reading the header or
        removing the file fails (OSError: the file gone already, an I/O error)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            try:
                empty = _end(fd, self.path) == _HEADER.size
            except JournalError:
                empty = os.fstat(fd).st_size == 0
            if empty:
                os.unlink(self.path)
        finally:
            os.close(fd)

    def _end(self) -> int:
        return _end(self._fd, self.path)

    def _records(self, end: int) -> Iterator[tuple[int, int, int | None, int]]:
        """(offset, length, where its old data is or None for a hole, hash) of each record up to
        `end`; a hole's hash is checked here, old data's when it is read back."""
        fd, at = self._fd, _HEADER.size
        while at < end:
            raw = os.pread(fd, _RECORD.size, at)
            if len(raw) != _RECORD.size:
                raise JournalError(f"{self.path}: a record is cut short")
            offset, length, holds_data, digest = _RECORD.unpack(raw)
            at += _RECORD.size
            if holds_data not in (0, 1) or offset + length > self.image.size or (
                    holds_data and (length > PIECE or at + length > end)):
                raise JournalError(f"{self.path}: a damaged record at byte {at - _RECORD.size}")
            if not holds_data:
                self._check(offset, length, None, digest)
            yield offset, length, (at if holds_data else None), digest
            at += length if holds_data else 0

    def _check(self, offset: int, length: int, data: bytes | None, digest: int) -> None:
        if _record_hash(offset, length, data) != digest:
            raise JournalError(f"{self.path}: the record of [{offset}, {offset + length}) fails its checksum")


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """(offset, length) ranges sorted, with overlapping and touching ones merged."""
    merged: list[tuple[int, int]] = []
    for offset, length in sorted(r for r in ranges if r[1] > 0):
        if merged and offset <= merged[-1][0] + merged[-1][1]:
            last_offset, last_length = merged[-1]
            merged[-1] = (last_offset, max(last_length, offset + length - last_offset))
        else:
            merged.append((offset, length))
    return merged


def _end(fd: int, path: str) -> int:
    """Where the records of the journal end, from its header."""
    header = os.pread(fd, _HEADER.size, 0)
    if len(header) != _HEADER.size or _HEADER.unpack(header)[0] != MAGIC:
        raise JournalError(f"{path}: no journal header")
    end = _HEADER.unpack(header)[2]
    if not _HEADER.size <= end <= os.fstat(fd).st_size:
        raise JournalError(f"{path}: the header says the records end at byte {end}")
    return end


def _write_record(fd: int, at: int, offset: int, length: int, data: bytes | None) -> int:
    at = _pwrite_all(fd, _RECORD.pack(offset, length, data is not None, _record_hash(offset, length, data)), at)
    return _pwrite_all(fd, data, at) if data is not None else at


def _record_hash(offset: int, length: int, data: bytes | None) -> int:
    digest = xxhash.xxh3_64(_FIELDS.pack(offset, length, data is not None))
    if data is not None:
        digest.update(data)
    return digest.intdigest()


def _pread_all(fd: int, offset: int, length: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise OSError(errno.EIO, f"short read ({len(data)} of {length} bytes at {offset})")
    return data


def _pwrite_all(fd: int, data: bytes, offset: int) -> int:
    """Write all of `data` at `offset` (a short write continues; ENOSPC raises); returns the end."""
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done
    return offset
