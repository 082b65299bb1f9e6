"""The FT replication protocol as a sans-IO state machine, in the manner of h11: no sockets,
events as frozen dataclasses, the rules as a table; bytes in and events out, buffers out for
events in.

A primary and a standby speak it over one stream of pykvm.transfer.wire frames (versioned,
sequenced, length-prefixed, hashed); each event travels as the frame kind of the same name:

    primary                               standby
    Hello(config, witness, epoch, mode, interval, disk mode, shared disks)
                                  ->
                                  <-      Ready  | Refused(reason)
    -- a sync, repeated; the first carries every populated page and the whole disk, in pieces --
    MachineStateBlob(data)        ->      (one per sync, anywhere before SyncEnd; ft.capture sends
                                          it first, so the standby decodes it while pages come)
    Pages(slot, pages)*           ->      (page data lands in the standby's staging buffers)
    DiskChanges(disk, changes)*   ->
    SyncEnd(sync, trigger, hashes)->      check the sync's page data against its digest (the
                                          primary hashes each frame's data after sending it;
                                          over TLS there is none: the channel authenticates),
                                          commit everything of the sync atomically, then
                                  <-      Ack(sync)  (cow mode: the next sync may begin before it)
    Heartbeat                     ->      (between syncs, when there is no output)
                                  <-      Heartbeat (the answer: the primary hears its standby too)
                                  <-      StandbyFault(reason): the standby cannot follow (a damaged
                                          sync, an I/O error, a verify mismatch); it will not take over
    Goodbye(reason)               <->     orderly end

TRANSITIONS says which side may send which event in which phase; any other move is a
ProtocolError (Pages outside a sync, a second state, a SyncEnd without one). The numbers are
checked on top: a SyncEnd's sync is the one after the last, an Ack names the sync awaiting it.
"""

from __future__ import annotations

import enum
import socket
import struct
import threading
from collections import deque
from dataclasses import replace

import numpy as np
import xxhash

from pykvm.ft.choices import DISK_MODES, SYNC_MODES  # noqa: F401 (part of the protocol's vocabulary)
from pykvm.ft.events import (  # noqa: F401 (the events are the protocol's vocabulary: p.SyncEnd)
    DISK_CHANGE_HEAD, DISK_FRAME_BYTES, DISK_FRAME_HEAD, EVENT_OF_KIND, FRAME_LIMITS, MAX_CHANGE_DATA, PROTOCOL, Ack,
    DiskChanges, Event, Goodbye, Heartbeat, Hello, MachineStateBlob, Pages, Ready, Refused, StandbyFault, SyncEnd)
from pykvm.memory import PAGE_SIZE
from pykvm.transfer import wire
from pykvm.transfer.wire import ProtocolError

MAX_IN_FLIGHT = 2  # syncs the primary may have sent and not yet had acknowledged (cow mode overlaps two)
# -- the rules ------------------------------------------------------------------------------------


class Role(enum.Enum):
    PRIMARY = "primary"
    STANDBY = "standby"

    @property
    def peer(self) -> Role:
        return Role.STANDBY if self is Role.PRIMARY else Role.PRIMARY


class Phase(enum.Enum):
    """Where the conversation is; both sides go through the same phases."""

    HELLO = "hello"  # nothing exchanged yet
    AWAIT_READY = "await-ready"  # the primary sent Hello
    IDLE = "idle"  # between syncs
    IN_SYNC = "in-sync"  # a sync's pages and disk changes are flowing
    STATE_SENT = "state-sent"  # ...and its machine state went too: SyncEnd may follow
    AWAIT_ACK = "await-ack"  # the primary sent SyncEnd
    CLOSED = "closed"


def _goodbye_anywhere(moves: dict[Phase, dict[type, Phase]]) -> dict[Phase, dict[type, Phase]]:
    """Either side may end the connection in any phase but CLOSED."""
    return {phase: {**moves.get(phase, {}), Goodbye: Phase.CLOSED} for phase in Phase if phase != Phase.CLOSED}


