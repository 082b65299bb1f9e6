"""The FT standby: a machine that is built but does not run, kept equal to the primary's state as
of the last acknowledged sync, and that takes over when the primary goes silent.

A sync is committed all or nothing. Everything of it is staged first — pages in reused staging
rows, disk changes in a list, the machine state as it came — and checked (frames hashed against
their bounds, the state decoded against its dataclasses, every disk change inside its disk). At
the sync's end the old contents of what the disk changes overwrite go to an undo journal
(ft.journal), the changes are written (not flushed: the primary flushes its own copy while the
sync travels, see ft.disk_mode, and a takeover flushes ours before the guest runs), and only then
are the staged pages and the state kept as the committed ones; then the Ack goes out, and the
pages are copied into guest RAM (which cannot fail) while the primary resumes, before anything
else is read or done.
A disk write that fails is rolled back from the journal, so the committed sync stays whole; a
rollback that fails too leaves this standby unusable, and it says so. The first sync is the
exception: with nothing committed yet there is nothing to protect (and no takeover possible),
so its pages and disk data go straight into RAM and onto the disk as they arrive.

Only the primary's silence (no byte for `timeout`) or its closing or resetting the connection
count as losing it ("lost", after which the CLI may take over). Anything else that stops this
standby — a damaged frame, a sync that does not check out or cannot be applied, a RAM mismatch
under verification — is this standby's fault ("fault"): it tells the primary why (StandbyFault)
and never takes over, so a standby that cannot follow never becomes a second live copy.
Guest RAM stays hot: takeover copies nothing in bulk, it restores the committed KVM and device
state and starts the vCPUs.

With shared disks (ft.disk_mode) no disk data comes at all, and a takeover writes nothing to
the disk before the guest runs: the file holds every write the primary released (each after
the sync that precedes it was committed here), and a write it held but never released is in
no committed state's past — the restored ring has it available again, and the guest's device
serves it once this standby has won the epoch (HeldUntilTakeover), never before.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from typing import Callable

import xxhash

from pykvm.devices.virtio.blk import SECTOR, Blk, DiskImage
from pykvm.devices.virtio.gate import DiskChange, GatedFunction
from pykvm.errors import ConfigError
from pykvm.ft import faults, protocol as p
from pykvm.ft.disk_mode import disk_refusal
from pykvm.ft.fencing import Fencing, admission
from pykvm.ft.journal import JournalError, UndoJournal
from pykvm.ft.staging import PageStaging
from pykvm.ft.state_parts import merge
from pykvm.ft.trace import OFF, FtTrace
from pykvm.machine import Machine, MachineConfig, MachineState
from pykvm.memory import ram_hash
from pykvm.state import StateError, decode
from pykvm.transfer import channel, wire
from pykvm.transfer.snapshot import check_same_shape
from pykvm.transfer.tls import TlsCredentials


GREETING_TIMEOUT = 5.0  # a connection that sends no Hello within this is dropped
LINGER = 5.0  # seconds a faulting standby waits for the primary to read its StandbyFault and close
FIRST_SYNC_FLUSH = 64 << 20  # the first sync's disk data is flushed every this many bytes
MAX_REASON = 4000  # characters of a StandbyFault's reason (well inside its frame's cap)


class SyncFault(Exception):
    """This standby cannot apply a sync (it does not check out, or the disk fails): a fault of
    the standby's, answered with StandbyFault, never a reason to take over."""


@dataclass
class StandbyStats:
    syncs: int = 0
    pages: int = 0
    disk_bytes: int = 0
    verified: int = 0
    mismatches: int = 0
    last_commit: float = 0.0
    commit_ms: list[float] = field(default_factory=list)


