"""TCP as the tests and bench/ft_tcp.py speak it to the guests: a stream through `tcp-echo` that
checks every byte comes back exactly once and in order (and times the longest wait for one),
`kv` requests one per line on a connection, and raw segments built by hand (bad input)."""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
from dataclasses import dataclass

from pykvm.testing.netframes import ETHERTYPE_IPV4, checksum, ethernet, ip_bytes, ipv4_packet

PROTO_TCP = 6
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
_TCP = struct.Struct("!HHIIBBHHH")


@dataclass(frozen=True)
class Segment:
    src_ip: str
    dst_ip: str
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    window: int
    payload: bytes


def tcp_frame(src_mac: str, dst_mac: str, src_ip: str, dst_ip: str, sport: int, dport: int, seq: int, ack: int,
              flags: int, *, window: int = 65535, payload: bytes = b"", options: bytes = b"",
              offset_words: int | None = None, good_checksum: bool = True) -> bytes:
    """An Ethernet frame holding one TCP segment; `offset_words` overrides the header length
    field, `good_checksum=False` damages the checksum (for bad input)."""
    words = offset_words if offset_words is not None else (_TCP.size + len(options)) // 4
    segment = _TCP.pack(sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, words << 4, flags, window, 0, 0)
    segment += options + payload
    pseudo = ip_bytes(src_ip) + ip_bytes(dst_ip) + struct.pack("!BBH", 0, PROTO_TCP, len(segment))
    value = checksum(pseudo + segment) ^ (0 if good_checksum else 0x5A5A)
    segment = segment[:16] + struct.pack("!H", value) + segment[18:]
    return ethernet(dst_mac, src_mac, ETHERTYPE_IPV4, ipv4_packet(src_ip, dst_ip, PROTO_TCP, segment))


def parse_tcp(frame: bytes) -> Segment | None:
    """The TCP segment in an Ethernet frame, or None if it holds none."""
    if len(frame) < 14 + 20 + 20 or frame[12:14] != b"\x08\x00" or frame[14 + 9] != PROTO_TCP:
        return None
    ihl = (frame[14] & 0xF) * 4
    total = struct.unpack_from("!H", frame, 16)[0]
    tcp = frame[14 + ihl:14 + total]
    sport, dport, seq, ack, off, flags, window, _, _ = _TCP.unpack_from(tcp)
    addresses = [".".join(map(str, frame[at:at + 4])) for at in (26, 30)]
    return Segment(addresses[0], addresses[1], sport, dport, seq, ack, flags, window, tcp[(off >> 4) * 4:])


@dataclass
class EchoResult:
    sent: int
    received: int
    intact: bool  # what came back is what was sent, in order, each byte once, then the guest's FIN
    error: str  # how the connection failed (a reset, a timeout, a wrong byte), or ""
    longest_stall_s: float  # the longest wait for the next echoed bytes while some were due


class EchoStream:
    """One connection to an echo server: a thread writes `total` pseudo-random bytes (from `seed`)
    in chunks, then half-closes; another reads the echo and checks it byte for byte, up to the
    server's FIN. `wait_received(n)` lets a caller strike at a point of the stream."""

    def __init__(self, sock: socket.socket, total: int, *, chunk: int = 4096, seed: int = 0) -> None:
        self.sock, self.total, self.chunk = sock, total, chunk
        self.data = random.Random(seed).randbytes(total)
        self.sent = self.received = 0
        self.longest_stall_s = 0.0
        self.error = ""
        self.closed_cleanly = False
        self._cond = threading.Condition()
        self._threads = [threading.Thread(target=self._send, daemon=True),
                         threading.Thread(target=self._receive, daemon=True)]

    def start(self) -> EchoStream:
        for thread in self._threads:
            thread.start()
        return self

    def _fail(self, why: str) -> None:
        with self._cond:
            self.error = self.error or why
            self._cond.notify_all()

    def _send(self) -> None:
        try:
            view = memoryview(self.data)
            while self.sent < self.total and not self.error:
                n = self.sock.send(view[self.sent:self.sent + self.chunk])
                with self._cond:
                    self.sent += n
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as error:
            self._fail(f"send: {error!r}")

    def _receive(self) -> None:
        last = time.monotonic()
        try:
            while True:
                got = self.sock.recv(65536)
                now = time.monotonic()
                if not got:
                    with self._cond:
                        self.closed_cleanly = self.received == self.total
                        if not self.closed_cleanly:
                            self.error = self.error or f"closed by the guest after {self.received} of {self.total}"
                        self._cond.notify_all()
                    return
                with self._cond:
                    start = self.received
                    if got != self.data[start:start + len(got)]:
                        self.error = self.error or (f"bytes {start}..{start + len(got)} are not what was sent"
                                                    if start + len(got) <= self.total else
                                                    f"{start + len(got) - self.total} bytes more than were sent")
                        self._cond.notify_all()
                        return
                    self.received += len(got)
                    self.longest_stall_s = max(self.longest_stall_s, now - last)
                    self._cond.notify_all()
                last = now
        except OSError as error:
            self._fail(f"receive: {error!r}")

    def wait_received(self, count: int, timeout: float = 60.0) -> bool:
        """Until `count` bytes came back (False: an error or the timeout came first)."""
        with self._cond:
            self._cond.wait_for(lambda: self.received >= count or self.error, timeout)
            return self.received >= count

    def wait(self, timeout: float = 120.0) -> EchoResult:
        """Until the stream is done (or failed, or the timeout passed); then the verdict."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(deadline - time.monotonic(), 0))
        if any(thread.is_alive() for thread in self._threads):
            self._fail(f"not done after {timeout} s: {self.received} of {self.total} bytes back")
            self.sock.close()
        with self._cond:
            return EchoResult(self.sent, self.received, self.closed_cleanly and not self.error, self.error,
                              self.longest_stall_s)


class KvLines:
    """`kv` over TCP: one request per line, its answer the next line on the connection. Records
    the puts acknowledged (`acked`), to check they are all served."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.file = sock.makefile("rwb")
        self.acked: dict[int, str] = {}

    def ask(self, request: str) -> str:
        self.file.write(request.encode() + b"\n")
        self.file.flush()
        line = self.file.readline()
        if not line.endswith(b"\n"):
            raise ConnectionError(f"{request!r}: the connection ended ({line!r})")
        return line[:-1].decode()

    def put(self, seq: int, value: str) -> None:
        answer = self.ask(f"put {seq} {value}")
        if answer != f"ok {seq}":
            raise AssertionError(f"put {seq}: the guest answered {answer!r}")
        self.acked[seq] = value

    def unserved(self) -> list[int]:
        """The acknowledged records the guest does not serve as written, asked on this connection."""
        return [seq for seq, value in self.acked.items() if self.ask(f"get {seq}") != f"val {seq} {value}"]

    def close(self) -> None:
        self.file.close()
        self.sock.close()
