"""The guest library's TCP against the host kernel's own: `tcp-echo` and `kv` on a TAP, on a
bridge in a network namespace, with the clients' sockets inside it. Connect, exchange, close;
many connections at once; a client far faster than the guest's window; and bad input (malformed
segments, a SYN flood, a window held shut for long), after which the guest still serves its
other connections and the VMM runs on, silent."""

from __future__ import annotations

import random
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from pykvm.testing.lan import BRIDGE_MAC, GUEST_IP, GuestLan
from pykvm.testing.netframes import ETHERTYPE_IPV4, ethernet, ipv4_packet
from pykvm.testing.tcp import ACK, PROTO_TCP, RST, SYN, EchoStream, KvLines, parse_tcp, tcp_frame
from tests.conftest import VmmProcess, needs_netns, requires_kvm
from tests.test_ft import _disks

pytestmark = [requires_kvm, needs_netns]

GUEST_MAC = "52:54:00:12:34:56"
ECHO, KV = 7, 9000
TCP_CONNS = 32  # guests/lib/tcp.h


@pytest.fixture
def lan():
    with GuestLan() as lan:
        yield lan


def _guest(lan: GuestLan, *args: str) -> VmmProcess:
    vmm = VmmProcess("run", *args, "--net", "tap:tap0", prefix=lan.prefix)
    vmm.wait_for(b": ready")
    return vmm


def _echo(lan: GuestLan, total: int, seed: int = 0, **connect) -> None:
    result = EchoStream(lan.connect(ECHO, **connect), total, seed=seed).start().wait()
    assert result.intact, result


def _done_line(vmm: VmmProcess) -> dict[str, int]:
    assert vmm.wait() == 0, vmm.output + vmm.errors
    line = next(line for line in vmm.output.splitlines() if line.startswith("tcp-echo: done"))
    return {key: int(value) for key, value in re.findall(r"(\w+)=(\d+)", line)}


def test_connect_exchange_close(lan, guest_images):
    vmm = _guest(lan, "tcp-echo", "--append", "count=1")
    try:
        with lan.connect(ECHO) as sock:
            result = EchoStream(sock, 100_000, seed=1).start().wait()
            port = sock.getsockname()[1]
        assert result.intact, result
        # the guest prints it once it has closed too, which may come after our close returns
        vmm.wait_for(f"tcp-echo: connection from 10.0.2.2:{port} closed after 100000 bytes\n".encode())
        done = _done_line(vmm)
        assert done["connections"] == 1 and done["bytes"] == 100_000
        assert done["resets_in"] == done["resets_out"] == done["dropped"] == 0
    finally:
        vmm.kill()


def test_many_connections_at_once(lan, guest_images):
    """More clients than the guest has connection slots: a SYN that finds them all taken is
    dropped and the client's kernel sends it again, once a connection has closed."""
    count = TCP_CONNS + 4
    vmm = _guest(lan, "tcp-echo", "--append", f"count={count}")
    try:
        with ThreadPoolExecutor(count) as pool:
            results = list(pool.map(lambda i: EchoStream(lan.connect(ECHO), 8_000 + i, seed=i).start().wait(),
                                    range(count)))
        assert all(r.intact for r in results), [r for r in results if not r.intact]
        done = _done_line(vmm)
        assert done["connections"] == count and done["bytes"] == sum(8_000 + i for i in range(count))
        assert done["resets_in"] == 0
    finally:
        vmm.kill()


def test_a_client_faster_than_the_window(lan, guest_images):
    """Two MiB written at once into a 16 KiB window, read back at once: every byte, in order."""
    vmm = _guest(lan, "tcp-echo", "--append", "count=1")
    try:
        _echo(lan, 2 << 20, seed=2)
        assert _done_line(vmm)["bytes"] == 2 << 20
    finally:
        vmm.kill()


def test_the_guest_closes_first(lan, guest_images):
    """close_after: the guest's FIN follows the bytes it echoed; the client reads them, then the
    end of the stream, and closes in turn (the guest's FIN_WAIT and TIME_WAIT)."""
    vmm = _guest(lan, "tcp-echo", "--append", "count=3 close_after=5000")
    try:
        for seed in range(3):
            with lan.connect(ECHO) as sock:
                data = random.Random(seed).randbytes(5000)
                sock.sendall(data)
                echoed = bytearray()
                while chunk := sock.recv(65536):
                    echoed += chunk
                assert echoed == data
        done = _done_line(vmm)
        assert done["connections"] == 3 and done["bytes"] == 15_000
        assert done["resets_in"] == done["resets_out"] == 0
    finally:
        vmm.kill()


