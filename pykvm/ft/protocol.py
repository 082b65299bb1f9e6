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
    SyncEnd(sync, trigger, hashes)->      commit everything of the sync atomically, then
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
import json
import socket
import struct
from dataclasses import dataclass
from typing import ClassVar, get_args

import numpy as np

from pykvm.devices.virtio.gate import DiskChange
from pykvm.ft.choices import DISK_MODES, SYNC_MODES  # noqa: F401 (part of the protocol's vocabulary)
from pykvm.transfer import wire
from pykvm.transfer.wire import Kind, ProtocolError

# 2: Hello carries the witness, epoch and sync mode; StandbyFault; heartbeats answered. 3: Hello
# carries the disk mode and shared disks' identities; state in binary parts; two syncs in flight.
PROTOCOL = 3
MAX_IN_FLIGHT = 2  # syncs the primary may have sent and not yet had acknowledged (cow mode overlaps two)
_DISK_HEAD = struct.Struct("<II")  # disk index, count
_CHANGE = struct.Struct("<QQB")  # offset, length, zeroed?
DISK_FRAME_BYTES = 4 << 20  # a DiskChanges frame's payload at most: a sender splits bigger changes
MAX_CHANGE_DATA = DISK_FRAME_BYTES - _DISK_HEAD.size - _CHANGE.size  # the most one change can carry
DISK_FRAME_HEAD, DISK_CHANGE_HEAD = _DISK_HEAD.size, _CHANGE.size  # what a frame and each change add

# What a frame of each kind may carry at most, checked on its header before anything is allocated
# (wire.FRAME_LIMITS, with the disk changes' own cap).
FRAME_LIMITS = {**wire.FRAME_LIMITS, Kind.DISK_CHANGES: DISK_FRAME_BYTES}


# -- events: each knows its frame kind and its payload ---------------------------------------------


class _Signal:
    """An event that is its kind alone (an empty payload)."""

    def payload(self) -> bytes:
        return b""

    @classmethod
    def parse(cls, payload: bytes):
        return cls()


class _Reason:
    """An event that carries one line saying why (UTF-8)."""

    reason: str

    def payload(self) -> bytes:
        return self.reason.encode()

    @classmethod
    def parse(cls, payload: bytes):
        return cls(payload.decode(errors="replace"))


@dataclass(frozen=True)
class Hello:
    """The primary introduces itself: its machine (the standby must build the same), the witness
    both must name and the epoch the primary holds there (see ft.witness), how it syncs, and where
    the standby's disks come from (the standby follows the primary's mode, interval and disk
    mode, it has no say in them; it checks that it can share the disks named shared)."""

    kind: ClassVar[Kind] = Kind.HELLO
    config: bytes  # the primary's MachineConfig, encoded
    witness: str = ""  # the witness URI; "" when the pair runs without one
    epoch: int = 0  # the epoch the primary won at the witness
    mode: str = "sync"  # sync | pipelined | cow
    interval_ms: float = 0.0  # periodic syncs on top of the output-driven ones (0: none)
    protocol: int = PROTOCOL
    disk_mode: str = "replicated"  # replicated | shared
    shared_disks: tuple[tuple[int, int, int], ...] = ()  # shared: each disk's identity (ft.disk_mode)

    def payload(self) -> bytes:
        head = {"protocol": self.protocol, "witness": self.witness, "epoch": self.epoch, "mode": self.mode,
                "interval_ms": self.interval_ms, "disk_mode": self.disk_mode,
                "shared_disks": [list(disk) for disk in self.shared_disks]}
        return json.dumps(head).encode() + b"\n" + self.config

    @classmethod
    def parse(cls, payload: bytes) -> Hello:
        head, _, config = payload.partition(b"\n")
        fields = json.loads(head)
        disks = fields.get("shared_disks", [])
        if not (isinstance(disks, list) and len(disks) <= 64 and all(_is_identity(disk) for disk in disks)):
            raise ValueError("Hello's shared disks are not lists of three counts")
        hello = cls(config, fields.get("witness", ""), fields.get("epoch", 0), fields.get("mode", "sync"),
                    fields.get("interval_ms", 0.0), fields["protocol"], fields.get("disk_mode", "replicated"),
                    tuple(tuple(disk) for disk in disks))
        if not (isinstance(hello.witness, str) and type(hello.epoch) is int and hello.epoch >= 0
                and hello.mode in SYNC_MODES and isinstance(hello.interval_ms, (int, float))
                and 0 <= hello.interval_ms < 3_600_000 and type(hello.protocol) is int
                and hello.disk_mode in DISK_MODES and (hello.disk_mode == "shared" or not disks)):
            raise ValueError("Hello fields out of range")
        return hello


