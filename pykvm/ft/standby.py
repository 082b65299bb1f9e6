"""The FT standby: a machine that is built but does not run, kept equal to the primary's state as
of the last acknowledged sync, and that takes over when the primary goes silent.

Everything of a sync is staged first — pages in reused staging rows, disk changes in a list, the
machine state as it came — and checked (frames hashed, the state decoded against its
dataclasses). Only at the sync's end are the pages copied into guest RAM, the disk changes
written and flushed, and the state kept as the committed one; then the Ack goes out. A sync
cut off midway is dropped with its staging, so the committed state is always a whole sync.
Guest RAM stays hot: takeover copies nothing in bulk, it restores the committed KVM and device
state and starts the vCPUs.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import xxhash

from pykvm.devices.virtio.blk import Blk
from pykvm.errors import ConfigError
from pykvm.ft import faults, protocol as p
from pykvm.ft.fencing import Fencing, admission
from pykvm.machine import Machine, MachineConfig, MachineState
from pykvm.memory import PAGE_SIZE, GuestMemory, MemorySlot, ram_hash
from pykvm.state import StateError, decode
from pykvm.transfer import wire
from pykvm.transfer.page_arena import PageArena
from pykvm.transfer.snapshot import check_same_shape


class PageStaging:
    """Where a sync's pages land until it commits: rows of an arena, reused from sync to sync."""

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory
        self._rows = PageArena()
        self.entries: list[tuple[MemorySlot, np.ndarray, np.ndarray]] = []  # slot, page numbers, rows

    def sink(self, slot_index: int, pages: np.ndarray) -> list[memoryview]:
        """The decoder's page sink: the buffer one frame's pages are received into."""
        slot = next((s for s in self.memory.slots if s.index == slot_index), None)
        if slot is None or (len(pages) and int(pages.max()) >= slot.pages):
            raise wire.ProtocolError(f"pages outside guest RAM (slot {slot_index})")
        rows = self._rows.take(len(pages))
        self.entries.append((slot, pages.astype(np.int64), rows))
        return [memoryview(rows).cast("B")]

    @property
    def page_count(self) -> int:
        return sum(len(pages) for _, pages, _ in self.entries)

    def commit(self) -> None:
        """Copy the staged pages into guest RAM (one numpy scatter per frame)."""
        for slot, pages, rows in self.entries:
            ram = np.frombuffer(slot.view, dtype=np.uint8).reshape(-1, PAGE_SIZE)
            ram[pages] = rows
        self.discard()

    def discard(self) -> None:
        self.entries.clear()
        self._rows.reset()


@dataclass
class StandbyStats:
    syncs: int = 0
    pages: int = 0
    disk_bytes: int = 0
    verified: int = 0
    mismatches: int = 0
    last_commit: float = 0.0
    commit_ms: list[float] = field(default_factory=list)


