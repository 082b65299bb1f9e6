"""The replication wire format, shared by live migration and fault tolerance, as sans-IO code:
frames are built as lists of buffers for `sendmsg`, and parsed from whatever bytes arrive, with
page data landing straight in the buffers the caller chooses (guest RAM, or a staging area).

    frame   = header payload  (each kind's payload bounded by FRAME_LIMITS, checked on the header)
    header  = magic "PYKV", version u16, kind u8, flags u8, seq u64, payload length u64,
              xxh3-64 of (header with this field zero + payload)
    flags   LIVE_DATA: page data read while the guest runs (migration pre-copy) is not covered
            by the hash, since the guest may change a page while it is being sent (the page is
            then dirty and sent again); a receiver that needs every byte checked (FT) refuses it
            DIGEST_LATER: page data covered by a running digest that a later frame carries (FT:
            the SyncEnd, over all of a sync's page data), so that the sender hashes a frame's
            data while sending it, not before; over TLS, which authenticates every byte, FT
            leaves that digest out on both sides (Decoder(check_later_digest=False))
    PAGES   payload = slot u32, count u32, page numbers u32 x count, count x 4096 bytes of data
    other   payloads are JSON or small binary blobs, per kind

Every frame is checked before it is handed on: magic, version, kind, length bound, sequence
number (each frame's seq is the previous one's + 1) and hash. Anything wrong raises
ProtocolError; the caller drops the connection and keeps what it had committed.
"""

from __future__ import annotations

import enum
import socket
import struct
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import xxhash

from pykvm.memory import PAGE_SIZE
from pykvm.transfer.channel import receive_into, send_buffers  # noqa: F401 (send_buffers: the wire's I/O)
from pykvm.transfer.page_arena import PageArena

MAGIC = b"PYKV"
VERSION = 1
HEADER = struct.Struct("<4sHBBQQQ")
LIVE_DATA = 0x1
DIGEST_LATER = 0x2
PAGES_HEAD = struct.Struct("<II")  # slot, count
PAGES_PER_FRAME = 1 << 16
PAGE_ROW = f"V{PAGE_SIZE}"  # numpy's view of a page as one element, to copy it whole


class Kind(enum.IntEnum):
    """What a frame carries. The sender is the side whose machine is copied (migration source,
    FT primary); the receiver holds the copy (migration target, FT standby)."""

    HELLO = 1  # sender -> receiver: protocol version and machine config
    READY = 2  # receiver -> sender: config accepted
    REFUSED = 3  # receiver -> sender: config refused, and why (UTF-8); the connection closes
    PAGES = 4  # guest pages
    MACHINE_STATE = 5  # an encoded MachineState (JSON)
    SYNC_END = 6  # the sync is whole (FT: one of many; migration: its one and last): commit it
    ACK = 7  # receiver -> sender: committed (JSON: what)
    HEARTBEAT = 8  # FT primary -> standby: still alive
    GOODBYE = 9  # orderly end of an FT pair
    DISK_CHANGES = 10  # FT: disk writes completed since the last sync (see ft.protocol)
    STANDBY_FAULT = 11  # FT standby -> primary: it cannot follow (why, UTF-8); the connection closes


class ProtocolError(Exception):
    """The peer sent something that is not a well-formed frame in sequence."""


MAX_PAYLOAD = PAGES_HEAD.size + PAGES_PER_FRAME * (4 + PAGE_SIZE)  # a full page frame: the largest any kind gets
# What a frame of each kind may carry, checked on its header before anything is allocated for it (a
# PAGES frame's length must also match its page count; its data goes to the page sink's buffers).
FRAME_LIMITS = {Kind.HELLO: 1 << 20, Kind.READY: 0, Kind.REFUSED: 64 << 10, Kind.PAGES: MAX_PAYLOAD,
                Kind.MACHINE_STATE: 64 << 20, Kind.SYNC_END: 4 << 10, Kind.ACK: 4 << 10, Kind.HEARTBEAT: 0,
                Kind.GOODBYE: 64 << 10, Kind.DISK_CHANGES: 4 << 20, Kind.STANDBY_FAULT: 64 << 10}


@dataclass(frozen=True)
class Frame:
    kind: Kind
    seq: int
    payload: bytes  # empty for PAGES: their data went to the sink's buffers
    slot: int = 0
    pages: np.ndarray | None = None  # PAGES: the page numbers, in payload order


# -- building frames ---------------------------------------------------------------------------------


def _header(kind: Kind, seq: int, length: int, parts: list, flags: int = 0) -> bytes:
    digest = xxhash.xxh3_64(HEADER.pack(MAGIC, VERSION, kind, flags, seq, length, 0))
    deque(map(digest.update, parts), maxlen=0)  # each part hashed, the loop in C (a page a part)
    return HEADER.pack(MAGIC, VERSION, kind, flags, seq, length, digest.intdigest())


def frame(kind: Kind, seq: int, payload: bytes = b"") -> list:
    return [_header(kind, seq, len(payload), [payload]), payload]