@dataclass(frozen=True)
class Ready(_Signal):
    kind: ClassVar[Kind] = Kind.READY


@dataclass(frozen=True)
class Refused(_Reason):
    kind: ClassVar[Kind] = Kind.REFUSED
    reason: str


@dataclass(frozen=True, eq=False)
class Pages:
    """Page numbers of a RAM slot; the data went to the buffers the receiver's page sink gave.
    Sent with `FtConnection.send_pages`, which frames the data along."""

    kind: ClassVar[Kind] = Kind.PAGES
    slot: int
    pages: np.ndarray

    def payload(self) -> bytes:
        raise TypeError("Pages are sent with FtConnection.send_pages")


@dataclass(frozen=True)
class DiskChanges:
    kind: ClassVar[Kind] = Kind.DISK_CHANGES
    disk: int  # index among the machine's disks
    changes: tuple[DiskChange, ...]

    def payload(self) -> bytes:
        parts = [_DISK_HEAD.pack(self.disk, len(self.changes))]
        for change in self.changes:
            length = change.zeroed or len(change.data)
            parts += [_CHANGE.pack(change.offset, length, 1 if change.zeroed else 0), change.data]
        return b"".join(parts)

    @classmethod
    def parse(cls, payload: bytes) -> DiskChanges:
        disk, count = _DISK_HEAD.unpack_from(payload, 0)
        at, changes = _DISK_HEAD.size, []
        for _ in range(count):
            offset, length, zeroed = _CHANGE.unpack_from(payload, at)
            at += _CHANGE.size
            if zeroed:
                changes.append(DiskChange(offset, zeroed=length))
            else:
                if at + length > len(payload):
                    raise ValueError("disk change runs past the frame")
                changes.append(DiskChange(offset, payload[at : at + length]))
                at += length
        if at != len(payload):
            raise ValueError("trailing bytes after the disk changes")
        return cls(disk, tuple(changes))


@dataclass(frozen=True)
class MachineStateBlob:
    kind: ClassVar[Kind] = Kind.MACHINE_STATE
    data: bytes  # an encoded MachineState, decoded only by the standby's commit

    def payload(self) -> bytes:
        return self.data

    @classmethod
    def parse(cls, payload: bytes) -> MachineStateBlob:
        return cls(payload)


@dataclass(frozen=True)
class SyncEnd:
    kind: ClassVar[Kind] = Kind.SYNC_END
    sync: int  # 1 for the first (full) sync, then one more each time
    trigger: str  # what made the primary sync: "full", "blk", "net", "timer"
    ram_hash: int | None = None  # verification mode: xxh3 of all guest RAM after this sync
    state_hash: int = 0  # xxh3 of the MachineStateBlob's data

    def payload(self) -> bytes:
        return json.dumps({"sync": self.sync, "trigger": self.trigger, "ram_hash": self.ram_hash,
                           "state_hash": self.state_hash}).encode()

    @classmethod
    def parse(cls, payload: bytes) -> SyncEnd:
        fields = json.loads(payload)
        return cls(int(fields["sync"]), str(fields["trigger"]), fields["ram_hash"], int(fields["state_hash"]))


@dataclass(frozen=True)
class Ack:
    kind: ClassVar[Kind] = Kind.ACK
    sync: int

    def payload(self) -> bytes:
        return json.dumps({"sync": self.sync}).encode()

    @classmethod
    def parse(cls, payload: bytes) -> Ack:
        return cls(int(json.loads(payload)["sync"]))


@dataclass(frozen=True)
class Heartbeat(_Signal):
    kind: ClassVar[Kind] = Kind.HEARTBEAT


@dataclass(frozen=True)
class Goodbye(_Reason):
    kind: ClassVar[Kind] = Kind.GOODBYE
    reason: str


@dataclass(frozen=True)
class StandbyFault(_Reason):
    """The standby cannot follow this primary (a sync that does not check out, an I/O error
    applying one, a RAM mismatch under --ft-verify). It names why, closes the connection and
    does not take over: a fault of the standby's is not a loss of the primary."""

    kind: ClassVar[Kind] = Kind.STANDBY_FAULT
    reason: str


