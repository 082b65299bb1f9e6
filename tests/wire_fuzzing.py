"""Feeding arbitrary bytes to the receiving side of the wire, and what must hold whatever they are:
nothing raised but wire.ProtocolError, and nothing allocated beyond the frame limits (the payload
bound of the kind a header claims, checked on the header). Shared by tests/test_wire_fuzz.py
(hypothesis) and bench/fuzz_wire.py (a longer random run)."""

from __future__ import annotations

import random
import struct
import tracemalloc

import numpy as np
import xxhash

from pykvm.ft import protocol as p
from pykvm.memory import PAGE_SIZE, page_runs
from pykvm.transfer import wire

RAM_PAGES = 64  # the receiver's "guest RAM": slot 0, this many pages
SLACK = 256 << 10  # what a decoder may hold beyond a frame's payload: its header, page numbers, bookkeeping
_ram = memoryview(bytearray(RAM_PAGES * PAGE_SIZE))


def page_sink(slot: int, pages: np.ndarray) -> list[memoryview]:
    """Pages of slot 0 within RAM_PAGES, as a real sink checks them."""
    if slot != 0 or (len(pages) and int(pages.max()) >= RAM_PAGES):
        raise wire.ProtocolError(f"pages outside guest RAM (slot {slot})")
    return [_ram[first * PAGE_SIZE : (first + count) * PAGE_SIZE] for first, count in page_runs(pages)]


def header(kind: int, seq: int, length: int, payload: bytes = b"", *, flags: int = 0, magic: bytes = wire.MAGIC,
           version: int = wire.VERSION, digest: int | None = None) -> bytes:
    """A frame header with any fields; the digest is the right one for `payload` unless given."""
    if digest is None:
        digest = xxhash.xxh3_64_intdigest(wire.HEADER.pack(magic, version, kind, flags, seq, length, 0) + payload)
    return wire.HEADER.pack(magic, version, kind, flags, seq, length, digest)


def bound(data: bytes) -> int:
    """The most a receiver may allocate for `data`: the payload its first header claims, capped by
    that kind's limit, plus the slack."""
    if len(data) < wire.HEADER.size:
        return SLACK
    kind, length = data[6], struct.unpack_from("<Q", data, 16)[0]
    try:
        limit = p.FRAME_LIMITS[wire.Kind(kind)]
    except ValueError:
        limit = 0
    return min(length, limit) + SLACK


def check(data: bytes, chunk: int) -> str | None:
    """Feed `data`, `chunk` bytes a read, to a wire.Decoder (as migration has it) and to an FT
    connection on either side. Returns what went wrong, or None."""
    started = not tracemalloc.is_tracing()  # a long run starts it once: starting is slow
    if started:
        tracemalloc.start()
    try:
        for make in (lambda: wire.Decoder(page_sink, allow_live_data=True),
                     lambda: p.FtConnection(p.Role.STANDBY, page_sink=page_sink),
                     lambda: p.FtConnection(p.Role.PRIMARY)):
            receiver = make()
            before = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            try:
                _feed(receiver, data, chunk)
            except wire.ProtocolError:
                pass
            except Exception as error:  # noqa: BLE001 (that is the finding)
                return f"{type(receiver).__name__}: {type(error).__name__}: {error}"
            allocated = tracemalloc.get_traced_memory()[1] - before
            if allocated > bound(data):
                return f"{type(receiver).__name__}: allocated {allocated} bytes for a frame bounded by {bound(data)}"
        return None
    finally:
        if started:
            tracemalloc.stop()


def _feed(receiver, data: bytes, chunk: int) -> None:
    """As a TLS channel reads: into the first target, at most `chunk` bytes at a time."""
    at = 0
    while at < len(data):
        target = receiver.want()[0]
        count = min(len(target), len(data) - at, chunk)
        target[:count] = data[at : at + count]
        at += count
        receiver.filled(count)


# -- random cases (bench/fuzz_wire.py) ------------------------------------------------------------------


