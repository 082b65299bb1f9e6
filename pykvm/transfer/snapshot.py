"""Snapshot files: a machine's configuration, state and RAM in one file.

    header    magic "PYKVMSNP", format version, section count, CRC-32 of header + section table
    table     per section: kind, offset, length, CRC-32 of its bytes
    CONFIG    the MachineConfig (JSON): RAM size, vCPUs, disks and NICs
    STATE     the MachineState (JSON): KVM's state and every device's
    MEMORY    one section per RAM slot, raw pages, starting on a 4 KiB boundary of the file

Restoring maps each MEMORY section MAP_PRIVATE straight from the file, so it reads no page up
front and takes the same time for 64 MiB as for 1 GiB; pages come in as the guest touches them.
The small sections are always checked against their CRC; the memory sections' CRCs only with
`verify_memory=True`, which reads all of RAM (a truncated file is always caught by its length).
"""

from __future__ import annotations

import collections
import contextlib
import enum
import mmap
import os
import tempfile
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import construct
import numpy as np
from construct import Bytes, Const, Int32ul, Int64ul, Struct

from pykvm.errors import ConfigError
from pykvm.kvm import KvmError
from pykvm.machine import Machine, MachineConfig, MachineState
from pykvm.memory import PAGE_SIZE, GuestMemory, MemorySlot, populated_pages, ram_layout
from pykvm.state import StateError, decode, encode

MAGIC = b"PYKVMSNP"
VERSION = 1
SKIP_ZERO_CHUNK = 1 << 20  # all-zero stretches of this size stay holes in the file
CRC_LAG = 16  # MiBs the CRC thread may be behind the writer
# The small sections are read whole into memory: bounded as a migration's HELLO and MACHINE_STATE
# frames are, checked on the table before anything is read (a sparse file may claim any length).
CONFIG_LIMIT = 1 << 20
STATE_LIMIT = 64 << 20


class SectionKind(enum.IntEnum):
    CONFIG = 1
    STATE = 2
    MEMORY = 3


Header = Struct(
    "magic" / Const(MAGIC),
    "version" / Int32ul,
    "sections" / Int32ul,
    "checksum" / Int32ul,  # of the header with this field zero, and the section table
    "reserved" / Bytes(12),
)
SectionEntry = Struct(
    "kind" / Int32ul,
    "index" / Int32ul,  # which RAM slot, for MEMORY
    "offset" / Int64ul,
    "length" / Int64ul,
    "checksum" / Int32ul,
    "reserved" / Bytes(4),
)


class SnapshotError(ConfigError):
    """A file that is not a snapshot we can restore (the CLI exits 2 with this message)."""


@dataclass
class Snapshot:
    """A snapshot file opened for restoring: its config and state, and where its RAM lies."""

    path: Path
    fd: int
    config: MachineConfig
    state: MachineState
    memory_offsets: list[int]

    def machine(self, *, serial_output, config: MachineConfig | None = None) -> Machine:
        """A machine running from this snapshot (RAM mapped copy-on-write from the file).
        `config` may swap backends (disk files, NICs) but not the machine's shape."""
        config = config or self.config
        check_same_shape(self.config, config)
        memory = GuestMemory(config.memory, image=(self.fd, self.memory_offsets))
        machine = Machine(config, serial_output=serial_output, memory=memory)
        try:
            machine.restore_state(self.state)
        except (StateError, KvmError) as error:  # well-formed, but not a state this machine (or KVM) takes
            machine.close()
            raise SnapshotError(f"{self.path}: the saved state does not restore: {error}") from None
        except BaseException:
            machine.close()
            raise
        return machine

    def close(self) -> None:
        os.close(self.fd)