# The sender's role -> phase -> {event type -> next phase}.
TRANSITIONS: dict[Role, dict[Phase, dict[type, Phase]]] = {
    Role.PRIMARY: _goodbye_anywhere({
        Phase.HELLO: {Hello: Phase.AWAIT_READY},
        Phase.IDLE: {Pages: Phase.IN_SYNC, DiskChanges: Phase.IN_SYNC, MachineStateBlob: Phase.STATE_SENT,
                     Heartbeat: Phase.IDLE},
        Phase.IN_SYNC: {Pages: Phase.IN_SYNC, DiskChanges: Phase.IN_SYNC, MachineStateBlob: Phase.STATE_SENT},
        Phase.STATE_SENT: {Pages: Phase.STATE_SENT, DiskChanges: Phase.STATE_SENT, SyncEnd: Phase.AWAIT_ACK},
        # The next sync may start before the last one's Ack (at most MAX_IN_FLIGHT unacknowledged)
        Phase.AWAIT_ACK: {Heartbeat: Phase.AWAIT_ACK, Pages: Phase.IN_SYNC, DiskChanges: Phase.IN_SYNC,
                          MachineStateBlob: Phase.STATE_SENT},
    }),
    Role.STANDBY: _goodbye_anywhere({
        Phase.AWAIT_READY: {Ready: Phase.IDLE, Refused: Phase.CLOSED},
        Phase.IDLE: {Heartbeat: Phase.IDLE, StandbyFault: Phase.CLOSED},
        # An Ack for the sync before the one in progress (the phase stays: see FtConnection._advance)
        Phase.IN_SYNC: {Ack: Phase.IN_SYNC, StandbyFault: Phase.CLOSED},
        Phase.STATE_SENT: {Ack: Phase.STATE_SENT, StandbyFault: Phase.CLOSED},
        Phase.AWAIT_ACK: {Ack: Phase.IDLE, StandbyFault: Phase.CLOSED},
    }),
}
SENDS = {role: {event for moves in phases.values() for event in moves} for role, phases in TRANSITIONS.items()}
_MISPLACED = {  # what a move missing from the table means, where a bare "not allowed" would puzzle
    (Phase.IDLE, SyncEnd): "SyncEnd without a machine state",
    (Phase.IN_SYNC, SyncEnd): "SyncEnd without a machine state",
    (Phase.STATE_SENT, MachineStateBlob): "a second machine state",
}


