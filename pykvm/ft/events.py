"""The FT protocol's events, in the manner of h11: frozen dataclasses, each knowing its wire
frame kind, how it encodes its payload and how it parses one (a parse that fails raises, and
ft.protocol turns that into a ProtocolError). The rules of who sends which when are ft.protocol's.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import ClassVar, get_args

import numpy as np

from pykvm.devices.virtio.gate import DiskChange
from pykvm.ft.choices import DISK_MODES, SYNC_MODES
from pykvm.transfer import wire
from pykvm.transfer.wire import Kind

# 2: Hello carries the witness, epoch and sync mode; StandbyFault; heartbeats answered. 3: Hello
# carries the disk mode and shared disks' identities; state in binary parts; two syncs in flight.
# 4: a sync's page data is checked by one digest in its SyncEnd (wire.DIGEST_LATER). 5: over TLS
# that digest is left out (0): the channel authenticates every byte.
PROTOCOL = 5
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
    pages_hash: int = 0  # xxh3 of the sync's page data in the order sent, 0 over TLS (FtConnection.send)

    def payload(self) -> bytes:
        return json.dumps({"sync": self.sync, "trigger": self.trigger, "ram_hash": self.ram_hash,
                           "state_hash": self.state_hash, "pages_hash": self.pages_hash}).encode()

    @classmethod
    def parse(cls, payload: bytes) -> SyncEnd:
        fields = json.loads(payload)
        return cls(int(fields["sync"]), str(fields["trigger"]), fields["ram_hash"], int(fields["state_hash"]),
                   int(fields["pages_hash"]))


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


def _is_identity(disk: object) -> bool:
    return isinstance(disk, list) and len(disk) == 3 and all(type(n) is int and n >= 0 for n in disk)
