"""The virtio guests on pykvm's own devices, from the CLI: bytes on disk, frames on a socket link,
pings and UDP through a real TAP in a network namespace, two VMMs wired together, and the kv
store surviving a SIGKILL of its VMM."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys

import pytest

from tests.conftest import REPO, VmmProcess, needs_netns, requires_kvm, run_pykvm
from tests.netutil import FrameSocket, Peer, blk_pattern

pytestmark = requires_kvm

SECTOR = 512


def _disk(path, size=8 << 20):
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


@pytest.mark.parametrize("append", ["", "irq=intx", "irq=poll event_idx=0 indirect=0"])
def test_blk_round_trip_and_host_file(tmp_path, guest_images, append):
    disk = _disk(tmp_path / "disk.img")
    result = run_pykvm("run", "blk", "--disk", disk, "--append", f"seed=7 sectors=1024 {append}", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout.decode()
    assert "blk: read back 1024 sectors, all match" in out and "blk: ok sectors=1024" in out
    data = open(disk, "rb").read()
    assert data[: 1024 * SECTOR] == blk_pattern(0, 1024 * SECTOR, 7)  # the guest's writes, on the host


def test_blk_readonly_refuses_writes(tmp_path, guest_images):
    disk = tmp_path / "ro.img"
    disk.write_bytes(blk_pattern(0, 1 << 20, 3))
    before = disk.read_bytes()
    result = run_pykvm("run", "blk", "--disk", f"{disk},readonly")
    assert result.returncode == 0, result.stdout + result.stderr
    assert b"blk: read-only, write refused" in result.stdout
    assert disk.read_bytes() == before


def test_each_disk_and_nic_is_its_own_function(tmp_path, guest_images):
    """The guest writes to the first disk only; the second stays as it was."""
    first, second = _disk(tmp_path / "a.img"), _disk(tmp_path / "b.img")
    result = run_pykvm("run", "blk", "--disk", first, "--disk", second, "--net", f"socket:{tmp_path / 'n.sock'}",
                       "--append", "sectors=64 zero=0")
    assert result.returncode == 0, result.stdout + result.stderr
    assert b"blk: device 00:01.0" in result.stdout
    assert open(first, "rb").read(64 * SECTOR) == blk_pattern(0, 64 * SECTOR, 1)
    assert open(second, "rb").read() == bytes(8 << 20)


@pytest.mark.parametrize("append", ["", "mrg=0 irq=intx", "idle=halt"])
def test_net_echo_over_the_socket_backend(tmp_path, guest_images, append):
    """idle=halt: each wait for a frame halts the vCPU until the interrupt (see guests/README.md)."""
    link = tmp_path / "link.sock"
    vmm = VmmProcess("run", "net-echo", "--net", f"socket:{link}", "--append", append)
    try:
        vmm.wait_for(b"net-echo: ready")
        with FrameSocket(tmp_path / "host.sock", link) as sock:
            peer = Peer(sock)
            assert peer.resolve() == "52:54:00:12:34:56"
            reply = peer.ping(1, b"x" * 1000)
            assert reply.icmp.data == b"x" * 1000 and reply.icmp.checksum_ok
            for size in (1, 512, 1472):
                payload = os.urandom(size)
                assert peer.udp(7, payload) == payload
    finally:
        vmm.kill()


@pytest.mark.parametrize("append", ["", "mrg=0"])
def test_a_frame_too_long_for_the_rx_buffers_is_dropped_and_the_nic_goes_on(tmp_path, guest_images, append):
    """4000 bytes fit neither a whole-frame buffer (mrg=0) nor the mergeable buffers taken for a
    maximal frame: the device drops the frame unseen by the guest (its rx count leaves it out), and
    the frames after it arrive, one spread over three mergeable buffers (1472 bytes) among them."""
    link = tmp_path / "link.sock"
    vmm = VmmProcess("run", "net-echo", "--net", f"socket:{link}", "--append", f"count=2 {append}")
    try:
        vmm.wait_for(b"net-echo: ready")
        with FrameSocket(tmp_path / "host.sock", link) as sock:
            peer = Peer(sock)
            peer.resolve()  # the guest's first frame received: an ARP request
            peer.send_udp(7, b"x" * (4000 - 42))
            assert peer.udp(7, b"after") == b"after"
            big = os.urandom(1472)
            assert peer.udp(7, big) == big
        assert vmm.wait() == 0
        assert "net-echo: done udp=2 " in vmm.output and " rx=3 " in vmm.output, vmm.output
    finally:
        vmm.kill()


def test_an_unknown_idle_mode_is_one_line_and_exit_2(tmp_path, guest_images):
    result = run_pykvm("run", "net-echo", "--net", f"socket:{tmp_path / 'link.sock'}", "--append", "idle=spin")
    assert result.returncode == 2, result.stdout + result.stderr
    assert b"virtio: FAIL idle=spin: expected poll or halt" in result.stdout


def test_two_vmms_on_one_socket_link(tmp_path, guest_images):
    """Each guest's first frame is an ARP request for its gateway; the other answers it."""
    a, b = tmp_path / "a.sock", tmp_path / "b.sock"
    first = VmmProcess("run", "net-echo", "--net", f"socket:{a},peer={b},mac=52:54:00:00:00:0a",
                       "--append", "ip=10.0.2.15/24 gw=10.0.2.16")
    second = VmmProcess("run", "net-echo", "--net", f"socket:{b},peer={a},mac=52:54:00:00:00:0b",
                        "--append", "ip=10.0.2.16/24 gw=10.0.2.15")
    try:
        first.wait_for(b"gateway 10.0.2.16 is at 52:54:00:00:00:0b")
        second.wait_for(b"gateway 10.0.2.15 is at 52:54:00:00:00:0a")
    finally:
        first.kill()
        second.kill()


