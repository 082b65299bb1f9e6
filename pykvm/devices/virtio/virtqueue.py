"""The split virtqueue (virtio 1.x, section 2.7) as a sans-IO object over guest memory.

It knows the ring layout and the rules a driver must follow, and nothing of devices, threads,
interrupts or notifications: a device pops descriptor chains, does its I/O on the buffers, puts
the chains on the used ring, and asks whether the driver wants an interrupt. Everything the guest
wrote — ring indices, descriptor addresses, lengths, flags, chain links — is checked; a violation
raises QueueError, after which the device must go to NEEDS_RESET (virtio 1.x, 2.1.2).

The ring indices and flags that driver and device share are read and written through
memoryviews cast to u16/u32, so each is one native load or store. struct.pack_into would not do:
it clears the field and then writes it byte by byte, so a driver polling used->idx could see 0
between two values, and a byte-wise read could catch avail->idx half updated.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from pykvm.memory import GuestMemory, GuestMemoryError

DESC_F_NEXT, DESC_F_WRITE, DESC_F_INDIRECT = 1, 2, 4
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1
MAX_QUEUE_SIZE = 32768
DESC_SIZE = 16
USED_ELEM_SIZE = 8

_DESC = struct.Struct("<QIHH")  # addr, len, flags, next


class QueueError(Exception):
    """The driver broke the virtqueue contract (the reason is for the log)."""


@dataclass(slots=True)
class DescriptorChain:
    """One request: the head index (returned in the used ring) and its buffers in order, the
    device-readable ones first, then the device-writable ones, as guest-physical (addr, len),
    with their total lengths and views of them (made by the walk that checked them, which
    knows their slot: a device takes them with no second translation)."""

    head: int
    readable: list[tuple[int, int]]
    writable: list[tuple[int, int]]
    readable_length: int
    writable_length: int
    in_views: list[memoryview] = field(repr=False)  # of the readable buffers
    out_views: list[memoryview] = field(repr=False)  # of the writable buffers

    def readable_views(self, memory: GuestMemory) -> list[memoryview]:
        return list(self.in_views)

    def writable_views(self, memory: GuestMemory) -> list[memoryview]:
        """Views for the device to write through (made writable now: see GuestMemory.write_barrier).
        Call written() once the writes are done."""
        if memory.write_barrier is not None:
            return [memory.writable_view(addr, length) for addr, length in self.writable]
        return list(self.out_views)

    def written(self, memory: GuestMemory) -> None:
        """Mark the device-writable buffers dirty for migration/FT, after the device wrote them:
        a mark made before the write could be harvested by a pre-copy round in between, and
        the page sent without the data."""
        if not memory.tracking:  # no dirty log kept: nobody would read the marks
            return
        for addr, length in self.writable:
            memory.mark_dirty(addr, length)

    def read(self, memory: GuestMemory, limit: int | None = None) -> bytes:
        """The readable bytes, concatenated (for small headers; data goes through views)."""
        out = bytearray()
        for addr, length in self.readable:
            take = length if limit is None else min(length, limit - len(out))
            out += memory.read(addr, take)
            if limit is not None and len(out) >= limit:
                break
        return bytes(out)

    def write(self, memory: GuestMemory, data: bytes | memoryview, skip: int = 0) -> int:
        """Scatter `data` into the writable buffers from byte `skip` on; returns bytes written."""
        done, view = 0, memoryview(data)
        for addr, length in self.writable:
            if skip >= length:
                skip -= length
                continue
            take = min(length - skip, len(view) - done)
            memory.write(addr + skip, view[done : done + take])
            done, skip = done + take, 0
            if done == len(view):
                break
        return done


@dataclass
class RingPosition:
    """How far device and driver have come on a ring, and the ring features it runs with: with
    the ring's size and addresses (the transport's queue registers), all it takes to rebuild it
    exactly (save/restore, migration, FT)."""

    next_avail: int
    next_used: int
    signalled_used: int
    event_idx: bool
    indirect: bool


class SplitQueue:
    def __init__(self, memory: GuestMemory, size: int, desc: int, avail: int, used: int, *,
                 event_idx: bool = False, indirect: bool = False) -> None:
        if size == 0 or size & (size - 1) or size > MAX_QUEUE_SIZE:
            raise QueueError(f"queue size {size} is not a power of two of at most {MAX_QUEUE_SIZE}")
        for name, addr, align in (("descriptor table", desc, 16), ("available ring", avail, 2), ("used ring", used, 4)):
            if addr % align:
                raise QueueError(f"{name} at {addr:#x} is not {align}-byte aligned")
        self.memory = memory
        self.size = size
        self.desc, self.avail, self.used = desc, avail, used
        self.event_idx, self.indirect = event_idx, indirect
        try:
            self._desc_slot, self._desc_off = memory.locate(desc, DESC_SIZE * size)
            avail_slot, avail_off = memory.locate(avail, 6 + 2 * size)
            self._used_slot, self._used_off = memory.locate(used, 6 + USED_ELEM_SIZE * size)
        except GuestMemoryError as error:
            raise QueueError(f"ring outside guest RAM: {error}") from None
        used_view = self._used_slot.view[self._used_off :]
        # avail: flags [0], idx [1], ring [2 .. 2+size), used_event [2+size]
        self._avail = avail_slot.view[avail_off : avail_off + 6 + 2 * size].cast("H")
        # used: flags [0], idx [1], avail_event [2 + 4*size]; elements as u32: id [1+2i], len [2+2i]
        self._used16 = used_view[: 6 + USED_ELEM_SIZE * size].cast("H")
        self._used32 = used_view[: 4 + USED_ELEM_SIZE * size].cast("I")
        self.next_avail = 0  # the next available-ring entry to take (free-running u16)
        self.next_used = 0  # the used index we publish next
        self.signalled_used = 0  # used index when the driver was last interrupted (event idx)

    # -- state -------------------------------------------------------------------------------------

    def position(self) -> RingPosition:
        return RingPosition(self.next_avail, self.next_used, self.signalled_used, self.event_idx, self.indirect)

    @classmethod
    def resume(cls, memory: GuestMemory, size: int, desc: int, avail: int, used: int,
               position: RingPosition) -> SplitQueue:
        """The ring at `position`, as saved by position()."""
        queue = cls(memory, size, desc, avail, used, event_idx=position.event_idx, indirect=position.indirect)
        queue.next_avail, queue.next_used = position.next_avail, position.next_used
        queue.signalled_used = position.signalled_used
        return queue

    # -- the available ring ------------------------------------------------------------------------

    def pending(self) -> int:
        """How many chains the driver has made available and we have not taken."""
        count = (self._avail[1] - self.next_avail) & 0xFFFF
        if count > self.size:
            raise QueueError(f"available index ran {count} entries ahead of the device (queue size {self.size})")
        return count

    def pop(self) -> DescriptorChain | None:
        """Take the next available chain, checked; None when the ring is empty."""
        count = (self._avail[1] - self.next_avail) & 0xFFFF  # pending(), inline: once per request
        if not count:
            return None
        if count > self.size:
            raise QueueError(f"available index ran {count} entries ahead of the device (queue size {self.size})")
        slot_index = self.next_avail % self.size
        head = self._avail[2 + slot_index]
        chain = self._walk(head)
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        return chain

    def undo_pop(self, count: int = 1) -> None:
        """Give back chains taken but not used (e.g. rx buffers a shorter frame did not need)."""
        self.next_avail = (self.next_avail - count) & 0xFFFF

    def _walk(self, head: int) -> DescriptorChain:
        if head >= self.size:
            raise QueueError(f"available ring names descriptor {head}, beyond queue size {self.size}")
        readable: list[tuple[int, int]] = []
        writable: list[tuple[int, int]] = []
        in_views: list[memoryview] = []
        out_views: list[memoryview] = []
        readable_length = writable_length = 0
        slots, unpack = self.memory.slots, _DESC.unpack_from
        view, base, limit = self._desc_slot.view, self._desc_off, self.size
        index, seen, in_indirect = head, 0, False
        while True:
            seen += 1
            if seen > limit:
                raise QueueError(f"descriptor chain from {head} is longer than its table ({limit}): a loop?")
            addr, length, flags, next_index = unpack(view, base + DESC_SIZE * index)
            if flags & DESC_F_INDIRECT:
                if in_indirect:
                    raise QueueError(f"chain {head}: an indirect table inside an indirect table")
                if not self.indirect:
                    raise QueueError(f"chain {head}: indirect descriptor without VIRTIO_F_INDIRECT_DESC")
                if flags & DESC_F_NEXT:
                    raise QueueError(f"chain {head}: indirect descriptor with NEXT set")
                if length == 0 or length % DESC_SIZE:
                    raise QueueError(f"chain {head}: indirect table length {length} is not a multiple of 16")
                try:
                    slot, offset = self.memory.locate(addr, length)
                except GuestMemoryError:
                    raise QueueError(f"chain {head}: indirect table [{addr:#x}, +{length}) outside guest RAM") from None
                view, base, limit = slot.view, offset, length // DESC_SIZE
                index, seen, in_indirect = 0, 0, True
                continue
            # One buffer (inline: this runs for every descriptor of every request)
            if length == 0:
                raise QueueError(f"chain {head}: zero-length buffer at {addr:#x}")
            for slot in slots:  # GuestMemory.locate, inline
                offset = addr - slot.guest_addr
                if 0 <= offset <= slot.size and 0 <= length <= slot.size - offset:
                    break
            else:
                raise QueueError(f"chain {head}: buffer [{addr:#x}, +{length}) outside guest RAM")
            if flags & DESC_F_WRITE:
                writable.append((addr, length))
                out_views.append(slot.view[offset : offset + length])
                writable_length += length
            elif writable:
                raise QueueError(f"chain {head}: device-readable buffer after a device-writable one")
            else:
                readable.append((addr, length))
                in_views.append(slot.view[offset : offset + length])
                readable_length += length
            if not flags & DESC_F_NEXT:
                return DescriptorChain(head, readable, writable, readable_length, writable_length, in_views, out_views)
            if next_index >= limit:
                raise QueueError(f"chain {head}: next descriptor {next_index} is beyond its table ({limit})")
            index = next_index

    # -- the used ring -----------------------------------------------------------------------------

    def add_used(self, head: int, written: int) -> None:
        """Return a chain to the driver with `written` bytes of device-written data. The entry is
        stored before the index, so the driver never sees the index before the entry (x86 keeps
        stores in order)."""
        element = self.next_used % self.size
        memory = self.memory
        if memory.write_barrier is not None:  # prepare_write, without a call when there is no barrier
            memory.write_barrier(self._used_slot, self._used_off, 4 + USED_ELEM_SIZE * (element + 1))
        used32 = self._used32
        used32[1 + 2 * element] = head
        used32[2 + 2 * element] = written
        self.next_used = next_used = (self.next_used + 1) & 0xFFFF
        self._used16[1] = next_used
        # One dirty range from used->idx to the entry (a page more at most: the ring changes anyway)
        if memory.tracking:
            memory.mark(self._used_slot, self._used_off + 2, 2 + USED_ELEM_SIZE * (element + 1))

    def needs_interrupt(self) -> bool:
        """Whether the driver asked to be interrupted for the entries added since the last time
        this returned True (event index, virtio 1.x 2.7.10, or the NO_INTERRUPT flag)."""
        if self.event_idx:
            used_event = self._avail[2 + self.size]
            new, old = self.next_used, self.signalled_used
            wanted = (new - used_event - 1) & 0xFFFF < (new - old) & 0xFFFF
        else:
            flags = self._avail[0]
            wanted = not flags & AVAIL_F_NO_INTERRUPT and self.next_used != self.signalled_used
        if wanted:
            self.signalled_used = self.next_used
        return wanted

    def set_notification(self, enabled: bool) -> None:
        """Tell the driver whether to notify us of new buffers (we are about to sleep: yes;
        we are draining the ring anyway: no). With event index: "notify past next_avail"."""
        if self.event_idx:
            if not enabled:
                return  # the driver notifies only when it passes avail_event: left where it is
            off, index, value = self._used_off + 4 + USED_ELEM_SIZE * self.size, 2 + 4 * self.size, self.next_avail
        else:
            off, index, value = self._used_off, 0, 0 if enabled else USED_F_NO_NOTIFY
        memory, slot = self.memory, self._used_slot
        if memory.write_barrier is not None:  # prepare_write and mark, called only when they do something
            memory.write_barrier(slot, off, 2)
        self._used16[index] = value
        if memory.tracking:
            memory.mark(slot, off, 2)
