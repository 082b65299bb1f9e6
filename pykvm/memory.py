"""Guest RAM: mmap'd slots, bounds-checked access, and the VMM-side dirty bitmap.

Guest-physical addresses are translated to a (slot, offset) pair; every access is checked against
the slot so a bad address from a guest (or a bug of ours) raises GuestMemoryError instead of
touching host memory. Writes the VMM makes into guest RAM are recorded in a per-slot dirty bitmap,
because KVM's dirty log only sees writes made by the guest's vCPUs; migration and FT merge both.
write() and its kin mark what they wrote; a write through a view() is marked by the writer, after
the write (mark_dirty).

While FT's copy-on-write sync has pages write-protected (pykvm.ft.cow over pykvm.userfaultfd), a
VMM thread that wrote a protected page while holding the GIL would wait for the fault handler,
a Python thread that needs the GIL: the process would hang. So every write the VMM makes itself
goes through `write_barrier` first (write() and its kin, writable_view(), prepare_write() for
views kept across requests such as the rings), which makes the pages writable in the writing
thread. Syscalls that write guest RAM (preadv, readv) release the GIL and need nothing.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import xxhash

if TYPE_CHECKING:
    import numpy as np  # imported where bitmaps are scanned (migration, FT): a plain run never loads it

PAGE_SIZE = 4096
PAGE_SHIFT = 12

# The x86 PC keeps [3 GiB, 4 GiB) for MMIO (LAPIC, IOAPIC, PCI BARs, KVM's TSS); RAM beyond that
# point continues above 4 GiB, as on QEMU's and Firecracker's machines.
MMIO_HOLE_START = 0xC000_0000
MMIO_HOLE_END = 0x1_0000_0000

# Linux's value; the mmap module only exports it from Python 3.13 on. Guest RAM is reserved lazily.
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


WriteBarrier = Callable[["MemorySlot", int, int], None]
"""(slot, offset, length): make those bytes writable by the calling thread (copy-on-write)."""


class GuestMemoryError(Exception):
    """A guest-physical access outside RAM (or crossing the end of a slot)."""


@dataclass(eq=False)
class MemorySlot:
    """One contiguous range of guest RAM backed by one host mapping (one KVM memslot)."""

    index: int
    guest_addr: int
    size: int
    mapping: mmap.mmap
    fd: int | None  # memfd behind the mapping, when shared-file backed
    from_image: bool = False  # mapped copy-on-write from a snapshot file
    view: memoryview = field(init=False, repr=False)
    host_addr: int = field(init=False)
    # One bit per page, in the layout KVM_GET_DIRTY_LOG uses, so the two can be OR-ed directly.
    # Cleared in place, never replaced: `dirty_words` (u64 items as Python ints) and `dirty` (the
    # same memory as a numpy array, made when first asked for) stay valid.
    dirty_words: memoryview = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.view = memoryview(self.mapping)
        anchor = ctypes.c_char.from_buffer(self.mapping)
        self.host_addr = ctypes.addressof(anchor)
        del anchor  # release the buffer export so the mapping can be closed later
        words = self.pages // 64 + (self.pages % 64 != 0)
        self.dirty_words = memoryview(bytearray(8 * words)).cast("Q")  # a store is ~10x cheaper than numpy's
        self._dirty_array: np.ndarray | None = None

    @property
    def dirty(self) -> np.ndarray:
        if self._dirty_array is None:
            import numpy as np

            self._dirty_array = np.frombuffer(self.dirty_words, dtype=np.uint64)
        return self._dirty_array

    @property
    def pages(self) -> int:
        return self.size >> PAGE_SHIFT

    @property
    def end(self) -> int:
        return self.guest_addr + self.size


def ram_layout(size: int) -> list[tuple[int, int]]:
    """Split `size` bytes of RAM into (guest_addr, length) ranges around the MMIO hole."""
    if size <= MMIO_HOLE_START:
        return [(0, size)]
    return [(0, MMIO_HOLE_START), (MMIO_HOLE_END, size - MMIO_HOLE_START)]


class GuestMemory:
    """All of a VM's RAM. Thread-safe for concurrent device access; the dirty bitmap has a lock."""

    def __init__(self, size: int, *, shared: bool = False, image: tuple[int, list[int]] | None = None,
                 populate: bool = False) -> None:
        """`image` = (fd, file offset of each slot): map RAM copy-on-write from a snapshot file,
        so restoring costs no copy, whatever the size; pages are read when the guest touches them.
        `populate`: fault every page in now (an FT standby, whose commits would otherwise pay a
        page fault for each page the primary touches for the first time)."""
        if size <= 0 or size % PAGE_SIZE:
            raise ValueError(f"guest memory size must be a positive multiple of {PAGE_SIZE}")
        self.size = size
        self.slots: list[MemorySlot] = []
        self._dirty_lock = threading.Lock()
        # Set while pages may be write-protected (ft.cow); runtime writers are device models under
        # their function's lock, which the protecting side takes before it protects anything.
        self.write_barrier: WriteBarrier | None = None
        # Whether anyone harvests the VMM-side bitmap (the VM turns it off while no dirty log is
        # kept, and back on before one starts): marks nobody will read cost ~1.5 us each on every
        # request a device serves.
        self.tracking = True
        for index, (guest_addr, length) in enumerate(ram_layout(size)):
            if image is not None:
                fd, offsets = image
                mapping = mmap.mmap(fd, length, flags=MAP_NORESERVE | mmap.MAP_PRIVATE, offset=offsets[index])
                self.slots.append(MemorySlot(index, guest_addr, length, mapping, None, from_image=True))
            else:
                self.slots.append(self._map_slot(index, guest_addr, length, shared, populate))

    @staticmethod
    def _map_slot(index: int, guest_addr: int, length: int, shared: bool, populate: bool) -> MemorySlot:
        flags = MAP_NORESERVE | (mmap.MAP_POPULATE if populate else 0)
        if shared:
            # A memfd lets another process (a snapshot writer, a standby) map the same RAM.
            fd = os.memfd_create(f"pykvm-ram{index}", os.MFD_CLOEXEC)
            os.ftruncate(fd, length)
            mapping = mmap.mmap(fd, length, flags=flags | mmap.MAP_SHARED)
        else:
            fd = None
            mapping = mmap.mmap(-1, length, flags=flags | mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        return MemorySlot(index, guest_addr, length, mapping, fd)

    def close(self) -> None:
        for slot in self.slots:
            slot.view.release()
            try:
                slot.mapping.close()
            except BufferError:
                pass  # a view is still held somewhere: the mapping goes when the last one does
            if slot.fd is not None:
                os.close(slot.fd)
        self.slots = []

    # -- translation ---------------------------------------------------------------------------

    def locate(self, addr: int, length: int) -> tuple[MemorySlot, int]:
        """Return (slot, offset) for [addr, addr+length), which must lie inside one slot."""
        for slot in self.slots:
            offset = addr - slot.guest_addr
            if 0 <= offset <= slot.size and 0 <= length <= slot.size - offset:
                return slot, offset
        raise GuestMemoryError(
            f"guest-physical access [{addr:#x}, {addr + length:#x}) is outside guest RAM"
        )

    def contains(self, addr: int, length: int) -> bool:
        for slot in self.slots:  # locate() without the exception: on every descriptor a device takes
            offset = addr - slot.guest_addr
            if 0 <= offset <= slot.size and 0 <= length <= slot.size - offset:
                return True
        return False

    # -- access --------------------------------------------------------------------------------

    def view(self, addr: int, length: int) -> memoryview:
        """A zero-copy view of guest RAM. Writes through it (by the caller, or a syscall like
        preadv) are not tracked: once they are done, and not before, call mark_dirty() for the
        range (DescriptorChain.written() does it for a request's buffers). A mark made before the
        write could be harvested by a pre-copy round in between, and the page sent without the data."""
        slot, offset = self.locate(addr, length)
        return slot.view[offset : offset + length]

    def writable_view(self, addr: int, length: int) -> memoryview:
        """view() for the VMM to write through (device-writable buffers): the pages are made
        writable first (see write_barrier). Mark the range dirty after writing, as for view()."""
        slot, offset = self.locate(addr, length)
        if self.write_barrier is not None:
            self.write_barrier(slot, offset, length)
        return slot.view[offset : offset + length]

    def prepare_write(self, slot: MemorySlot, offset: int, length: int) -> None:
        """Before writing a range already located through a view kept from earlier (a ring)."""
        if self.write_barrier is not None:
            self.write_barrier(slot, offset, length)

    def read(self, addr: int, length: int) -> bytes:
        slot, offset = self.locate(addr, length)
        return slot.mapping[offset : offset + length]

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        length = len(data)
        slot, offset = self.locate(addr, length)
        if self.write_barrier is not None:
            self.write_barrier(slot, offset, length)
        slot.view[offset : offset + length] = data
        self.mark(slot, offset, length)

    def fill(self, addr: int, length: int, byte: int = 0) -> None:
        slot, offset = self.locate(addr, length)
        if self.write_barrier is not None:
            self.write_barrier(slot, offset, length)
        ctypes.memset(slot.host_addr + offset, byte, length)  # inside the slot: locate checked it
        self.mark(slot, offset, length)

    def read_u16(self, addr: int) -> int:
        slot, offset = self.locate(addr, 2)
        return _U16.unpack_from(slot.view, offset)[0]

    def read_u32(self, addr: int) -> int:
        slot, offset = self.locate(addr, 4)
        return _U32.unpack_from(slot.view, offset)[0]

    def read_u64(self, addr: int) -> int:
        slot, offset = self.locate(addr, 8)
        return _U64.unpack_from(slot.view, offset)[0]

    def write_u16(self, addr: int, value: int) -> None:
        self._write_struct(_U16, addr, value)

    def write_u32(self, addr: int, value: int) -> None:
        self._write_struct(_U32, addr, value)

    def write_u64(self, addr: int, value: int) -> None:
        self._write_struct(_U64, addr, value)

    def _write_struct(self, fmt: struct.Struct, addr: int, value: int) -> None:
        slot, offset = self.locate(addr, fmt.size)
        if self.write_barrier is not None:
            self.write_barrier(slot, offset, fmt.size)
        fmt.pack_into(slot.view, offset, value)
        self.mark(slot, offset, fmt.size)

    # -- VMM-side dirty tracking -----------------------------------------------------------------

    def mark_dirty(self, addr: int, length: int) -> None:
        """Record a write the VMM made behind the guest's back (e.g. through a view), after it."""
        if not self.tracking:
            return
        slot, offset = self.locate(addr, length)
        self.mark(slot, offset, length)

    def mark(self, slot: MemorySlot, offset: int, length: int) -> None:
        """mark_dirty for a range already located (hot paths keep their (slot, offset))."""
        if length <= 0 or not self.tracking:
            return
        first = offset >> PAGE_SHIFT
        last = (offset + length - 1) >> PAGE_SHIFT
        with self._dirty_lock:
            if first >> 6 == last >> 6:  # the common case: a ring entry, buffers up to 64 pages
                slot.dirty_words[first >> 6] |= ((2 << (last - first)) - 1) << (first & 63)
            else:
                _set_bit_range(slot.dirty_words, first, last + 1)

    def take_dirty_into(self, slot: MemorySlot, bitmap: np.ndarray) -> None:
        """OR the slot's VMM dirty bitmap into `bitmap` and clear it (atomic w.r.t. writers)."""
        import numpy as np

        with self._dirty_lock:
            np.bitwise_or(bitmap, slot.dirty, out=bitmap)
            slot.dirty.fill(0)

    def take_dirty(self, slot: MemorySlot) -> np.ndarray:
        """Return a copy of the slot's VMM dirty bitmap and clear it (atomic w.r.t. writers)."""
        import numpy as np

        taken = np.zeros_like(slot.dirty)
        self.take_dirty_into(slot, taken)
        return taken


_ALL_ONES = 0xFFFF_FFFF_FFFF_FFFF


def _set_bit_range(words: memoryview, start: int, stop: int) -> None:
    """Set bits [start, stop) of a little-endian u64 bitmap (a memoryview of u64 items)."""
    first_word, last_word = start >> 6, (stop - 1) >> 6
    head = (_ALL_ONES << (start & 63)) & _ALL_ONES
    tail = _ALL_ONES >> (63 - ((stop - 1) & 63))
    if first_word == last_word:
        words[first_word] |= head & tail
        return
    words[first_word] |= head
    if last_word > first_word + 1:
        words[first_word + 1 : last_word] = memoryview(b"\xff" * (8 * (last_word - first_word - 1))).cast("Q")
    words[last_word] |= tail


SEEK_DATA, SEEK_HOLE = getattr(os, "SEEK_DATA", 3), getattr(os, "SEEK_HOLE", 4)
_PAGEMAP_PRESENT, _PAGEMAP_SWAPPED = 1 << 63, 1 << 62


def populated_pages(slot: MemorySlot, first: int = 0, stop: int | None = None) -> np.ndarray:
    """Page numbers, in [first, stop) (default: the whole slot), of the slot's pages that may hold
    something other than zeros: every page ever written, resident or swapped out (a migration's
    round 0 and the FT full sync send these, and the other side starts from zeros). Residency
    (mincore) is not the question: a swapped-out page holds data too.
    - memfd RAM: the file itself knows which pages hold data (SEEK_DATA/SEEK_HOLE walk the
      extents, swapped-out shmem pages included; pagemap would show those as never allocated);
    - anonymous RAM: /proc/self/pagemap, present or swapped;
    - RAM mapped from a snapshot file: scanned for zeros (a page of the file may be zeros)."""
    import numpy as np

    stop = slot.pages if stop is None else stop
    if not 0 <= first <= stop <= slot.pages:
        raise ValueError(f"pages [{first}, {stop}) are not within the slot's {slot.pages}")
    if slot.from_image:
        words = np.frombuffer(slot.view[first * PAGE_SIZE : stop * PAGE_SIZE], dtype=np.uint64)
        return first + np.flatnonzero(words.reshape(-1, PAGE_SIZE // 8).any(axis=1))
    if slot.fd is not None:
        return _data_pages(slot.fd, first * PAGE_SIZE, stop * PAGE_SIZE)
    return first + _mapped_pages(slot.host_addr + first * PAGE_SIZE, stop - first)


def _data_pages(fd: int, offset: int, end: int) -> np.ndarray:
    """Pages of a file's bytes [offset, end) that hold data, from its extents (one lseek pair per
    extent)."""
    import numpy as np

    runs = []
    while offset < end:
        try:
            start = os.lseek(fd, offset, SEEK_DATA)
        except OSError as error:
            if error.errno == errno.ENXIO:  # no data after `offset`
                break
            raise
        if start >= end:
            break
        stop = min(os.lseek(fd, start, SEEK_HOLE), end)
        runs.append(np.arange(start >> PAGE_SHIFT, (stop + PAGE_SIZE - 1) >> PAGE_SHIFT))
        offset = stop
    return np.concatenate(runs) if runs else np.empty(0, dtype=np.int64)


def _mapped_pages(host_addr: int, pages: int) -> np.ndarray:
    """Pages of an anonymous mapping that are present or swapped out (pagemap: one u64 per page;
    the flags are readable without privileges, only the frame numbers are hidden)."""
    import numpy as np

    with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
        entries = np.frombuffer(os.pread(pagemap.fileno(), pages * 8, (host_addr >> PAGE_SHIFT) * 8), dtype=np.uint64)
    return np.flatnonzero(entries & np.uint64(_PAGEMAP_PRESENT | _PAGEMAP_SWAPPED))


def dirty_pages(bitmap: np.ndarray) -> np.ndarray:
    """Page indices of the set bits of a u64 dirty bitmap, ascending (numpy, no Python loop):
    find the non-zero words, then unpack only those."""
    import numpy as np

    words = np.flatnonzero(bitmap)
    if words.size == 0:
        return np.empty(0, dtype=np.int64)
    # Unpacked as bools: numpy's nonzero scans a bool array several times faster than a uint8 one
    # (0.08 against 0.3 ms for 3000 scattered pages), and this runs inside every FT pause.
    bits = np.flatnonzero(np.unpackbits(bitmap[words].view(np.uint8), bitorder="little").view(np.bool_))
    return (words[bits >> 6] << 6) | (bits & 63)


def page_runs(pages: np.ndarray) -> list[tuple[int, int]]:
    """(first page, count) of each run of consecutive page numbers (computed in numpy; only the
    final list is built in Python)."""
    import numpy as np

    if len(pages) == 0:
        return []
    pages = pages.astype(np.int64, copy=False)
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    bounds = np.concatenate(([0], breaks, [len(pages)]))
    return list(zip(pages[bounds[:-1]].tolist(), np.diff(bounds).tolist()))


def ram_hash(memory: GuestMemory) -> int:
    """xxh3-64 of all guest RAM, slot after slot: FT's verification mode compares both sides'.
    The pages the guest never populated are hashed as the zeros they read as, without reading
    them: a read would map the zero page into each, populated_pages would count it from then on,
    and a full sync to a new standby would send all of RAM."""
    digest = xxhash.xxh3_64()
    for slot in memory.slots:
        hashed = 0  # bytes of the slot hashed so far
        for first, count in page_runs(populated_pages(slot)):
            _hash_zeros(digest, first * PAGE_SIZE - hashed)  # the hole before this run
            hashed = (first + count) * PAGE_SIZE
            digest.update(slot.view[first * PAGE_SIZE : hashed])
        _hash_zeros(digest, slot.size - hashed)
    return digest.intdigest()


def _hash_zeros(digest: xxhash.xxh3_64, length: int) -> None:
    """`length` zero bytes into `digest`, a MiB at a time."""
    if length <= 0:
        return
    zeros = memoryview(bytes(min(length, 1 << 20)))
    for at in range(0, length, len(zeros)):
        digest.update(zeros[: length - at])