@needs_netns
def test_net_echo_through_a_real_tap(netns, guest_images):
    """A TAP inside a private namespace, the host side at 10.0.2.2: ping and UDP echo from there."""
    ns = ["ip", "netns", "exec", netns]
    subprocess.run([*ns, "ip", "tuntap", "add", "dev", "tap0", "mode", "tap"], check=True)
    subprocess.run([*ns, "ip", "addr", "add", "10.0.2.2/24", "dev", "tap0"], check=True)
    subprocess.run([*ns, "ip", "link", "set", "tap0", "up"], check=True)
    vmm = subprocess.Popen([*ns, sys.executable, "-m", "pykvm", "run", "net-echo", "--net", "tap:tap0"],
                           cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_line(vmm, b"net-echo: ready")
        ping = subprocess.run([*ns, "ping", "-c", "3", "-i", "0.2", "-W", "5", "10.0.2.15"], capture_output=True, text=True)
        assert ping.returncode == 0 and " 0% packet loss" in ping.stdout, ping.stdout + ping.stderr
        echo = subprocess.run([*ns, sys.executable, "-c", (
            "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5)\n"
            "for n in (1, 100, 1400):\n"
            "    s.sendto(b'u' * n, ('10.0.2.15', 7)); assert s.recv(2000) == b'u' * n\n"
            "print('udp echo ok')")], capture_output=True, text=True)
        assert echo.returncode == 0 and "udp echo ok" in echo.stdout, echo.stderr
    finally:
        vmm.kill()
        vmm.wait()


def _wait_line(proc: subprocess.Popen, marker: bytes) -> None:
    """Read the child's stdout until `marker` (the pipe read blocks; the guest's timeout is its own)."""
    seen = b""
    while marker not in seen:
        chunk = proc.stdout.read1(4096)
        if not chunk:
            raise AssertionError(f"VMM ended before {marker!r}: {seen!r} {proc.stderr.read()!r}")
        seen += chunk


def test_kv_records_survive_a_killed_vmm(tmp_path, guest_images):
    disk = _disk(tmp_path / "kv.img", 4 << 20)
    link = tmp_path / "link.sock"
    acked = {}
    with FrameSocket(tmp_path / "client.sock", link) as sock:
        vmm = VmmProcess("run", "kv", "--disk", disk, "--net", f"socket:{link}")
        try:
            vmm.wait_for(b"kv: ready records=0")
            peer = Peer(sock)
            for seq in range(1, 31):
                value = f"v{seq}-{os.urandom(4).hex()}"
                assert peer.udp(9000, f"put {seq} {value}".encode()) == f"ok {seq}".encode()
                acked[seq] = value
            assert peer.udp(9000, b"put 5 different") == b"err 5 exists"
            assert peer.udp(9000, f"put 5 {acked[5]}".encode()) == b"ok 5"  # a retried put
            vmm.proc.send_signal(signal.SIGKILL)
            vmm.wait()
        finally:
            vmm.kill()
        vmm = VmmProcess("run", "kv", "--disk", disk, "--net", f"socket:{link}")
        try:
            vmm.wait_for(b"kv: ready records=30")
            peer = Peer(sock)
            for seq, value in acked.items():
                assert peer.udp(9000, f"get {seq}".encode()) == f"val {seq} {value}".encode()
            assert peer.udp(9000, b"get 999") == b"none 999"
        finally:
            vmm.kill()


@pytest.mark.parametrize("spec, message", [
    ("bogus", "expected tap:NAME or socket:PATH"),
    ("tap:", "expected tap:NAME or socket:PATH"),
    ("tap:" + "x" * 20, "at most 15 characters"),
    ("socket:/tmp/x.sock,colour=red", "unknown option 'colour=red'"),
    ("socket:/tmp/x.sock,mac=zz:00:00:00:00:00", "is not six hex bytes"),
])
def test_bad_net_spec(spec, message):
    result = run_pykvm("run", "--net", spec)
    assert result.returncode == 2 and result.stderr.decode().count("\n") == 1
    assert message in result.stderr.decode()


def test_missing_disk_file(tmp_path):
    result = run_pykvm("run", "--disk", str(tmp_path / "nope.img"))
    assert result.returncode == 2 and b"no such file" in result.stderr


@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0, reason="needs root and unshare(1)")
def test_tap_without_dev_net_tun(tmp_path):
    """With /dev/net hidden (a private mount namespace), the TAP cannot be created: one clear line."""
    script = f"mount -t tmpfs none /dev/net && cd {REPO} && exec \"$0\" -m pykvm run --net tap:tapx"
    result = run_pykvm(prefix=("unshare", "-m", "sh", "-c", script))
    err = result.stderr.decode()
    assert result.returncode == 2 and err.count("\n") == 1
    assert re.search(r"--net tap:tapx: cannot open /dev/net/tun", err)
