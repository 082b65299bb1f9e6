"""The client outside the `iozone` guest: it drives the workload over UDP, calibrates the guest's
TSC against its own clock, and stamps each report's arrival.

The externally observed latency of a report is its arrival here minus the moment the guest
produced it. The guest puts its TSC in the report; the client converts it to its own clock
(time.perf_counter) with an offset and a rate calibrated by probes before and after the workload.
A probe's TSC is read when the guest handles it, so `TSC - send time` is the clock offset plus the
inbound delay; the probe of each burst with the least of it fixes one point of the line, the two
bursts the rate. Replies are outputs (a protected guest's wait for a sync), so only their send
times are used, never the round trip's midpoint. The estimate of the offset errs by the smallest
inbound delay of a burst, which makes every latency too long by that much (a fraction of a
millisecond: less than the smallest round trip of an unprotected run, results.json's
`min_round_trip_ms`)."""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from pykvm.testing.netframes import FrameSocket, Peer, parse_frame

GUEST_PORT = 9001
CLIENT_PORT = 40001
RESEND = 0.25  # a command unanswered this long is sent again (UDP: the guest may not be up yet)
_U64 = struct.Struct("<Q")
_REPORT = struct.Struct("<4sQQQQQ")  # magic, seq, tsc, writes, bytes, pages
_PROBE = struct.Struct("<4sQQ")  # magic, tsc, cookie (the probe's number, echoed)


class GuestSilent(Exception):
    """The guest did not answer a command in time."""


@dataclass
class Report:
    seq: int
    tsc: int
    writes: int
    bytes: int
    pages: int
    arrival: float  # perf_counter when it arrived


@dataclass
class Probe:
    sent: float
    tsc: int
    answered: float


@dataclass
class Clock:
    """Guest TSC -> client time: t = anchor_time + (tsc - anchor_tsc) / rate."""

    anchor_tsc: int
    anchor_time: float
    rate: float  # TSC ticks per second of the client's clock

    def time_of(self, tsc: int) -> float:
        return self.anchor_time + (tsc - self.anchor_tsc) / self.rate


@dataclass
class Session:
    """What one workload run gave: the reports, the probes, and the guest's own figures."""

    reports: list[Report] = field(default_factory=list)
    probes: list[list[Probe]] = field(default_factory=list)  # one burst before, one after
    totals: tuple[int, int, int] = (0, 0, 0)  # writes, bytes, fsyncs, as the guest counted at stop
    started: float = 0.0  # wall clock (time.time), to match the metrics file's sync times
    stopped: float = 0.0
    wall_offset: float = 0.0  # time.time() - time.perf_counter(): the client's clock to the wall clock

    def clock(self) -> Clock:
        """The calibration: the least-delayed probe of each burst, a line through the two. Which
        probe was least delayed depends on the rate, so a first line through the probes of the
        shortest round trips gives the rate that picks them."""
        before, after = self.probes if len(self.probes) == 2 else ([], [])
        if not before or not after or min(p.sent for p in after) <= max(p.sent for p in before):
            raise GuestSilent("no two probe bursts to calibrate the guest's clock with")
        first, last = (min(burst, key=lambda p: p.answered - p.sent) for burst in self.probes)
        rate = (last.tsc - first.tsc) / (last.sent - first.sent)
        first, last = (min(burst, key=lambda p: p.tsc / rate - p.sent) for burst in self.probes)
        return Clock(first.tsc, first.sent, (last.tsc - first.tsc) / (last.sent - first.sent))

    def min_rtt_ms(self) -> float:
        return min((p.answered - p.sent) * 1000 for burst in self.probes for p in burst)

    def latencies_ms(self) -> list[float]:
        clock = self.clock()
        return [(r.arrival - clock.time_of(r.tsc)) * 1000 for r in self.reports]

    def report_times(self) -> list[tuple[float, float]]:
        """(produced, arrived) of each report on the wall clock, as the metrics file's sync times are."""
        clock = self.clock()
        return [(clock.time_of(r.tsc) + self.wall_offset, r.arrival + self.wall_offset) for r in self.reports]

    def throughput(self) -> dict[str, float]:
        """Writes/s and MB/s (10^6 bytes) between the first and the last report, on the guest's clock."""
        if len(self.reports) < 2:
            return {"writes_per_s": 0.0, "mb_per_s": 0.0}
        first, last = self.reports[0], self.reports[-1]
        seconds = (last.tsc - first.tsc) / self.clock().rate
        return {"writes_per_s": (last.writes - first.writes) / seconds,
                "mb_per_s": (last.bytes - first.bytes) / seconds / 1e6}


