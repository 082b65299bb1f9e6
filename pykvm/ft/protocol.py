"""The FT replication protocol as a sans-IO state machine, in the manner of h11: no sockets,
events as frozen dataclasses, bytes in and events out, buffers out for events in.

A primary and a standby speak it over one stream (pykvm.transfer.wire frames: versioned, sequenced,
length-prefixed, hashed):

    primary                               standby
    Hello(config)                 ->
                                  <-      Ready  | Refused(reason)
    -- a sync, repeated; the first carries every populated page and the whole disk --
    Pages(slot, pages)*           ->      (page data lands in the standby's staging buffers)
    DiskChanges(disk, changes)*   ->
    MachineStateBlob(data)        ->
    SyncEnd(sync, trigger, hashes)->      commit everything of the sync atomically, then
                                  <-      Ack(sync)
    Heartbeat                     ->      (between syncs, when there is no output)
    Goodbye(reason)               <->     orderly end

Everything out of order is a ProtocolError: a Pages outside a sync, a second state, a SyncEnd
without a state or with a sync number that is not the next one, an Ack for a sync not sent.
"""

from __future__ import annotations

import enum
import json
import socket
import struct
from dataclasses import dataclass, field

import numpy as np

from pykvm.transfer import wire
from pykvm.devices.virtio.gate import DiskChange
from pykvm.transfer.wire import Kind, ProtocolError

PROTOCOL = 1
_DISK_HEAD = struct.Struct("<II")  # disk index, count
_CHANGE = struct.Struct("<QQB")  # offset, length, zeroed?


# -- events ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    config: bytes  # the primary's MachineConfig, encoded
    protocol: int = PROTOCOL


@dataclass(frozen=True)
class Ready:
    pass


@dataclass(frozen=True)
class Refused:
    reason: str


@dataclass(frozen=True, eq=False)
class Pages:
    """Page numbers of a RAM slot; the data went to the buffers the receiver's page sink gave."""

    slot: int
    pages: np.ndarray


@dataclass(frozen=True)
class DiskChanges:
    disk: int
    changes: tuple[DiskChange, ...]


@dataclass(frozen=True)
class MachineStateBlob:
    data: bytes  # an encoded MachineState


@dataclass(frozen=True)
class SyncEnd:
    sync: int
    trigger: str  # what made the primary sync: "full", "blk", "net", "timer"
    ram_hash: int | None = None  # verification mode: xxh3 of all guest RAM after this sync
    state_hash: int = 0
    extra: dict = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Ack:
    sync: int


@dataclass(frozen=True)
class Heartbeat:
    pass


@dataclass(frozen=True)
class Goodbye:
    reason: str


Event = Hello | Ready | Refused | Pages | DiskChanges | MachineStateBlob | SyncEnd | Ack | Heartbeat | Goodbye


class Role(enum.Enum):
    PRIMARY = "primary"
    STANDBY = "standby"


class Phase(enum.Enum):
    HELLO = "hello"  # nothing exchanged yet
    AWAIT_READY = "await-ready"  # primary sent Hello
    IDLE = "idle"  # between syncs
    IN_SYNC = "in-sync"  # a sync's parts are flowing
    AWAIT_ACK = "await-ack"  # primary sent SyncEnd
    CLOSED = "closed"