class FtConnection:
    """One side of the protocol. `send(event)` returns the buffers to write; `want()` and
    `filled(n)` take received bytes and return events. Both check the other side's and our own
    moves against the protocol.

    `authenticated`: the channel authenticates every byte itself (mutual TLS: a record that was
    changed on the way fails its MAC, and the connection with it). The page data then goes
    without a digest of its own: the sender hashes none (the SyncEnd says 0) and the receiver
    checks none. Each side sets it from its own configuration, never from what the peer says, so
    a peer in the clear cannot talk a receiver out of the check; and a TLS side cannot meet a
    side in the clear (the handshake fails)."""

    def __init__(self, role: Role, page_sink: wire.PageSink | None = None, *, authenticated: bool = False) -> None:
        self.role = role
        self.authenticated = authenticated
        self.phase = Phase.HELLO
        self.last_sync = 0  # the last sync completed (primary: acked; standby: acked by us)
        self._out_seq = 0
        self._unacked: list[int] = []  # syncs whose SyncEnd went and whose Ack has not come, oldest first
        self._page_sink = page_sink or _refuse_pages
        self._decoder = wire.Decoder(self._sink_in_turn, limits=FRAME_LIMITS, allow_digest_later=True,
                                     check_later_digest=not authenticated)
        self._pages_digest = xxhash.xxh3_64()  # the page data sent in this sync
        self._unhashed: list = []  # page data handed out by send_pages, not yet in the digest
        self._handing, self._hashing = threading.Lock(), threading.Lock()  # hash_pages may run on another thread

    # -- sending ----------------------------------------------------------------------------------

    def send(self, event: Event) -> list:
        if isinstance(event, SyncEnd):
            event = replace(event, pages_hash=self._take_pages_digest())
        payload = event.payload()  # first: an event that cannot be encoded leaves the phase as it was
        self._advance(event, outgoing=True)
        buffers = wire.frame(event.kind, self._out_seq, payload)
        self._out_seq += 1
        return buffers

    def send_pages(self, slot: int, view: memoryview, pages: np.ndarray, *, data: list | None = None) -> list:
        """Pages of a RAM slot, read from `view` (guest RAM) or, given `data`, from those buffers
        (in page order, wherever the pages are held: guest RAM, a copy made aside; one frame's
        worth of pages). The data is hashed later (`hash_pages`, or the SyncEnd): it must not change
        until then. Over an `authenticated` channel it is not hashed at all."""
        if data is None and len(pages) and (int(pages[-1]) + 1) * PAGE_SIZE > len(view):
            raise ValueError(f"page {int(pages[-1])} is beyond the {len(view)}-byte RAM view")
        buffers, seq, unhashed = [], self._out_seq, []
        for start in range(0, len(pages), wire.PAGES_PER_FRAME):
            chunk = pages[start : start + wire.PAGES_PER_FRAME]
            chunk_data = data if data is not None else wire.run_views(view, chunk)
            buffers += wire.page_frame(seq, slot, chunk, chunk_data, digest_later=True)
            unhashed += chunk_data
            seq += 1
        self._advance(Pages(slot, pages), outgoing=True)
        self._out_seq = seq
        if not self.authenticated:
            with self._handing:
                self._unhashed += unhashed
        return buffers

    def hash_pages(self) -> None:
        """Hash the page data handed out so far into the sync's digest, in the order handed out.
        It may run on another thread while the sender sends those pages and builds the next
        frame (ft.capture does, so that the hash and the send overlap); the SyncEnd hashes what is
        left, waiting for a hash_pages in progress."""
        with self._hashing:
            with self._handing:
                todo, self._unhashed = self._unhashed, []
            deque(map(self._pages_digest.update, todo), maxlen=0)  # a page a buffer, the loop in C

    def _take_pages_digest(self) -> int:
        if self.authenticated:
            return 0
        self.hash_pages()
        with self._hashing:
            digest = self._pages_digest.intdigest()
            self._pages_digest.reset()
        return digest

    # -- receiving -------------------------------------------------------------------------------

    def want(self) -> list[memoryview]:
        return self._decoder.want()

    def _sink_in_turn(self, slot: int, pages: np.ndarray) -> list[memoryview]:
        """The page sink, asked only where Pages may come now: the decoder asks for a frame's
        buffers on its head, before the frame is finished and checked against the rules, and a
        frame out of place (before Hello: a stray peer) must not write its data anywhere."""
        self._next_phase(self.role.peer, Pages)
        return self._page_sink(slot, pages)

    def filled(self, count: int) -> Event | None:
        frame = self._decoder.filled(count)
        if frame is None:
            return None
        event = _decode(frame)
        self._advance(event, outgoing=False)
        if isinstance(event, SyncEnd) and not self.authenticated \
                and event.pages_hash != self._decoder.take_later_digest():
            raise ProtocolError(f"sync {event.sync}: its page data failed its checksum")
        return event

    # -- the rules -------------------------------------------------------------------------------

    def _advance(self, event: Event, *, outgoing: bool) -> None:
        """Move to the phase `event` leads to, or raise ProtocolError if it breaks the rules."""
        next_phase = self._next_phase(self.role if outgoing else self.role.peer, type(event))
        self._check_numbers(event)
        self.phase = next_phase
        if isinstance(event, SyncEnd):
            self._unacked.append(event.sync)
        elif isinstance(event, Ack):
            self.last_sync = self._unacked.pop(0)
            if self._unacked and self.phase is Phase.IDLE:
                self.phase = Phase.AWAIT_ACK  # the later sync still awaits its own

    def _next_phase(self, sender: Role, event_type: type) -> Phase:
        """The phase `sender` sending an `event_type` now leads to; ProtocolError if it may not."""
        name = event_type.__name__
        if self.phase == Phase.CLOSED:
            raise ProtocolError(f"{name} after the connection ended")
        if event_type not in SENDS[sender]:
            raise ProtocolError(f"the {sender.value} does not send {name}")
        next_phase = TRANSITIONS[sender][self.phase].get(event_type)
        if next_phase is None:
            what = _MISPLACED.get((self.phase, event_type), name)
            raise ProtocolError(f"{what} not allowed in phase {self.phase.value} ({self.role.value} side)")
        if event_type in (Pages, DiskChanges, MachineStateBlob) and self.phase is Phase.AWAIT_ACK \
                and len(self._unacked) >= MAX_IN_FLIGHT:
            raise ProtocolError(f"a sync begun with {len(self._unacked)} unacknowledged ({self.role.value} side)")
        return next_phase

    @property
    def next_sync(self) -> int:
        """The number the next SyncEnd carries: one past the last sent, acknowledged or not."""
        return self._unacked[-1] + 1 if self._unacked else self.last_sync + 1

    @property
    def unacknowledged(self) -> int:
        return len(self._unacked)

    def _check_numbers(self, event: Event) -> None:
        if isinstance(event, Hello) and event.protocol != PROTOCOL:
            raise ProtocolError(f"protocol {event.protocol}, this pykvm speaks {PROTOCOL}")
        if isinstance(event, SyncEnd) and event.sync != self.next_sync:
            raise ProtocolError(f"sync {event.sync} out of order (expected {self.next_sync})")
        if isinstance(event, Ack) and (not self._unacked or event.sync != self._unacked[0]):
            awaiting = f"sync {self._unacked[0]} is" if self._unacked else "none is"
            raise ProtocolError(f"Ack({event.sync}) for a sync not awaiting one ({awaiting})")