class IozoneClient:
    """Talks to the guest over the Unix-datagram link a pykvm `--net socket:` NIC is bound to."""

    def __init__(self, socket_path: Path, link: Path) -> None:
        self.link = FrameSocket(socket_path, link)
        self.peer = Peer(self.link, timeout=RESEND)

    def close(self) -> None:
        self.link.close()

    def _send(self, payload: bytes) -> None:
        self.peer.send_udp(GUEST_PORT, payload, CLIENT_PORT)

    def _receive(self, timeout: float) -> tuple[bytes, float] | None:
        """The next datagram from the guest's port, with its arrival time (None: nothing in time)."""
        deadline = time.perf_counter() + timeout
        while (left := deadline - time.perf_counter()) > 0:
            data = self.link.receive(left)
            arrival = time.perf_counter()
            if data is None:
                return None
            try:
                frame = parse_frame(data)
            except ValueError:
                continue
            if frame.udp is not None and (frame.udp.sport, frame.udp.dport) == (GUEST_PORT, CLIENT_PORT):
                return frame.udp.payload, arrival
        return None

    def _try(self, payload: bytes) -> float | None:
        """Send once; the send time, or None if the guest or its link is not there yet."""
        try:
            if self.peer.guest_mac is None:
                self.peer.resolve()
            sent = time.perf_counter()
            self._send(payload)
            return sent
        except TimeoutError:
            return None
        except (FileNotFoundError, ConnectionRefusedError):
            time.sleep(RESEND / 10)  # the VMM has not bound the link yet: as with a cable being plugged in
            return None

    def _command(self, payload: bytes, magic: bytes, deadline: float, reports: list[Report] | None = None) -> bytes:
        """Send until the answer starting with `magic` comes; reports meanwhile go to `reports`."""
        while time.monotonic() < deadline:
            if self._try(payload) is None:
                continue
            while (got := self._receive(RESEND)) is not None:
                data, arrival = got
                if data.startswith(magic):
                    return data
                if reports is not None and data.startswith(b"IOZR"):
                    reports.append(_report(data, arrival))
        raise GuestSilent(f"the guest did not answer {payload[:5].decode()!r}")

    def probes(self, count: int, deadline: float) -> list[Probe]:
        """`count` probes, one after the other. Every try carries a cookie of its own, so an answer
        to a try that seemed lost is paired with that try's send time, not with a later one's."""
        burst: list[Probe] = []
        sent_at: dict[int, float] = {}  # cookie -> send time, of tries not answered yet
        cookie = 0
        while len(burst) < count:
            if time.monotonic() > deadline:
                raise GuestSilent("the guest did not answer 'probe'")
            sent = self._try(b"probe" + _U64.pack(cookie))
            if sent is None:
                continue
            sent_at[cookie] = sent
            cookie += 1
            while (got := self._receive(RESEND)) is not None:
                data, arrival = got
                if data.startswith(b"IOZP") and len(data) >= _PROBE.size:
                    _, tsc, answered = _PROBE.unpack_from(data)
                    if answered in sent_at:
                        burst.append(Probe(sent_at.pop(answered), tsc, arrival))
                        break
        return burst

    def _collect(self, seconds: float) -> list[tuple[bytes, float]]:
        """Every frame for `seconds`, stamped on arrival and decoded only afterwards: the link holds
        few datagrams (net.unix.max_dgram_qlen), and a VMM drops a frame the client is too slow for."""
        frames = []
        sock = self.link.sock
        sock.settimeout(RESEND)
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            frames.append((data, time.perf_counter()))
        return frames

    def run(self, seconds: float, *, probes: int = 20, patience: float = 60) -> Session:
        """Calibrate, run the workload for `seconds`, calibrate again, and end the guest."""
        session = Session()
        session.probes.append(self.probes(probes, time.monotonic() + patience))
        session.started = time.time()
        session.wall_offset = session.started - time.perf_counter()
        self._command(b"start", b"IOZS", time.monotonic() + patience)
        for data, arrival in self._collect(seconds):
            try:
                frame = parse_frame(data)
            except ValueError:
                continue
            if frame.udp is not None and frame.udp.sport == GUEST_PORT and frame.udp.payload.startswith(b"IOZR"):
                session.reports.append(_report(frame.udp.payload, arrival))
        data = self._command(b"stop", b"IOZE", time.monotonic() + patience, session.reports)
        session.stopped = time.time()
        session.totals = struct.unpack_from("<QQQ", data, 4)
        session.probes.append(self.probes(probes, time.monotonic() + patience))
        self._command(b"quit", b"IOZQ", time.monotonic() + patience)
        return session


def _report(data: bytes, arrival: float) -> Report:
    if len(data) < _REPORT.size:
        raise GuestSilent(f"a {len(data)}-byte report")
    _, seq, tsc, writes, nbytes, pages = _REPORT.unpack_from(data)
    return Report(seq, tsc, writes, nbytes, pages, arrival)