def random_case(rng: random.Random) -> bytes:
    """A stream that is wrong somewhere: a random header, a well-hashed frame of any kind with a
    random payload, a valid stream with bytes flipped or cut, or a claimed length at a limit."""
    kinds = [int(kind) for kind in wire.Kind] + [0, 255]
    kind, seq = rng.choice(kinds), rng.choice([0, 0, 0, 1, rng.getrandbits(64)])
    shape = rng.choice([0, 1, 1, 2, 3, 4, 4] * 10 + [5])  # a claimed length at a limit (5) is slow: rarely
    if shape == 0:
        return rng.randbytes(rng.randrange(0, 200))
    if shape == 1:  # a well-formed header (good hash) over a random payload
        payload = _payload(rng, kind)
        return header(kind, seq, len(payload), payload, flags=rng.choice([0, 0, 1, rng.randrange(256)])) + payload
    if shape == 2:  # any length at all, the hash left wrong
        length = rng.choice([rng.getrandbits(64), rng.getrandbits(32), rng.randrange(1 << 16)])
        return header(kind, seq, length, digest=rng.getrandbits(64)) + rng.randbytes(rng.randrange(64))
    if shape == 5:  # a claimed length just within or past its kind's limit, and little data after it
        limit = p.FRAME_LIMITS.get(wire.Kind(kind), 0) if kind in wire.Kind._value2member_map_ else 0
        return header(kind, seq, max(0, limit + rng.choice([-1, 0, 1])), digest=0) + rng.randbytes(64)
    if shape == 3:  # a well-formed page frame, its page numbers anywhere
        payload = _payload(rng, wire.Kind.PAGES)
        return header(wire.Kind.PAGES, 0, len(payload), payload) + payload
    data = bytearray(_valid_stream(rng))  # a good stream, damaged
    for _ in range(rng.randrange(1, 4)):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    return bytes(data[: rng.randrange(len(data) + 1)])


def _payload(rng: random.Random, kind: int) -> bytes:
    if kind == wire.Kind.PAGES and rng.random() < 0.5:  # a page frame's own shape, page numbers anywhere
        count = rng.randrange(4)
        pages = [rng.choice([rng.randrange(RAM_PAGES), rng.getrandbits(32)]) for _ in range(count)]
        return (wire.PAGES_HEAD.pack(rng.choice([0, 0, 1, rng.getrandbits(32)]), count)
                + struct.pack(f"<{count}I", *pages) + bytes(count * PAGE_SIZE))
    if kind == wire.Kind.DISK_CHANGES and rng.random() < 0.5:
        count = rng.randrange(4)
        body = b"".join(struct.pack("<QQB", rng.getrandbits(64), rng.choice([0, 8, rng.getrandbits(64)]),
                                    rng.randrange(2)) + rng.randbytes(8) for _ in range(count))
        return struct.pack("<II", rng.randrange(3), count + rng.choice([0, 0, 1])) + body
    texts = [b"", b"{}", b"[]", b"null", b'{"sync": "x"}', b'{"protocol": 2}\n', b"[" * 5000, rng.randbytes(64),
             b'{"protocol": 2, "epoch": -1}\n{}', b'{"sync": 1, "trigger": 1, "ram_hash": [], "state_hash": "a"}']
    return rng.choice(texts)


def _valid_stream(rng: random.Random) -> bytes:
    """A primary's opening: Hello, then a sync's pages, state and end."""
    primary = p.FtConnection(p.Role.PRIMARY)
    buffers = primary.send(p.Hello(b"{}"))
    primary.phase = p.Phase.IDLE  # as if the standby's Ready had come: what the primary sends next
    pages = np.array(sorted(rng.sample(range(RAM_PAGES), rng.randrange(1, 4))), dtype=np.uint32)
    buffers += primary.send_pages(0, _ram, pages)
    buffers += primary.send(p.MachineStateBlob(b"{}")) + primary.send(p.SyncEnd(1, "blk", None, 0))
    return b"".join(bytes(buffer) for buffer in buffers)
