"""The virtio guests (`blk`, `net-echo`, `kv`) against QEMU's virtio-pci devices, the reference
that pykvm's own devices must match: the same images, the same command lines, the same results.

QEMU runs under TCG (fast to start, deterministic here; `PYKVM_QEMU_ACCEL=kvm` to check the guests
under KVM too); the drivers' switches (`irq=`, `event_idx=0`, `indirect=0`, `mrg=0`) are
parametrized where a run is cheap. The network guests
talk to the test over QEMU's `-netdev dgram` on Unix sockets: one raw Ethernet frame per datagram.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import struct
import subprocess
import threading
import time
import zlib
from pathlib import Path

import pytest

from tests.netutil import ARP_REQUEST, FrameSocket, Peer, arp_reply, blk_pattern, icmp_echo, udp_frame

QEMU = shutil.which("qemu-system-x86_64")
pytestmark = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")

GUEST_MAC, GUEST_IP = "52:54:00:12:34:56", "10.0.2.15"
SECTOR = 512
TIMEOUT = 60  # seconds for any one wait on the guest
ACCEL = os.environ.get("PYKVM_QEMU_ACCEL", "tcg")


class Qemu:
    """QEMU running a guest, its serial output (stdout) collected line by line as it comes."""

    def __init__(self, image: Path, append: str, devices: list[str], log: Path, accel: str = ACCEL) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._stderr = log.open("wb")
        self.proc = subprocess.Popen(
            [QEMU, "-accel", accel, "-M", "pc", "-m", "64", "-nodefaults", "-no-reboot", "-display", "none",
             "-serial", "stdio", "-monitor", "none", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x01",
             *devices, "-kernel", str(image), "-append", append],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._stderr)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for raw in self.proc.stdout:
            self._queue.put(raw.decode(errors="replace").rstrip("\r\n"))
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float = TIMEOUT) -> re.Match:
        """The first new line that pattern matches (re.search); fails on a timeout or on exit."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                pytest.fail(f"no line matching {pattern!r} within {timeout} s; output:\n" + "\n".join(self.lines))
            if line is None:
                pytest.fail(f"QEMU exited ({self.proc.wait()}) before a line matching {pattern!r}; output:\n"
                            + "\n".join(self.lines))
            self.lines.append(line)
            if match := re.search(pattern, line):
                return match

    def finish(self, timeout: float = TIMEOUT) -> int:
        """Waits for the exit status, with all output collected."""
        try:
            status = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail("the guest did not exit; output:\n" + "\n".join(self.lines))
        while (line := self._queue.get(timeout=TIMEOUT)) is not None:
            self.lines.append(line)
        return status

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def kill(self) -> None:
        """SIGKILL: a crash, as far as the disk is concerned."""
        self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        self._stderr.close()


def blk_drive(path: Path, *, readonly: bool = False, serial: str = "pykvm-test") -> list[str]:
    return ["-drive", f"if=none,id=d0,file={path},format=raw" + (",readonly=on" if readonly else ""),
            "-device", f"virtio-blk-pci,drive=d0,disable-legacy=on,serial={serial}"]


def net_link(tmp_path: Path) -> tuple[list[str], FrameSocket]:
    """QEMU's end at tmp_path/qemu.sock, the test's (bound now, so no frame is lost) at tmp_path/test.sock."""
    ours, theirs = tmp_path / "test.sock", tmp_path / "qemu.sock"
    link = FrameSocket(ours, theirs)
    return ["-netdev", f"dgram,id=n0,local.type=unix,local.path={theirs},remote.type=unix,remote.path={ours}",
            "-device", f"virtio-net-pci,netdev=n0,disable-legacy=on,mac={GUEST_MAC}"], link


@pytest.fixture
def qemus(tmp_path):
    """Starts QEMUs that are killed at the end of the test."""
    started: list[Qemu] = []

    def start(image: Path, append: str, devices: list[str]) -> Qemu:
        started.append(Qemu(image, append, devices, tmp_path / f"qemu{len(started)}.stderr"))
        return started[-1]

    yield start
    for q in started:
        q.close()