def save(machine: Machine, path: str | Path, *, overwrite: bool = True) -> int:
    """Write a snapshot of a machine (caller holds it quiesced); returns the file size. Without
    `overwrite`, an existing file at `path` is left alone (FileExistsError)."""
    config = encode(machine.config)
    state = encode(machine.save_state())
    slots = machine.vm.memory.slots
    table_size = SectionEntry.sizeof() * (2 + len(slots))
    offset = Header.sizeof() + table_size
    entries, blobs = [], []
    for kind, blob in ((SectionKind.CONFIG, config), (SectionKind.STATE, state)):
        entries.append(dict(kind=kind, index=0, offset=offset, length=len(blob), checksum=zlib.crc32(blob),
                            reserved=bytes(4)))
        blobs.append((offset, blob))
        offset += len(blob)
    for slot in slots:
        offset = -(-offset // PAGE_SIZE) * PAGE_SIZE
        entries.append(dict(kind=SectionKind.MEMORY, index=slot.index, offset=offset, length=slot.size,
                            checksum=0, reserved=bytes(4)))  # the checksum is taken as RAM is written
        offset += slot.size

    path = Path(path)
    # A new file of our own beside the target (O_EXCL: never a FIFO or a device someone put there),
    # removed whatever goes wrong: a failed snapshot leaves nothing behind.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        try:
            os.fchmod(fd, 0o644)
            os.ftruncate(fd, offset)  # RAM that is all zeros stays a hole
            for at, blob in blobs:
                _write_all(fd, blob, at)
            for entry, slot in zip(entries[2:], slots):
                entry["checksum"] = _write_memory(fd, slot, entry["offset"])
            table = b"".join(SectionEntry.build(entry) for entry in entries)
            header = dict(version=VERSION, sections=len(entries), checksum=0, reserved=bytes(12))
            header["checksum"] = zlib.crc32(Header.build(header) + table)
            _write_all(fd, Header.build(header) + table, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, path)  # a snapshot appears whole or not at all
        else:
            os.link(tmp, path)  # whole, and only where nothing is (atomic, unlike a check first)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return offset


def _write_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _write_memory(fd: int, slot: MemorySlot, offset: int) -> int:
    """Write a RAM slot at `offset`, all-zero MiBs left as holes; returns its CRC-32. One pass a
    MiB: the zero test and the copy into the page cache read it on this thread while another
    takes the CRC of the same MiB (both calls free the GIL: the CRC, ~2 GB/s here, about as
    slow as the copy, no longer adds to it). Each MiB's writeback starts as soon as it is
    written (POSIX_FADV_DONTNEED starts it without waiting), so the disk works while RAM is
    still being copied instead of all at the fsync (a GiB is far below the dirty-page threshold
    that would start it otherwise).
    Only the pages the guest populated are read (memory.populated_pages): reading an untouched
    page would map the zero page (anonymous RAM) or allocate one (memfd RAM), and a migration
    after the snapshot would count it as populated and send it."""
    ram = slot.view
    per_chunk = SKIP_ZERO_CHUNK // PAGE_SIZE
    populated = np.ones(slot.pages, dtype=np.bool_)
    if not slot.from_image:  # a snapshot file's pages are read from the file, nothing is allocated
        populated[:] = False
        populated[populated_pages(slot)] = True
    zeros = bytes(SKIP_ZERO_CHUNK)
    crc = 0

    def add_to_crc(data: memoryview | bytes) -> None:  # on the CRC thread, in the order submitted
        nonlocal crc
        crc = zlib.crc32(data, crc)

    with ThreadPoolExecutor(1, thread_name_prefix="snapshot-crc") as checksum:
        behind: collections.deque[Future] = collections.deque()

        def crc_later(data: memoryview | bytes) -> None:
            behind.append(checksum.submit(add_to_crc, data))
            if len(behind) > CRC_LAG:  # bounds the copies of partly populated MiBs held for it
                behind.popleft().result()

        for start in range(0, len(ram), SKIP_ZERO_CHUNK):
            chunk = ram[start : start + SKIP_ZERO_CHUNK]
            which = populated[start // PAGE_SIZE : start // PAGE_SIZE + per_chunk]
            if not which.any():
                crc_later(zeros[: len(chunk)])
                continue
            if not which.all():  # the populated pages among zeros, as the guest sees them
                pages = np.zeros((len(which), PAGE_SIZE), dtype=np.uint8)
                pages[which] = np.frombuffer(chunk, dtype=np.uint8).reshape(-1, PAGE_SIZE)[which]
                chunk = memoryview(pages).cast("B")
            crc_later(chunk)
            if np.frombuffer(chunk, dtype=np.uint64).any():
                _write_all(fd, chunk, offset + start)
                os.posix_fadvise(fd, offset + start, len(chunk), os.POSIX_FADV_DONTNEED)
        for future in behind:
            future.result()
    return crc


def open_snapshot(path: str | Path, *, verify_memory: bool = False) -> Snapshot:
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SnapshotError(f"{path}: no such file") from None
    except OSError as error:
        raise SnapshotError(f"{path}: cannot open: {error.strerror}") from None
    try:
        return _read(path, fd, verify_memory)
    except BaseException:
        os.close(fd)
        raise


def _read(path: Path, fd: int, verify_memory: bool) -> Snapshot:
    size = os.fstat(fd).st_size
    head = os.pread(fd, Header.sizeof(), 0)
    if len(head) < Header.sizeof() or not head.startswith(MAGIC):
        raise SnapshotError(f"{path}: not a pykvm snapshot")
    header = Header.parse(head)
    if header.version > VERSION:
        raise SnapshotError(f"{path}: snapshot format version {header.version} is newer than this pykvm "
                            f"understands (version {VERSION}); restore it with a newer pykvm")
    if header.version != VERSION or not 3 <= header.sections <= 64:
        raise SnapshotError(f"{path}: damaged snapshot header")
    table = os.pread(fd, SectionEntry.sizeof() * header.sections, Header.sizeof())
    unsigned = Header.build(dict(header, checksum=0))
    if len(table) != SectionEntry.sizeof() * header.sections or zlib.crc32(unsigned + table) != header.checksum:
        raise SnapshotError(f"{path}: damaged snapshot header (checksum mismatch)")
    entries = [SectionEntry.parse(table[i : i + SectionEntry.sizeof()]) for i in range(0, len(table), SectionEntry.sizeof())]
    for entry in entries:
        if entry.offset + entry.length > size:
            raise SnapshotError(f"{path}: truncated snapshot ({size} bytes, a section ends at {entry.offset + entry.length})")
    by_kind = {kind: [e for e in entries if e.kind == kind] for kind in SectionKind}
    if len(by_kind[SectionKind.CONFIG]) != 1 or len(by_kind[SectionKind.STATE]) != 1:
        raise SnapshotError(f"{path}: damaged snapshot (missing configuration or state)")
    for kind, limit in ((SectionKind.CONFIG, CONFIG_LIMIT), (SectionKind.STATE, STATE_LIMIT)):
        if by_kind[kind][0].length > limit:
            raise SnapshotError(f"{path}: damaged snapshot ({kind.name.lower()} section of "
                                f"{by_kind[kind][0].length} bytes, the limit is {limit})")
    config_blob = _section(path, fd, by_kind[SectionKind.CONFIG][0])
    state_blob = _section(path, fd, by_kind[SectionKind.STATE][0])
    try:
        config = decode(MachineConfig, config_blob)
        state = decode(MachineState, state_blob)
    except StateError as error:
        raise SnapshotError(f"{path}: damaged snapshot ({error})") from None
    memory = sorted(by_kind[SectionKind.MEMORY], key=lambda e: e.index)
    layout = ram_layout(config.memory)
    if [e.length for e in memory] != [length for _, length in layout] or any(e.offset % PAGE_SIZE for e in memory):
        raise SnapshotError(f"{path}: damaged snapshot (memory sections do not match {config.memory} bytes of RAM)")
    if config.memory <= 0 or config.memory % PAGE_SIZE:
        raise SnapshotError(f"{path}: damaged snapshot (RAM size {config.memory} is not a positive multiple of {PAGE_SIZE})")
    if verify_memory:
        for entry in memory:
            _verify_memory(path, fd, entry)
    return Snapshot(path, fd, config, state, [e.offset for e in memory])


def _section(path: Path, fd: int, entry: construct.Container) -> bytes:
    data = os.pread(fd, entry.length, entry.offset)
    if zlib.crc32(data) != entry.checksum:
        raise SnapshotError(f"{path}: damaged snapshot ({SectionKind(entry.kind).name.lower()} section checksum mismatch)")
    return data


def _verify_memory(path: Path, fd: int, entry: construct.Container) -> None:
    with mmap.mmap(fd, entry.length, prot=mmap.PROT_READ, offset=entry.offset) as mapped:
        if zlib.crc32(mapped) != entry.checksum:
            raise SnapshotError(f"{path}: damaged snapshot (RAM slot {entry.index} checksum mismatch)")


def check_same_shape(saved: MachineConfig, wanted: MachineConfig) -> None:
    """Backends may change between save and restore; what the guest sees may not."""
    if (saved.memory, saved.cpus, len(saved.disks), len(saved.nets), saved.legacy_virtio) != (
        wanted.memory, wanted.cpus, len(wanted.disks), len(wanted.nets), wanted.legacy_virtio
    ):
        raise SnapshotError(
            f"the snapshot's machine ({saved.memory >> 20} MiB, {saved.cpus} vCPUs, {len(saved.disks)} disks, "
            f"{len(saved.nets)} NICs) differs from the one asked for ({wanted.memory >> 20} MiB, {wanted.cpus} vCPUs, "
            f"{len(wanted.disks)} disks, {len(wanted.nets)} NICs)"
        )
