"""The GDB remote serial protocol's framing, sans-IO: bytes in, events out; payloads in, bytes out.

A packet is `$payload#cc`, cc the modulo-256 sum of the payload bytes in two hex digits. The
receiver answers `+` (good) or `-` (send again). Inside a payload, `#`, `$`, `}` and `*` are
escaped as `}` followed by the byte XOR 0x20 (binary data: `X`, `vFile`); gdb never
run-length-encodes what it sends to a stub, and this stub never encodes what it sends. Outside
packets, a 0x03 byte is an interrupt (the user's Ctrl-C). Nothing here touches a socket.

Reference: the GDB manual, "Remote Protocol" (Overview, Packets, Stop Reply Packets).
"""

from __future__ import annotations

from dataclasses import dataclass

ESCAPE = 0x7D  # '}'
ESCAPED = frozenset(b"#$}*")
INTERRUPT = 0x03
# The largest payload accepted (and advertised as PacketSize): `G` with every register in hex is
# ~1.1 KB, memory writes are what gdb cuts to this size.
MAX_PAYLOAD = 0x4000


class ProtocolError(ValueError):
    """A packet's payload that does not parse (answered with an error reply, `E..`)."""


@dataclass(frozen=True)
class Packet:
    payload: bytes  # unescaped


@dataclass(frozen=True)
class BadPacket:
    """A packet whose checksum failed, or that was too long: answered with `-`."""

    reason: str


@dataclass(frozen=True)
class Interrupt:
    """0x03 between packets: stop the target."""


@dataclass(frozen=True)
class Ack:
    good: bool  # `+` or `-` for a packet we sent


Event = Packet | BadPacket | Interrupt | Ack


def checksum(data: bytes) -> int:
    return sum(data) & 0xFF


def escape(data: bytes) -> bytes:
    out = bytearray()
    for byte in data:
        if byte in ESCAPED:
            out += bytes((ESCAPE, byte ^ 0x20))
        else:
            out.append(byte)
    return bytes(out)


def unescape(data: bytes) -> bytes:
    out = bytearray()
    escaped = False
    for byte in data:
        if escaped:
            out.append(byte ^ 0x20)
            escaped = False
        elif byte == ESCAPE:
            escaped = True
        else:
            out.append(byte)
    if escaped:
        raise ProtocolError("payload ends inside an escape")
    return bytes(out)


def encode(payload: bytes) -> bytes:
    """The bytes on the wire for one packet carrying `payload`."""
    body = escape(payload)
    return b"$" + body + b"#" + b"%02x" % checksum(body)


class Decoder:
    """Feed it what the socket gave; it returns the events complete so far (and keeps the rest)."""

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self._max = max_payload
        self._body: bytearray | None = None  # inside a packet: the raw (escaped) body so far
        self._sum: bytearray | None = None  # after '#': the checksum digits so far
        self._oversized = False

    def feed(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        for byte in data:
            event = self._byte(byte)
            if event is not None:
                events.append(event)
        return events

    def _byte(self, byte: int) -> Event | None:
        if self._sum is not None:
            self._sum.append(byte)
            if len(self._sum) < 2:
                return None
            return self._finish()
        if self._body is not None:
            if byte == ord("#"):
                self._sum = bytearray()
            elif len(self._body) >= 2 * self._max:  # escaped bytes take two
                self._oversized = True
            else:
                self._body.append(byte)
            return None
        if byte == ord("$"):
            self._body, self._oversized = bytearray(), False
            return None
        if byte == INTERRUPT:
            return Interrupt()
        if byte in b"+-":
            return Ack(byte == ord("+"))
        return None  # noise between packets is ignored, as gdb itself does

    def _finish(self) -> Event:
        body, digits = bytes(self._body or b""), bytes(self._sum or b"")
        self._body = self._sum = None
        if self._oversized:
            return BadPacket(f"longer than {self._max} bytes")
        try:
            expected = int(digits, 16)
        except ValueError:
            return BadPacket(f"checksum {digits!r} is not hex")
        if checksum(body) != expected:
            return BadPacket(f"checksum {expected:02x}, payload sums to {checksum(body):02x}")
        try:
            payload = unescape(body)
        except ProtocolError as error:
            return BadPacket(str(error))
        if len(payload) > self._max:
            return BadPacket(f"longer than {self._max} bytes")
        return Packet(payload)


# -- payload helpers ------------------------------------------------------------------------------


def parse_hex(text: bytes, what: str = "number") -> int:
    try:
        return int(text, 16)
    except ValueError:
        raise ProtocolError(f"{what} {text!r} is not hex") from None


def parse_address_length(text: bytes) -> tuple[int, int]:
    """`ADDR,LENGTH` (both hex), as in `m`, `M` and `X`."""
    address, comma, length = text.partition(b",")
    if not comma:
        raise ProtocolError(f"expected ADDR,LENGTH in {text!r}")
    return parse_hex(address, "address"), parse_hex(length, "length")


def parse_hex_bytes(text: bytes) -> bytes:
    try:
        return bytes.fromhex(text.decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError(f"{text[:32]!r}... is not hex data") from None


@dataclass(frozen=True)
class BreakpointRequest:
    """`Z`/`z` TYPE,ADDR,KIND: insert (Z) or remove (z) a breakpoint of TYPE (0 software,
    1 hardware, 2-4 watchpoints) at ADDR; KIND is the instruction length (1 on x86)."""

    insert: bool
    type: int
    address: int
    kind: int


def parse_breakpoint(payload: bytes) -> BreakpointRequest:
    fields = payload[1:].split(b";", 1)[0].split(b",")  # `;cond` lists are not supported: ignored by gdb
    if payload[:1] not in (b"Z", b"z") or len(fields) != 3:
        raise ProtocolError(f"expected Z/z TYPE,ADDR,KIND, got {payload!r}")
    return BreakpointRequest(payload[:1] == b"Z", parse_hex(fields[0], "type"), parse_hex(fields[1], "address"),
                             parse_hex(fields[2], "kind"))


def parse_thread(text: bytes) -> int:
    """A thread id as gdb writes it: hex, or -1 (all) or 0 (any); the `pPID.TID` form too."""
    if text.startswith(b"p"):
        text = text.split(b".", 1)[1] if b"." in text else b"-1"
    if text == b"-1":
        return -1
    return parse_hex(text, "thread id")


def stop_reply(signal: int, thread: int, *, swbreak: bool = False, hwbreak: bool = False) -> bytes:
    """`T` stop reply: the signal (5 SIGTRAP, 2 SIGINT), the thread, and why (with `swbreak+`
    negotiated, the PC is already the breakpoint's address)."""
    reason = b"swbreak:;" if swbreak else b"hwbreak:;" if hwbreak else b""
    return b"T%02xthread:%x;%s" % (signal, thread, reason)


def exit_reply(status: int) -> bytes:
    return b"W%02x" % (status & 0xFF)


def error_reply(code: int = 1) -> bytes:
    return b"E%02x" % code