# -- blk --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("append", [
    "",
    "irq=intx",
    "irq=poll event_idx=0 indirect=0",
    "seed=12345 start=100 sectors=3000 zero=7 indirect=0",
])
def test_blk_writes_the_pattern(guest_images, qemus, tmp_path, append):
    params = dict(seed=1, start=0, sectors=2048, zero=64) | {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", append)
                                                             if k in ("seed", "start", "sectors", "zero")}
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"")
    with disk.open("r+b") as f:
        f.truncate(8192 * SECTOR)
    q = qemus(guest_images["blk"], append, blk_drive(disk))
    assert q.finish() == 0, q.output
    assert q.lines[0].startswith("blk: seed=")
    assert "blk: id pykvm-test" in q.lines
    assert q.lines[-1] == f"blk: ok sectors={params['sectors']} capacity=8192", q.output

    data = disk.read_bytes()
    start, end = params["start"] * SECTOR, (params["start"] + params["sectors"]) * SECTOR
    assert data[:start] == bytes(start)
    assert data[start:end] == blk_pattern(start, end - start, params["seed"])
    # The zero range got the pattern, then WRITE_ZEROES and DISCARD (a raw file reads back zeros).
    assert f"blk: write-zeroes {params['zero']} sectors, read back zeros" in q.lines
    assert data[end:] == bytes(len(data) - end)


def test_blk_read_only(guest_images, qemus, tmp_path):
    disk = tmp_path / "disk.img"
    content = blk_pattern(0, 64 * SECTOR, seed=5)
    disk.write_bytes(content)
    q = qemus(guest_images["blk"], "", blk_drive(disk, readonly=True))
    assert q.finish() == 0, q.output
    assert f"blk: sector 0: {content[:16].hex(' ')}" in q.lines, q.output
    assert q.lines[-1] == "blk: read-only, write refused"
    assert disk.read_bytes() == content


