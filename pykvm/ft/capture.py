"""What one sync carries, taken from a quiesced machine: the pages dirtied since the last sync
(every populated page for a full sync), the disk changes completed since then (the whole disk
for a full sync), the machine state, and the SyncEnd that closes it.

Everything is taken while the machine is quiesced (the dirty log, the disk changes, the state),
but packed and framed when asked for, which in pipelined and cow modes is after the guest runs
again: the state is packed then (only its parts that changed, see ft.state_parts), and a sync goes
as a batch of buffers per frame of pages, each sent before the next is built, so that a full sync
holds one piece of RAM or disk at a time whatever their sizes. While a frame is sent, another
thread hashes its pages (into the sync's digest, which the SyncEnd carries): the hash and the
kernel's copy of the same pages run side by side (sendmsg frees the GIL). Over TLS, which
authenticates every byte, there is no such digest (FtConnection.authenticated).

Where each page's data is read from is the capture's PageSource: guest RAM itself (GuestRam: the
guest stays paused until the frames are sent), a copy made while the guest was paused
(CopiedPages: the guest runs on meanwhile), or any other holder of the pages' contents as of the
capture (a copy made aside when the guest writes a page still to send).
In cow mode (ft.cow) that is CowPages: the pages are found in the dirty bitmaps and copied out
once the guest runs again, under write-protection, and the state goes first in a batch of its own,
so the standby hears from us at once while the copy goes on.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Iterator, Protocol

import numpy as np
import xxhash

from pykvm.devices.virtio.blk import Blk
from pykvm.devices.virtio.gate import DiskChange
from pykvm.ft import protocol as p
from pykvm.ft.disk_mode import contents
from pykvm.ft.cow import CowMemory
from pykvm.ft.state_parts import StateSender
from pykvm.machine import Machine, MachineState
from pykvm.memory import PAGE_SIZE, MemorySlot, dirty_pages, populated_pages, ram_hash
from pykvm.transfer import wire
from pykvm.transfer.page_arena import PageArena

FRAME_PAGES = 1024  # pages a frame (4 MiB): a batch, hashed on another thread while it is sent
THREADED_HASH_PAGES = 128  # a frame this big is worth handing to the hasher thread (~0.1 ms a handover)


class PageSource(Protocol):
    """Where the data of the pages a sync sends is read from."""

    def page_data(self, slot: MemorySlot, first: int, pages: np.ndarray) -> list:
        """Buffers holding `pages` (ascending page numbers of `slot`, one frame's worth, from the
        `first`th of the slot's pages in this sync on) as of the capture, in page order. Asked
        when the frame is built, just before its batch is sent; the buffers must not change until
        the batch is sent and hashed (before the SyncEnd)."""


class GuestRam:
    """The pages read straight from guest RAM: each run of pages is one buffer, nothing copied."""

    def page_data(self, slot: MemorySlot, first: int, pages: np.ndarray) -> list:
        return wire.run_views(slot.view, pages)


class CopiedPages:
    """The pages copied out of guest RAM while the guest is paused (one C copy per page into
    `arena`'s rows), so the guest may run before they are sent."""

    def __init__(self, arena: PageArena, page_lists: list[tuple[MemorySlot, np.ndarray]]) -> None:
        arena.reset()  # the sync before this one was sent and acknowledged
        self._copies = {slot.index: wire.gather(arena, slot.view, numbers) for slot, numbers in page_lists}

    def page_data(self, slot: MemorySlot, first: int, pages: np.ndarray) -> list:
        rows = self._copies[slot.index]
        return [rows[first * PAGE_SIZE : (first + len(pages)) * PAGE_SIZE]]


class CowPages:
    """Cow mode: the pages copied out of write-protected guest RAM while the guest runs (a write
    to a page not yet copied copies it aside first); once all are copied, RAM is unprotected."""

    def __init__(self, cow: CowMemory, bitmaps: list[tuple[MemorySlot, np.ndarray]]) -> None:
        cow.capture(bitmaps)  # (paused) the pages set in these are the sync's
        self._cow = cow
        self._copies: dict[int, memoryview] | None = None

    @functools.cached_property
    def page_lists(self) -> list[tuple[MemorySlot, np.ndarray]]:
        """The sync's pages per slot, found in its bitmaps when first asked (the guest running)."""
        return self._cow.pages()

    def page_data(self, slot: MemorySlot, first: int, pages: np.ndarray) -> list:
        if self._copies is None:  # the first frame: the guest runs again, copy them all out
            self._copies = {s.index: self._cow.gather(s, numbers) for s, numbers in self.page_lists}
            self._cow.disarm()
        rows = self._copies[slot.index]
        return [rows[first * PAGE_SIZE : (first + len(pages)) * PAGE_SIZE]]


@dataclass
class Capture:
    """One sync, ready to send: `batches` yields lists of buffers, each to be sent before the
    next is asked for."""

    sync: int
    find_pages: Callable[[], list[tuple[MemorySlot, np.ndarray]]]  # the pages it sends, per slot
    batches: Iterator[list]

    @property
    def pages(self) -> int:
        return sum(len(numbers) for _, numbers in self.find_pages())


def harvest(machine: Machine, *, full: bool) -> list[tuple[MemorySlot, np.ndarray]]:
    """Read and reset the dirty log (KVM's | the VMM's) of every slot: the pages to send, per slot
    (for a full sync, every populated page)."""
    page_lists = []
    for slot, bitmap in dirty_bitmaps(machine):
        numbers = populated_pages(slot) if full else dirty_pages(bitmap)
        if len(numbers):
            page_lists.append((slot, numbers))
    return page_lists


def dirty_bitmaps(machine: Machine) -> list[tuple[MemorySlot, np.ndarray]]:
    """Read and reset the dirty log (KVM's | the VMM's) of every slot, as u64 bitmaps: the VM's
    own, valid until the next harvest (a cow sync keeps them until its pages are found)."""
    return [(slot, machine.vm.dirty_bitmap(slot)) for slot in machine.vm.memory.slots]


def capture(machine: Machine, protocol: p.FtConnection, trigger: str, disk_changes: list[list[DiskChange]],
            disks: list[Blk], states: StateSender, *, full: bool, verify: bool, copy_into: PageArena | None = None,
            source: PageSource | None = None, cow: CowMemory | None = None) -> Capture:
    """Take the sync from the quiesced machine. `disk_changes[i]`: the changes recorded for disk i
    since the last sync (taken, and the list emptied); `states`: the parts of the machine state
    sent last (only those that changed go); `verify`: send a hash of all RAM.
    `copy_into`: copy the pages there now (the guest will run before they are sent); `source`:
    where the pages' data is read from otherwise (guest RAM by default). `cow`
    (armed, see ft.cow; not for a full sync): the pages are found and read through CowPages, and
    the state goes first alone."""
    if cow is not None:
        if full or copy_into is not None:
            raise ValueError("a cow capture sends the dirty pages, read through the write-protection")
        cow_pages = CowPages(cow, dirty_bitmaps(machine))
        source, find_pages = cow_pages, lambda: cow_pages.page_lists  # found once the guest runs again
    else:
        page_lists = harvest(machine, full=full)
        find_pages = lambda: page_lists
        if copy_into is not None:
            source = CopiedPages(copy_into, page_lists)
    sync = protocol.next_sync
    if full:  # the whole disk, read as it is sent; it covers whatever was recorded before
        disk_events: Iterable = (event for index, disk in enumerate(disks)
                                 for event in disk_change_frames(index, whole_disk(disk)))
    else:
        disk_events = [event for index, changes in enumerate(disk_changes) if changes
                       for event in disk_change_frames(index, list(changes))]
    for changes in disk_changes:
        changes.clear()
    end = p.SyncEnd(sync, trigger, ram_hash(machine.vm.memory) if verify else None)
    batches = _frames(protocol, source or GuestRam(), find_pages, disk_events, states, machine.save_state(), end,
                      full=full, state_alone=cow is not None)
    return Capture(sync, find_pages, batches)


def _frames(protocol: p.FtConnection, source: PageSource, find_pages: Callable[[], list], disk_events: Iterable,
            states: StateSender, state: MachineState, end: p.SyncEnd, *, full: bool,
            state_alone: bool = False) -> Iterator[list]:
    """`capture`'s batches: the machine state first (packed here, once the guest runs again in
    pipelined and cow modes; the standby decodes it while the pages come), a batch per frame of
    pages, the disk changes, the SyncEnd (with the hash of the packed state). A frame's pages are
    hashed on the hasher thread while the frame is sent (not over TLS). A full sync sends a batch
    per frame of disk changes too (the disk is read as it goes). `state_alone`: the state is a batch of its own."""
    blob = states.blob(state, full=full)
    end = replace(end, state_hash=xxhash.xxh3_64_intdigest(blob))
    batch = protocol.send(p.MachineStateBlob(blob))
    if state_alone:
        yield batch
        batch = []
    hashing = None
    for slot, numbers in find_pages():
        for start in range(0, len(numbers), FRAME_PAGES):
            chunk = numbers[start : start + FRAME_PAGES]
            pages = protocol.send_pages(slot.index, slot.view, chunk, data=source.page_data(slot, start, chunk))
            if hashing is not None:
                hashing.result()
                hashing = None
            if not protocol.authenticated:  # (over TLS the channel authenticates them: no digest)
                if len(chunk) < THREADED_HASH_PAGES:  # hashed at once: less than handing it over costs
                    protocol.hash_pages()
                else:
                    hashing = _hasher().submit(protocol.hash_pages)  # while they are sent: sendmsg frees the GIL
            yield batch + pages
            batch = []
    if hashing is not None:
        hashing.result()
    for event in disk_events:
        batch += protocol.send(event)
        if full:
            yield batch
            batch = []
    yield batch + protocol.send(end)


@functools.cache
def _hasher() -> ThreadPoolExecutor:
    """The thread that hashes page frames while they are sent (one: the digest is in send order)."""
    return ThreadPoolExecutor(1, thread_name_prefix="ft-hash")


def disk_change_frames(disk: int, changes: Iterable[DiskChange]) -> Iterator[p.DiskChanges]:
    """`changes` as DiskChanges events whose payloads stay within p.DISK_FRAME_BYTES (a change with
    more data is split), taken from the iterable only as they are needed: a sender holds one
    frame's worth at a time."""
    batch: list[DiskChange] = []
    size = p.DISK_FRAME_HEAD
    for change in changes:
        pieces = [change] if len(change.data) <= p.MAX_CHANGE_DATA else [
            DiskChange(change.offset + at, change.data[at : at + p.MAX_CHANGE_DATA])
            for at in range(0, len(change.data), p.MAX_CHANGE_DATA)]
        for piece in pieces:
            cost = p.DISK_CHANGE_HEAD + len(piece.data)
            if batch and size + cost > p.DISK_FRAME_BYTES:
                yield p.DiskChanges(disk, tuple(batch))
                batch, size = [], p.DISK_FRAME_HEAD
            batch.append(piece)
            size += cost
    if batch:
        yield p.DiskChanges(disk, tuple(batch))


def whole_disk(disk: Blk) -> Iterator[DiskChange]:
    """The disk's contents as changes, read a piece at a time as they are taken (ft.disk_mode.
    contents: holes and all-zero pieces as zeroed ranges), so the standby's copy equals ours
    whatever it held before."""
    return contents(disk.disk, [(0, disk.disk.size)])
