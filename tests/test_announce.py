"""The announce: after an FT takeover or a migration the new VMM broadcasts a RARP with the guest's
MAC (as QEMU does), so switches and peers learn where the guest now is. Seen on a TAP (a raw
AF_PACKET socket in the TAP's network namespace) and on a socket link without peer=, where the
addresses that had sent to the old VMM's link receive it from the new one."""

from __future__ import annotations

import json
import signal
import socket
import struct
import subprocess
import time

from pykvm.devices.net_backends import RECENT_SENDERS, SocketBackend
from pykvm.testing.ft_pair import stop_pair
from pykvm.testing.lan import run_in_netns
from pykvm.testing.netframes import FrameSocket, Peer, mac_str
from tests.conftest import VmmProcess, needs_netns, requires_kvm, run_pykvm
from tests.test_ft import _disks, _free_port

GUEST_MAC = "52:54:00:12:34:56"  # the first NIC's default
ETHERTYPE_RARP = 0x8035
RARP_REQUEST_REVERSE = 3


def _rarp_fields(frame: bytes) -> dict:
    """What a RARP frame says: its Ethernet addresses, the operation, sender and target MACs."""
    dst, src, ethertype = frame[0:6], frame[6:12], struct.unpack_from("!H", frame, 12)[0]
    _, _, _, _, op, sha, _, tha, _ = struct.unpack_from("!HHBBH6s4s6s4s", frame, 14)
    return dict(dst=mac_str(dst), src=mac_str(src), ethertype=ethertype, op=op, sender=mac_str(sha),
                target=mac_str(tha))


ANNOUNCE = dict(dst="ff:ff:ff:ff:ff:ff", src=GUEST_MAC, ethertype=ETHERTYPE_RARP, op=RARP_REQUEST_REVERSE,
                sender=GUEST_MAC, target=GUEST_MAC)