class Standby:
    """Follows one primary (`serve`), then, if it was lost rather than said goodbye, runs its
    guest from the last committed sync (`take_over`)."""

    def __init__(self, machine: Machine, *, timeout: float, verify: bool = False,
                 fencing: Fencing | None = None, log: Callable[[str], None] = print) -> None:
        """`fencing`: this standby's witness (None: none); a primary must name the same one."""
        self.machine = machine
        self.fencing = fencing
        self.mode, self.interval_ms = "", 0.0  # the primary's, from its Hello: for ft-stats only
        self.timeout = timeout
        self.verify = verify  # kept for the record: RAM is checked whenever the primary sends its hash
        self.log = log
        self.staging = PageStaging(machine.vm.memory)
        self.disks = [f.device for f in machine.virtio if isinstance(f.device, Blk)]
        self.committed: MachineState | None = None
        self.committed_sync = 0
        self.stats = StandbyStats()
        self._staged_disk: list[p.DiskChanges] = []
        self._staged_state: bytes | None = None
        self.lost_at = 0.0  # time.monotonic() when the primary was found gone

    # -- the connection ----------------------------------------------------------------------------

    def serve(self, server: socket.socket) -> str:
        """Follow one primary until it says goodbye ("goodbye"), is refused for a machine of
        another shape ("refused"), or is lost ("lost")."""
        conn, peer = server.accept()
        self.log(f"ft standby: primary {peer[0]} connected")
        protocol = p.FtConnection(p.Role.STANDBY, page_sink=self.staging.sink)
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(self.timeout)
            try:
                while True:
                    event = p.receive_event(conn, protocol)
                    reply = self._handle(event, protocol)
                    if reply is not None:
                        wire.send_buffers(conn, reply)
                    if isinstance(event, p.Goodbye):
                        self.log(f"ft standby: primary said goodbye ({event.reason})")
                        return "goodbye"
                    if protocol.phase == p.Phase.CLOSED:  # we sent Refused
                        return "refused"
            except socket.timeout:
                reason = f"no word from the primary for {self.timeout * 1000:.0f} ms"
            except (ConnectionError, OSError) as error:
                reason = f"connection lost ({error})"
            except wire.ProtocolError as error:
                reason = f"protocol violation, connection dropped ({error})"
        self.lost_at = time.monotonic()
        self.staging.discard()  # a sync cut off midway never counts
        self._staged_disk, self._staged_state = [], None
        self.log(f"ft standby: primary lost: {reason}")
        return "lost"

    def _handle(self, event: p.Event, protocol: p.FtConnection) -> list | None:
        if isinstance(event, p.Hello):
            try:
                check_same_shape(decode(MachineConfig, event.config), self.machine.config)
                refusal = admission(self.fencing, event)
            except (ConfigError, StateError) as error:
                refusal = str(error)
            if refusal is not None:
                self.log(f"ft standby: refusing the primary: {refusal}")
                return protocol.send(p.Refused(refusal))
            self.mode, self.interval_ms = event.mode, event.interval_ms
            return protocol.send(p.Ready())
        if isinstance(event, p.DiskChanges):
            if event.disk >= len(self.disks):
                raise wire.ProtocolError(f"changes for disk {event.disk}, this machine has {len(self.disks)}")
            self._staged_disk.append(event)
        elif isinstance(event, p.MachineStateBlob):
            self._staged_state = event.data
        elif isinstance(event, p.SyncEnd):
            self._commit(event)
            faults.acking(event.sync)
            return protocol.send(p.Ack(event.sync))
        elif isinstance(event, p.Heartbeat) and protocol.phase is p.Phase.IDLE:
            return protocol.send(p.Heartbeat())  # the primary hears that we live
        return None

    def _commit(self, end: p.SyncEnd) -> None:
        started = time.perf_counter()
        try:  # check everything before changing anything
            state = decode(MachineState, self._staged_state or b"")
        except StateError as error:
            raise wire.ProtocolError(f"sync {end.sync} carries a state that does not decode: {error}") from None
        if xxhash.xxh3_64_intdigest(self._staged_state) != end.state_hash:
            raise wire.ProtocolError(f"sync {end.sync}: state hash mismatch")
        pages = self.staging.page_count
        self.staging.commit()
        written = self._apply_disk_changes(end.sync)
        self.committed, self.committed_sync = state, end.sync
        self._staged_state = None
        if end.ram_hash is not None:
            ours = ram_hash(self.machine.vm.memory)
            self.stats.verified += 1
            if ours != end.ram_hash:
                self.stats.mismatches += 1
                self.log(f"ft standby: VERIFY FAILED at sync {end.sync}: RAM differs from the primary's")
        self.stats.syncs += 1
        self.stats.pages += pages
        self.stats.disk_bytes += written
        self.stats.last_commit = time.monotonic()
        self.stats.commit_ms.append((time.perf_counter() - started) * 1000)

    def _apply_disk_changes(self, sync: int) -> int:
        """Write the sync's disk changes and flush the disks they touched; returns the bytes written."""
        written, touched = 0, set()
        for batch in self._staged_disk:
            faults.writing_disk(sync)
            image = self.disks[batch.disk].disk
            for change in batch.changes:
                if change.zeroed:
                    image.zero(change.offset, change.zeroed)
                else:
                    image.write(change.offset, change.data)
                    written += len(change.data)
            touched.add(image)
        for image in touched:
            image.flush()
        self._staged_disk = []
        return written

    # -- takeover -------------------------------------------------------------------------------

    def take_over(self) -> float:
        """Become the primary: restore the committed state into the (hot) machine, attach the
        network, announce the MAC, run. Returns the seconds from detection to running vCPUs."""
        assert self.committed is not None
        detected_at = self.lost_at
        self.machine.restore_state(self.committed)
        # A dead primary's TAP may still be closing (wait); a hung one keeps its socket (take it).
        self.machine.attach_networks(announce=True, wait=2.0, take_over=True)
        self.machine.vm.start()
        elapsed = time.monotonic() - detected_at
        self.log(f"ft standby: took over from sync {self.committed_sync} in {elapsed * 1000:.1f} ms "
                 f"(after detecting the loss)")
        return elapsed