def test_the_guest_sends_again_what_was_lost(lan, guest_images):
    """For a while every frame from the guest is lost (the host's side answers to another MAC
    than the one the guest sends to) while the client's frames still arrive: the guest's timer
    sends its unacknowledged data again (seen on the wire: a data segment whose sequence number
    went out before), and once frames pass again the stream completes intact."""
    vmm = _guest(lan, "tcp-echo", "--append", "count=1")
    wire = lan.packet_socket(promiscuous=True)
    try:
        sock = lan.connect(ECHO)
        port = sock.getsockname()[1]
        stream = EchoStream(sock, 300_000, seed=8).start()
        assert stream.wait_received(50_000)
        lan.set_host_mac("02:00:00:00:00:03")
        sent_before: set[int] = set()

        def sent_again(segment) -> bool:
            if segment.dport != port or not segment.payload:
                return False
            again = segment.seq in sent_before
            sent_before.add(segment.seq)
            return again

        _expect(wire, sent_again)
        lan.set_host_mac(BRIDGE_MAC)
        result = stream.wait()
        assert result.intact, result
        assert _done_line(vmm)["retransmits"] >= 1
    finally:
        wire.close()
        vmm.kill()


def test_kv_over_tcp_beside_udp(lan, tmp_path, guest_images):
    (disk,) = _disks(tmp_path, "kv.img")
    vmm = _guest(lan, "kv", "--disk", disk)
    try:
        kv = KvLines(lan.connect(KV))
        for seq in range(1, 21):
            kv.put(seq, f"value-{seq}")
        assert kv.ask("put 3 other") == "err 3 exists" and kv.ask("get 99") == "none 99"
        assert kv.ask("get 3 extra") == "err malformed" and kv.ask("x" * 5000) == "err malformed"
        assert kv.ask(f"put 50 {'y' * 401}") == "err 50 too long"
        # several requests in one write: answered in order, one line each
        kv.file.write(b"get 1\nget 2\nput 21 v21\n")
        kv.file.flush()
        assert [kv.file.readline() for _ in range(3)] == [b"val 1 value-1\n", b"val 2 value-2\n", b"ok 21\n"]
        assert kv.unserved() == []
        udp = lan.inside(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        udp.settimeout(10)
        udp.sendto(b"get 21", (GUEST_IP, KV))
        assert udp.recv(1500) == b"val 21 v21"  # the UDP service is as it was
        udp.close()
        # the client's last line needs no newline; the guest closes after answering it
        kv.file.write(b"get 5")
        kv.file.flush()
        kv.sock.shutdown(socket.SHUT_WR)
        assert kv.file.read() == b"val 5 value-5\n"
        kv.close()
    finally:
        vmm.kill()
    assert vmm.errors == ""


# -- bad input --------------------------------------------------------------------------------------

def _vmm_unaffected(vmm: VmmProcess) -> None:
    assert vmm.proc.poll() is None and vmm.errors == "", vmm.errors


def test_malformed_segments(lan, guest_images):
    """Truncated headers, impossible header lengths, bad checksums are dropped; a reset or a SYN
    on a live connection's addresses that does not carry its exact next sequence number does not
    end it (RFC 5961); a segment for no connection gets a reset."""
    vmm = _guest(lan, "tcp-echo", "--append", "count=2")
    raw = lan.packet_socket()
    try:
        with lan.connect(ECHO) as live:
            live.sendall(b"before")
            assert live.recv(100) == b"before"
            host, port = live.getsockname()
            stranger = dict(src_mac=BRIDGE_MAC, dst_mac=GUEST_MAC, src_ip="10.0.2.77", dst_ip=GUEST_IP, sport=4242,
                            dport=ECHO)
            cut_short = ipv4_packet("10.0.2.77", GUEST_IP, PROTO_TCP, (4242).to_bytes(2, "big") + bytes(10))
            frames = [
                ethernet(GUEST_MAC, BRIDGE_MAC, ETHERTYPE_IPV4, cut_short),  # a 12-byte TCP header
                tcp_frame(**stranger, seq=1, ack=0, flags=SYN, offset_words=3),  # header shorter than 20
                tcp_frame(**stranger, seq=1, ack=0, flags=SYN, offset_words=15),  # longer than the segment
                tcp_frame(**stranger, seq=1, ack=0, flags=SYN, good_checksum=False),
            ]
            rng = random.Random(5)
            mine = dict(src_mac=BRIDGE_MAC, dst_mac=GUEST_MAC, src_ip=host, dst_ip=GUEST_IP, sport=port, dport=ECHO)
            frames += [tcp_frame(**mine, seq=rng.getrandbits(32), ack=0, flags=RST) for _ in range(20)]
            frames += [tcp_frame(**mine, seq=rng.getrandbits(32), ack=0, flags=SYN)]
            frames += [tcp_frame(**stranger, seq=1, ack=0, flags=SYN, options=b"\x02\x00\x01\x01")]  # bad option
            frames += [tcp_frame(**{**stranger, "sport": 4343}, seq=7, ack=99, flags=ACK, payload=b"hello")]
            for frame in frames:
                raw.send(frame)
            # the bad-option SYN opened a connection (SYN-ACK); the stray ACK got a reset
            syn_ack = _expect(raw, lambda s: s.dport == 4242 and s.flags == SYN | ACK)
            reset = _expect(raw, lambda s: s.dport == 4343 and s.flags & RST)
            assert reset.seq == 99
            raw.send(tcp_frame(**stranger, seq=syn_ack.ack, ack=0, flags=RST))  # which we end
            live.sendall(b"after")
            assert live.recv(100) == b"after"  # the live connection is still there
        _echo(lan, 10_000)  # and a new one is served
        done = _done_line(vmm)
        assert done["dropped"] == 4 and done["connections"] == 2 and done["resets_in"] == 1
    finally:
        raw.close()
        vmm.kill()
    assert vmm.errors == ""


def _expect(raw: socket.socket, match, timeout: float = 10.0):
    """The first segment from the guest that `match`es."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        raw.settimeout(left)
        try:
            frame = raw.recv(2048)
        except TimeoutError:
            break
        segment = parse_tcp(frame)
        if segment is not None and segment.src_ip == GUEST_IP and match(segment):
            return segment
    raise TimeoutError("the guest sent no such segment")


def test_a_syn_flood(lan, guest_images):
    """Thousands of SYNs from made-up hosts while a client streams: the stream completes intact,
    and a new client is accepted right after (a flood's half-open connections give way)."""
    vmm = _guest(lan, "tcp-echo")
    raw = lan.packet_socket()
    try:
        stream = EchoStream(lan.connect(ECHO), 400_000, seed=3).start()
        rng = random.Random(6)
        for _ in range(3000):
            raw.send(tcp_frame(BRIDGE_MAC, GUEST_MAC, f"10.0.2.{rng.randrange(100, 250)}", GUEST_IP,
                               rng.randrange(1024, 65536), ECHO, rng.getrandbits(32), 0, SYN))
        result = stream.wait()
        assert result.intact, result
        _echo(lan, 50_000, seed=4)
        _vmm_unaffected(vmm)
    finally:
        raw.close()
        vmm.kill()


def test_a_window_held_shut(lan, guest_images):
    """A client that stops reading: the guest's send buffer fills, then its receive window
    shuts, and the client's does too. For seconds the guest keeps the connection (probing the
    shut window) and serves other clients; then the client reads, and gets every byte."""
    vmm = _guest(lan, "tcp-echo")
    try:
        stuck = lan.connect(ECHO, receive_buffer=4096)
        stuck.setblocking(False)
        sent = bytearray()
        block = random.Random(7).randbytes(4096)
        while True:  # until both windows are shut and our send buffer is full
            try:
                sent += block[:stuck.send(block)]
            except BlockingIOError:
                break
        held_until, served = time.monotonic() + 8, 0
        while time.monotonic() < held_until:
            _echo(lan, 20_000, seed=served)
            served += 1
        stuck.setblocking(True)
        stuck.settimeout(30)
        stuck.shutdown(socket.SHUT_WR)
        echoed = bytearray()
        while chunk := stuck.recv(65536):
            echoed += chunk
        assert echoed == sent and served >= 2
        stuck.close()
        _vmm_unaffected(vmm)
    finally:
        vmm.kill()