def _next_rarp(receive, timeout: float = 10.0) -> dict:
    """The first RARP frame `receive(seconds_left)` yields; other frames are skipped."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        frame = receive(left)
        if frame is not None and len(frame) >= 42 and struct.unpack_from("!H", frame, 12)[0] == ETHERTYPE_RARP:
            return _rarp_fields(frame)
    raise TimeoutError(f"no RARP frame within {timeout} s")


# -- the backend alone ------------------------------------------------------------------------------

def test_a_socket_link_broadcasts_to_its_recent_senders(tmp_path):
    """Without peer=, a broadcast reaches each of the last RECENT_SENDERS addresses that sent to
    the link; a sender that speaks again is recent again; a new backend (a standby's, a migration
    target's) that learns them broadcasts to them too, but sends no unicast frame before one speaks."""
    link = SocketBackend(str(tmp_path / "link.sock"))
    count = RECENT_SENDERS + 2
    peers = [FrameSocket(tmp_path / f"peer{i}.sock", tmp_path / "link.sock") for i in range(count)]
    buffer = memoryview(bytearray(2048))
    try:
        for peer in [*peers, peers[0]]:  # peer0 first and last: the most recent of all
            peer.send(b"x" * 60)
            assert link.receive_into([buffer]) == 60
        recent = [peers[0], *peers[-(RECENT_SENDERS - 1):]]
        assert sorted(link.senders()) == sorted(p.path for p in recent) and link.senders()[-1] == peers[0].path
        link.broadcast([memoryview(b"hello, everyone")])
        for peer in recent:
            assert peer.receive(timeout=5) == b"hello, everyone"
        for forgotten in peers[1:count - RECENT_SENDERS + 1]:  # a unix datagram is queued at the
            assert forgotten.receive(timeout=0) is None  # receiver when sendmsg returns: this is sound
        # a fresh socket at the same path (a standby taking over) that learns what the link knew
        learned = link.senders()
        link.close()
        link = SocketBackend(str(tmp_path / "link.sock"))
        link.learn(learned)
        assert link.senders() == learned
        link.send([memoryview(b"unicast")])  # nobody has spoken to this socket: goes nowhere
        link.broadcast([memoryview(b"announce")])
        for peer in recent:
            assert peer.receive(timeout=5) == b"announce"
    finally:
        link.close()
        for peer in peers:
            peer.close()


# -- takeovers --------------------------------------------------------------------------------------

@requires_kvm
def test_takeover_announces_to_the_senders_of_a_socket_link(tmp_path, guest_images):
    """Two hosts talk to the kv guest on a socket link without peer=; the primary dies; the
    standby, on a fresh socket, sends each of them the RARP."""
    primary_disk, standby_disk = _disks(tmp_path, "p.img", "s.img")
    link = str(tmp_path / "link.sock")
    port = _free_port()
    standby = VmmProcess("ft", "standby", "--listen", f"tcp:127.0.0.1:{port}", "--disk", standby_disk,
                         "--net", f"socket:{link}")
    primary = None
    try:
        standby.stderr.wait_for(b"waiting for a primary")
        primary = VmmProcess("run", "kv", "--disk", primary_disk, "--net", f"socket:{link}",
                             "--ft", f"tcp:127.0.0.1:{port}")
        primary.wait_for(b"kv: ready")
        with FrameSocket(tmp_path / "a.sock", link) as a, FrameSocket(tmp_path / "b.sock", link) as b:
            # A reply leaves the primary only once the standby acknowledged a sync taken after
            # the request came in: by then the standby knows the sender.
            for seq, sock, mac, ip in ((1, a, "52:54:00:00:00:02", "10.0.2.2"), (2, b, "52:54:00:00:00:03", "10.0.2.3")):
                peer = Peer(sock, mac=mac, ip=ip, timeout=5.0)
                assert peer.udp(9000, f"put {seq} v{seq}".encode()) == f"ok {seq}".encode()
            primary.proc.send_signal(signal.SIGKILL)
            primary.wait()
            standby.stderr.wait_for(b"took over")
            assert _next_rarp(a.receive) == ANNOUNCE
            assert _next_rarp(b.receive) == ANNOUNCE
    finally:
        stop_pair(primary, standby)


@requires_kvm
def test_migration_announces_to_the_senders_of_a_socket_link(tmp_path, guest_images):
    """A host talked to the kv guest on the source's link; after the migration the target (its
    own fresh socket at the same path) sends that host the RARP."""
    (disk,) = _disks(tmp_path, "kv.img")  # one disk file, shared as a migration's disks are
    link, control, uri = str(tmp_path / "link.sock"), str(tmp_path / "src.ctl"), f"tcp:127.0.0.1:{_free_port()}"
    target = VmmProcess("run", "kv", "--disk", disk, "--net", f"socket:{link}", "--incoming", uri)
    source = VmmProcess("run", "kv", "--disk", disk, "--net", f"socket:{link}", "--control", control)
    try:
        target.stderr.wait_for(b"waiting for a migration")
        source.wait_for(b"kv: ready")
        with FrameSocket(tmp_path / "host.sock", link) as host:
            assert Peer(host, timeout=5.0).udp(9000, b"put 1 v1") == b"ok 1"  # the source read our frames
            reply = json.loads(run_pykvm("ctl", control, "migrate", uri).stdout)
            assert reply["ok"], reply
            try:
                assert _next_rarp(host.receive, timeout=30.0) == ANNOUNCE
            except TimeoutError as error:  # say what each VMM said: the target may not have got the link
                raise AssertionError(f"{error}\ntarget:\n{target.errors}\nsource:\n{source.errors}") from None
    finally:
        source.kill()
        target.kill()


@requires_kvm
@needs_netns
def test_takeover_announces_on_a_tap(tmp_path, guest_images, netns):
    ns = ("ip", "netns", "exec", netns)
    subprocess.run([*ns, "ip", "link", "set", "lo", "up"], check=True)  # for the FT connection
    subprocess.run([*ns, "ip", "tuntap", "add", "dev", "tap0", "mode", "tap"], check=True)
    subprocess.run([*ns, "ip", "link", "set", "tap0", "up"], check=True)
    capture = run_in_netns(netns, lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW,
                                                         socket.htons(ETHERTYPE_RARP)))
    capture.bind(("tap0", ETHERTYPE_RARP))

    def receive(timeout: float) -> bytes | None:
        capture.settimeout(timeout)
        try:
            return capture.recv(2048)
        except TimeoutError:
            return None

    port = _free_port()
    standby = VmmProcess("ft", "standby", "--listen", f"tcp:127.0.0.1:{port}", "--net", "tap:tap0", prefix=ns)
    primary = None
    try:
        standby.stderr.wait_for(b"waiting for a primary")
        primary = VmmProcess("run", "dirty", "--net", "tap:tap0", "--ft", f"tcp:127.0.0.1:{port}", prefix=ns)
        primary.wait_for(b"pages/s")  # protected (the first sync comes before the guest runs)
        primary.proc.send_signal(signal.SIGKILL)
        primary.wait()
        standby.stderr.wait_for(b"took over")
        assert _next_rarp(receive) == ANNOUNCE
    finally:
        capture.close()
        stop_pair(primary, standby)