def page_frames(seq: int, slot: int, view: memoryview, pages: np.ndarray, *, live: bool = False) -> tuple[list, int]:
    """Frames carrying `pages` (ascending page numbers) of a RAM slot, as buffers for sendmsg:
    each run of consecutive pages travels as one memoryview of guest RAM, so nothing is copied.
    `live`: the guest is running, so the data is left out of the hash (LIVE_DATA). Returns the
    buffers and the next sequence number."""
    if len(pages) and (int(pages[-1]) + 1) * PAGE_SIZE > len(view):
        raise ValueError(f"page {int(pages[-1])} is beyond the {len(view)}-byte RAM view")
    buffers: list = []
    for start in range(0, len(pages), PAGES_PER_FRAME):
        chunk = pages[start : start + PAGES_PER_FRAME]
        buffers += page_frame(seq, slot, chunk, run_views(view, chunk), live=live)
        seq += 1
    return buffers, seq


def page_frame(seq: int, slot: int, pages: np.ndarray, data: list, *, live: bool = False,
               digest_later: bool = False) -> list:
    """One PAGES frame for `pages` (ascending, at most PAGES_PER_FRAME) of a RAM slot whose
    contents are `data`: buffers, in page order, wherever the pages are held (guest RAM, a copy
    made aside), their lengths adding up to the pages'. Hashed here, so the data must not change
    until it is sent (unless `live`); with `digest_later`, only the head is hashed here, and the
    data must not change until the sender has hashed it into the digest a later frame carries."""
    if len(pages) > PAGES_PER_FRAME:
        raise ValueError(f"{len(pages)} pages do not fit one frame")
    if sum(map(len, data)) != len(pages) * PAGE_SIZE:
        raise ValueError("the page data does not match the page count")
    numbers = np.ascontiguousarray(pages, dtype="<u4")
    head = PAGES_HEAD.pack(slot, len(numbers)) + numbers.tobytes()
    length = len(head) + len(numbers) * PAGE_SIZE
    hashed = [head] if live or digest_later else [head, *data]
    flags = LIVE_DATA if live else DIGEST_LATER if digest_later else 0
    return [_header(Kind.PAGES, seq, length, hashed, flags), head, *data]


def gather(arena: PageArena, view: memoryview, pages: np.ndarray) -> memoryview:
    """The pages copied into consecutive rows of `arena` (one memcpy per page, in C)."""
    rows = arena.take(len(pages))
    np.take(np.frombuffer(view, dtype=PAGE_ROW), pages, out=rows.view(PAGE_ROW).reshape(-1))
    return memoryview(rows).cast("B")


def run_views(view: memoryview, pages: np.ndarray) -> list[memoryview]:
    """Memoryviews of `view` holding `pages` (ascending page numbers), one per run of
    consecutive pages (the runs are found in numpy; only the slicing is Python)."""
    if len(pages) == 0:
        return []
    pages = np.asarray(pages, dtype=np.int64)
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    firsts = pages[np.concatenate(([0], breaks))] * PAGE_SIZE
    ends = pages[np.concatenate((breaks - 1, [len(pages) - 1]))] * PAGE_SIZE + PAGE_SIZE
    return list(map(view.__getitem__, map(slice, firsts.tolist(), ends.tolist())))  # loops in C


# -- parsing frames ----------------------------------------------------------------------------------

PageSink = Callable[[int, np.ndarray], list[memoryview]]
"""(slot, page numbers) -> buffers to receive those pages into (in order), or raise ProtocolError."""