Event = (Hello | Ready | Refused | Pages | DiskChanges | MachineStateBlob | SyncEnd | Ack | Heartbeat | Goodbye
         | StandbyFault)
EVENT_OF_KIND: dict[Kind, type] = {event.kind: event for event in get_args(Event)}


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
    moves against the protocol."""

    def __init__(self, role: Role, page_sink: wire.PageSink | None = None) -> None:
        self.role = role
        self.phase = Phase.HELLO
        self.last_sync = 0  # the last sync completed (primary: acked; standby: acked by us)
        self._out_seq = 0
        self._unacked: list[int] = []  # syncs whose SyncEnd went and whose Ack has not come, oldest first
        self._decoder = wire.Decoder(page_sink or _refuse_pages, limits=FRAME_LIMITS)

    # -- sending ----------------------------------------------------------------------------------

    def send(self, event: Event) -> list:
        payload = event.payload()  # first: an event that cannot be encoded leaves the phase as it was
        self._advance(event, outgoing=True)
        buffers = wire.frame(event.kind, self._out_seq, payload)
        self._out_seq += 1
        return buffers

    def send_pages(self, slot: int, view: memoryview, pages: np.ndarray, *, data: list | None = None) -> list:
        """Pages of a RAM slot, read from `view` (guest RAM) or, given `data`, from those buffers
        (in page order, wherever the pages are held: guest RAM, a copy made aside; one frame's
        worth of pages). Every byte is hashed now: the data must not change until it is sent."""
        if data is not None:
            buffers, next_seq = wire.page_frame(self._out_seq, slot, pages, data), self._out_seq + 1
        else:
            buffers, next_seq = wire.page_frames(self._out_seq, slot, view, pages)
        self._advance(Pages(slot, pages), outgoing=True)
        self._out_seq = next_seq
        return buffers

    # -- receiving -------------------------------------------------------------------------------

    def want(self) -> list[memoryview]:
        return self._decoder.want()

    def filled(self, count: int) -> Event | None:
        frame = self._decoder.filled(count)
        if frame is None:
            return None
        event = _decode(frame)
        self._advance(event, outgoing=False)
        return event

    # -- the rules -------------------------------------------------------------------------------

    def _advance(self, event: Event, *, outgoing: bool) -> None:
        """Move to the phase `event` leads to, or raise ProtocolError if it breaks the rules."""
        sender, event_type = (self.role if outgoing else self.role.peer), type(event)
        name = event_type.__name__
        if self.phase == Phase.CLOSED:
            raise ProtocolError(f"{name} after the connection ended")
        if event_type not in SENDS[sender]:
            raise ProtocolError(f"the {sender.value} does not send {name}")
        next_phase = TRANSITIONS[sender][self.phase].get(event_type)
        if next_phase is None:
            what = _MISPLACED.get((self.phase, event_type), name)
            raise ProtocolError(f"{what} not allowed in phase {self.phase.value} ({self.role.value} side)")
        self._check_numbers(event)
        if event_type in (Pages, DiskChanges, MachineStateBlob) and self.phase is Phase.AWAIT_ACK \
                and len(self._unacked) >= MAX_IN_FLIGHT:
            raise ProtocolError(f"a sync begun with {len(self._unacked)} unacknowledged ({self.role.value} side)")
        self.phase = next_phase
        if isinstance(event, SyncEnd):
            self._unacked.append(event.sync)
        elif isinstance(event, Ack):
            self.last_sync = self._unacked.pop(0)
            if self._unacked and self.phase is Phase.IDLE:
                self.phase = Phase.AWAIT_ACK  # the later sync still awaits its own

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


def receive_event(sock: socket.socket, connection: FtConnection) -> Event:
    """Blocking helper: read from `sock` until `connection` yields an event. EOF raises
    ConnectionError; the socket's timeout raises socket.timeout."""
    while True:
        count = wire.receive_into(sock, connection.want())
        if count == 0:
            raise ConnectionError("the peer closed the connection")
        event = connection.filled(count)
        if event is not None:
            return event


def _is_identity(disk: object) -> bool:
    return isinstance(disk, list) and len(disk) == 3 and all(type(n) is int and n >= 0 for n in disk)


def _refuse_pages(slot: int, pages: np.ndarray) -> list[memoryview]:
    raise ProtocolError("page data is not expected here")