class HeldUntilTakeover:
    """The output gate of the standby's devices from the restore to the takeover. A restored
    device serves its rings at once, and an output the primary held at the committed sync is
    pending there again (gate.HeldOutputs.give_back): served then, a disk write would reach a
    shared disk, and a frame be dropped (no NIC attached yet), before this standby has won the
    epoch. They are held instead, and go out once it has (`release`), or die with the process."""

    def __init__(self, machine: Machine) -> None:
        self.functions = machine.virtio
        self._held: list[tuple[GatedFunction, int]] = []
        for function in self.functions:
            function.set_output_gate(self)

    def hold(self, function: GatedFunction, queue_index: int) -> None:
        self._held.append((function, queue_index))  # a device thread with its lock held: never blocks

    def release(self) -> None:
        for function in self.functions:
            with function.lock:  # once it is ours, a hold in progress on this function is in the list
                function.set_output_gate(None)
        for function, queue_index in self._held:
            function.release_held(queue_index)
        self._held = []


class TakeoverImpossible(Exception):
    """The committed state cannot be put into this machine: the standby does not take over."""


class Standby:
    """Follows one primary (`serve`), then, if it was lost rather than said goodbye, runs its
    guest from the last committed sync (`take_over`)."""

    def __init__(self, machine: Machine, *, timeout: float, verify: bool = False,
                 fencing: Fencing | None = None, tls: TlsCredentials | None = None,
                 log: Callable[[str], None] = print, trace: FtTrace = OFF) -> None:
        """`fencing`: this standby's witness (None: none); a primary must name the same one.
        `tls`: a primary must show a certificate of this CA (None: anyone may connect).
        `trace`: where each sync's phases and the takeover's steps are told (--trace-ft)."""
        self.machine = machine
        self.trace = trace
        self.tls = tls
        self.fencing = fencing
        self.mode, self.interval_ms = "", 0.0  # the primary's, from its Hello: for ft-stats only
        self.disk_mode = ""  # the primary's, from its Hello: "shared" disks take no disk changes
        self.timeout = timeout
        self.verify = verify  # kept for the record: RAM is checked whenever the primary sends its hash
        self.log = log
        self.staging = PageStaging(machine.vm.memory)
        self.disks = [f.device for f in machine.virtio if isinstance(f.device, Blk)]
        self.committed: MachineState | None = None
        self.committed_sync = 0
        self.stats = StandbyStats()
        self._staged_disk: list[p.DiskChanges] = []
        self._staged_state: tuple[MachineState, int] | None = None  # decoded, and its blob's hash
        self._drain = bytearray(1 << 16)  # where a faulting standby drops what still comes
        self.lost_at = 0.0  # time.monotonic() when the primary was found gone
        self.journals = [UndoJournal(disk.disk) for disk in self.disks]
        self.unusable = ""  # why this standby's copy is known bad (it will not take over), or ""
        self._staged_bytes = [0] * len(self.disks)  # bytes of each disk this sync's staged changes cover
        self._written_since_flush = 0  # the first sync's disk data not yet flushed
        self._outputs: HeldUntilTakeover | None = None  # from restore_committed() to take_over()

    # -- the connection ----------------------------------------------------------------------------

    def serve(self, server: socket.socket) -> str:
        """Follow one primary until it says goodbye ("goodbye"), is refused for a machine of
        another shape ("refused"), is lost ("lost": silent for `timeout`, or its connection closed
        or reset), or this standby cannot follow it ("fault": the primary is told why, and this
        standby must not take over)."""
        try:
            return self._follow(server)
        finally:
            for journal in self.journals:  # a standby follows one primary: they are not needed again
                try:
                    journal.close()
                except OSError as error:  # at worst a leftover file: never a reason to change the outcome
                    failed = "remove" if error.filename else "close"
                    self.log(f"ft standby: cannot {failed} the undo journal {journal.path}: {error.strerror or error}")

    def _follow(self, server: socket.socket) -> str:
        conn, peer, protocol, hello = self._await_primary(server)
        self.log(f"ft standby: primary {peer[0]} connected")
        with conn:
            conn.settimeout(self.timeout)  # per receive: patience counts from the last byte
            event = hello
            try:
                while True:
                    reply = self._handle(event, protocol)
                    if reply is not None:
                        wire.send_buffers(conn, reply)
                    self.staging.apply()  # a committed sync's pages, while the primary resumes
                    if isinstance(event, p.Goodbye):
                        self.log(f"ft standby: primary said goodbye ({event.reason})")
                        return "goodbye"
                    if protocol.phase == p.Phase.CLOSED:  # we sent Refused
                        return "refused"
                    event = p.receive_event(conn, protocol)
            except TimeoutError:
                lost = f"no word from the primary for {self.timeout * 1000:.0f} ms"
            except ConnectionError as error:
                lost = f"connection lost ({error})"
            except (wire.ProtocolError, SyncFault) as error:
                return self._fault(conn, protocol, str(error))
            except OSError as error:  # neither silence nor a closed connection: no sign the primary died
                return self._fault(conn, protocol, f"connection error ({channel.describe(error)})")
        self.lost_at = time.monotonic()
        self._discard_sync()  # a sync cut off midway never counts
        self.log(f"ft standby: primary lost: {lost}")
        self.trace.takeover(f"the primary is lost; the last committed sync is {self.committed_sync}")
        return "lost"

    def _await_primary(self, server: socket.socket) -> tuple[socket.socket, tuple, p.FtConnection, p.Hello]:
        """The first connection whose first word is a Hello (past the TLS handshake, if any).
        A connection that fails the handshake, sends anything else or nothing is no primary (a
        port scan, a stray client): it is dropped, and this standby goes on waiting."""
        while True:
            conn, peer = channel.accept(server, self.tls, self.log, "ft standby")
            protocol = p.FtConnection(p.Role.STANDBY, page_sink=self.staging.sink, authenticated=self.tls is not None)
            try:  # the whole Hello by the deadline: a peer dribbling bytes would hold us for ever
                hello = p.receive_event(conn, protocol, deadline=time.monotonic() + GREETING_TIMEOUT)
                if isinstance(hello, p.Hello):
                    return conn, peer, protocol, hello
                reason = f"{type(hello).__name__} before any Hello"
            except (OSError, wire.ProtocolError) as error:  # ConnectionError and timeouts included
                reason = channel.describe(error)
            conn.close()
            self.log(f"ft standby: dropped a connection from {peer[0]}: {reason}; still waiting for a primary")

    def _fault(self, conn: socket.socket, protocol: p.FtConnection, reason: str) -> str:
        """Tell the primary why we stop following it, then let it close: until it does (or for
        LINGER at most) what it still sends is read and dropped, so that our close does not
        reset the connection before it has read the reason."""
        self._discard_sync()
        self.log(f"ft standby: cannot follow the primary, will not take over: {reason}")
        try:
            wire.send_buffers(conn, protocol.send(p.StandbyFault(reason[:MAX_REASON])))
            conn.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + LINGER
            while time.monotonic() < deadline and conn.recv_into(self._drain):
                pass
        except (OSError, wire.ProtocolError):
            pass  # it is gone already, or the fault came before there was a conversation to end
        return "fault"

    def _handle(self, event: p.Event, protocol: p.FtConnection) -> list | None:
        if isinstance(event, p.Hello):
            try:
                check_same_shape(decode(MachineConfig, event.config), self.machine.config)
                refusal = admission(self.fencing, event)
            except (ConfigError, StateError) as error:
                refusal = str(error)
            if refusal is None:
                refusal = disk_refusal(event.disk_mode, [disk.disk for disk in self.disks], event.shared_disks)
            if refusal is not None:
                self.log(f"ft standby: refusing the primary: {refusal}")
                return protocol.send(p.Refused(refusal))
            self.mode, self.interval_ms, self.disk_mode = event.mode, event.interval_ms, event.disk_mode
            return protocol.send(p.Ready())
        if isinstance(event, p.DiskChanges):
            self._receive_disk_changes(event)
        elif isinstance(event, p.MachineStateBlob):
            self._staged_state = self._decoded_state(event.data, protocol.last_sync + 1)
        elif isinstance(event, p.SyncEnd):
            if self.trace.on:
                changes = sum(len(batch.changes) for batch in self._staged_disk)
                self.trace.sync(event.sync, f"staged {self.staging.page_count} pages, {changes} disk changes, "
                                            f"the state ({event.trigger})")
            self._commit(event)
            faults.acking(event.sync)
            return protocol.send(p.Ack(event.sync))
        elif isinstance(event, p.Heartbeat) and protocol.phase is p.Phase.IDLE:
            return protocol.send(p.Heartbeat())  # the primary hears that we live
        return None

    # -- a sync -------------------------------------------------------------------------------------

    def _receive_disk_changes(self, batch: p.DiskChanges) -> None:
        """Check the changes against their disk; stage them, or (first sync) write them now."""
        if self.disk_mode == "shared":  # the primary's released writes are in the file already
            raise wire.ProtocolError(f"changes for disk {batch.disk}, which the primary shares with us")
        if batch.disk >= len(self.disks):
            raise wire.ProtocolError(f"changes for disk {batch.disk}, this machine has {len(self.disks)}")
        image = self.disks[batch.disk].disk
        for change in batch.changes:
            if change.offset + (change.zeroed or len(change.data)) > image.size:
                raise wire.ProtocolError(f"a change at byte {change.offset} runs past the end of disk {batch.disk} "
                                         f"({image.size} bytes)")
        if self.committed is None:
            self._write_first_sync(batch)
            return
        # Held until the sync ends: a sync covers a byte once at most, in whole sectors (an empty change: one)
        self._staged_bytes[batch.disk] += sum(max(change.zeroed or len(change.data), SECTOR)
                                              for change in batch.changes)
        if self._staged_bytes[batch.disk] > image.size:
            raise wire.ProtocolError(f"one sync's changes to disk {batch.disk} exceed its size")
        self._staged_disk.append(batch)

    def _write_first_sync(self, batch: p.DiskChanges) -> None:
        try:
            self.stats.disk_bytes += _apply(self.disks[batch.disk].disk, batch.changes)
            self._written_since_flush += sum(len(change.data) for change in batch.changes)
            if self._written_since_flush >= FIRST_SYNC_FLUSH:  # keeps the flush at its end short
                self._flush(range(len(self.disks)))
        except OSError as error:
            raise SyncFault(f"writing the first sync to disk {batch.disk} failed: {error}") from None

    def _commit(self, end: p.SyncEnd) -> None:
        started = time.perf_counter()
        state = self._checked_state(end)
        if self.committed is None:  # the first sync is on the disks already
            try:
                self._flush(range(len(self.disks)))
            except OSError as error:
                raise SyncFault(f"flushing the first sync failed: {error}") from None
        else:
            self._apply_staged_disk_changes(end.sync)
        pages = self.staging.page_count
        self.staging.commit()
        self.committed, self.committed_sync = state, end.sync
        self._staged_state = None
        if end.ram_hash is not None:
            self.staging.apply()
            self._verify(end)
        self.stats.syncs += 1
        self.stats.pages += pages
        self.stats.last_commit = time.monotonic()
        self.stats.commit_ms.append((time.perf_counter() - started) * 1000)
        if self.trace.on:
            self.trace.sync(end.sync, f"committed in {self.stats.commit_ms[-1]:.2f} ms (disks journaled and "
                                      "written; pages and state kept); acknowledging")

    def _decoded_state(self, blob: bytes, sync: int) -> tuple[MachineState, int]:
        """The state a sync's blob describes (decoded as it arrives, while its pages still come:
        the parts that changed, on top of a copy of the committed state), and the blob's hash."""
        try:
            return merge(self.committed, blob, self.machine), xxhash.xxh3_64_intdigest(blob)
        except StateError as error:
            raise SyncFault(f"sync {sync} carries a state that does not decode: {error}") from None

    def _checked_state(self, end: p.SyncEnd) -> MachineState:
        state, digest = self._staged_state or (None, None)
        if state is None or digest != end.state_hash:
            raise SyncFault(f"sync {end.sync}: state hash mismatch")
        return state

    def _apply_staged_disk_changes(self, sync: int) -> None:
        """All or nothing: journal what the changes overwrite and write them; on a failure, put
        the journaled contents back."""
        touched = sorted({batch.disk for batch in self._staged_disk})
        try:
            for disk in touched:
                self.journals[disk].save(sync, [(change.offset, change.zeroed or len(change.data))
                                                 for batch in self._staged_disk if batch.disk == disk
                                                 for change in batch.changes])
        except OSError as error:  # the disks are untouched yet
            raise SyncFault(f"sync {sync}: cannot journal its disk changes: {error}") from None
        try:
            for batch in self._staged_disk:
                faults.writing_disk(sync)
                self.stats.disk_bytes += _apply(self.disks[batch.disk].disk, batch.changes)
        except OSError as error:
            failure = f"sync {sync}: applying its disk changes failed ({error})"
            try:
                for disk in touched:
                    self.journals[disk].rollback()
            except (OSError, JournalError) as rollback_error:
                self.unusable = f"{failure}, and so did the rollback ({rollback_error}): the disk is damaged"
                raise SyncFault(self.unusable) from None
            self._forget_journals(touched)
            raise SyncFault(f"{failure}; rolled back to sync {self.committed_sync}") from None
        self._forget_journals(touched)
        self._staged_disk, self._staged_bytes = [], [0] * len(self.disks)

    def _forget_journals(self, disks: list[int]) -> None:
        for disk in disks:
            try:
                self.journals[disk].clear()
            except OSError:
                pass  # only space is lost: the next sync's journal truncates it anyway

    def _verify(self, end: p.SyncEnd) -> None:
        """The primary sent a hash of all its RAM: ours, now committed, must equal it."""
        self.stats.verified += 1
        if ram_hash(self.machine.vm.memory) != end.ram_hash:
            self.stats.mismatches += 1
            self.unusable = f"VERIFY FAILED at sync {end.sync}: RAM differs from the primary's"
            raise SyncFault(self.unusable)

    def _flush(self, disks) -> None:
        for disk in disks:
            self.disks[disk].disk.flush()
        self._written_since_flush = 0

    def _discard_sync(self) -> None:
        self.staging.discard()
        self._staged_disk, self._staged_state = [], None
        self._staged_bytes = [0] * len(self.disks)

    # -- takeover -------------------------------------------------------------------------------

    def restore_committed(self) -> None:
        """Put the last committed sync into the (hot) machine, not running yet. Done before the
        epoch is claimed: a standby whose state does not restore must not win the right to run
        (the primary, if alive, wins it instead). The devices' outputs are held until take_over()."""
        assert self.committed is not None
        self.trace.takeover(f"restoring sync {self.committed_sync}: its pages into RAM, vCPU and device state; "
                            "flushing the disks")
        self.staging.apply()
        self._outputs = HeldUntilTakeover(self.machine)
        try:
            self.machine.restore_state(self.committed)
        except StateError as error:
            raise TakeoverImpossible(f"the state of sync {self.committed_sync} does not restore: {error}") from None
        try:  # the commits wrote without flushing (ft.disk_mode): the guest's flushes are made here now
            faults.taking_over()
            self._flush(range(len(self.disks)))
        except OSError as error:
            raise TakeoverImpossible(f"the disks of sync {self.committed_sync} cannot be flushed: {error}") from None

    def take_over(self) -> float:
        """Become the primary, once restore_committed() has put the state in (and the epoch is
        won, with a witness): attach the network, announce the MAC, let the outputs the restored
        devices hold go, run. Returns the seconds from detection to running vCPUs."""
        detected_at = self.lost_at
        # A dead primary's TAP may still be closing (wait); a hung one keeps its socket (take it).
        self.machine.attach_networks(announce=True, wait=2.0, take_over=True)
        self._outputs.release()
        self.trace.takeover("networks attached, the guest's MAC announced (RARP), held outputs released; "
                            "starting the vCPUs")
        self.machine.vm.start()
        elapsed = time.monotonic() - detected_at
        self.log(f"ft standby: took over from sync {self.committed_sync} in {elapsed * 1000:.1f} ms "
                 f"(after detecting the loss)")
        return elapsed


def _apply(image: DiskImage, changes: tuple[DiskChange, ...]) -> int:
    """Write `changes` to the disk image (not flushed); returns the data bytes written."""
    written = 0
    for change in changes:
        if change.zeroed:
            image.zero(change.offset, change.zeroed)
        else:
            image.write(change.offset, change.data)
            written += len(change.data)
    return written