class Decoder:
    """Turns received bytes into Frames. Drive it with `want()` (where to put the next bytes) and
    `filled(n)` (n bytes went there); a finished frame comes back from `filled`."""

    def __init__(self, page_sink: PageSink, expected_seq: int = 0, max_payload: int = MAX_PAYLOAD,
                 *, allow_live_data: bool = False, allow_digest_later: bool = False,
                 check_later_digest: bool = True, limits: Mapping[Kind, int] = FRAME_LIMITS) -> None:
        """`limits`: each kind's payload bound, checked on the header like `max_payload`.
        `allow_digest_later`: accept DIGEST_LATER page frames; their data goes into a running
        digest that the caller compares with the one a later frame carries (`take_later_digest`).
        `check_later_digest` False: that data is not hashed at all (the channel itself
        authenticates every byte: TLS)."""
        self.page_sink = page_sink
        self.allow_live_data = allow_live_data
        self.allow_digest_later = allow_digest_later
        self.check_later_digest = check_later_digest
        self._later = xxhash.xxh3_64()
        self.expected_seq = expected_seq
        self.max_payload = max_payload
        self.limits = dict(limits)
        self._start_header()

    def _start_header(self) -> None:
        self._stage = "header"
        self._pages = np.empty(0, dtype="<u4")
        self._buffer = bytearray(HEADER.size)
        self._targets = [memoryview(self._buffer)]

    def want(self) -> list[memoryview]:
        return self._targets

    def take_later_digest(self) -> int:
        """The digest of the DIGEST_LATER page data received since the last call (then reset)."""
        digest = self._later.intdigest()
        self._later.reset()
        return digest

    def filled(self, count: int) -> Frame | None:
        # Page data is hashed as it lands, still in cache: into the frame's hash, or the running one
        hashing = self._data_hash if self._stage == "page-data" else None
        while count:
            if not self._targets:
                raise ProtocolError("more bytes than asked for")
            first = self._targets[0]
            if count >= len(first):
                if hashing:
                    hashing.update(first)
                count -= len(first)
                self._targets.pop(0)
            else:
                if hashing:
                    hashing.update(first[:count])
                self._targets[0] = first[count:]
                count = 0
        if self._targets:
            return None
        return self._advance()

    def _advance(self) -> Frame | None:
        if self._stage == "header":
            magic, version, kind, flags, seq, length, digest = HEADER.unpack(self._buffer)
            if magic != MAGIC:
                raise ProtocolError("bad magic: not a pykvm replication stream")
            if version != VERSION:
                raise ProtocolError(f"stream version {version}, this pykvm speaks {VERSION}")
            try:
                self._kind = Kind(kind)
            except ValueError:
                raise ProtocolError(f"unknown frame kind {kind}") from None
            if seq != self.expected_seq:
                raise ProtocolError(f"frame {seq} out of sequence (expected {self.expected_seq})")
            limit = min(self.max_payload, self.limits.get(self._kind, self.max_payload))
            if length > limit:  # before anything is allocated for it
                raise ProtocolError(f"{self._kind.name} frame of {length} bytes exceeds its limit of {limit}")
            allowed = (LIVE_DATA if self.allow_live_data else 0) | (DIGEST_LATER if self.allow_digest_later else 0)
            if flags & ~allowed or (flags and self._kind != Kind.PAGES) or flags == LIVE_DATA | DIGEST_LATER:
                raise ProtocolError(f"frame {seq}: flags {flags:#x} not allowed here")
            self._seq, self._length, self._digest = seq, length, digest
            self._hash = xxhash.xxh3_64(HEADER.pack(magic, version, kind, flags, seq, length, 0))
            later = self._later if self.check_later_digest else None
            self._data_hash = None if flags & LIVE_DATA else later if flags & DIGEST_LATER else self._hash
            if self._kind == Kind.PAGES:
                if length < PAGES_HEAD.size:
                    raise ProtocolError("page frame too short")
                self._stage, self._buffer = "pages-head", bytearray(PAGES_HEAD.size)
            else:
                self._stage, self._buffer = "payload", bytearray(length)
            self._targets = [memoryview(self._buffer)] if self._buffer else []
            return self._finish() if not self._targets else None
        if self._stage == "pages-head":
            self._hash.update(self._buffer)
            self._slot, count = PAGES_HEAD.unpack(self._buffer)
            if self._length != PAGES_HEAD.size + count * (4 + PAGE_SIZE):
                raise ProtocolError(f"page frame length {self._length} does not match {count} pages")
            self._stage, self._buffer = "page-numbers", bytearray(4 * count)
            self._targets = [memoryview(self._buffer)] if count else []
            return None if count else self._finish()
        if self._stage == "page-numbers":
            self._hash.update(self._buffer)
            self._pages = np.frombuffer(bytes(self._buffer), dtype="<u4")
            self._data = self.page_sink(self._slot, self._pages)
            if sum(len(view) for view in self._data) != len(self._pages) * PAGE_SIZE:
                raise ProtocolError("page sink returned buffers of the wrong size")
            self._stage, self._targets = "page-data", list(self._data)
            return None
        if self._stage == "page-data":  # hashed in filled() as it came (or left to the later digest)
            return self._finish()
        # payload
        self._hash.update(self._buffer)
        return self._finish()

    def _finish(self) -> Frame:
        if self._hash.intdigest() != self._digest:
            raise ProtocolError(f"frame {self._seq} ({self._kind.name}) failed its checksum")
        if self._kind == Kind.PAGES:
            done = Frame(self._kind, self._seq, b"", self._slot, self._pages)
        else:
            done = Frame(self._kind, self._seq, bytes(self._buffer))
        self.expected_seq = self._seq + 1
        self._start_header()
        return done


def time_left_until(sock: socket.socket, deadline: float) -> None:
    """Let `sock`'s next read wait only until `deadline` (time.monotonic()); TimeoutError if it
    has passed: a whole frame is due by then, however its bytes trickle in."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("no whole frame by the deadline")
    sock.settimeout(left)


def receive_frame(sock: socket.socket, decoder: Decoder, *, deadline: float | None = None) -> Frame:
    """Blocking helper: read until the decoder yields a frame. EOF raises ConnectionError. With a
    `deadline` (time.monotonic()), the whole frame must be in by then, or TimeoutError: a peer
    that dribbles bytes never trips a per-read timeout."""
    while True:
        if deadline is not None:
            time_left_until(sock, deadline)
        count = receive_into(sock, decoder.want())
        if count == 0:
            raise ConnectionError("the peer closed the connection")
        frame_ = decoder.filled(count)
        if frame_ is not None:
            return frame_