def test_blk_bar_above_4g(guest_images, qemus, tmp_path):
    """A 2 GiB BAR in front of it (ivshmem) pushes the firmware's 64-bit BARs above 4 GiB, out of
    the runtime's identity map: the driver maps them itself."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4096 * SECTOR))
    q = qemus(guest_images["blk"], "sectors=512 zero=8",
              ["-object", "memory-backend-ram,id=big,size=2G", "-device", "ivshmem-plain,memdev=big",
               *blk_drive(disk)])
    assert q.finish() == 0, q.output
    common = int(re.search(r"common=(0x[0-9a-f]+)", q.output).group(1), 16)
    assert common >= 1 << 32
    assert q.lines[-1] == "blk: ok sectors=512 capacity=4096"


# -- net-echo ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("append", [
    "",
    "irq=intx",
    "mrg=0",
    "irq=poll event_idx=0 indirect=0 mrg=0",
])
def test_net_echo(guest_images, qemus, tmp_path, append):
    devices, link = net_link(tmp_path)
    peer = Peer(link, GUEST_IP)
    with link:
        q = qemus(guest_images["net-echo"], f"{append} count=4", devices)
        assert q.wait_for(r"^net-echo: ready ").group(0)
        assert q.lines[0] == "net-echo: count=4"
        assert q.lines[-1] == f"net-echo: ready mac={GUEST_MAC} ip={GUEST_IP}/24"

        # It asks for its gateway at start; we are the gateway.
        request = link.expect(lambda f: f.arp is not None and f.arp.op == ARP_REQUEST, TIMEOUT)
        assert (request.src, request.arp.sender_ip, request.arp.target_ip) == (GUEST_MAC, GUEST_IP, peer.ip)
        link.send(arp_reply(peer.mac, peer.ip, GUEST_MAC, GUEST_IP))
        q.wait_for(rf"^net-echo: gateway {peer.ip} is at {peer.mac}$")

        assert peer.resolve() == GUEST_MAC
        for seq, data in enumerate([b"", bytes(range(256)) * 5]):
            reply = peer.ping(seq, data)
            assert reply.icmp.data == data and reply.icmp.checksum_ok and reply.ip.checksum_ok
            assert (reply.dst, reply.ip.dst) == (peer.mac, peer.ip)

        # 1472 bytes fill a 1514-byte frame: three 512-byte receive buffers with MRG_RXBUF.
        for size in (1, 1472):
            payload = bytes(i * 7 % 256 for i in range(size))
            peer.send_udp(7, payload, sport=5000 + size)
            reply = peer.receive_udp(7, 5000 + size)
            assert reply.udp.payload == payload and reply.udp.checksum_ok and reply.ip.checksum_ok
        peer.send_udp(7, b"no checksum", with_checksum=False)
        assert peer.receive_udp(7).udp.payload == b"no checksum"

        # Frames not for it are ignored: only the last datagram is echoed.
        frame = bytearray(udp_frame(peer.mac, GUEST_MAC, peer.ip, GUEST_IP, 40000, 7, b"bad ip checksum"))
        frame[24] ^= 0xFF
        link.send(bytes(frame))
        link.send(udp_frame(peer.mac, "52:54:00:99:99:99", peer.ip, GUEST_IP, 40000, 7, b"other mac"))
        link.send(udp_frame(peer.mac, GUEST_MAC, peer.ip, "10.0.2.99", 40000, 7, b"other ip"))
        link.send(icmp_echo(peer.mac, GUEST_MAC, peer.ip, "10.0.2.99", 1, 1))
        peer.send_udp(7, b"last")
        assert peer.receive_udp(7).udp.payload == b"last"

        assert q.finish() == 0, q.output
        assert re.match(r"net-echo: done udp=4 icmp=2 arp=1 ", q.lines[-1]), q.output


# -- kv ---------------------------------------------------------------------------------------------

class KvServer:
    """The kv guest on a disk and a link, and a peer to send it requests."""

    def __init__(self, start, image: Path, disk: Path, tmp_path: Path, append: str = "") -> None:
        devices, self.link = net_link(tmp_path)
        self.qemu = start(image, append, blk_drive(disk) + devices)
        ready = self.qemu.wait_for(r"^kv: ready records=(\d+) capacity=(\d+)$")
        self.records, self.capacity = int(ready.group(1)), int(ready.group(2))
        self.peer = Peer(self.link, GUEST_IP)

    def ask(self, request: bytes) -> bytes:
        return self.peer.udp(9000, request, timeout=TIMEOUT)

    def stop(self) -> None:
        """Kills QEMU (a crash, for the disk) and frees both socket paths for a restart."""
        self.qemu.kill()
        self.link.close()
        Path(self.link.peer).unlink(missing_ok=True)


def empty_disk(path: Path, sectors: int) -> Path:
    path.write_bytes(bytes(sectors * SECTOR))
    return path


def record_data(seq: int) -> bytes:
    """Assorted data: empty, spaces, binary bytes (anything but a newline), up to 400 bytes."""
    return bytes((seq * 31 + i) % 256 for i in range(seq * 37 % 401)).replace(b"\n", b"N")


@pytest.mark.parametrize("append", ["", "irq=intx mrg=0", "irq=poll event_idx=0 indirect=0"])
def test_kv_survives_a_restart(guest_images, qemus, tmp_path, append):
    disk = empty_disk(tmp_path / "kv.img", 2048)
    kv = KvServer(qemus, guest_images["kv"], disk, tmp_path, append)
    assert (kv.records, kv.capacity) == (0, 2047)
    assert kv.qemu.lines[0].startswith("kv: ")
    assert kv.peer.ping(1).icmp is not None

    seqs = [0, 1, 2, 7, 400, 12345, 2**64 - 1] + list(range(1000, 1030))
    for seq in seqs:
        assert kv.ask(b"put %d " % seq + record_data(seq) + b"\n") == b"ok %d" % seq
    assert kv.ask(b"put 7 " + record_data(7)) == b"ok 7"  # a client's retry
    assert kv.ask(b"put 7 something else") == b"err 7 exists"
    assert kv.ask(b"get 8") == b"none 8"
    assert kv.ask(b"put 9 " + b"x" * 401) == b"err 9 too long"
    for bad in (b"put 9", b"put 9x y", b"get 9 ", b"get", b"del 9", b"put 18446744073709551616 y", b"put 9 a\nb"):
        assert kv.ask(bad) == b"err malformed", bad
    kv.stop()

    kv = KvServer(qemus, guest_images["kv"], disk, tmp_path, append)
    assert kv.records == len(seqs)
    for seq in seqs:
        assert kv.ask(b"get %d\n" % seq) == b"val %d " % seq + record_data(seq)
    assert kv.ask(b"put 8 late") == b"ok 8"
    kv.stop()
    check_layout(disk.read_bytes(), [(seq, record_data(seq)) for seq in seqs] + [(8, b"late")])


def check_layout(data: bytes, records: list[tuple[int, bytes]]) -> None:
    """The documented disk layout (guests/README.md), read back independently."""
    header = data[:SECTOR]
    assert header[:8] == b"PYKVMKV1"
    assert header[16:508] == bytes(492)
    prev_crc = struct.unpack_from("<I", header, 508)[0]
    assert prev_crc == zlib.crc32(header[:508])
    for i, (seq, payload) in enumerate(records, start=1):
        sector = data[i * SECTOR:(i + 1) * SECTOR]
        assert struct.unpack_from("<4sIQI", sector) == (b"KVR1", len(payload), seq, prev_crc)
        assert sector[20:20 + len(payload)] == payload and sector[20 + len(payload):508] == bytes(488 - len(payload))
        prev_crc = struct.unpack_from("<I", sector, 508)[0]
        assert prev_crc == zlib.crc32(sector[:508])
    assert data[(len(records) + 1) * SECTOR:(len(records) + 2) * SECTOR] == bytes(SECTOR)


def test_kv_torn_record_ends_the_log(guest_images, qemus, tmp_path):
    disk = empty_disk(tmp_path / "kv.img", 64)
    kv = KvServer(qemus, guest_images["kv"], disk, tmp_path)
    for seq in range(10):
        assert kv.ask(b"put %d v%d" % (seq, seq)) == b"ok %d" % seq
    kv.stop()

    with disk.open("r+b") as f:  # tear record 6 (sector 7): its checksum no longer matches
        f.seek(7 * SECTOR + 30)
        f.write(b"torn")
    kv = KvServer(qemus, guest_images["kv"], disk, tmp_path)
    assert kv.records == 6
    assert [kv.ask(b"get %d" % seq) for seq in (5, 6, 9)] == [b"val 5 v5", b"none 6", b"none 9"]
    assert kv.ask(b"put 42 after") == b"ok 42"  # goes where the torn record was
    kv.stop()

    kv = KvServer(qemus, guest_images["kv"], disk, tmp_path)
    assert kv.records == 7 and kv.ask(b"get 42") == b"val 42 after"
    kv.stop()


def test_kv_full(guest_images, qemus, tmp_path):
    disk = empty_disk(tmp_path / "kv.img", 8)
    kv = KvServer(qemus, guest_images["kv"], disk, tmp_path)
    assert kv.capacity == 7
    for seq in range(7):
        assert kv.ask(b"put %d x" % seq) == b"ok %d" % seq
    assert kv.ask(b"put 7 x") == b"err 7 full"
    assert kv.ask(b"put 3 x") == b"ok 3"
    kv.stop()


def test_kv_refuses_a_foreign_disk(guest_images, qemus, tmp_path):
    disk = tmp_path / "kv.img"
    disk.write_bytes(b"not a store".ljust(64 * SECTOR, b"\0"))
    devices, link = net_link(tmp_path)
    with link:
        q = qemus(guest_images["kv"], "", blk_drive(disk) + devices)
        assert q.finish() == 3 << 1 | 1
    assert "kv: FAIL sector 0 is neither zeros nor a store header" in q.lines
