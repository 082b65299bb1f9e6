"""What one sync carries, taken from a quiesced machine: the pages dirtied since the last sync
(every populated page for a full sync), the disk changes completed since then (the whole disk
for a full sync), the machine state, and the SyncEnd that closes it.

The frames come as batches of buffers for sendmsg, one batch after the other. A full sync is read
and framed a piece at a time as the batches are sent, so the primary holds one piece at a time
whatever the sizes of RAM and disk; any other sync is captured at once (with `copy`, its pages
are copied out of guest RAM, so the guest may run before they are sent).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import xxhash

from pykvm.devices.virtio.blk import Blk
from pykvm.devices.virtio.gate import DiskChange
from pykvm.ft import protocol as p
from pykvm.ft.cow import CowMemory
from pykvm.hostfile import extents
from pykvm.machine import Machine, MachineState
from pykvm.memory import MemorySlot, dirty_pages, populated_pages, ram_hash
from pykvm.state import encode

DISK_CHUNK = 1 << 20  # the full sync reads the disk in pieces of this size
PAGES_PER_BATCH = 4096  # pages framed (and, if scattered, gathered: 16 MiB) before they are sent


@dataclass
class Capture:
    """One sync, ready to send: `batches` yields lists of buffers, in order."""

    sync: int
    pages: int
    batches: Iterable[list]


def harvest(machine: Machine, *, full: bool) -> list[tuple[MemorySlot, np.ndarray]]:
    """Read and reset the dirty log (KVM's | the VMM's) of every slot: the pages to send, per slot
    (for a full sync, every populated page)."""
    page_lists = []
    for slot in machine.vm.memory.slots:
        bitmap = machine.vm.dirty_bitmap(slot)
        numbers = populated_pages(slot) if full else dirty_pages(bitmap)
        if len(numbers):
            page_lists.append((slot, numbers))
    return page_lists


def capture(machine: Machine, protocol: p.FtConnection, trigger: str, disk_changes: list[list[DiskChange]],
            disks: list[Blk], *, full: bool, copy: bool, verify: bool, cow: CowMemory | None = None) -> Capture:
    """Take the sync from the quiesced machine. `disk_changes[i]`: the changes recorded for disk i
    since the last sync (emptied as they are framed); `verify`: send a hash of all RAM. `cow`
    (armed: see ft.cow): only the page numbers and the state are taken now; the batches, asked
    for once the guest runs again, copy the pages out and then frame everything."""
    page_lists = harvest(machine, full=full)
    sync = protocol.next_sync
    if cow is not None:
        cow.capture(page_lists)
        changes = [list(recorded) for recorded in disk_changes]
        for recorded in disk_changes:
            recorded.clear()
        # Encoded once the guest runs again: the saved parts are values (bytes, numbers, fresh
        # lists), not views of the live devices, as a snapshot needs them to be.
        state, ram = machine.save_state(), ram_hash(machine.vm.memory) if verify else None
        return Capture(sync, sum(len(numbers) for _, numbers in page_lists),
                       _cow_frames(cow, protocol, trigger, sync, page_lists, changes, state, ram))
    batches: Iterable[list] = _frames(machine, protocol, trigger, sync, page_lists, disk_changes, disks,
                                      full=full, copy=copy, verify=verify)
    if not full:
        batches = [[buffer for batch in batches for buffer in batch]]
    return Capture(sync, sum(len(numbers) for _, numbers in page_lists), batches)


def _frames(machine: Machine, protocol: p.FtConnection, trigger: str, sync: int, page_lists: list,
            disk_changes: list[list[DiskChange]], disks: list[Blk], *, full: bool, copy: bool,
            verify: bool) -> Iterator[list]:
    """`capture`'s batches, each framed when it is asked for (after the one before was sent)."""
    for slot, numbers in page_lists:
        for start in range(0, len(numbers), PAGES_PER_BATCH):
            yield protocol.send_pages(slot.index, slot.view, numbers[start : start + PAGES_PER_BATCH], copy=copy)
            if full:
                protocol.reuse_scratch()  # that batch is sent: its gathered pages are not needed
    for disk_index, changes in enumerate(disk_changes):
        for event in p.disk_change_frames(disk_index, whole_disk(disks[disk_index]) if full else changes):
            yield protocol.send(event)
        changes.clear()  # a full sync covers whatever was recorded before it
    state = encode(machine.save_state())
    end = p.SyncEnd(sync, trigger, ram_hash(machine.vm.memory) if verify else None, xxhash.xxh3_64_intdigest(state))
    yield protocol.send(p.MachineStateBlob(state)) + protocol.send(end)


def _cow_frames(cow: CowMemory, protocol: p.FtConnection, trigger: str, sync: int, page_lists: list,
               disk_changes: list[list[DiskChange]], state: MachineState, ram: int | None) -> Iterator[list]:
    """A copy-on-write sync's batches: the state first (the standby hears from us at once, as
    after a synchronous capture, although the pages take a while), then the pages, copied out
    while the guest runs (writes to pages not yet copied copying them aside), RAM unprotected,
    and then the pages, the disk changes and the SyncEnd framed."""
    blob = encode(state)
    yield protocol.send(p.MachineStateBlob(blob))
    copied = [(slot, numbers, cow.gather(slot, numbers)) for slot, numbers in page_lists]
    cow.disarm()
    batch = []
    for slot, numbers, data in copied:
        batch += protocol.send_pages(slot.index, slot.view, numbers, data=data)
    for disk_index, changes in enumerate(disk_changes):
        for event in p.disk_change_frames(disk_index, changes):
            batch += protocol.send(event)
    yield batch + protocol.send(p.SyncEnd(sync, trigger, ram, xxhash.xxh3_64_intdigest(blob)))


def whole_disk(disk: Blk) -> Iterator[DiskChange]:
    """The disk's contents as changes, read a piece at a time as they are taken: holes (skipped
    with SEEK_DATA/SEEK_HOLE, never read) and all-zero pieces as zeroed ranges, so the standby's
    copy equals ours whatever it held before."""
    image = disk.disk
    for offset, length, holds_data in extents(image.fd, 0, image.size):
        if not holds_data:
            yield DiskChange(offset, zeroed=length)
            continue
        for at in range(offset, offset + length, DISK_CHUNK):
            size = min(DISK_CHUNK, offset + length - at)
            data = image.read(at, size)
            if len(data) != size:
                raise OSError(errno.EIO, f"short read of {image.spec.path} ({len(data)} of {size} bytes at {at})")
            yield DiskChange(at, zeroed=size) if data.count(0) == size else DiskChange(at, data)