def _decode(frame: wire.Frame) -> Event:
    event_type = EVENT_OF_KIND.get(frame.kind)
    if event_type is None:
        raise ProtocolError(f"{frame.kind.name} frames are not part of the FT protocol")
    if event_type is Pages:
        return Pages(frame.slot, frame.pages)
    try:
        return event_type.parse(frame.payload)
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, struct.error) as error:
        raise ProtocolError(f"malformed {frame.kind.name} frame: {error}") from None


def receive_event(sock: socket.socket, connection: FtConnection, *, deadline: float | None = None) -> Event:
    """Blocking helper: read from `sock` until `connection` yields an event. EOF raises
    ConnectionError; the socket's timeout raises socket.timeout. With a `deadline`
    (time.monotonic()), the whole event must be in by then (TimeoutError), however the bytes
    trickle in."""
    while True:
        if deadline is not None:
            wire.time_left_until(sock, deadline)
        count = wire.receive_into(sock, connection.want())
        if count == 0:
            raise ConnectionError("the peer closed the connection")
        event = connection.filled(count)
        if event is not None:
            return event


def expect_answer(event_type: type, event: Event, what: str) -> None:
    """The standby's answer to `what` must be `event_type`; a StandbyFault says why it gave up."""
    if isinstance(event, StandbyFault):
        raise ProtocolError(f"the standby gave up at {what}: {event.reason}")
    if not isinstance(event, event_type):
        raise ProtocolError(f"the standby answered {type(event).__name__} to {what}")


def _refuse_pages(slot: int, pages: np.ndarray) -> list[memoryview]:
    raise ProtocolError("page data is not expected here")