class FtConnection:
    """One side of the protocol. `send(event)` returns the buffers to write; `want()` and
    `filled(n)` take received bytes and return events. Both check the other side's and our own
    moves against the protocol."""

    def __init__(self, role: Role, page_sink: wire.PageSink | None = None) -> None:
        self.role = role
        self.phase = Phase.HELLO
        self.last_sync = 0  # the last sync completed (primary: acked; standby: ended)
        self._state_seen = False
        self._out_seq = 0
        self._pending_sync = 0  # the sync a SyncEnd announced and an Ack must name
        self._gatherer = wire.PageGatherer()
        self._decoder = wire.Decoder(page_sink or _refuse_pages)

    # -- sending ----------------------------------------------------------------------------------

    def send(self, event: Event) -> list:
        kind, payload = self._encode(event)
        self._advance(event, outgoing=True)
        buffers = wire.frame(kind, self._out_seq, payload)
        self._out_seq += 1
        return buffers

    def send_pages(self, slot: int, view: memoryview, pages: np.ndarray, *, copy: bool = False) -> list:
        """Pages of a RAM slot (the guest must be stopped: every byte is hashed). Scattered pages
        (all pages, with `copy`) are gathered into scratch buffers that stay valid until the
        next SyncEnd is sent."""
        self._advance(Pages(slot, pages), outgoing=True)
        buffers, self._out_seq = wire.page_frames(self._out_seq, slot, view, pages, gatherer=self._gatherer,
                                                  copy=copy)
        return buffers

    @staticmethod
    def _encode(event: Event) -> tuple[Kind, bytes]:
        if isinstance(event, Hello):
            return Kind.HELLO, json.dumps({"protocol": event.protocol}).encode() + b"\n" + event.config
        if isinstance(event, Ready):
            return Kind.READY, b""
        if isinstance(event, Refused):
            return Kind.ERROR, event.reason.encode()
        if isinstance(event, DiskChanges):
            parts = [_DISK_HEAD.pack(event.disk, len(event.changes))]
            for change in event.changes:
                length = change.zeroed or len(change.data)
                parts += [_CHANGE.pack(change.offset, length, 1 if change.zeroed else 0), change.data]
            return Kind.DISK, b"".join(parts)
        if isinstance(event, MachineStateBlob):
            return Kind.STATE, event.data
        if isinstance(event, SyncEnd):
            return Kind.DONE, json.dumps({"sync": event.sync, "trigger": event.trigger, "ram_hash": event.ram_hash,
                                          "state_hash": event.state_hash, "extra": event.extra}).encode()
        if isinstance(event, Ack):
            return Kind.ACK, json.dumps({"sync": event.sync}).encode()
        if isinstance(event, Heartbeat):
            return Kind.HEARTBEAT, b""
        if isinstance(event, Goodbye):
            return Kind.GOODBYE, event.reason.encode()
        raise TypeError(f"not a protocol event: {event!r}")

    # -- receiving -------------------------------------------------------------------------------

    def want(self) -> list[memoryview]:
        return self._decoder.want()

    def filled(self, count: int) -> Event | None:
        frame = self._decoder.filled(count)
        if frame is None:
            return None
        event = self._decode(frame)
        self._advance(event, outgoing=False)
        return event

    @staticmethod
    def _decode(frame: wire.Frame) -> Event:
        payload = frame.payload
        try:
            if frame.kind == Kind.HELLO:
                head, _, config = payload.partition(b"\n")
                return Hello(config, json.loads(head)["protocol"])
            if frame.kind == Kind.READY:
                return Ready()
            if frame.kind == Kind.ERROR:
                return Refused(payload.decode(errors="replace"))
            if frame.kind == Kind.PAGES:
                return Pages(frame.slot, frame.pages)
            if frame.kind == Kind.DISK:
                return _decode_disk(payload)
            if frame.kind == Kind.STATE:
                return MachineStateBlob(payload)
            if frame.kind == Kind.DONE:
                fields = json.loads(payload)
                return SyncEnd(int(fields["sync"]), str(fields["trigger"]), fields["ram_hash"], int(fields["state_hash"]),
                               dict(fields.get("extra") or {}))
            if frame.kind == Kind.ACK:
                return Ack(int(json.loads(payload)["sync"]))
            if frame.kind == Kind.HEARTBEAT:
                return Heartbeat()
            if frame.kind == Kind.GOODBYE:
                return Goodbye(payload.decode(errors="replace"))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, struct.error) as error:
            raise ProtocolError(f"malformed {frame.kind.name} frame: {error}") from None
        raise ProtocolError(f"{frame.kind.name} frames are not part of the FT protocol")

    # -- the rules ------------------------------------------------------------------------------------

    def _advance(self, event: Event, *, outgoing: bool) -> None:
        sender = self.role if outgoing else (Role.STANDBY if self.role == Role.PRIMARY else Role.PRIMARY)
        phase = self.phase
        if phase == Phase.CLOSED:
            raise ProtocolError(f"{type(event).__name__} after the connection ended")
        if isinstance(event, Goodbye):
            self.phase = Phase.CLOSED
            return
        name = type(event).__name__
        if sender == Role.PRIMARY:
            if isinstance(event, Hello):
                self._expect(phase == Phase.HELLO, name)
                if event.protocol != PROTOCOL:
                    raise ProtocolError(f"protocol {event.protocol}, this pykvm speaks {PROTOCOL}")
                self.phase = Phase.AWAIT_READY
            elif isinstance(event, (Pages, DiskChanges, MachineStateBlob)):
                self._expect(phase in (Phase.IDLE, Phase.IN_SYNC), name)
                if isinstance(event, MachineStateBlob):
                    self._expect(not self._state_seen, "a second machine state")
                    self._state_seen = True
                self.phase = Phase.IN_SYNC
            elif isinstance(event, SyncEnd):
                self._expect(phase == Phase.IN_SYNC and self._state_seen, "SyncEnd without a machine state")
                if event.sync != self.last_sync + 1:
                    raise ProtocolError(f"sync {event.sync} out of order (expected {self.last_sync + 1})")
                self._state_seen = False
                self.phase = Phase.AWAIT_ACK
                self._pending_sync = event.sync
                if outgoing:
                    self._gatherer.reset()  # the sync is complete: its scratch can be reused next time
            elif isinstance(event, Heartbeat):
                self._expect(phase in (Phase.IDLE, Phase.AWAIT_ACK), name)
            else:
                raise ProtocolError(f"the primary does not send {name}")
        else:
            if isinstance(event, (Ready, Refused)):
                self._expect(phase == Phase.AWAIT_READY, name)
                self.phase = Phase.IDLE if isinstance(event, Ready) else Phase.CLOSED
            elif isinstance(event, Ack):
                self._expect(phase == Phase.AWAIT_ACK and event.sync == self._pending_sync,
                             f"Ack({event.sync}) for a sync not awaiting one")
                self.last_sync = event.sync
                self.phase = Phase.IDLE
            else:
                raise ProtocolError(f"the standby does not send {name}")

    def _expect(self, condition: bool, what: str) -> None:
        if not condition:
            raise ProtocolError(f"{what} not allowed in phase {self.phase.value} ({self.role.value} side)")


def receive_event(sock: socket.socket, connection: FtConnection) -> Event:
    """Blocking helper: read from `sock` until `connection` yields an event. EOF raises
    ConnectionError; the socket's timeout raises socket.timeout."""
    while True:
        count = sock.recvmsg_into(connection.want()[: wire.MAX_IOVECS])[0]
        if count == 0:
            raise ConnectionError("the peer closed the connection")
        event = connection.filled(count)
        if event is not None:
            return event


def _decode_disk(payload: bytes) -> DiskChanges:
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
    return DiskChanges(disk, tuple(changes))


def _refuse_pages(slot: int, pages: np.ndarray) -> list[memoryview]:
    raise ProtocolError("page data is not expected here")
